"""The training loop every stage shares.

A stage (pretraining now; SFT, DPO, LoRA later) hands the Trainer three things:

    model      an acornlm Transformer (float32 weights: the masters the optimizer updates)
    batches    an object with  batch(step, micro_step) -> this rank's micro-batch,
               eval_batch(i) -> validation batch i (the same on every rank: the Trainer shares
               the indices out), tokens_per_step (global, all ranks) and optionally
               tokens_per_byte (of the validation split, for bits per byte)
    loss_fn    loss_fn(model, batch) -> scalar loss, the mean over the micro-batch's tokens; it
               gets the model as wrapped for training (DDP, torch.compile), so it should only
               call it, and `model.training` tells training from evaluation; a loss function
               with a `pop_metrics(training) -> {name: value}` method adds its own numbers
               (DPO reward margins, GRPO rewards) to each metrics line

and the Trainer does the rest: device and precision, seeding, torch.compile, DDP or FSDP
(acornlm/train/parallel.py, sharded checkpoints in acornlm/train/sharded_checkpoint.py), gradient
accumulation, clipping, the learning-rate schedule, evaluation, metrics, checkpoints, the
time budget, a clean stop on SIGINT/SIGTERM (acornlm/train/signals.py) and NaN/inf handling.
Batches must be a pure function of (step, micro_step), so the data position saved in a
checkpoint is just the step and resuming is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from acornlm.accel import accelerate
from acornlm.allocator import keep_freed_memory
from acornlm.errors import AcornError, CheckpointError, ConfigError
from acornlm.model import Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.train.activation_checkpointing import apply_activation_checkpointing
from acornlm.train.checkpointing import (
    capture_rng_state,
    checkpoint_name,
    checkpoints_root,
    load_train_state,
    mark_best,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from acornlm.train.config import TrainConfig
from acornlm.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    broadcast_flag,
    log,
    max_over_ranks,
)
from acornlm.train.gpu_stats import is_cuda, peak_memory, reset_peak_memory, spec_bf16_flops
from acornlm.train.metrics import LOSS_CURVE_FILE, METRICS_FILE, MetricsLog, plot_loss_curve, read_metrics
from acornlm.train.mfu import measure_matmul_peak
from acornlm.train.optim import build_optimizer
from acornlm.train.parallel import LAUNCH_HINT, clip_grad_norm, parallelize
from acornlm.train.precision import Precision, select_device, select_precision
from acornlm.train.schedule import learning_rate_at
from acornlm.train.sharded_checkpoint import (
    ShardedCheckpointer,
    is_sharded_checkpoint,
    load_sharded_optimizer_state,
    restore_rank_rng,
)
from acornlm.train.signals import requested_stop

TRAIN_STATE_VERSION = 1
# An fp16 GradScaler overflow with the loss scale still >= this is routine (see Trainer._count_overflow).
MIN_ROUTINE_LOSS_SCALE = 1.0


class TrainingDivergedError(AcornError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class BatchSource(Protocol):
    """What a stage supplies: deterministic training and evaluation batches."""

    tokens_per_step: int

    def batch(self, step: int, micro_step: int) -> Any: ...  # this rank's slice

    def eval_batch(self, index: int) -> Any: ...  # rank-independent


LossFn = Callable[[nn.Module, Any], torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, or tuple/list/dict of them) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def perplexity(loss: float) -> float:
    """Perplexity = exp(cross-entropy in nats); inf instead of an overflow."""
    return math.exp(loss) if loss < 700 else math.inf


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """Bits per byte = loss / ln 2 * tokens / bytes: comparable across tokenizers."""
    return loss / math.log(2) * tokens_per_byte


@dataclass
class Progress:
    """The counters of a run; saved in train_state.pt and restored on resume."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_bad_steps: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float | None = None
    elapsed_s: float = 0.0


class Trainer:
    """Runs the optimisation of `model` on `batches` with `loss_fn`; see the module docstring.

    Rank 0 alone prints, writes metrics and checkpoints into `run_dir`. `resume_from` is a
    checkpoint directory whose weights the caller already loaded into `model`; the Trainer
    restores the optimizer, scaler, counters and RNG states from its train_state.pt.
    `write_model(directory, model, info=, tokenizer_dir=)` writes the model files of each
    checkpoint (default: the whole model; LoRA stages pass `lora.write_lora_checkpoint`).
    """

    def __init__(self, model: Transformer, config: TrainConfig, run_dir: str | Path,
                 batches: BatchSource, loss_fn: LossFn, *,
                 context: DistributedContext | None = None, device: torch.device | None = None,
                 tokenizer_dir: str | Path | None = None, checkpoint_info: dict[str, Any] | None = None,
                 resume_from: str | Path | None = None,
                 write_model: Callable[..., None] = write_model_files) -> None:
        keep_freed_memory()  # ~13% faster CPU steps: no re-mapping of freed activations (acornlm/allocator.py)
        self.config = config
        self.run_dir = Path(run_dir)
        self.batches = batches
        self.loss_fn = loss_fn
        self.context = context or DistributedContext()
        self.device = device or select_device(config.device, self.context.local_rank)
        self.precision: Precision = select_precision(self.device, config.dtype)
        self.tokenizer_dir = tokenizer_dir
        self.checkpoint_info = checkpoint_info or {}
        self.write_model = write_model  # how checkpoints write the model (LoRA: base weights + adapter)
        self.progress = Progress()
        self.last_checkpoint: Path | None = None
        self.last_aux_loss: float | None = None  # MoE load-balancing loss of the latest step

        seed_everything(config.seed + self.context.rank)
        # float32 masters: autocast lowers the precision of the arithmetic, never of the weights.
        self.raw_model = accelerate(model.to(device=self.device, dtype=torch.float32), self.device, mode="train")
        apply_activation_checkpointing(self.raw_model, config.activation_checkpointing)  # before compile/DDP/FSDP
        if config.parallel == "fsdp" and not self.context.is_distributed:
            raise ConfigError(f"train.parallel=fsdp needs a process group of 2 or more processes: {LAUNCH_HINT}")
        # FSDP: sharded checkpoints (acornlm/train/sharded_checkpoint.py), set up before the model is sharded
        self.sharded_checkpointer = (ShardedCheckpointer(self.raw_model, self.context, self.device,
                                                         config.async_checkpoint)
                                     if config.parallel == "fsdp" else None)
        # DDP wraps, FSDP shards raw_model in place (acornlm/train/parallel.py); raw_model is what the optimizer steps
        self.train_model, self.eval_model = parallelize(self.raw_model, config, self.context, self.device,
                                                        self.precision)
        self.optimizer = build_optimizer(self.raw_model, config, self.device)
        self.scaler = self.precision.grad_scaler()
        self.resumed = resume_from is not None
        if resume_from is not None:
            self._restore(Path(resume_from))

    # --- one optimizer step ---

    def _train_step(self, step: int) -> tuple[float, float, bool]:
        """Accumulate gradients over the micro-batches, clip, and step unless something is non-finite.

        Returns (mean loss over all micro-batches and ranks, gradient norm before clipping, skipped).
        A mixture-of-experts model's load-balancing loss, model.router_aux_loss_coef × aux, joins the
        loss that is differentiated; the returned loss stays the stage's own, and the mean aux loss
        goes to `self.last_aux_loss` (None for dense models).
        """
        config = self.config
        accum = config.grad_accum_steps
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        aux_sum, aux_coef = None, getattr(self.raw_model.config, "router_aux_loss_coef", 0.0)
        for micro_step in range(accum):
            batch = move_to_device(self.batches.batch(step, micro_step), self.device)
            # DDP all-reduces gradients on every backward; only the last micro-step needs it.
            last = micro_step == accum - 1
            no_sync = isinstance(self.train_model, DistributedDataParallel) and not last
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self.loss_fn(self.train_model, batch)
                aux = self.raw_model.aux_loss()
                self.raw_model.clear_aux_loss()
                total = loss if aux is None else loss + aux_coef * aux
                scaled = total / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float()
            if aux is not None:
                aux_sum = aux.detach().float() + (0.0 if aux_sum is None else aux_sum)
        mean_loss = all_reduce_mean(loss_sum / accum).item()
        self.last_aux_loss = None if aux_sum is None else all_reduce_mean(aux_sum / accum).item()

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.raw_model.parameters(), max_norm)  # DTensor shards under FSDP
        # With a GradScaler an inf gradient is routine (it lowers the scale and skips by itself);
        # otherwise a non-finite loss or norm would poison the weights, so the step is skipped.
        bad = not math.isfinite(mean_loss) or (self.scaler is None and not math.isfinite(grad_norm))
        bad = any_rank(bad, self.device)  # every rank must take the same decision
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            if not bad:
                self.scaler.step(self.optimizer)  # skips optimizer.step() itself if a gradient is inf/NaN
            self.scaler.update()  # such an overflow halves the scale; growth_interval clean steps double it
            if not bad and self.scaler.get_scale() < scale_before:
                bad = self._count_overflow(scale_before)
        elif not bad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm, bad

    def _count_overflow(self, scale_before: float) -> bool:
        """Count a step the fp16 GradScaler skipped (a gradient overflowed; it halved the loss scale).

        While the scale stays >= MIN_ROUTINE_LOSS_SCALE this is routine: the scaler is still finding
        the largest scale whose gradients fit fp16 (from its initial 65536 the first steps of a run
        often overflow several times in a row, and every growth_interval steps it tries a doubled
        scale), so the step counts in skipped_steps but not towards train.max_bad_steps. Below that,
        the unscaled gradients themselves overflow fp16's range (65504): the run is diverging, and
        the step is returned as bad, for _count_bad_step to count like a NaN loss.
        """
        scale = self.scaler.get_scale()
        if scale < MIN_ROUTINE_LOSS_SCALE:
            return True
        self.progress.skipped_steps += 1
        log(f"step {self.progress.step + 1}: fp16 gradient overflow, optimizer step skipped; "
            f"loss scale {scale_before:g} -> {scale:g}", self.context)
        return False

    def _count_bad_step(self, bad: bool) -> None:
        progress = self.progress
        if not bad:
            progress.consecutive_bad_steps = 0
            return
        progress.skipped_steps += 1
        progress.consecutive_bad_steps += 1
        log(f"step {progress.step}: non-finite loss or gradient norm, optimizer step skipped "
            f"({progress.consecutive_bad_steps} in a row)", self.context)

    def _check_divergence(self) -> None:
        progress = self.progress
        if progress.consecutive_bad_steps <= self.config.max_bad_steps:
            return
        if self.last_checkpoint is not None:
            kept = f"The last good checkpoint {self.last_checkpoint} is intact"
        else:
            kept = "No checkpoint had been saved yet"
        raise TrainingDivergedError(
            f"{progress.consecutive_bad_steps} steps in a row had a non-finite loss or gradient norm "
            f"(more than train.max_bad_steps={self.config.max_bad_steps}); stopped at step {progress.step}. "
            f"{kept}. Lower train.learning_rate, raise train.warmup_steps or set train.grad_clip, "
            "then resume with --resume.")

    # --- evaluation ---

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over train.eval_batches batches, with perplexity and bits per byte.

        The ranks share out the batch indices and sum their losses, so the validation set,
        and hence the number, is the same whatever the world size.
        """
        self.eval_model.eval()
        indices = range(self.context.rank, self.config.eval_batches, self.context.world_size)
        total = torch.zeros((), device=self.device)
        # Under FSDP every forward pass is a collective (it all-gathers the weights), so every rank runs
        # as many as the busiest one; the extra passes (on batch 0) are not counted.
        passes = math.ceil(self.config.eval_batches / self.context.world_size) if self.sharded_checkpointer \
            else len(indices)
        for i in range(passes):
            batch = move_to_device(self.batches.eval_batch(indices[i] if i < len(indices) else 0), self.device)
            with self.precision.autocast():
                loss = self.loss_fn(self.eval_model, batch).detach().float()
            if i < len(indices):
                total += loss
        self.eval_model.train()
        count = torch.tensor(float(len(indices)), device=self.device)
        total, count = all_reduce_sum(torch.stack([total, count]))
        val_loss = (total / count).item()
        result = {"val_loss": val_loss, "val_ppl": perplexity(val_loss), **self._stage_metrics(training=False)}
        tokens_per_byte = getattr(self.batches, "tokens_per_byte", None)
        if tokens_per_byte:
            result["val_bpb"] = bits_per_byte(val_loss, tokens_per_byte)
        return result

    # --- checkpoints ---

    def _train_state(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resume needs (tensors and plain values only)."""
        return {
            "version": TRAIN_STATE_VERSION,
            **dataclasses.asdict(self.progress),
            "data_position": self.progress.step,  # batches are a pure function of the step
            "world_size": self.context.world_size,
            "parallel": self.config.parallel if self.context.is_distributed else "none",
            "optimizer": None if self.sharded_checkpointer else self.optimizer.state_dict(),  # FSDP: DCP shards
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
        }

    def _checkpoint_info(self, val_loss: float | None) -> dict[str, Any]:
        """The run information stored next to the model in config.json."""
        return {
            **self.checkpoint_info,
            "step": self.progress.step,
            "tokens_seen": self.progress.tokens_seen,
            "val_loss": val_loss,
            "train": dataclasses.asdict(self.config),
        }

    def save(self, val_loss: float | None) -> Path:
        """Save a checkpoint on rank 0 (all ranks call this and learn whether it worked)."""
        is_best = val_loss is not None and math.isfinite(val_loss) and val_loss < self.progress.best_val_loss
        if is_best:
            self.progress.best_val_loss = val_loss
        if self.sharded_checkpointer is not None:  # FSDP: every rank writes its shards
            self.last_checkpoint = self.sharded_checkpointer.save(
                self.run_dir, self.progress.step, self.raw_model, self.optimizer, self._train_state(),
                self._checkpoint_info(val_loss), self.tokenizer_dir, self.write_model, is_best, self.config.keep_last)
            return self.last_checkpoint
        path = checkpoints_root(self.run_dir) / checkpoint_name(self.progress.step)
        error: CheckpointError | None = None
        if self.context.is_main:
            try:
                save_checkpoint(self.run_dir, self.progress.step, self.raw_model, self._train_state(),
                                self._checkpoint_info(val_loss), self.tokenizer_dir, self.write_model)
                if is_best:
                    mark_best(self.run_dir, path)
                prune_checkpoints(self.run_dir, self.config.keep_last)
            except CheckpointError as exc:
                error = exc
            except OSError as exc:
                error = CheckpointError(f"saved {path}, but updating the `best` pointer or pruning failed: {exc}")
        saved = broadcast_flag(error is None, self.device)
        if error is not None:
            raise error
        if not saved:
            raise CheckpointError("rank 0 could not save a checkpoint; its error message says why")
        self.last_checkpoint = path
        return path

    def finish_saving(self) -> None:
        """Wait for a checkpoint still being written in the background (train.async_checkpoint) and commit it."""
        if self.sharded_checkpointer is not None:
            self.sharded_checkpointer.wait()

    def _restore_optimizer(self, checkpoint: Path, saved: dict[str, Any] | None) -> None:
        """Load the optimizer state of any checkpoint layout into this run's (sharded or not) optimizer."""
        if is_sharded_checkpoint(checkpoint):  # written by FSDP: DCP reshards it to this run
            load_sharded_optimizer_state(checkpoint, self.raw_model, self.optimizer)
        elif self.sharded_checkpointer is not None:  # a DDP / single-process state into FSDP
            self.sharded_checkpointer.load_unsharded_optimizer_state(
                saved, self.raw_model, self.optimizer, lambda model: build_optimizer(model, self.config, self.device))
        else:
            self.optimizer.load_state_dict(saved)

    def _restore(self, checkpoint: Path) -> None:
        state = load_train_state(checkpoint)
        try:
            self._restore_optimizer(checkpoint, state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            for field in dataclasses.fields(Progress):
                setattr(self.progress, field.name, state[field.name])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"{checkpoint}/train_state.pt does not fit this run ({exc}); "
                "resume with the model it was trained with, or start a new --out") from exc
        # An FSDP checkpoint of the same world size has every rank's generators; otherwise only rank 0's
        # are saved, and the other ranks get a fresh seed per (rank, step).
        if not restore_rank_rng(checkpoint, self.context.rank, self.context.world_size, state["world_size"]):
            if self.context.is_main:
                restore_rng_state(state["rng"])
            else:
                seed_everything(self.config.seed + self.context.rank + 1_000_003 * self.progress.step)
        self.last_checkpoint = checkpoint
        if state["world_size"] != self.context.world_size:
            log(f"resuming a {state['world_size']}-process run on {self.context.world_size}: the global step "
                "and tokens seen carry on; the global batch now has the new size", self.context)

    # --- the loop ---

    def _peak_flops(self) -> float:
        """One device's peak FLOP/s for MFU: a known GPU's dense bf16 spec peak (acornlm/train/gpu_stats.py),
        else the measured matmul peak, measured without disturbing the seeded random generators."""
        if is_cuda(self.device):
            spec = spec_bf16_flops(self.device)
            if spec is not None:
                return spec
        size = 4096 if self.device.type == "cuda" else 1024
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            compute = self.precision.compute_dtype or torch.float32
            return measure_matmul_peak(str(self.device), compute, size=size)

    def _is_due(self, interval: int) -> bool:
        return interval > 0 and self.progress.step % interval == 0

    def _agreed_stop_signal(self) -> signal.Signals | None:
        """The signal that stops the run (acornlm/train/signals.py), the same on every rank; None: go on.

        Each rank offers the number of the signal it caught (0: none) and all take the largest.
        torchrun forwards a signal to every worker, but not at the same instant, and a signal sent
        to one rank alone must stop the others too, or they would wait for it in the next collective.
        """
        caught = requested_stop()
        number = max_over_ranks(int(caught) if caught is not None else 0, self.device)
        return signal.Signals(number) if number else None

    def _stop_for_signal(self, received: signal.Signals, saved_step: int) -> None:
        """Save the step just finished (unless it is on disk already) and say how to continue.

        No extra evaluation: the grace period after SIGTERM is short (2 min on a reclaimed spot
        instance, 30 s under torchrun unless --shutdown-timeout says otherwise), and an extra
        validation loss would make the resumed run differ from an uninterrupted one (one more
        metrics line, a `best` pointer that could move). For the same reason the checkpoint is
        saved without a validation loss.
        """
        step = self.progress.step
        if step != saved_step:
            self.save(None)
        where = (f"checkpoint {self.last_checkpoint}" if self.last_checkpoint is not None
                 else "no checkpoint (no step was trained yet)")
        log(f"stopped by {received.name} at step {step}; {where}; continue with --resume auto", self.context)

    def fit(self) -> dict[str, Any]:
        """Train until train.max_steps (or the time budget, or a stop signal); returns a summary of the run.

        Under acornlm.train.signals.StopOnSignal, a SIGINT or SIGTERM ends the run between two steps
        with a checkpoint; the summary's `stopped_by_signal` then names the signal ("SIGTERM").
        """
        config, progress = self.config, self.progress
        metrics = None
        if self.context.is_main:
            metrics = MetricsLog(self.run_dir, progress.step if self.resumed else None, config.tensorboard,
                                 config.wandb, {"train": dataclasses.asdict(config), **self.checkpoint_info},
                                 swanlab=config.swanlab)
        meter = Throughput(self.raw_model.flops_per_token(config.seq_len),
                           self._peak_flops() * self.context.world_size, progress.elapsed_s, device=self.device)
        stopped_early = False
        stopped_by: signal.Signals | None = None  # SIGINT/SIGTERM under acornlm.train.signals.StopOnSignal
        saved_step = progress.step  # on disk already: the resumed checkpoint (a fresh run has nothing at 0)
        bar = tqdm(total=config.max_steps, initial=progress.step, unit="step", dynamic_ncols=True,
                   disable=not (config.progress and self.context.is_main), desc="train")
        try:
            if progress.step >= config.max_steps:
                log(f"already at step {progress.step} (train.max_steps={config.max_steps}); "
                    "raise --train.max_steps to train longer", self.context)
            while progress.step < config.max_steps:
                stopped_by = self._agreed_stop_signal()  # checked between steps: a stop finishes the step
                if stopped_by is not None:
                    self._stop_for_signal(stopped_by, saved_step)
                    break
                record, ends_run, out_of_time = self._step_and_record(meter)
                timing = meter.window_stats()
                if metrics is not None and (self._is_due(config.log_interval) or "val_loss" in record or ends_run):
                    metrics.write(record | timing)
                    meter.reset_window()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{timing['tokens_per_s']:,.0f}", mfu=f"{timing['mfu']:.1%}", refresh=False)
                self._check_divergence()
                if self._is_due(config.save_interval) or ends_run:
                    self.save(record.get("val_loss"))
                    saved_step = progress.step
                if out_of_time and progress.step < config.max_steps:
                    stopped_early = True
                    log(f"time budget of train.max_minutes={config.max_minutes} reached at step "
                        f"{progress.step}; evaluated and saved", self.context)
                    break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        self.finish_saving()  # an async checkpoint is renamed into place only once fully written
        if self.context.is_main:
            plot_loss_curve(read_metrics(self.run_dir / METRICS_FILE), self.run_dir / LOSS_CURVE_FILE)
        return self._summary(meter, stopped_early) | {"stopped_by_signal": stopped_by.name if stopped_by else None}

    def _step_and_record(self, meter: Throughput) -> tuple[dict[str, Any], bool, bool]:
        """One optimizer step at the scheduled learning rate, plus evaluation when it is due.

        Returns the step's metrics record, whether the run ends after this step (last step,
        time up, or diverged), and whether the time budget ran out (rank 0's clock decides).
        """
        config, progress = self.config, self.progress
        lr = learning_rate_at(progress.step, config.learning_rate, config.min_lr, config.warmup_steps,
                              config.max_steps)
        for group in self.optimizer.param_groups:  # Muon's matrices peak at train.muon_lr: lr_scale
            group["lr"] = lr * group.get("lr_scale", 1.0)
        started = time.perf_counter()
        loss, grad_norm, bad = self._train_step(progress.step)
        meter.add(self.batches.tokens_per_step, time.perf_counter() - started)
        progress.step += 1
        progress.tokens_seen += self.batches.tokens_per_step
        progress.elapsed_s = meter.elapsed_s()
        self._count_bad_step(bad)

        out_of_time = config.max_minutes > 0 and meter.run_wall_s() >= config.max_minutes * 60
        out_of_time = broadcast_flag(out_of_time, self.device)
        last = progress.step >= config.max_steps or out_of_time
        diverged = progress.consecutive_bad_steps > config.max_bad_steps
        record: dict[str, Any] = {
            "step": progress.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_seen": progress.tokens_seen, "skipped_steps": progress.skipped_steps,
            **self._stage_metrics(training=True),
        }
        if self.last_aux_loss is not None:  # MoE load balance: 1 = perfectly even, E = one expert takes all
            record["aux_loss"] = self.last_aux_loss
        if self.scaler is not None:  # fp16: the GradScaler's loss scale after this step
            record["loss_scale"] = self.scaler.get_scale()
        if not diverged and (self._is_due(config.eval_interval) or last):
            record.update(self.evaluate())
            progress.last_val_loss = record["val_loss"]
        return record, last or diverged, out_of_time

    def _stage_metrics(self, training: bool) -> dict[str, float]:
        """The stage's own numbers since the last call, when its loss function keeps any."""
        pop_metrics = getattr(self.loss_fn, "pop_metrics", None)
        return pop_metrics(training) if pop_metrics is not None else {}

    def _summary(self, meter: Throughput, stopped_early: bool) -> dict[str, Any]:
        progress = self.progress
        val_loss = progress.last_val_loss
        tokens_per_byte = getattr(self.batches, "tokens_per_byte", None)
        return {
            "params": self.raw_model.num_params(),
            "steps": progress.step,
            "tokens_seen": progress.tokens_seen,
            "tokens_per_s": meter.run_tokens_per_s(),
            "mfu": meter.run_mfu(),
            "val_loss": val_loss,
            "val_ppl": perplexity(val_loss) if val_loss is not None else None,
            "val_bpb": bits_per_byte(val_loss, tokens_per_byte) if val_loss is not None and tokens_per_byte
            else None,
            "skipped_steps": progress.skipped_steps,
            "wall_time_s": meter.run_wall_s(),
            "stopped_early": stopped_early,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "run_dir": str(self.run_dir),
            "rank": self.context.rank,
        }


class Throughput:
    """Tokens per second and MFU, over the current logging window and over this invocation.

    Only the time spent in training steps counts, not evaluation or checkpoint saving.
    MFU (PaLM appendix B) = flops_per_token x tokens/s / peak FLOP/s of all devices.
    On a CUDA `device` a window also reports this rank's peak GPU memory (acornlm/train/gpu_stats.py).
    """

    def __init__(self, flops_per_token: float, peak_flops: float, elapsed_before_s: float,
                 device: torch.device | None = None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.elapsed_before_s = elapsed_before_s  # earlier invocations of a resumed run
        self.started = time.perf_counter()
        self.run_tokens, self.run_time = 0, 0.0
        self.window_tokens, self.window_time = 0, 0.0
        self.cuda_device = device if is_cuda(device) else None
        if self.cuda_device is not None:
            reset_peak_memory(self.cuda_device)

    def add(self, tokens: int, seconds: float) -> None:
        self.run_tokens += tokens
        self.run_time += seconds
        self.window_tokens += tokens
        self.window_time += seconds

    def reset_window(self) -> None:
        self.window_tokens, self.window_time = 0, 0.0
        if self.cuda_device is not None:
            reset_peak_memory(self.cuda_device)

    def tokens_per_s(self) -> float:
        return self.window_tokens / self.window_time if self.window_time else 0.0

    def mfu(self) -> float:
        return self.flops_per_token * self.tokens_per_s() / self.peak_flops

    def run_tokens_per_s(self) -> float:
        return self.run_tokens / self.run_time if self.run_time else 0.0

    def run_mfu(self) -> float:
        return self.flops_per_token * self.run_tokens_per_s() / self.peak_flops

    def run_wall_s(self) -> float:
        return time.perf_counter() - self.started

    def elapsed_s(self) -> float:
        return self.elapsed_before_s + self.run_wall_s()

    def window_stats(self) -> dict[str, float]:
        """The timing fields of a metrics line (the ones a resumed run cannot reproduce), and on a GPU
        the window's peak memory."""
        stats = {"tokens_per_s": self.tokens_per_s(), "mfu": self.mfu(), "elapsed_s": self.elapsed_s()}
        if self.cuda_device is not None:
            stats |= peak_memory(self.cuda_device)
        return stats
