"""How much training fits a wall-clock budget: the demo's step timing and thread choice.

The demo sizes each run by time, not steps: it times a few real optimizer steps, then sets
max_steps so the cosine schedule ends when the time does (a run cut off mid-schedule ends at a
high learning rate). Shared by the pretraining demo (demo.py) and its fine-tuning (demo_finetune.py).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import torch

from acornlm.accel import accelerate
from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.train.config import TrainConfig
from acornlm.train.losses import next_token_loss
from acornlm.train.optim import build_optimizer
from acornlm.train.precision import select_device, select_precision


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def step_seconds(model_config: ModelConfig, train_config: TrainConfig, device: str) -> float:
    """Wall-clock seconds of one optimizer step of this model and batch, timed on real steps made
    of the Trainer's own pieces: the accelerated model, its AdamW groups, its loss and precision."""
    dev = select_device(device)
    model = accelerate(Transformer(dataclasses.replace(model_config)).to(dev), dev)
    optimizer = build_optimizer(model, train_config, dev)
    autocast = select_precision(dev, train_config.dtype).autocast
    x = torch.randint(0, model_config.vocab_size, (train_config.batch_size, train_config.seq_len + 1), device=dev)
    batch = (x[:, :-1], x[:, 1:])
    timings = []
    for _ in range(6):  # the first step warms up; the median of the others resists a passing spike of load
        start = time.perf_counter()
        for _ in range(train_config.grad_accum_steps):
            with autocast():
                loss = next_token_loss(model, batch)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return sorted(timings[1:])[len(timings[1:]) // 2]


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
