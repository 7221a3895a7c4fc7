"""What a GPU run adds to each metrics line: peak memory of the logging window, and the peak
FLOP/s that MFU is measured against.

Peak memory: `torch.cuda.max_memory_allocated` is the most memory tensors held at once (weights,
gradients, optimizer state and the activations of the largest step); `max_memory_reserved` is what
PyTorch's caching allocator took from the driver, the number to compare with the card's size and
with `acornlm plan` (nvidia-smi shows it plus the CUDA context). Both are reset after each logged
line, so a line reports the peak of its own window, not of the whole run.

Peak FLOP/s: MFU (PaLM appendix B) = flops_per_token x tokens/s / peak. On a GPU the peak is the
vendor's dense bf16 tensor-core figure (acornlm.train.devices), as PaLM and torchtitan count it,
whatever dtype the run trains in; a GPU that is not in the table falls back to the measured matmul
peak of acornlm.train.mfu. The CPU keeps the measured peak (vendor CPU peaks mean little).
"""

from __future__ import annotations

import torch

from acornlm.train.devices import gpu_spec_for

GiB = 2**30
PEAK_ALLOCATED_FIELD = "gpu_peak_allocated_gib"
PEAK_RESERVED_FIELD = "gpu_peak_reserved_gib"
GPU_MEMORY_FIELDS = (PEAK_ALLOCATED_FIELD, PEAK_RESERVED_FIELD)


def is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new window: the next `peak_memory` reports the peak from now on."""
    torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved GPU memory since the last reset, in GiB."""
    return {
        PEAK_ALLOCATED_FIELD: round(torch.cuda.max_memory_allocated(device) / GiB, 4),
        PEAK_RESERVED_FIELD: round(torch.cuda.max_memory_reserved(device) / GiB, 4),
    }


def spec_bf16_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of this GPU from the device table, or None when its name is unknown."""
    spec = gpu_spec_for(torch.cuda.get_device_name(device))
    return spec.bf16_flops if spec is not None else None
