"""The layer every fine-tuning stage stands on (SFT, DPO, GRPO, distillation).

A stage supplies its data and its loss; the rest is here:

    start = resolve_start(init, out, resume, lora, train_config)   # where the run starts, checked
    model = build_policy(start, train_config, context, "sft")        # the weights to train (+ LoRA)
    reference = load_reference(start)                                # a frozen copy (DPO, GRPO)
    Trainer(model, ..., write_model=start.write_model, checkpoint_info=start.checkpoint_info("sft", ...))
    final_metrics(run_dir, names)                                    # the summary's last values

and the pieces a stage's batches and metrics use: `example_indices` (a pure function of the step,
so a resumed run continues where it stopped) and `MeanMetrics`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acornlm.accel import accelerate
from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import (
    checkpoint_model_config,
    load_model,
    read_checkpoint_config,
    resolve_checkpoint,
    write_model_files,
)
from acornlm.model.lora import (
    LoraConfig,
    apply_lora,
    enable_adapter_training,
    load_adapter,
    load_model_with_adapter,
    merge_lora,
    parameter_counts,
    write_lora_checkpoint,
)
from acornlm.tokenizer import Tokenizer, load_tokenizer
from acornlm.train import distributed
from acornlm.train.checkpointing import remove_abandoned
from acornlm.train.config import TrainConfig
from acornlm.train.metrics import METRICS_FILE, read_metrics
from acornlm.train.parallel import check_parallel_run
from acornlm.train.pretrain import ResumeMode, check_context_length, find_resume_checkpoint
from acornlm.train.trainer import seed_everything


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


def example_indices(num_examples: int, seed: int, step: int, micro_step: int, batch_size: int,
                    rank: int = 0, world_size: int = 1, grad_accum_steps: int = 1) -> list[int]:
    """The examples of this rank's micro-batch, as a pure function of (seed, step, micro_step).

    The data is read in epochs, each in the order of a permutation seeded by (seed, epoch).
    Global position p = step * global batch + (micro_step * world_size + rank) * batch_size + i
    falls in epoch p // N at offset p % N, so a resumed run continues exactly where it stopped
    and one process with accumulation 2 sees the global batch two processes with 1 see.
    """
    global_batch = batch_size * grad_accum_steps * world_size
    first = step * global_batch + (micro_step * world_size + rank) * batch_size
    indices = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, num_examples)
        indices.append(int(epoch_order(num_examples, seed, epoch)[offset]))
    return indices


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_examples)


class MeanMetrics:
    """Running means of a stage's extra numbers (rewards, accuracies) over one step or one evaluation.

    Training and evaluation are kept apart (the loss function sees `model.training`); the
    Trainer collects them through the loss function's `pop_metrics(training)`, evaluation
    numbers prefixed with "val_". They are this rank's numbers (rank 0 logs).
    """

    def __init__(self) -> None:
        self._sums: dict[bool, dict[str, float]] = {True: {}, False: {}}
        self._counts: dict[bool, dict[str, int]] = {True: {}, False: {}}
        self._totals: dict[bool, dict[str, float]] = {True: {}, False: {}}

    def add(self, training: bool, values: dict[str, float | torch.Tensor]) -> None:
        sums, counts = self._sums[training], self._counts[training]
        for name, value in values.items():
            number = value.item() if isinstance(value, torch.Tensor) else float(value)
            sums[name] = sums.get(name, 0.0) + number
            counts[name] = counts.get(name, 0) + 1

    def add_total(self, training: bool, values: dict[str, float | torch.Tensor]) -> None:
        """Numbers that add up instead of averaging (counts of errors)."""
        totals = self._totals[training]
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + (value.item() if isinstance(value, torch.Tensor) else value)

    def pop(self, training: bool) -> dict[str, float]:
        prefix = "" if training else "val_"
        sums, counts, totals = self._sums[training], self._counts[training], self._totals[training]
        result = {prefix + name: sums[name] / counts[name] for name in sums}
        result.update({prefix + name: value for name, value in totals.items()})
        sums.clear()
        counts.clear()
        totals.clear()
        return result


@dataclass
class StageStart:
    """Where a fine-tuning run starts: resolved before any process group or model exists.

    `init` is the starting checkpoint (also the DPO/GRPO reference); `source` is where the
    weights come from now: `init` for a fresh run, the run's latest checkpoint on --resume.
    """

    out_dir: Path
    init: Path
    source: Path
    checkpoint: Path | None  # the checkpoint to resume from
    info: dict[str, Any]     # config.json of `source`
    lora: LoraConfig
    tokenizer: Tokenizer
    model_config: ModelConfig

    @property
    def write_model(self) -> Callable[..., None]:
        return write_lora_checkpoint if self.lora.enabled else write_model_files

    def checkpoint_info(self, stage: str, **extra: Any) -> dict[str, Any]:
        """What config.json records about the run next to the model."""
        tokenizer = self.tokenizer
        return {"stage": stage, "init": str(self.init), "lora": self.lora.to_dict() if self.lora.enabled else None,
                "tokenizer": {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind,
                              "vocab_size": tokenizer.vocab_size}, **extra}


def resolve_start(init: str | Path | None, out: str | Path, resume: ResumeMode, lora: LoraConfig | None,
                  train_config: TrainConfig, stage: str = "sft") -> StageStart:
    """The run's starting point, checked (as `run_sft` does): --init or a run to resume, LoRA
    settings that agree with the resumed run's, a context the model has, a parallel setup `stage`
    can run (acornlm/train/parallel.py; this also derives grad_accum_steps from train.global_batch_size)."""
    out_dir = Path(out)
    lora = lora or LoraConfig()
    checkpoint = find_resume_checkpoint(out_dir, resume)
    resumed_info = read_checkpoint_config(checkpoint) if checkpoint is not None else None
    if checkpoint is None:
        if init is None:
            raise ConfigError("--init is required: the checkpoint (or run directory) to fine-tune, e.g. an SFT run")
        init_ckpt = resolve_checkpoint(init)
    else:
        init_ckpt = Path(resumed_info.get("init") or checkpoint)
    source = checkpoint or init_ckpt
    info = resumed_info or read_checkpoint_config(init_ckpt)
    lora = resolve_lora(lora, resumed_info, checkpoint)
    model_config = checkpoint_model_config(info, source / "config.json")
    check_context_length(model_config, train_config)
    check_parallel_run(train_config, checkpoint, stage=stage, lora=lora.enabled)
    return StageStart(out_dir, init_ckpt, source, checkpoint, info, lora, load_tokenizer(source), model_config)


def build_policy(start: StageStart, train_config: TrainConfig, context: distributed.DistributedContext,
                 stage: str) -> Transformer:
    """The model to train: the source weights, with new or resumed LoRA adapters when asked."""
    if start.checkpoint is not None:
        distributed.log(f"resuming from {start.checkpoint}", context)
        if context.is_main and isinstance(start.info.get("step"), int):
            remove_abandoned(start.out_dir, start.info["step"])
        distributed.barrier()
    # a fresh run starts from --init with its adapter merged; a resumed run's adapter is loaded below
    model = load_model(start.source, device="cpu")[0] if start.checkpoint is not None else load_merged(start.init)
    if start.lora.enabled:
        if start.checkpoint is not None:
            load_adapter(model, start.checkpoint)
            enable_adapter_training(model)
        else:
            seed_everything(train_config.seed)  # the same adapter initialisation on every rank and rerun
            apply_lora(model, start.lora)
    trainable, total = parameter_counts(model)
    distributed.log(f"{stage}: training {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
                    + (f" with LoRA rank {start.lora.rank}" if start.lora.enabled else ""), context)
    return model


def load_reference(start: StageStart) -> Transformer:
    """A frozen copy of the starting model (the reference pi_ref), loaded from --init."""
    return accelerate(load_merged(start.init).eval().requires_grad_(False))


def load_merged(path: Path) -> Transformer:
    """A checkpoint's model with its LoRA adapter (if it has one) merged in, every weight trainable:
    a stage after a LoRA SFT run starts from what SFT learned, not from the base under the adapter."""
    model, _ = load_model_with_adapter(path, device="cpu")
    return merge_lora(model).requires_grad_(True)


def final_metrics(run_dir: Path, names: Sequence[str]) -> dict[str, float]:
    """The last logged value of each metric in `names` (for the summary a stage prints)."""
    found: dict[str, float] = {}
    for record in read_metrics(run_dir / METRICS_FILE):
        found.update({name: record[name] for name in names if record.get(name) is not None})
    return found
