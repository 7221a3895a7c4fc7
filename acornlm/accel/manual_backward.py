"""RMSNorm and rotary embeddings with hand-written backward passes, for training on the CPU.

Why: on the CPU these memory-bound steps cost what their passes over memory cost. PyTorch's
`F.rms_norm` is a composite of six elementwise ops there, and autograd differentiates each one;
RoPE's `rotate_half` builds its rotated copy with chunk/neg/cat. Written out by hand, RMSNorm's
forward + backward for an [8, 256, 512] activation took 2.8-3.4 instead of 6.8-7.5 ms, and RoPE's
on the queries 1.0-1.3 instead of 2.5-2.8 ms (2-core benchmark machine; benchmarks/README.md). The
formulas are the same as the reference code in acornlm/model/transformer.py, which CUDA, inference
and tracing keep using; tests check both give the same values and gradients.
"""

from __future__ import annotations

import torch

from acornlm.accel import onednn as ops


def use_manual_backward(*tensors: torch.Tensor) -> bool:
    """Gradients wanted, fp32 on the CPU (lower precisions keep PyTorch's upcasting kernels), and not
    traced or compiled (keep standard graphs there)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    first = tensors[0]
    return first.is_cpu and first.dtype == torch.float32 and not ops.is_traced_or_compiled()


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm (Zhang & Sennrich 2019): y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) per row.

    Backward, with n the row length: dw = sum over rows of dy * x * r;
    dx = r * (dy * w) - x * r^3 * mean(dy * w * x). The product dy * x serves both.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        inv_rms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_().div_(rows.shape[1])
        inv_rms.add_(eps).rsqrt_()
        ctx.save_for_backward(rows, weight, inv_rms)
        ctx.shape = x.shape
        return torch.mul(rows, inv_rms).mul_(weight).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight, inv_rms = ctx.saved_tensors
        grad = grad_out.reshape(rows.shape)
        grad_x_rows = grad * rows
        grad_weight = torch.mv(grad_x_rows.t(), inv_rms.view(-1))
        correction = torch.mv(grad_x_rows, weight).unsqueeze(-1)  # sum over the row of dy * w * x
        correction.mul_(inv_rms.pow(3)).div_(rows.shape[1])
        grad_x = (grad * weight).mul_(inv_rms).sub_(rows * correction)
        return grad_x.view(ctx.shape), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1], in three passes and no
    rotated copy."""
    half = x.shape[-1] // 2
    out = torch.mul(x, cos)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


class RotaryFunction(torch.autograd.Function):
    """RoPE (Su et al. 2021): y = x * cos + rotate_half(x) * sin. Rotation is linear, so
    dx = dy * cos + rotate_half^T(dy * sin), and rotate_half^T([u1, u2]) = [u2, -u1]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotary(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad_out.shape[-1] // 2
        grad_x = torch.mul(grad_out, cos)
        grad_x[..., :half].addcmul_(grad_out[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad_out[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


def apply_rotary_manual(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return RotaryFunction.apply(x, cos, sin)
