"""Training checkpoints: atomic saves, the `latest` and `best` pointers, pruning, train state.

    RUN/checkpoints/step-0000123/   config.json, model.safetensors, tokenizer files, train_state.pt
    RUN/checkpoints/latest          "step-0000123"
    RUN/checkpoints/best            the checkpoint with the lowest validation loss

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed into
place; only then does `latest` move. A crash, a full disk or Ctrl-C at any moment therefore
leaves the previous checkpoint and pointer untouched. train_state.pt holds only tensors and
plain Python values, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from acornlm.errors import CheckpointError, DiskFullError
from acornlm.files import DISK_FULL_ERRNOS, atomic_write_text
from acornlm.model import Transformer
from acornlm.model.checkpoint import (
    CONFIG_FILE,
    LATEST_FILE,
    TRAIN_STATE_FILE,
    write_model_files,
)

CHECKPOINTS_DIR = "checkpoints"
BEST_FILE = "best"
TEMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every finished checkpoint of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_pointer(run_dir: str | Path, name: str = LATEST_FILE) -> Path | None:
    """The checkpoint a pointer file (`latest` or `best`) names, or None when there is none."""
    pointer = checkpoints_root(run_dir) / name
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not (target / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{pointer} points to {target}, which is not a checkpoint; "
            f"delete {pointer} to start over or point it at an existing step-* folder")
    return target


# --- RNG state: stored as plain lists and tensors so that weights_only loading accepts it ---

def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": np_kind, "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np.array(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- saving ---

def fsync_tree(directory: Path) -> None:
    """Flush every file of `directory` (and of its subfolders) and the directory entries to disk."""
    for path in directory.iterdir():
        if path.is_dir():
            fsync_tree(path)
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open directories; rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, model: Transformer, train_state: dict[str, Any],
                    info: dict[str, Any], tokenizer_dir: str | Path | None = None,
                    write_model: Callable[..., None] = write_model_files) -> Path:
    """Write `checkpoints/step-NNNNNNN/` atomically and move `latest` to it.

    `write_model(directory, model, info=, tokenizer_dir=)` writes the model files; a stage may
    swap it (LoRA writes the frozen base weights plus the adapter files).

    On any failure the temporary folder is removed and the previous checkpoint and `latest`
    are left as they were. A full disk becomes a DiskFullError (one line: where, which checkpoint
    is kept, what to do), another OSError (permissions) a CheckpointError; the rest propagates.
    """
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    previous = read_pointer(run_dir)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_model(tmp, model, info=info, tokenizer_dir=tokenizer_dir)
        torch.save(train_state, tmp / TRAIN_STATE_FILE)
        commit_checkpoint(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise DiskFullError(disk_full_message(root, name, previous, exc)) from exc
        if isinstance(exc, OSError):
            raise CheckpointError(save_failed_message(final, previous, exc)) from exc
        raise
    return final


def commit_checkpoint(temporary: Path, final: Path) -> None:
    """fsync `temporary` (recursively), rename it to `final` and point `latest` at it: the one step
    that makes a checkpoint exist, shared by single-process and sharded (FSDP) saves."""
    fsync_tree(temporary)
    if final.exists():  # left by a run that died before moving `latest`; this one replaces it
        shutil.rmtree(final)
    os.replace(temporary, final)
    fsync_dir(final.parent)
    atomic_write_text(final.parent / LATEST_FILE, final.name + "\n")


def save_failed_message(final: Path, previous: Path | None, exc: BaseException) -> str:
    """One line for a save that failed (not for a full disk): what is kept and what to do."""
    kept = f"the previous checkpoint {previous} and" if previous else "no earlier checkpoint exists;"
    return (f"could not save checkpoint {final}: {exc}. Nothing was half-written: {kept} "
            f"{final.parent / LATEST_FILE} are intact. Free disk space (or fix permissions) and resume with --resume")


# Errors that mean "no space left" although they are no OSError: torch.save's zip writer checks
# its position after each write ("unexpected pos N vs M") or reports "file write failed";
# safetensors and tokenizers (Rust) put the OS error into their message.
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")
RUST_DISK_FULL = ("os error 28)", "os error 122)", "No space left on device", "Disk quota exceeded")


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error raised while writing a checkpoint means the disk (or quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(marker in text for marker in TORCH_WRITE_FAILURES):
        return True
    return isinstance(exc, SafetensorError) and any(marker in text for marker in RUST_DISK_FULL)


def disk_full_message(root: Path, name: str, previous: Path | None, exc: BaseException) -> str:
    """One line: where the disk is full, which checkpoint is kept, and how to go on."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if previous is None:
        kept = "no earlier checkpoint exists yet; free space, then rerun the command"
    else:
        match = STEP_DIR.match(previous.name)
        step = f"checkpoint {int(match.group(1))} " if match else "checkpoint "
        kept = (f"{step}({previous}, the last good one) is kept intact and {root / LATEST_FILE} still names it; "
                "free space, then rerun with --resume")
    return f"the disk is full at {root}: could not write {name} ({reason}); {kept}"


def mark_best(run_dir: str | Path, checkpoint: Path) -> None:
    atomic_write_text(checkpoints_root(run_dir) / BEST_FILE, checkpoint.name + "\n")


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the `best` or `latest` one."""
    checkpoints = list_checkpoints(run_dir)
    keep = {path for _, path in checkpoints[-keep_last:]}
    for pointer in (LATEST_FILE, BEST_FILE):
        target = read_pointer(run_dir, pointer)
        if target is not None:
            keep.add(target)
    removed = []
    for _, path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_abandoned(run_dir: str | Path, resumed_step: int) -> list[Path]:
    """Remove temporary folders of interrupted saves and checkpoints newer than the resumed one.

    A checkpoint newer than `latest` exists only when a run died between renaming it into
    place and moving the pointer; the resumed run recomputes those steps anyway.
    """
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TEMP_PREFIX)]
    removed += [path for step, path in list_checkpoints(run_dir) if step > resumed_step]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# --- loading ---

def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    """train_state.pt of a checkpoint (weights_only: loading it cannot execute code)."""
    file = Path(checkpoint) / TRAIN_STATE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: {checkpoint} holds weights only and cannot be resumed; "
            "start a new run (fine-tune from it) or resume from a training checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and tensor errors all mean the same to the user
        raise CheckpointError(f"{file} is corrupt or unreadable: {exc}") from exc
