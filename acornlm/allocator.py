"""Keep freed memory inside the process instead of handing it back to the OS (glibc malloc).

Why: PyTorch's CPU tensors come from the C library's malloc. glibc serves large blocks (over
32 MB always, smaller ones until its threshold adapts) with a fresh `mmap`, and gives them back
with `munmap` when freed. A training step allocates and frees the same large activations and
gradients every time (the [tokens, vocab] logits alone are 52 MB at minimind2-small's batch), so
each step the kernel maps and zeroes those pages again: in a profile of one step on the 2-core
benchmark machine, filling the zeroed loss gradient took 81 ms (~0.6 GB/s) and SwiGLU's multiplies
140 ms. With mmap off and no trimming, freed blocks are reused: 3 ms and 18 ms, and training went
from 1599 to 1814 tokens/s (benchmarks/README.md). The cost: the process keeps its peak memory until it exits.

`keep_freed_memory()` applies it with `mallopt` where glibc is the C library (Linux); elsewhere,
or when ACORNLM_KEEP_FREED_MEMORY=0, it does nothing. jemalloc/tcmalloc preloaded with LD_PRELOAD
reuse memory on their own and ignore the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>: free memory above the heap's top kept before trimming
M_MMAP_MAX = -4        # most blocks served by mmap at once; 0 = never use mmap
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int): ~2 GiB kept before any trim

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its trimming, once per process.

    Returns True when the setting is in force (applied now or before).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if sys.platform != "linux" or os.environ.get("ACORNLM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt means something else
            return False
        _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    except OSError:
        return False
    return _applied
