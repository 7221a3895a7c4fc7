"""The SFT stage: teach a pretrained model to answer in chats, with the loss on assistant tokens only.

Interface (the CLI `acornlm train sft` calls this; other stages reuse the helpers):

    from acornlm.train.sft import run_sft, assistant_token_loss
    summary = run_sft("chats.jsonl", init="runs/pretrain", out="runs/sft", train_config=TrainConfig(...),
                      lora=LoraConfig(rank=8))   # lora.rank 0 (default) = full fine-tuning

Like pretraining, the stage only prepares things and hands the generic Trainer its batches
(`acornlm.data.sft.SFTBatches`) and its loss (`assistant_token_loss`); the Trainer does the loop,
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from acornlm.data.conversations import Conversation, load_conversations
from acornlm.data.sft import IGNORE_INDEX, TRUNCATION, SFTBatches, encode_conversations
from acornlm.errors import CheckpointError, ConfigError
from acornlm.model import ModelConfig
from acornlm.model.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint, write_model_files
from acornlm.model.lora import (
    LoraConfig,
    apply_lora,
    enable_adapter_training,
    load_adapter,
    parameter_counts,
    write_lora_checkpoint,
)
from acornlm.paths import as_path_list
from acornlm.tokenizer import load_tokenizer
from acornlm.train import distributed
from acornlm.train.checkpointing import remove_abandoned
from acornlm.train.config import TrainConfig
from acornlm.train.pretrain import check_context_length, find_resume_checkpoint
from acornlm.train.trainer import Trainer, seed_everything

VAL_SPLIT_STREAM = 2**31 - 2  # the random stream that picks held-out conversations


def assistant_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Masked next-token cross-entropy: L = -1/|A| * sum_{t in A} log softmax(logits_t)[x_{t+1}],
    A being the positions whose next token is an assistant token (targets != IGNORE_INDEX)."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def split_conversations(conversations: Sequence[Conversation], val_fraction: float,
                        seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a seeded random `val_fraction` of the conversations is held out (at least
    one when val_fraction > 0 and there are two or more)."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(conversations)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    order = np.random.Generator(np.random.PCG64([seed, VAL_SPLIT_STREAM])).permutation(n)
    held_out = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    val = [c for i, c in enumerate(conversations) if i in held_out]
    return train, val


def resolve_lora(requested: LoraConfig, info: dict[str, Any] | None, checkpoint: Path | None) -> LoraConfig:
    """The LoRA settings of the run: the command line's, or on resume the checkpoint's (which must agree)."""
    if checkpoint is None or info is None:
        return requested
    saved = LoraConfig(**info["lora"]) if info.get("lora") else LoraConfig()
    if requested.enabled and requested != saved:
        raise ConfigError(f"--resume continues a run with LoRA {saved.to_dict() if saved.enabled else 'off'}, "
                          f"but the command line asks for {requested.to_dict()}; drop the --lora options "
                          "or start a new run with another --out")
    return saved


def run_sft(data: str | Path | Sequence[str | Path], init: str | Path | None, out: str | Path,
            train_config: TrainConfig, lora: LoraConfig | None = None, *, data_format: str = "auto",
            val_data: str | Path | Sequence[str | Path] | None = None, val_fraction: float = 0.05,
            packing: bool = False, truncation: str = "truncate", resume: bool = False) -> dict[str, Any]:
    """Fine-tune the checkpoint `init` on the chat data in `data`, writing the run to `out`.

    Returns the Trainer's summary plus "data" (what was kept, truncated, dropped) and
    "trainable_params". With `resume`, the run in `out` continues (its model, LoRA settings and
    data position); `init` is then only needed for a fresh run.
    """
    lora = lora or LoraConfig()
    if truncation not in TRUNCATION:
        raise ConfigError(f"--truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    out_dir = Path(out)
    checkpoint = find_resume_checkpoint(out_dir, resume)
    info = read_checkpoint_config(checkpoint) if checkpoint is not None else None
    if checkpoint is None:
        if init is None:
            raise ConfigError("--init is required: the pretrained checkpoint (or run directory) to fine-tune")
        init_ckpt = resolve_checkpoint(init)
    else:
        init_ckpt = Path(info.get("init") or checkpoint)
    source = checkpoint or init_ckpt  # where the weights and tokenizer come from
    source_info = info or read_checkpoint_config(init_ckpt)
    lora = resolve_lora(lora, info, checkpoint)
    try:
        model_config = ModelConfig.from_dict(source_info["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source / 'config.json'}: invalid model section: {exc}") from exc
    check_context_length(model_config, train_config)
    tokenizer = load_tokenizer(source)

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
        if checkpoint is not None:
            distributed.log(f"resuming from {checkpoint}", context)
            if context.is_main and isinstance(info.get("step"), int):
                remove_abandoned(out_dir, info["step"])
            distributed.barrier()
        model, _ = load_model(source, device="cpu")
        if lora.enabled:
            if checkpoint is not None:
                load_adapter(model, checkpoint)
                enable_adapter_training(model)
            else:
                seed_everything(train_config.seed)  # the same adapter initialisation on every rank and rerun
                apply_lora(model, lora)
        trainable, total = parameter_counts(model)
        distributed.log(f"sft: training {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
                        + (f" with LoRA rank {lora.rank}" if lora.enabled else ""), context)
        batches = SFTBatches(train_examples, val_examples, batch_size=train_config.batch_size,
                             seed=train_config.seed, row_tokens=max_tokens, packing=packing,
                             pad_id=tokenizer.eot_id, grad_accum_steps=train_config.grad_accum_steps,
                             rank=context.rank, world_size=context.world_size)
        trainer = Trainer(
            model, train_config, out_dir, batches, assistant_token_loss, context=context, device=device,
            tokenizer_dir=source, resume_from=checkpoint,
            write_model=write_lora_checkpoint if lora.enabled else write_model_files,
            checkpoint_info={
                "stage": "sft",
                "init": str(init_ckpt),
                "lora": lora.to_dict() if lora.enabled else None,
                "data": [str(path) for path in as_path_list(data)],
                "tokenizer": {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind,
                              "vocab_size": tokenizer.vocab_size},
            },
        )
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary["trainable_params"] = trainable
    summary["data"] = {"load": dataclasses.asdict(load_stats), "encode": dataclasses.asdict(encode_stats),
                       "val_examples": len(val_examples), "train_rows": len(batches)}
    return summary
