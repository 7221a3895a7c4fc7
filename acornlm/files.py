"""Writing files so that nothing is ever half-written: the one place acornlm publishes outputs.

Every output (a checkpoint's `latest` pointer, metrics, prepared data, a tokenizer copy, an HF
export, a GGUF file, a download) is written under a temporary name next to its target, on the
same filesystem, and renamed over the target only when complete: `os.replace` is atomic, so a
reader (or a rerun after a crash or a full disk) sees the old content or the new, never a mix,
and a failure leaves no temporary behind.

    with atomic_path(out / "model.gguf") as tmp:        # a file
        write_everything(tmp)
    with atomic_path(out_dir, directory=True) as tmp:    # a directory, replacing the old one
        write_files_into(tmp)
    atomic_write_text(path, text); atomic_write_json(path, data)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# "No space left on device" and "Disk quota exceeded": both mean the disk is full for this user.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(exc: BaseException) -> bool:
    """Whether an OS error means the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` over `target`. An existing directory is first moved aside and deleted
    after the rename, so there is no moment without a complete `target`."""
    old = None
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        remove(old)
        os.replace(target, old)
    elif target.is_symlink():
        target.unlink()
    os.replace(tmp, target)
    if old is not None:
        remove(old)


@contextmanager
def atomic_path(target: Path, directory: bool = False) -> Iterator[Path]:
    """A temporary path next to `target` (a fresh empty directory when `directory`); when the block
    ends without an exception it replaces `target`, otherwise it is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        remove(tmp)
    try:
        yield tmp
        replace(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (flushed to disk before the rename), old or new content, never a mix."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
