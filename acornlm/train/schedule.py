"""The learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step, so a resumed run gets exactly the learning rate it would have
had without the interruption: nothing about the schedule needs saving.
"""

from __future__ import annotations

import math


def learning_rate_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup then cosine decay (the nanoGPT schedule).

    For the 0-based optimizer step `step`:
        warmup (step < warmup_steps): lr = max_lr * (step + 1) / warmup_steps
        decay:                        lr = min_lr + 0.5 * (1 + cos(pi * ratio)) * (max_lr - min_lr),
                                      ratio = (step - warmup_steps) / (total_steps - warmup_steps)
        past total_steps:             lr = min_lr
    So the peak `max_lr` is reached at `step == warmup_steps` and `min_lr` at `step == total_steps`.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
