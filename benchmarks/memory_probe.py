"""Memory probes the benchmarks share: this process's current and peak resident memory.

Kept free of torch and acornlm imports so that a benchmark's parent process can import it before
it starts the fresh child processes it measures.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def rss_mb() -> float:
    """Current resident memory of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS
