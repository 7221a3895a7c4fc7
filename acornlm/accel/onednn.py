"""The CPU's fast linear layers: matrix multiplies on oneDNN, and weights packed for decoding.

Why: PyTorch multiplies fp32 matrices on the CPU with Intel MKL. On CPUs that MKL does not
treat as Intel (AMD EPYC/Ryzen), MKL takes a generic code path without AVX-512, while oneDNN
(also bundled with PyTorch, which uses it for bf16) detects the instruction set itself. On the
2-core AMD EPYC this project is benchmarked on, oneDNN runs the model's fp32 matmuls about 2x
faster in training and the one-token products of decoding about 1.6x faster (numbers in
benchmarks/README.md). The results are the same fp32 products summed in a different order
(differences ~1e-6 relative).

`OneDNNLinear` is an `nn.Linear` (same parameters, names, init, `isinstance` checks): `accelerate`
(acornlm/accel/__init__.py) turns the model's `nn.Linear` layers into it in place, so checkpoints,
weight tying and code that wraps linear layers keep working. It uses oneDNN only for fp32 tensors
on the CPU and plain `F.linear` everywhere else (CUDA, bf16, a PyTorch built without oneDNN); set
`acornlm.accel.onednn.USE_ONEDNN = False` to turn it off.

The product is registered as a PyTorch custom op (`acornlm::onednn_linear`) with its own
backward, so autograd and torch.compile both see one opaque, differentiable operation.

For generation, `pack_for_inference(model)` (accelerate's mode="infer") also keeps each weight in oneDNN's own blocked
layout (`PackedWeight`), so oneDNN stops reordering it on every call. Decoding reads every
weight once per token, and the packed products stream about 1.4x (fp32) to 2x (bf16) more bytes
per second; the cost is a second copy of the linear weights in memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

USE_ONEDNN = True
PACK_BATCH_HINT = 16  # rows oneDNN's packed layout is tuned for; 16 is as fast as 1 for one row

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


def is_traced_or_compiled() -> bool:
    """Exporting or torch.compile is capturing a graph: hand-written eager paths step aside for standard ops."""
    return is_exporting() or (dynamo_loaded() and torch.compiler.is_compiling())


def autocast_on_cpu() -> bool:
    """CPU autocast (bf16/fp16 training or evaluation of fp32 weights) is on: an fp32 oneDNN product
    would bypass it and compute in fp32, so products go through F.linear, which autocast lowers."""
    return torch.is_autocast_enabled("cpu")


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (USE_ONEDNN and ONEDNN_AVAILABLE and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and x.numel() > 0 and not is_exporting()
            and not autocast_on_cpu())


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


def needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, on oneDNN for fp32 CPU tensors."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if dynamo_loaded() and torch.compiler.is_compiling():
        return onednn_linear(x, weight, bias)
    if needs_grad(x, weight, bias):
        return EagerOneDNNLinear.apply(x, weight, bias)
    # Inference: call oneDNN directly; decoding runs ~60 small products per token, and the custom
    # op's dispatch would cost about as much as one of them.
    return onednn_matmul(rows_of(x), weight, bias).view(*x.shape[:-1], weight.shape[0])


class PackedWeight:
    """Weights reordered once into oneDNN's blocked layout, for inference.

    Why: given a plain row-major weight, oneDNN reorders it into its blocked layout inside every
    product. For a decoding step (a few rows against the whole matrix) that reorder is a large part
    of the work: with the weight packed once, one row through a 1408 x 512 fp32 weight takes 87
    instead of 121 us, and 16 rows 178 instead of 275 us (benchmarks/README.md).

    Several layers that read the same input (q/k/v, gate/up) can share one PackedWeight: their
    weights are stacked by rows into one matrix, so one larger product replaces several small ones.

    The packed copy follows the weights: it is made again whenever one of them changes in place
    (its version counter moves, as after an optimizer step or load_state_dict) or is replaced.
    It is never saved or copied: state dicts, deepcopy and pickling see only the plain weights.
    """

    def __init__(self) -> None:
        self.key: tuple = ()
        self.sources: list[torch.Tensor] = []  # detached aliases: they keep old storage (and its address) taken
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def get(self, layers: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packed weight, bias) of the layers stacked by output rows."""
        key = tuple((t.data_ptr(), t._version) for layer in layers for t in (layer.weight, layer.bias)
                    if t is not None)
        if key != self.key:
            self.sources = [t.detach() for layer in layers for t in (layer.weight, layer.bias) if t is not None]
            weight = torch.cat([layer.weight.detach() for layer in layers])
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
            has_bias = layers[0].bias is not None
            self.bias = torch.cat([layer.bias.detach() for layer in layers]) if has_bias else None
            self.key = key
        return self.weight, self.bias

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight()  # an opaque oneDNN tensor has no storage to copy; repack on first use

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packable(weight: torch.Tensor) -> bool:
    """oneDNN on, and an fp32 or bf16 weight on the CPU."""
    return USE_ONEDNN and ONEDNN_AVAILABLE and weight.is_cpu and weight.dtype in PACKED_DTYPES


def uses_packed(x: torch.Tensor, layers: Sequence[nn.Linear]) -> bool:
    """Packable weights of x's dtype, plain `Linear` layers (a LoRA layer adds its own update), and
    an inference call: no gradient to compute, no tracing or compiling. Runs ~40 times per decoded
    token, so the cheap tests come first."""
    if not (USE_ONEDNN and x.is_cpu and x.dtype in PACKED_DTYPES and x.numel() > 0):
        return False
    if x.dtype == torch.float32 and autocast_on_cpu():
        return False
    for layer in layers:
        if type(layer) is not OneDNNLinear or layer.weight.dtype != x.dtype or not layer.weight.is_cpu:
            return False
    if torch.is_grad_enabled() and any(needs_grad(x, layer.weight, layer.bias) for layer in layers):
        return False
    return not is_traced_or_compiled()


def packed_product(x: torch.Tensor, layers: Sequence[nn.Linear], packed: PackedWeight) -> list[torch.Tensor]:
    """The layers' outputs from one oneDNN product over their packed, stacked weights."""
    weight, bias = packed.get(layers)
    y = onednn_matmul(rows_of(x), weight, bias)
    if len(layers) == 1:
        return [y.view(*x.shape[:-1], y.shape[-1])]
    return [part.view(*x.shape[:-1], part.shape[-1])
            for part in y.split([layer.out_features for layer in layers], dim=-1)]


def linears(x: torch.Tensor, layers: Sequence[nn.Linear], packed: PackedWeight | None) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], as one product over their packed, stacked weights when
    `packed` is given (see `pack_for_inference`) and the call is inference on the CPU."""
    if packed is None or not uses_packed(x, layers):
        return [layer(x) for layer in layers]
    return packed_product(x, layers, packed)


class OneDNNLinear(nn.Linear):
    """nn.Linear whose forward uses `linear` above, or a packed weight after `pack_for_inference`."""

    packed_weight: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None and uses_packed(x, (self,)):
            return packed_product(x, (self,), self.packed_weight)[0]
        return linear(x, self.weight, self.bias)


class FusableLinears:
    """A module whose linear layers named in `fusable_linears` read the same input and may share
    one packed weight (`fused_linears`, set by `pack_for_inference`), e.g. attention's q/k/v
    (see acornlm/accel/modules.py)."""

    fusable_linears: tuple[str, ...] = ()
    fused_linears: PackedWeight | None = None


def can_fuse(layers: Sequence[nn.Module]) -> bool:
    return (len(layers) > 1 and all(type(layer) is OneDNNLinear for layer in layers)
            and len({(layer.weight.dtype, layer.weight.device, layer.bias is None) for layer in layers}) == 1)


def pack_for_inference(model: nn.Module, enable: bool = True) -> nn.Module:
    """Give every `OneDNNLinear` of `model` a `PackedWeight`, and every group of fusable layers a shared
    one (or take them away with enable=False); returns `model`.

    Gradients, CUDA, fp16 and torch.compile keep the plain path, so packing a model that is
    still being trained is safe, only costlier in memory (a second copy of the linear weights).
    Weights that can be packed now are packed now, so the first request does not wait for it
    (a layer of a fused group only on its own first use, which fusing makes rare).
    """
    if not ONEDNN_AVAILABLE:
        return model
    packs: list[tuple[PackedWeight, list[nn.Linear]]] = []
    fused: set[int] = set()
    for module in model.modules():
        if isinstance(module, OneDNNLinear):
            module.packed_weight = PackedWeight() if enable else None
        if isinstance(module, FusableLinears):
            group = [getattr(module, name, None) for name in module.fusable_linears]
            module.fused_linears = PackedWeight() if enable and can_fuse(group) else None
            if module.fused_linears is not None:
                packs.append((module.fused_linears, group))
                fused.update(id(layer) for layer in group)
    packs += [(m.packed_weight, [m]) for m in model.modules()
              if isinstance(m, OneDNNLinear) and m.packed_weight is not None and id(m) not in fused]
    with torch.no_grad():
        for packed, layers in packs:
            if packable(layers[0].weight):
                packed.get(layers)
    return model
