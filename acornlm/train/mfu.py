"""Model FLOPs utilisation: achieved training FLOP/s divided by a *measured* matmul peak.

MFU (PaLM, appendix B) = flops_per_token x tokens_per_second / peak_flops. Vendor peaks are
meaningless on a laptop CPU, so the peak is measured here: the best rate of a large square
matmul in the training dtype on the training device. On the CPU both of PyTorch's matmul
libraries are timed (MKL through torch.matmul, and oneDNN, which the model's Linear layers use
where it is faster, see acornlm.accel.onednn) and the faster one is the peak, so MFU never flatters.
On a GPU the Trainer divides by the vendor's dense bf16 peak instead (acornlm/train/gpu_stats.py), as
PaLM and torchtitan do; the measured peak is its fallback for a GPU missing from the device table.
"""

from __future__ import annotations

import functools
import time

import torch

from acornlm.accel import onednn


@functools.lru_cache(maxsize=8)
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32,
                        size: int = 2048, repeats: int = 5) -> float:
    """Best observed FLOP/s of an n x n @ n x n matmul (2·n^3 FLOPs each) on this device."""
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    products = [torch.matmul]
    if dev.type == "cpu" and dtype == torch.float32:
        if onednn.ONEDNN_AVAILABLE:
            products.append(onednn.onednn_matmul)
    best = float("inf")
    for product in products:
        product(a, b)  # warm up kernels and caches
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            product(a, b)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_second / peak_flops
