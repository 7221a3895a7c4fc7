"""How much training fits a wall-clock budget: the demo's step timing and thread choice.

The demo sizes each run by time, not steps: it times a few real optimizer steps, then sets
max_steps so the cosine schedule ends when the time does (a run cut off mid-schedule ends at a
high learning rate). Shared by the pretraining demo (demo.py) and its fine-tuning (demo_finetune.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.train.config import TrainConfig
from acornlm.train.losses import next_token_loss
from acornlm.train.metrics import METRICS_FILE, read_metrics
from acornlm.train.trainer import Trainer


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


TIMED_STEPS = 6  # the first warms up; the median of the rest resists a passing spike of load


class RandomBatches:
    """Random token batches for timing: a step costs the same whatever its tokens say."""

    tokens_per_byte = None

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int) -> None:
        self.vocab_size, self.shape = vocab_size, (batch_size, seq_len + 1)
        self.tokens_per_step = batch_size * seq_len

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, self.vocab_size, self.shape,
                               generator=torch.Generator().manual_seed(1009 * step + micro_step))
        return tokens[:, :-1], tokens[:, 1:]

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(10**6 + index, 0)


def step_seconds(model_config: ModelConfig, train_config: TrainConfig, device: str) -> float:
    """Wall-clock seconds of one optimizer step of this model and batch, timed on TIMED_STEPS steps
    of the real Trainer (its accelerated model, AdamW, loss, precision and bookkeeping) in a
    throwaway run directory, so the estimate is what the run itself will see."""
    config = dataclasses.replace(train_config, device=device, max_steps=TIMED_STEPS, max_minutes=0.0,
                                 warmup_steps=1, eval_interval=0, eval_batches=1, save_interval=0,
                                 log_interval=1, progress=False)
    batches = RandomBatches(model_config.vocab_size, config.batch_size, config.seq_len)
    with tempfile.TemporaryDirectory(prefix="acornlm-timing-") as run_dir, \
            contextlib.redirect_stderr(io.StringIO()):  # the timing run's own log lines are not the demo's
        Trainer(Transformer(dataclasses.replace(model_config)), config, run_dir, batches, next_token_loss).fit()
        elapsed = [r["elapsed_s"] for r in read_metrics(Path(run_dir) / METRICS_FILE) if "elapsed_s" in r]
    durations = sorted(b - a for a, b in zip(elapsed, elapsed[1:]))
    return durations[len(durations) // 2]


def estimate_steps(model_config: ModelConfig, train_config: TrainConfig, minutes: float, device: str) -> int:
    """How many optimizer steps fit in `minutes`, from timing a few real training steps.

    The cosine schedule decays over max_steps, so a wall-clock-limited run should end its
    schedule when its time ends instead of being cut off at a high learning rate.
    """
    # evaluation and checkpoints take a share of the budget too
    return max(10, int(minutes * 60 / step_seconds(model_config, train_config, device) * 0.85))


def choose_threads(requested: int, time_step: Callable[[], float]) -> int:
    """Torch threads for the demo: `requested`, or for 0 whichever of PyTorch's default (one per
    core) and a single thread makes `time_step()` faster. A single thread wins when other work keeps
    the cores busy: threads that wait for each other at every operation can run 10x slower."""
    if requested < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = automatic), got {requested}")
    if requested:
        return requested
    default = torch.get_num_threads()
    if default == 1:
        return 1
    timings = {}
    for threads in (default, 1):
        torch.set_num_threads(threads)
        timings[threads] = time_step()
    torch.set_num_threads(default)
    return min(timings, key=timings.get)
