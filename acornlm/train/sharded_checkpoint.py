"""Checkpoints of an FSDP run: a consolidated model file plus the sharded optimizer, written atomically.

    RUN/checkpoints/step-0000123/
        config.json, model.safetensors, tokenizer files   the whole model in one file (rank 0), as always:
                                                           `acornlm export`, `acornlm.load` and fine-tuning
                                                           read it like any other checkpoint
        train_state.pt                                     counters, scaler, rank 0's RNG; "optimizer": None
        optimizer/.metadata, optimizer/__R_0.distcp        the optimizer state, each rank writing its own shard
                                                           (torch.distributed.checkpoint, DCP)
        rng-rank-R.pt                                      every rank's random generators

Why both: the optimizer state (two AdamW moments, 8 bytes per parameter) is the bulk, and DCP writes
it in parallel without ever gathering it on one rank. The weights (4 bytes per parameter) are
gathered once to rank 0 for the single-file model.safetensors users export and load; resuming
reads them from there, so there is one copy of the weights and no way for two to disagree.

Atomic, with the same rule as every checkpoint (acornlm/train/checkpointing.py): rank 0 makes a
hidden temporary folder and tells the others its name; every rank writes its part into it; after all
have finished (DCP's own final collective, then a barrier), rank 0 alone fsyncs it, renames it to
step-NNNNNNN and moves `latest`. Several nodes must therefore share the run directory's filesystem.
With train.async_checkpoint, DCP's `async_save` copies the optimizer state to CPU memory and writes
it in a background thread while training goes on; the rename happens when the next save begins or
training ends, after the write has finished. A failure anywhere (a full disk on any rank) removes
the temporary folder and leaves the previous checkpoint and `latest` as they were.

Resuming works from and to any layout, through torch.distributed.checkpoint's state-dict API, whose
optimizer state is keyed by parameter name (not by position) and is independent of sharding:

    sharded checkpoint -> FSDP run, any world size     dcp.load reshards the saved shards to this run's
    sharded checkpoint -> DDP / one process             dcp.load assembles whole tensors
    DDP / one process checkpoint -> FSDP run            the whole state is loaded into an unsharded copy,
                                                        read back by name and sharded (set_optimizer_state_dict)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from acornlm.errors import CheckpointError, DiskFullError
from acornlm.model.checkpoint import LATEST_FILE, TRAIN_STATE_FILE
from acornlm.train.checkpointing import (
    TEMP_PREFIX,
    capture_rng_state,
    checkpoint_name,
    checkpoints_root,
    commit_checkpoint,
    disk_full_message,
    is_disk_full,
    mark_best,
    prune_checkpoints,
    read_pointer,
    restore_rng_state,
    save_failed_message,
)
from acornlm.train.distributed import DistributedContext, any_rank, broadcast_flag

OPTIMIZER_DIR = "optimizer"
DCP_METADATA = ".metadata"
RANK_RNG_FILE = "rng-rank-{rank}.pt"


def optimizers_of(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer` (itself, or the parts of one that iterates over them, e.g. Muon + AdamW)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / OPTIMIZER_DIR).is_dir()


def check_sharded_checkpoint(checkpoint: Path) -> None:
    """CheckpointError naming the first missing file of a sharded checkpoint (nothing else is touched).

    DCP's .metadata lists the file that holds every piece of every tensor; each must be there.
    """
    if not is_sharded_checkpoint(checkpoint):
        return
    folder = checkpoint / OPTIMIZER_DIR
    hint = ("the checkpoint is incomplete (copied without all files?); restore the file, or resume from an "
            f"earlier checkpoint by writing its step-* folder name into {checkpoint.parent / LATEST_FILE}")
    if not (folder / DCP_METADATA).is_file():
        raise CheckpointError(f"{folder / DCP_METADATA} is missing: {hint}")
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # unpickling errors of all kinds mean the same to the user
        raise CheckpointError(f"{folder / DCP_METADATA} is corrupt or unreadable: {exc}") from exc
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder / missing[0]} is missing{more}: {hint}")


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules with every parameter and buffer on the meta device (no memory).

    Made before sharding, it is the plain, unsharded model the checkpoint writer fills with the
    gathered weights; tied parameters stay tied (deepcopy's memo maps each tensor once).
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def move_tensors(model: nn.Module, device: str) -> nn.Module:
    """Give every parameter and buffer of `model` new, uninitialised storage on `device` (in place).

    Unlike nn.Module.to_empty, a tensor two modules share (a tied embedding and output head) stays
    one tensor, so an optimizer built on the copy has the same parameter groups as the original.
    """
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in moved:
                    empty = torch.empty_like(tensor, device=device)
                    moved[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                         if isinstance(tensor, nn.Parameter) else empty)
                table[name] = moved[id(tensor)]
    return model


def unwrap_exception(exc: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (which gathers every rank's)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return exc


@dataclasses.dataclass
class PendingSave:
    """A checkpoint written into `temporary`, waiting for its optimizer shards before the rename."""

    temporary: Path
    step: int
    previous: Path | None
    is_best: bool
    keep_last: int
    future: Future | None  # the background DCP write (None: written already)


class ShardedCheckpointer:
    """Saves and restores the checkpoints of an FSDP run; every rank calls every method."""

    def __init__(self, model: nn.Module, context: DistributedContext, device: torch.device,
                 async_save: bool = False) -> None:
        """`model` must not be sharded yet: a weightless copy of it is kept to write model.safetensors."""
        self.skeleton = meta_copy(model)
        self.context = context
        self.device = device
        self.async_save = async_save
        self.pending: PendingSave | None = None
        # A background write's collectives run in another thread: on a process group of their own they
        # cannot interleave with the training step's (gloo also works for CPU tensors under NCCL training).
        self.group = dist.new_group(backend="gloo") if async_save else None

    # --- saving ---

    def save(self, run_dir: Path, step: int, model: nn.Module, optimizer: Any, train_state: dict[str, Any],
             info: dict[str, Any], tokenizer_dir: str | Path | None, write_model: Callable[..., None],
             is_best: bool, keep_last: int) -> Path:
        """Write checkpoint `step` (returns its final path; with async_save it appears when committed)."""
        self.wait()
        root = checkpoints_root(run_dir)
        name = checkpoint_name(step)
        temporary, previous, error = None, None, None
        if self.context.is_main:
            try:
                root.mkdir(parents=True, exist_ok=True)
                previous = read_pointer(run_dir)
                temporary = root / f"{TEMP_PREFIX}{name}-{os.getpid()}"
                if temporary.exists():
                    shutil.rmtree(temporary)
                temporary.mkdir()
            except (OSError, CheckpointError) as exc:
                error = exc
        shared = [str(temporary) if temporary else None, str(previous) if previous else None]
        dist.broadcast_object_list(shared, src=0)  # rank 0's folder and previous checkpoint, for every rank
        previous = Path(shared[1]) if shared[1] else None
        if shared[0] is None:
            self._fail(root, name, None, previous, error)
        temporary = Path(shared[0])

        # The whole model, gathered to rank 0 (a collective: every rank takes part).
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        try:
            if self.context.is_main:
                write_model(temporary, self._consolidated(full), info=info, tokenizer_dir=tokenizer_dir)
                torch.save(train_state | {"optimizer": None}, temporary / TRAIN_STATE_FILE)
            torch.save(capture_rng_state(), temporary / RANK_RNG_FILE.format(rank=self.context.rank))
        except Exception as exc:
            error = exc
        finally:
            move_tensors(self.skeleton, "meta")  # give the gathered copy's memory back
            del full
        if any_rank(error is not None, self.device):
            self._fail(root, name, temporary, previous, error)

        state = {"optimizer": get_optimizer_state_dict(model, optimizers_of(optimizer))}
        writer = FileSystemWriter(str(temporary / OPTIMIZER_DIR))
        pending = PendingSave(temporary, step, previous, is_best, keep_last, None)
        try:
            if self.async_save:
                pending.future = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            else:
                dcp.save(state, storage_writer=writer)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            self._fail(root, name, temporary, previous, exc)
        self.pending = pending
        if not self.async_save:
            self.wait()
        return root / name

    def _consolidated(self, full: dict[str, torch.Tensor]) -> nn.Module:
        """The unsharded model holding the gathered weights (rank 0 only)."""
        model = move_tensors(self.skeleton, "cpu")
        model.load_state_dict(full)
        return model

    def wait(self) -> None:
        """Finish the pending save: wait for its shards, then rank 0 renames it into place and moves `latest`."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        root = pending.temporary.parent
        name = checkpoint_name(pending.step)
        error: BaseException | None = None
        try:
            if pending.future is not None:
                pending.future.result()
        except BaseException as exc:
            error = exc
        if any_rank(error is not None, self.device):
            self._fail(root, name, pending.temporary, pending.previous, error)
        if self.context.is_main:
            try:
                commit_checkpoint(pending.temporary, root / name)
                if pending.is_best:
                    mark_best(root.parent, root / name)
                prune_checkpoints(root.parent, pending.keep_last)
            except BaseException as exc:
                error = exc
        if not broadcast_flag(error is None, self.device):
            self._fail(root, name, pending.temporary, pending.previous, error)

    def _fail(self, root: Path, name: str, temporary: Path | None, previous: Path | None,
              error: BaseException | None) -> None:
        """Remove the temporary folder (rank 0) and raise the error every rank reports."""
        if self.context.is_main and temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        cause = unwrap_exception(error) if error is not None else None
        if cause is not None and is_disk_full(cause):
            raise DiskFullError(disk_full_message(root, name, previous, cause)) from error
        if cause is None:
            raise CheckpointError(f"another rank could not write its part of checkpoint {root / name}; its error "
                                  f"message says why. The previous checkpoint and {root / LATEST_FILE} are intact")
        if isinstance(cause, (OSError, CheckpointError, RuntimeError)):
            raise CheckpointError(save_failed_message(root / name, previous, cause)) from error
        raise error

    # --- restoring ---

    def load_unsharded_optimizer_state(self, saved: dict[str, Any], model: nn.Module, optimizer: Any,
                                       build_optimizer: Callable[[nn.Module], Any]) -> None:
        """Load a DDP / single-process optimizer state (keyed by position) into the sharded optimizer.

        The state goes into an optimizer over an unsharded copy of the model first (so whatever
        format `build_optimizer` saves, e.g. Muon + AdamW, it reads itself), then by parameter name
        into the sharded optimizer, each rank keeping its shard of every moment.
        """
        plain = move_tensors(self.skeleton, "cpu")
        try:
            plain_optimizer = build_optimizer(plain)
            plain_optimizer.load_state_dict(saved)
            options = StateDictOptions(full_state_dict=True)
            full = get_optimizer_state_dict(plain, optimizers_of(plain_optimizer), options=options)
            set_optimizer_state_dict(model, optimizers_of(optimizer), full, options=options)
        finally:
            move_tensors(self.skeleton, "meta")


def load_sharded_optimizer_state(checkpoint: Path, model: nn.Module, optimizer: Any) -> None:
    """Load the DCP optimizer state of `checkpoint` into `optimizer`, whatever its sharding (or none).

    The template from get_optimizer_state_dict tells DCP which piece of each tensor this rank
    needs; DCP reads just those bytes from the shards, whatever world size wrote them.
    """
    check_sharded_checkpoint(checkpoint)
    optimizers = optimizers_of(optimizer)
    state = {"optimizer": get_optimizer_state_dict(model, optimizers)}
    try:
        dcp.load(state, storage_reader=FileSystemReader(str(checkpoint / OPTIMIZER_DIR)))
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{checkpoint / OPTIMIZER_DIR} does not fit this run ({unwrap_exception(exc)}); "
                              "resume with the model and optimizer it was trained with") from exc
    set_optimizer_state_dict(model, optimizers, state["optimizer"])


def restore_rank_rng(checkpoint: Path, rank: int, world_size: int, saved_world_size: int) -> bool:
    """Restore this rank's own random generators when the checkpoint has them for the same world size."""
    file = checkpoint / RANK_RNG_FILE.format(rank=rank)
    if saved_world_size != world_size or not file.is_file():
        return False
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file} is corrupt or unreadable: {exc}") from exc
    restore_rng_state(state)
    return True
