"""Which device and which number format a run trains in.

Weights always stay float32 ("master weights"); lower precision only enters through
autocast around the forward pass, so checkpoints and optimizer state are float32 everywhere.
float16 needs a GradScaler (its small range underflows gradients); bfloat16 does not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from acornlm.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" = cuda if available else cpu; under torchrun each process takes GPU `local_rank`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r} but CUDA is not available here; use --train.device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device='mps' but MPS is not available here; use --train.device cpu")
    return device


@dataclass(frozen=True)
class Precision:
    """The compute dtype of the forward pass (None = plain float32) and whether losses are scaled."""

    device: torch.device
    compute_dtype: torch.dtype | None
    use_grad_scaler: bool

    @property
    def name(self) -> str:
        return str(self.compute_dtype or torch.float32).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.use_grad_scaler else None


def select_precision(device: torch.device, dtype: str) -> Precision:
    """"auto": bf16 autocast on CUDA when supported, else fp16 + GradScaler; float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"train.dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    compute = DTYPES[dtype]
    if compute is torch.float32:
        return Precision(device, None, False)
    return Precision(device, compute, use_grad_scaler=compute is torch.float16)
