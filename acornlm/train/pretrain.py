"""The pretraining stage: next-token prediction on prepared token data.

Everything that can be wrong with the inputs (tokenizer/vocabulary mismatch, a context longer
than the model's, an existing run in --out, a changed model on --resume) is checked here,
before any process group, model or optimizer exists. Then the stage hands the generic Trainer
its batches (a TokenLoader per split) and its loss (cross-entropy), nothing more.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch

from acornlm.data.loader import TokenLoader, check_tokenizer, read_meta
from acornlm.data.prepare import TOKENIZER_SUBDIR
from acornlm.errors import CheckpointError, ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import (
    checkpoint_model_config,
    load_model,
    read_checkpoint_config,
    resolve_checkpoint,
)
from acornlm.tokenizer import Tokenizer, load_tokenizer
from acornlm.train import distributed
from acornlm.train.checkpointing import list_checkpoints, read_pointer, remove_abandoned
from acornlm.train.config import TrainConfig
from acornlm.train.losses import next_token_loss
from acornlm.train.parallel import check_parallel_run
from acornlm.train.trainer import Trainer, seed_everything

# The model section a command line starts from: vocab_size 0 = the tokenizer's size.
# num_key_value_heads and head_dim stay 0 ("derive them") until the user's values are in.
DEFAULT_MODEL_FIELDS = {f.name: f.default for f in dataclasses.fields(ModelConfig)} | {"vocab_size": 0}


class PretrainBatches:
    """The Trainer's batch source: the rank's slice of the global batch, and validation batches."""

    def __init__(self, train: TokenLoader, val: TokenLoader, tokens_per_step: int,
                 tokens_per_byte: float | None) -> None:
        self.train = train
        self.val = val
        self.tokens_per_step = tokens_per_step
        self.tokens_per_byte = tokens_per_byte

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train.batch(step, micro_step)

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.val.eval_batch(index)


# --- checks that run before anything is built ---

def resolve_vocab_size(model: ModelConfig, tokenizer: Tokenizer, tokenizer_dir: Path) -> ModelConfig:
    """vocab_size 0 means the tokenizer's size; a smaller vocabulary could not embed every token."""
    if model.vocab_size == 0:
        return dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary of "
            f"{tokenizer.vocab_size} tokens ({tokenizer_dir}); set model.vocab_size to 0 (= the tokenizer's "
            f"size) or to at least {tokenizer.vocab_size}")
    return model


def check_context_length(model: ModelConfig, train: TrainConfig) -> None:
    if train.seq_len > model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={train.seq_len} is longer than model.max_position_embeddings="
            f"{model.max_position_embeddings}: the model has no positions for the extra tokens. "
            f"Lower train.seq_len or raise model.max_position_embeddings (not possible when resuming)")


def changed_model_fields(requested: ModelConfig, saved: ModelConfig) -> list[str]:
    """Fields the command line set to something other than both the default and the checkpoint's value.

    A field left at its default means "whatever the checkpoint has", so `--resume` works
    without repeating the model options; vocab_size 0 likewise means "the tokenizer's size",
    and num_key_value_heads / head_dim equal to what they derive from means "not chosen".
    """
    derived = {"num_key_value_heads": requested.num_attention_heads,
               "head_dim": requested.hidden_size // requested.num_attention_heads}
    changed = []
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        value, before = getattr(requested, name), getattr(saved, name)
        if value == before or value == DEFAULT_MODEL_FIELDS[name] or value == derived.get(name):
            continue
        changed.append(f"model.{name}: checkpoint {before!r}, command line {value!r}")
    return changed


def check_tokenizer_matches(checkpoint: Path, info: dict[str, Any], meta: dict[str, Any], data_dir: Path) -> None:
    """Token ids only mean something with the tokenizer that made them: refuse mixed pairs."""
    saved = (info.get("tokenizer") or {}).get("fingerprint")
    if saved is not None:
        check_tokenizer(meta, saved, data_dir, str(checkpoint))


def read_data(data_dir: Path) -> tuple[dict[str, Any], Tokenizer, Path]:
    """meta.json and the tokenizer of a prepared data directory, checked against each other."""
    meta = read_meta(data_dir)
    tokenizer_dir = data_dir / TOKENIZER_SUBDIR
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer(meta, tokenizer.fingerprint, data_dir, str(tokenizer_dir))
    return meta, tokenizer, tokenizer_dir


# What `resume` may be: True and "auto" both continue the run in the output directory when it has a
# checkpoint and start a fresh run when it has none; False refuses a directory that holds a run.
ResumeMode = bool | Literal["auto"]


def check_resume(resume: object) -> None:
    """ConfigError unless `resume` is True, False or "auto" (e.g. a misspelt string from the Python API)."""
    if not (isinstance(resume, bool) or resume == "auto"):
        raise ConfigError(f"resume must be true, false or \"auto\", got {resume!r}")


def find_resume_checkpoint(out_dir: Path, resume: ResumeMode) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run (refusing to overwrite one).

    With resume=True or "auto" a directory without checkpoints starts fresh, so one command line
    (`--resume auto`) serves the first start and every restart after an interruption.
    """
    check_resume(resume)
    latest = read_pointer(out_dir)
    if not resume:
        if latest is not None or list_checkpoints(out_dir):
            raise ConfigError(
                f"{out_dir} already holds checkpoints of a run; pass --resume to continue it "
                "or choose another --out (nothing was changed)")
        return None
    if latest is None:
        if list_checkpoints(out_dir):
            raise CheckpointError(
                f"{out_dir / 'checkpoints'} holds checkpoints but no `latest` pointer; write the name of the "
                "step-* folder to resume from into checkpoints/latest")
        return None
    return latest


def _tokens_per_byte(meta: dict[str, Any]) -> float | None:
    val = meta.get("val") or {}
    return val["tokens"] / val["bytes"] if val.get("tokens") and val.get("bytes") else None


# --- the stage ---

def saved_model_config(checkpoint: Path, info: dict[str, Any], requested: ModelConfig, option: str) -> ModelConfig:
    """The model a checkpoint holds; model options on the command line may not contradict it."""
    saved = checkpoint_model_config(info, checkpoint / "config.json")
    changed = changed_model_fields(requested, saved)
    if changed:
        raise ConfigError(
            f"{option} continues the model saved in {checkpoint}, but the command line changes it: "
            f"{'; '.join(changed)}. Drop those options, or start a new run with another --out")
    return saved


def run_pretrain(data_dir: str | Path, out_dir: str | Path, model_config: ModelConfig,
                 train_config: TrainConfig, resume: ResumeMode = False, init: str | Path | None = None) -> dict[str, Any]:
    """Pretrain a Transformer on the prepared data in `data_dir`, writing the run to `out_dir`.

    `init` starts a fresh run from a checkpoint's weights instead of random ones (continued
    pretraining, e.g. of a model brought in with `acornlm import hf`); its model and tokenizer are
    kept, so the data must have been prepared with that tokenizer. Optimizer, schedule and step
    count start anew. On --resume the weights come from the run's own checkpoint; resume=True and
    resume="auto" both start fresh when `out_dir` has no checkpoint yet.
    Returns the Trainer's summary (params, tokens seen, tokens/s, MFU, final val loss/bpb, ...).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    meta, tokenizer, tokenizer_dir = read_data(data_dir)
    checkpoint = find_resume_checkpoint(out_dir, resume)
    init_ckpt = resolve_checkpoint(init) if init is not None and checkpoint is None else None
    if checkpoint is not None:
        info = read_checkpoint_config(checkpoint)
        check_tokenizer_matches(checkpoint, info, meta, data_dir)
        model_config = saved_model_config(checkpoint, info, model_config, "--resume")
    elif init_ckpt is not None:
        check_tokenizer(meta, load_tokenizer(init_ckpt).fingerprint, data_dir, str(init_ckpt))
        model_config = saved_model_config(init_ckpt, read_checkpoint_config(init_ckpt), model_config, "--init")
    model_config = resolve_vocab_size(model_config, tokenizer, tokenizer_dir)
    check_context_length(model_config, train_config)
    check_parallel_run(train_config, checkpoint, stage="pretrain")

    context, device = distributed.setup(train_config.device)
    try:
        if resume and checkpoint is None:
            distributed.log(f"--resume {'auto' if resume == 'auto' else 'true'}: no checkpoint in {out_dir} yet, "
                            "starting a fresh run", context)
        if checkpoint is not None:
            distributed.log(f"resuming from {checkpoint}", context)
            if context.is_main and isinstance(info.get("step"), int):
                remove_abandoned(out_dir, info["step"])
            distributed.barrier()
            model, _ = load_model(checkpoint, device="cpu")
        elif init_ckpt is not None:
            distributed.log(f"starting from the weights of {init_ckpt}", context)
            seed_everything(train_config.seed)
            model, _ = load_model(init_ckpt, device="cpu")
        else:
            seed_everything(train_config.seed)  # the same initial weights on every rank and every rerun
            model = Transformer(model_config)
        batches = build_batches(data_dir, meta, train_config, context)
        trainer = Trainer(
            model, train_config, out_dir, batches, next_token_loss, context=context, device=device,
            tokenizer_dir=tokenizer_dir, resume_from=checkpoint,
            checkpoint_info={
                "stage": "pretrain",
                "data": str(data_dir),
                **({"init": str(init_ckpt)} if init_ckpt is not None else {}),
                "tokenizer": {key: meta["tokenizer"][key] for key in ("fingerprint", "kind", "vocab_size")},
            },
        )
        return trainer.fit()
    finally:
        distributed.teardown()


def build_batches(data_dir: Path, meta: dict[str, Any], train: TrainConfig,
                  context: distributed.DistributedContext) -> PretrainBatches:
    """TokenLoaders for both splits; the training one gives this rank its slice of every global batch."""
    train_loader = TokenLoader(data_dir, "train", batch_size=train.batch_size, seq_len=train.seq_len,
                               seed=train.seed, rank=context.rank, world_size=context.world_size,
                               grad_accum_steps=train.grad_accum_steps)
    # Validation batch i is the same on every rank (the Trainer shares the indices out), so the
    # validation set, and the loss, do not depend on the number of processes.
    val_loader = TokenLoader(data_dir, "val", batch_size=train.batch_size, seq_len=train.seq_len,
                             seed=train.seed, rank=0, world_size=1)
    return PretrainBatches(train_loader, val_loader, train_loader.tokens_per_step, _tokens_per_byte(meta))
