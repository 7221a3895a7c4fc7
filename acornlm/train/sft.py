"""The SFT stage: teach a pretrained model to answer in chats, with the loss on assistant tokens only.

Interface (the CLI `acornlm train sft` calls this; other stages reuse the helpers):

    from acornlm.train.sft import run_sft
    summary = run_sft("chats.jsonl", init="runs/pretrain", out="runs/sft", train_config=TrainConfig(...),
                      lora=LoraConfig(rank=8))   # lora.rank 0 (default) = full fine-tuning

Like pretraining, the stage only prepares things and hands the generic Trainer its batches
(`acornlm.data.sft.SFTBatches`) and its loss (`acornlm.train.losses.assistant_token_loss`); the Trainer does the loop,
checkpoints, metrics and exact resume. With LoRA, only the adapters are trainable (so the
optimizer holds only them) and checkpoints store the frozen base weights plus the adapter files
in the PEFT layout (`acornlm.model.lora.write_lora_checkpoint`).

Every problem with the inputs (no --init, a dataset that cannot be read, a context longer than
the model's, a resumed run with other LoRA settings) is found before any model is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acornlm.data.conversations import load_conversations, split_conversations
from acornlm.data.sft import TRUNCATION, SFTBatches, encode_conversations
from acornlm.errors import ConfigError
from acornlm.model.lora import (
    LoraConfig,
    parameter_counts,
)
from acornlm.paths import as_path_list
from acornlm.train import distributed
from acornlm.train.config import TrainConfig
from acornlm.train.losses import assistant_token_loss
from acornlm.train.stage import ResumeMode, build_policy, resolve_start
from acornlm.train.trainer import Trainer


def run_sft(data: str | Path | Sequence[str | Path], init: str | Path | None, out: str | Path,
            train_config: TrainConfig, lora: LoraConfig | None = None, *, data_format: str = "auto",
            val_data: str | Path | Sequence[str | Path] | None = None, val_fraction: float = 0.05,
            packing: bool = False, truncation: str = "truncate", resume: ResumeMode = False) -> dict[str, Any]:
    """Fine-tune the checkpoint `init` on the chat data in `data`, writing the run to `out`.

    Returns the Trainer's summary plus "data" (what was kept, truncated, dropped) and
    "trainable_params". With `resume`, the run in `out` continues (its model, LoRA settings and
    data position); `init` is then only needed for a fresh run.
    """
    if truncation not in TRUNCATION:
        raise ConfigError(f"--truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    start = resolve_start(init, out, resume, lora, train_config)
    tokenizer = start.tokenizer

    conversations, load_stats = load_conversations(as_path_list(data), data_format)
    if val_data is not None:
        train_chats, (val_chats, _) = conversations, load_conversations(as_path_list(val_data), data_format)
    else:
        train_chats, val_chats = split_conversations(conversations, val_fraction, train_config.seed)
    max_tokens = train_config.seq_len + 1  # a row's last token is only a target
    train_examples, encode_stats = encode_conversations(tokenizer, train_chats, max_tokens, truncation)
    val_examples, _ = encode_conversations(tokenizer, val_chats, max_tokens, truncation)

    context, device = distributed.setup(train_config.device)
    try:
        distributed.log(f"sft data: {load_stats.summary()}", context)
        distributed.log(f"sft data: {encode_stats.summary()}; {len(val_examples):,} held out for validation",
                        context)
        model = build_policy(start, train_config, context, "sft")
        trainable, _ = parameter_counts(model)
        batches = SFTBatches(train_examples, val_examples, batch_size=train_config.batch_size,
                             seed=train_config.seed, row_tokens=max_tokens, packing=packing,
                             pad_id=tokenizer.eot_id, grad_accum_steps=train_config.grad_accum_steps,
                             rank=context.rank, world_size=context.world_size)
        trainer = Trainer(
            model, train_config, start.out_dir, batches, assistant_token_loss, context=context, device=device,
            tokenizer_dir=start.source, resume_from=start.checkpoint, write_model=start.write_model,
            checkpoint_info=start.checkpoint_info("sft", data=[str(path) for path in as_path_list(data)]),
        )
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary["trainable_params"] = trainable
    summary["data"] = {"load": dataclasses.asdict(load_stats), "encode": dataclasses.asdict(encode_stats),
                       "val_examples": len(val_examples), "train_rows": len(batches)}
    return summary
