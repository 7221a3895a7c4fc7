"""Weight-only int8 quantization for decoding on a CPU.

Why: generating one token multiplies a single row through every weight matrix, so each token
reads all the weights once from memory and the speed is set by how many bytes that is, not by
arithmetic (benchmarks/README.md measures it). int8 weights are a quarter of the fp32 bytes.
PyTorch ships a CPU kernel for exactly this product (`torch._weight_int8pack_mm`: int8 weights,
bf16 activations, one scale per output row), which decodes 2-5x faster than the fp32 product.

Formula (symmetric absmax quantization per output channel, as in LLM.int8()'s vector-wise
scheme without outliers):

    scale_n = max_k |W[n, k]| / 127          q[n, k] = round(W[n, k] / scale_n)  in [-127, 127]
    y = (x · q^T) * scale  (+ bias)

Only the linear layers are quantized (attention, feed-forward and output head); embeddings,
norms and the KV cache keep their dtype. The product's cost grows with the number of rows, so
it pays for decoding a few sequences at a time; prefilling a long prompt is slower than fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acornlm.errors import ConfigError
from acornlm.model.lora import LoraLinear

QUANTIZATIONS = ("none", "int8")
INT8_MAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 quantization of each row: (q int8 [N, K], scale float32 [N])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """An inference-only linear layer with int8 weights and one scale per output feature.

    The weights are buffers, not parameters: nothing here trains, and the layer saves and
    loads with the model's state dict under `qweight` / `scale`.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = qweight.shape[1]
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_rows(linear.weight)
        return cls(q, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.device.type == "cpu":
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scale)
        else:  # no fused kernel: dequantize on the fly (correct, not fast)
            y = F.linear(rows, self.qweight.to(rows.dtype)) * self.scale
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every linear layer of `model` (in place) by its quantized version; returns `model`.

    A tied output head gets its own int8 copy; the input embedding stays as it was for lookups.
    """
    if method not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {method!r}: use one of {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return model
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise ConfigError("int8 quantization needs torch >= 2.4 (torch._weight_int8pack_mm)")

    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("int8 quantization of a model with an unmerged LoRA adapter: merge it first "
                          "(`acornlm lora merge`), then quantize the merged checkpoint")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear))
    model.eval()
    return model
