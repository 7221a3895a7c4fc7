"""Fast building blocks for the CPU: a Linear layer whose matrix multiplies run on oneDNN.

Why: PyTorch multiplies fp32 matrices on the CPU with Intel MKL. On CPUs that MKL does not
treat as Intel (AMD EPYC/Ryzen), MKL takes a generic code path without AVX-512, while oneDNN
(also bundled with PyTorch, which uses it for bf16) detects the instruction set itself. On the
2-core AMD EPYC this project is benchmarked on, oneDNN runs the model's fp32 matmuls about 2x
faster in training and the one-token products of decoding about 1.6x faster (numbers in
benchmarks/README.md). The results are the same fp32 products summed in a different order
(differences ~1e-6 relative).

`Linear` is a drop-in `nn.Linear` (same parameters, names, init, `isinstance` checks), so
checkpoints, weight tying and code that wraps linear layers keep working. It uses oneDNN only
for fp32 tensors on the CPU and plain `F.linear` everywhere else (CUDA, bf16, a PyTorch built
without oneDNN); set `acornlm.model.ops.USE_ONEDNN = False` to turn it off.

The product is registered as a PyTorch custom op (`acornlm::onednn_linear`) with its own
backward, so autograd and torch.compile both see one opaque, differentiable operation.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

USE_ONEDNN = True

ONEDNN_AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                    and hasattr(torch.library, "custom_op"))


def onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias for a 2-D `x` on oneDNN. A transposed (strided) weight needs no copy;
    a strided `x` is copied to contiguous first."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """[..., features] -> [tokens, features] (a view when x is contiguous)."""
    return x.reshape(-1, x.shape[-1])


def weight_gradient_rows(grad_rows: torch.Tensor, input_rows: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x: a sum over the rows (tokens) of both operands.

    oneDNN wants its first operand contiguous, and either order of the product has a transposed
    first operand, which costs a copy: so copy the narrower of the two. dW = (x^T dy)^T when
    the layer widens (more outputs than inputs: up/gate projections, the output head).
    """
    if grad_rows.shape[1] <= input_rows.shape[1]:
        return onednn_matmul(grad_rows.t(), input_rows.t())
    return onednn_matmul(input_rows.t(), grad_rows.t()).t().contiguous()


if ONEDNN_AVAILABLE:
    @torch.library.custom_op("acornlm::onednn_linear", mutates_args=())
    def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T + b on oneDNN, for x of any leading shape."""
        return onednn_matmul(rows_of(x), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @onednn_linear.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("acornlm::onednn_weight_gradient", mutates_args=())
    def onednn_weight_gradient(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return weight_gradient_rows(rows_of(grad_out), rows_of(x))

    @onednn_weight_gradient.register_fake
    def _(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return grad_out.new_empty(grad_out.shape[-1], x.shape[-1])

    def _setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def _backward(ctx, grad_out: torch.Tensor):
        """The chain rule of y = x W^T + b: dx = dy W, dW = dy^T x, db = sum of dy over tokens."""
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad_out, weight.t(), None)
        if ctx.needs_input_grad[1]:
            grad_weight = onednn_weight_gradient(grad_out, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows_of(grad_out).sum(0)
        return grad_x, grad_weight, grad_bias

    onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def dynamo_loaded() -> bool:
    """torch.compile / torch.export import torch._dynamo; asking torch.compiler whether it is
    compiling would import it too (~2.5 s on first use), so ask only when it is loaded already."""
    return "torch._dynamo" in sys.modules


def is_exporting() -> bool:
    """Tracing for ONNX/TorchScript/torch.export: keep the graph made of standard ops only."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return dynamo_loaded() and getattr(torch.compiler, "is_exporting", lambda: False)()


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (USE_ONEDNN and ONEDNN_AVAILABLE and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and x.numel() > 0 and not is_exporting())


class EagerOneDNNLinear(torch.autograd.Function):
    """The same product and chain rule as the custom op, for eager training.

    PyTorch's custom-op machinery imports torch._dynamo on its first call (~2.5 s per process),
    so eager mode, which needs no graph capture, uses this plain autograd.Function instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_matmul(rows_of(x), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        """dx = dy W, dW = dy^T x, db = sum of dy over tokens."""
        x, weight = ctx.saved_tensors
        grad_rows = rows_of(grad_out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_matmul(grad_rows, weight.t()).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = weight_gradient_rows(grad_rows, rows_of(x))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, on oneDNN for fp32 CPU tensors."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if dynamo_loaded() and torch.compiler.is_compiling():
        return onednn_linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return EagerOneDNNLinear.apply(x, weight, bias)
    # Inference: call oneDNN directly; decoding runs ~60 small products per token, and the custom
    # op's dispatch would cost about as much as one of them.
    return onednn_matmul(rows_of(x), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose forward uses `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
