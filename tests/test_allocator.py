"""keep_freed_memory: a training-like loop stops page-faulting once freed blocks are reused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOOP = """
import resource, torch
from acornlm.allocator import keep_freed_memory
print(keep_freed_memory())
x = torch.randn(2048, 6400)  # the size of minimind2-small's logits at batch 8 x 256
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.log_softmax(x, -1)
    z = y.exp() * 2
    del y, z
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def last_step_faults(setting: str) -> tuple[bool, int]:
    env = {**os.environ, "ACORNLM_KEEP_FREED_MEMORY": setting}
    out = subprocess.run([sys.executable, "-c", LOOP], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt is glibc's (Linux)")
def test_freed_memory_is_reused_instead_of_mapped_again():
    applied, kept = last_step_faults("1")
    if not applied:
        pytest.skip("the C library is not glibc")
    off_applied, default = last_step_faults("0")
    assert not off_applied, "ACORNLM_KEEP_FREED_MEMORY=0 must leave malloc alone"
    pages = 2048 * 6400 * 4 // 4096  # one 52 MB tensor
    assert default > pages, f"glibc's default should map the freed blocks again ({default} faults)"
    assert kept < pages // 10, f"freed blocks were not reused: {kept} page faults in a steady-state step"
