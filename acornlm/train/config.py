"""TrainConfig: every knob of a training run, with its default and meaning (shown by --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from acornlm.errors import ConfigError


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation, checkpointing and logging of a run.

    Args:
        max_steps: Optimizer steps to run (the cosine schedule decays over these).
        max_minutes: Wall-clock budget in minutes of this invocation (a resumed run gets a fresh budget); 0 = none. When reached, the run evaluates, saves and stops cleanly.
        batch_size: Sequences per micro-batch on each process.
        seq_len: Tokens per sequence (the context length trained on).
        grad_accum_steps: Micro-batches accumulated per optimizer step. Global batch = batch_size x grad_accum_steps x world size.
        global_batch_size: Sequences per optimizer step over all processes; 0 = batch_size x grad_accum_steps x world size. When set, grad_accum_steps is derived from it (global_batch_size / (batch_size x world size)), so the same run keeps its global batch on any number of processes; a world size that does not divide it is refused before training.
        learning_rate: Peak learning rate reached after warmup.
        min_lr: Final learning rate at the end of the cosine decay.
        warmup_steps: Steps of linear warmup from 0 to learning_rate.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not norms, biases). With optimizer=muon the Muon matrices are shrunk by the same amount per step (their decay is weight_decay x learning_rate / muon_lr).
        beta1: AdamW first-moment decay.
        beta2: AdamW second-moment decay.
        adam_eps: AdamW epsilon.
        grad_clip: Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged).
        eval_interval: Evaluate validation loss every this many steps (and at the end); 0 = only at the end.
        eval_batches: Micro-batches of validation data per evaluation.
        save_interval: Save a checkpoint every this many steps (and at the end); 0 = only at the end.
        keep_last: Number of most recent step checkpoints to keep (the best one is kept as well).
        log_interval: Append a line to metrics.jsonl every this many steps.
        seed: Seed for python, numpy and torch (and the data order).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto" (bf16 autocast on CUDA when supported, fp16 with a GradScaler otherwise, fp32 on CPU), "float32", "bfloat16" or "float16". Weights and optimizer state stay float32 either way. With float16 a step whose gradients overflow is skipped by the GradScaler and counted in skipped_steps; metrics then log loss_scale.
        compile: Compile the model with torch.compile (pays on GPUs; on a CPU eager fp32 training is as fast or faster, see benchmarks/README.md).
        parallel: How several processes (torchrun) share the work. "ddp": every rank holds the whole model, gradients and optimizer state, and gradients are averaged. "fsdp": FSDP2 shards weights, gradients and optimizer state across ranks (fully_shard per block, then the root; weights gathered in the compute dtype of train.dtype, gradients reduced in float32); needs torchrun with 2 or more processes. Its checkpoints keep one consolidated model.safetensors and write the optimizer state sharded with torch.distributed.checkpoint; they resume on any number of processes, with FSDP or without.
        fsdp_cpu_offload: With parallel=fsdp, keep the sharded weights, gradients and optimizer state in CPU memory and move them to the GPU per block (slower; fits larger models).
        activation_checkpointing: Recompute activations in the backward pass instead of storing them. "none"; "full": keep only each block's input and recompute the whole block; "selective": recompute every second block (blocks 0, 2, 4, ...), keeping the others' activations: about half the activation memory saved for half the extra compute of "full" (minimind2-small, 8 x 512, fp32 on a CPU: activations 2.8 GB -> full 1.0 GB at 0.80x the tokens/s, selective 1.8 GB at 0.90x; benchmarks/activation_checkpointing.py).
        optimizer: "adamw" for every weight, or "muon": Muon (torch.optim.Muon: momentum orthogonalised by Newton-Schulz) for the 2-D matrices inside the blocks (attention and MLP projections), AdamW at learning_rate for the embeddings, norms, biases, output head, MoE routers and stacked experts (as nanochat does).
        muon_lr: Peak learning rate of the Muon-trained matrices (nanochat: 0.02); warmup and cosine decay scale it like learning_rate (its floor is min_lr x muon_lr / learning_rate).
        async_checkpoint: With parallel=fsdp, write the optimizer shards of a checkpoint in the background (torch.distributed.checkpoint.async_save) while training goes on; the checkpoint is renamed into place and `latest` moved once the write has finished (at the next save or the end of training).
        max_bad_steps: Steps in a row that may be skipped for a NaN/inf loss or gradient norm (each is counted in metrics); one more stops the run with an error, leaving the last checkpoint intact.
        tensorboard: Also write TensorBoard event files in the run directory (needs the tensorboard extra).
        wandb: Also log to Weights & Biases in offline mode (needs the wandb extra).
        swanlab: Also log to SwanLab in offline mode, under RUN/swanlog (upload later with `swanlab sync`; needs the swanlab extra).
        progress: Show a progress bar.
    """

    max_steps: int = 1000
    max_minutes: float = 0.0
    batch_size: int = 8
    seq_len: int = 256
    grad_accum_steps: int = 1
    global_batch_size: int = 0
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_batches: int = 20
    save_interval: int = 500
    keep_last: int = 2
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"
    fsdp_cpu_offload: bool = False
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    async_checkpoint: bool = False
    max_bad_steps: int = 5
    tensorboard: bool = False
    wandb: bool = False
    swanlab: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "seq_len", "grad_accum_steps", "eval_batches",
                    "keep_last", "log_interval", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_interval", "save_interval", "global_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(
                f"train.min_lr={self.min_lr} must be between 0 and train.learning_rate={self.learning_rate}")
        choices = {"parallel": ("ddp", "fsdp"), "activation_checkpointing": ("none", "full", "selective"),
                   "optimizer": ("adamw", "muon")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.muon_lr <= 0:
            raise ConfigError(f"train.muon_lr must be > 0, got {self.muon_lr}")
        if self.max_minutes < 0:
            raise ConfigError(f"train.max_minutes must be >= 0, got {self.max_minutes}")


STAGE_DEFAULTS_DIR = Path(__file__).parent / "defaults"


def stage_defaults(stage: str) -> dict[str, Any]:
    """A stage's default settings, acornlm/train/defaults/STAGE.yaml: a `train:` section (TrainConfig
    fields) and one named after the stage (its own config dataclass's fields)."""
    path = STAGE_DEFAULTS_DIR / f"{stage}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the stage's defaults: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise ConfigError(f"{path}: expected a `train:` section")
    return data
