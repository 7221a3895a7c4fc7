"""Speed, applied from outside the reference model (the torchtitan pattern).

    model = Transformer(config)                 # the reference: plain nn.Linear, formulas written out
    accelerate(model, mode="train")             # the Trainer does this
    accelerate(model, mode="infer")             # the Engine and acornlm.load do this (also packs weights)

On the CPU, `accelerate` changes the class of the model's modules in place (their parameters,
names and state dicts stay exactly as they are) to ones that run oneDNN products and hand-written
backward passes (acornlm/accel/modules.py), and selects the "acornlm_cpu" attention
(acornlm/accel/onednn_attention.py). On other devices only RMSNorm changes, to PyTorch's fused
`F.rms_norm` (the reference writes the formula out in several operations).
Each kernel gives the reference's logits and gradients within float rounding: tests/test_accel.py.
`deaccelerate(model)` turns a model back into the reference (for tests and benchmarks).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from acornlm.accel.modules import accelerated_class, reference_class
from acornlm.accel.onednn import ONEDNN_AVAILABLE, pack_for_inference
from acornlm.accel.onednn_attention import cpu_attention
from acornlm.errors import ConfigError
from acornlm.model.transformer import ATTENTION_FUNCTIONS, RMSNorm, Transformer, register_attention

CPU_ATTENTION = "acornlm_cpu"
register_attention(CPU_ATTENTION, cpu_attention)
MODES = ("train", "infer")


def accelerate(model: nn.Module, device: torch.device | str | None = None,
               mode: Literal["train", "infer"] = "train") -> nn.Module:
    """Swap in the kernels for `device` (default: the model's) and return `model` (changed in place).

    mode="infer" also packs the linear weights into oneDNN's layout (a second copy of them, for
    ~1.4-2x faster decoding; training stays correct but pays that memory). Calling it again after
    modules were added (e.g. LoRA adapters) accelerates the new ones.
    """
    if mode not in MODES:
        raise ConfigError(f"accelerate: mode must be one of {MODES}, got {mode!r}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    on_cpu = torch.device(device).type == "cpu" and ONEDNN_AVAILABLE
    for module in model.modules():
        if not on_cpu and not isinstance(module, RMSNorm):
            continue
        accelerated = accelerated_class(type(module))
        if accelerated is not None:
            module.__class__ = accelerated
    if on_cpu and isinstance(model, Transformer):
        model.set_attention(CPU_ATTENTION)
    if on_cpu and mode == "infer":
        pack_for_inference(model)
    return model


def deaccelerate(model: nn.Module) -> nn.Module:
    """The reference model again (in place): reference classes, "sdpa" attention, no packed weights."""
    for module in model.modules():
        module.__class__ = reference_class(type(module))
        for attribute in ("packed_weight", "fused_linears"):
            module.__dict__.pop(attribute, None)
    if isinstance(model, Transformer):
        model.set_attention("sdpa")
    return model


__all__ = ["accelerate", "deaccelerate", "ATTENTION_FUNCTIONS", "CPU_ATTENTION"]
