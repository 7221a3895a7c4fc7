"""The optimizer: AdamW with weight decay on matrices only, or Muon + AdamW (acornlm/train/muon.py)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from acornlm.train.config import TrainConfig
from acornlm.train.muon import MuonWithAdamW, build_muon


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices and embeddings (p.dim() >= 2) decay, norms and biases do not.

    Decaying a norm's gain or a bias only pulls it towards zero without regularising anything
    useful (the GPT-2/nanoGPT convention). A tied embedding/output matrix appears once.
    """
    # parameters() yields a shared (tied) tensor only once
    return decay_groups([param for param in model.parameters() if param.requires_grad], weight_decay)


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """`params` as parameter_groups splits them: those with p.dim() >= 2 decay, the others do not."""
    return [
        {"params": [param for param in params if param.dim() >= 2], "weight_decay": weight_decay},
        {"params": [param for param in params if param.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW (Loshchilov & Hutter 2019, decoupled weight decay), as PyTorch's fused kernel on CUDA and
    the CPU: one pass over each tensor instead of one per arithmetic step (on the 2-core CPU, 14
    instead of 32 ms per step for minimind2-small; benchmarks/README.md).

    With train.optimizer=muon, the blocks' hidden matrices go to Muon and the rest to this AdamW
    (acornlm/train/muon.py). The learning rate set here is only a placeholder: the Trainer writes
    the scheduled value (times the group's `lr_scale`, if it has one) into every group before each step.
    """
    extra = {}
    if device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        extra["fused"] = True
    if config.optimizer == "muon":
        options = {"betas": (config.beta1, config.beta2), "eps": config.adam_eps, **extra}
        return build_muon(model, config, lambda params: decay_groups(params, config.weight_decay), options)
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        eps=config.adam_eps,
        **extra,
    )
