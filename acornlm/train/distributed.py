"""Data-parallel plumbing: torchrun detection, the process group, and the few collectives the
Trainer needs. Without torchrun every helper is a no-op, so single-process code paths stay plain.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process it starts. Rank 0 is the
"main" process: it alone prints, writes metrics and saves checkpoints.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from acornlm.errors import ConfigError
from acornlm.train.precision import select_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from exc


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when started by torchrun: NCCL for CUDA, gloo for CPU.

    On CUDA each process takes the GPU of its LOCAL_RANK; the caller builds its device from
    `context.local_rank` before calling this.
    """
    if not launched_by_torchrun():
        return DistributedContext()
    context = DistributedContext(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK"))
    if context.world_size == 1:
        return context
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return context


def teardown() -> None:
    """Leave the process group (safe to call when there is none).

    After a clean run every rank first meets the others at a barrier: a rank that tears down gloo
    while its peer still has a collective or a connection in flight can abort the peer's process
    ("terminate called without an active exception"). When an exception is already on its way
    out, the barrier is skipped, since the failed rank's peers may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if sys.exc_info()[0] is None and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks (a copy; the input is left alone)."""
    result = value.detach().clone()
    if _active():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= dist.get_world_size()
    return result


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all ranks (a copy; the input is left alone)."""
    result = value.detach().clone()
    if _active():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (a MAX all-reduce)."""
    if not _active():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (a MAX all-reduce), e.g. the number of the signal that
    stops the run, 0 where none arrived: any_rank's agreement, carrying which signal it was."""
    if not _active():
        return value
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_flag(flag: bool, device: torch.device, src: int = 0) -> bool:
    """Rank `src`'s value of `flag` on every rank, e.g. rank 0's "time is up" decision."""
    if not _active():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(tensor, src=src)
    return bool(tensor.item())


def barrier() -> None:
    if _active():
        dist.barrier()


def log(message: str, context: DistributedContext) -> None:
    """Print a line on rank 0 only, without breaking a tqdm progress bar."""
    if context.is_main:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def setup(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Pick this process's device (GPU LOCAL_RANK under torchrun) and join the process group."""
    local_rank = _env_int("LOCAL_RANK") if launched_by_torchrun() else 0
    device = select_device(device_name, local_rank)
    return init_distributed(device), device
