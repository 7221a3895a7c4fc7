"""The model's modules with the CPU kernels in: each class here is mixed into a reference class of
acornlm/model/ by `accelerate`, and overrides only the method whose work it speeds up.

    nn.Linear            -> OneDNNLinear            products on oneDNN (acornlm/accel/onednn.py)
    RMSNorm.forward      -> hand-written backward  (acornlm/accel/manual_backward.py) in CPU training
    CausalSelfAttention  -> q/k/v as one packed product; RoPE with a hand-written backward
    FeedForward          -> gate/up as one packed product
    TopKRouter, StackedExperts (MoE) -> their x W^T on oneDNN

Every override computes the reference formula (tests/test_accel.py compares logits and gradients)
and falls back to it wherever its kernel does not apply (CUDA, bf16 training, tracing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acornlm.accel.manual_backward import apply_rotary_manual, rms_norm, use_manual_backward
from acornlm.accel.onednn import FusableLinears, OneDNNLinear, linear, linears
from acornlm.model.moe import StackedExperts, TopKRouter
from acornlm.model.transformer import CausalSelfAttention, FeedForward, RMSNorm


class FastRMSNorm:
    """RMSNorm: the hand-written backward in fp32 CPU training, else PyTorch's rms_norm kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_manual_backward(x, self.weight):  # CPU training: fewer passes over memory
            return rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class FastAttention(FusableLinears):
    """Attention whose q/k/v projections share one packed weight in inference (see pack_for_inference),
    and whose RoPE has a hand-written backward in CPU training."""

    fusable_linears = ("q_proj", "k_proj", "v_proj")

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj), self.fused_linears)
        return q, k, v

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if use_manual_backward(q, k):
            return apply_rotary_manual(q, cos, sin), apply_rotary_manual(k, cos, sin)
        return super().rotate(q, k, cos, sin)


class FastFeedForward(FusableLinears):
    """SwiGLU whose gate and up projections share one packed weight in inference."""

    fusable_linears = ("gate_proj", "up_proj")

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = linears(x, (self.gate_proj, self.up_proj), self.fused_linears)
        return gate, up


class FastExpertProducts:
    """The MoE router's and experts' x W^T on oneDNN."""

    linear = staticmethod(linear)


# reference class -> the class mixed in front of it
MIXINS: dict[type, type] = {
    RMSNorm: FastRMSNorm,
    CausalSelfAttention: FastAttention,
    FeedForward: FastFeedForward,
    TopKRouter: FastExpertProducts,
    StackedExperts: FastExpertProducts,
}
_ACCELERATED: dict[type, type] = {}  # reference (or user) class -> its accelerated class


def accelerated_class(cls: type) -> type | None:
    """The class a module of class `cls` becomes, or None when nothing applies (or it already is one).

    `nn.Linear` becomes `OneDNNLinear`; a subclass of it (LoRA's layer) keeps its own forward,
    whose super() call then reaches OneDNNLinear's. A reference module gets its mixin in front.
    """
    if cls in _ACCELERATED.values() or issubclass(cls, OneDNNLinear):
        return None
    if cls not in _ACCELERATED:
        if cls is nn.Linear:
            _ACCELERATED[cls] = OneDNNLinear
        elif issubclass(cls, nn.Linear):
            _ACCELERATED[cls] = _named_class(cls.__name__, (cls, OneDNNLinear))
        else:
            mixin = next((m for base, m in MIXINS.items() if issubclass(cls, base)), None)
            if mixin is None:
                return None
            _ACCELERATED[cls] = _named_class(f"Fast{cls.__name__}", (mixin, cls))
    return _ACCELERATED[cls]


def _named_class(name: str, bases: tuple[type, ...]) -> type:
    """A class made at run time, registered under its name in this module so pickling finds it."""
    cls = type(name, bases, {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


def reference_class(cls: type) -> type:
    """The reference class an accelerated class was made from (itself when it is one)."""
    for reference, accelerated in _ACCELERATED.items():
        if accelerated is cls:
            return reference
    return cls
