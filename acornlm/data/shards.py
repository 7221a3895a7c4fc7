"""Writing a split as shard files, and the progress file that lets an interrupted `data prepare` resume.

A split is written as shards `train-00000.bin`, `train-00001.bin`, ... Each shard holds whole documents
(token ids, each document followed by <|endoftext|>) and closes before the document that would take it
past `shard_tokens` tokens, so a shard only exceeds that size when a single document does. A shard is
written to a hidden `.train-00003.bin.partial` file, fsynced, then renamed into place: a `.bin` file is
always complete.

Resuming. Each time a shard closes, `prepare-progress.json` is rewritten atomically with:
    - the input position of the next document (file number + byte offset, or row), so the resumed run
      seeks straight there instead of re-reading what is done;
    - every finished shard (file, tokens, documents, UTF-8 bytes, SHA-256);
    - the length of the *other* split's open shard, whose partial file is fsynced first: the other split
      keeps its half-written shard, truncated back to that length on resume;
    - a fingerprint of what decides the output (input files, tokenizer, options). A resumed run refuses
      different inputs, since it would stitch two corpora together.
Because the shard cuts depend only on the documents (never on timing, workers or where a run stopped),
a resumed run writes the same bytes as a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from acornlm.data.corpus import InputPosition
from acornlm.errors import DataError, DiskFullError
from acornlm.files import atomic_write_json

PROGRESS_FILE = "prepare-progress.json"
LOCK_FILE = ".prepare.lock"
# 2^27 = 134M tokens = 256 MiB of uint16 per shard: a crash loses at most one shard of work (seconds to
# minutes of tokenizing), and a 10B-token corpus (FineWeb-Edu sample) makes ~75 files per split.
DEFAULT_SHARD_TOKENS = 1 << 27
FINGERPRINT_SAMPLE = 1 << 16  # bytes read from each end of an input file for its fingerprint
HASH_CHUNK = 1 << 24


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


SHARD_PATTERN = re.compile(r"^(train|val)-\d{5}\.bin$")


class ShardWriter:
    """The shards of one split: append documents, close a shard when the next document would overflow it.

    The open shard lives in `.{name}.partial`; `close_shard` fsyncs it and renames it to its final name.
    Tokens, documents and UTF-8 bytes are counted per shard, and the SHA-256 of its bytes is computed
    while writing, so the index costs no second pass over the data.
    """

    def __init__(self, out: Path, split: str, dtype: type, shard_tokens: int,
                 finished: list[dict[str, Any]] | None = None, open_shard: dict[str, int] | None = None):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.finished: list[dict[str, Any]] = list(finished or [])
        self.tokens = self.documents = self.bytes = 0
        self.sha256 = hashlib.sha256()
        self.file = None
        if open_shard and open_shard["tokens"]:
            self._reopen(open_shard)

    @property
    def name(self) -> str:
        return shard_name(self.split, len(self.finished))

    @property
    def partial(self) -> Path:
        return self.out / f".{self.name}.partial"

    def _reopen(self, state: dict[str, int]) -> None:
        """Continue the open shard of an interrupted run: cut its partial file back to the recorded length."""
        size = state["tokens"] * self.dtype.itemsize
        published = self.out / self.name
        if not self.partial.is_file() and published.is_file():
            # The run died between publishing this shard and recording it: the file starts with the
            # recorded part, so take it back as the partial file (the rest is written again).
            os.replace(published, self.partial)
        if not self.partial.is_file() or self.partial.stat().st_size < size:
            found = self.partial.stat().st_size if self.partial.is_file() else "no file"
            raise DataError(f"{self.partial} should hold {size} bytes of the interrupted run ({found}); the unfinished "
                            f"shard is lost: start over with `acornlm data prepare ... --resume false`")
        self.file = open(self.partial, "r+b")
        self.file.truncate(size)
        while chunk := self.file.read(HASH_CHUNK):
            self.sha256.update(chunk)
        self.file.seek(size)
        self.tokens, self.documents, self.bytes = state["tokens"], state["documents"], state["bytes"]

    def would_overflow(self, num_tokens: int) -> bool:
        """True when the open shard has documents and this one would take it past shard_tokens."""
        return self.documents > 0 and self.tokens + num_tokens > self.shard_tokens

    def add(self, tokens: np.ndarray, num_bytes: int) -> None:
        if self.file is None:
            self.file = open(self.partial, "wb")
        data = tokens.tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.tokens += len(tokens)
        self.documents += 1
        self.bytes += num_bytes

    def sync(self) -> None:
        """Make the open shard's bytes durable (before the progress file records its length)."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close_shard(self) -> None:
        """Publish the open shard under its final name and add it to the index."""
        if self.documents == 0:
            return
        self.sync()
        self.file.close()
        self.file = None
        os.replace(self.partial, self.out / self.name)
        self.finished.append({"file": self.name, "tokens": self.tokens, "documents": self.documents,
                              "bytes": self.bytes, "sha256": self.sha256.hexdigest()})
        self.tokens = self.documents = self.bytes = 0
        self.sha256 = hashlib.sha256()

    def open_state(self) -> dict[str, int]:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}

    def summary(self) -> dict[str, Any]:
        """The split's entry in meta.json: totals and the shard index."""
        shards = self.finished
        return {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards), "shards": shards}

    @property
    def total_documents(self) -> int:
        return sum(s["documents"] for s in self.finished) + self.documents

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def discard(self) -> None:
        self.close_file()
        self.partial.unlink(missing_ok=True)


# --- The progress file ---

def input_fingerprint(files: list[str]) -> list[dict[str, Any]]:
    """Per input file: its name, size and a BLAKE2b of its first and last 64 KiB.

    Cheap for any corpus size (128 KiB read per file) and unchanged by copying the files elsewhere
    with their names; an edit that keeps a file's size and both ends is not noticed.
    """
    fingerprint = []
    for spec in files:
        if spec.startswith("hf:"):
            fingerprint.append({"input": spec})
            continue
        path = Path(spec)
        size = path.stat().st_size
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            digest.update(f.read(FINGERPRINT_SAMPLE))
            if size > FINGERPRINT_SAMPLE:
                f.seek(max(FINGERPRINT_SAMPLE, size - FINGERPRINT_SAMPLE))
                digest.update(f.read(FINGERPRINT_SAMPLE))
        fingerprint.append({"input": path.name, "size": size, "sample_blake2b": digest.hexdigest()})
    return fingerprint


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first thing that differs between two run fingerprints, in words."""
    for key in new:
        if old.get(key) != new[key]:
            if key == "inputs":
                old_inputs, new_inputs = old.get(key) or [], new[key]
                if len(old_inputs) != len(new_inputs):
                    return f"{len(old_inputs)} input files then, {len(new_inputs)} now"
                for a, b in zip(old_inputs, new_inputs):
                    if a != b:
                        return f"input file {b.get('input')} differs ({a} then, {b} now)"
            then, now = (str(v)[:16] if key == "tokenizer" else repr(v) for v in (old.get(key), new[key]))
            return f"{key}: {then} then, {now} now"
    return "the progress file is from another acornlm version"


def read_progress(out: Path) -> dict[str, Any] | None:
    """The progress of an interrupted run in `out`, or None."""
    file = out / PROGRESS_FILE
    if not file.is_file():
        return None
    try:
        progress = json.loads(file.read_text(encoding="utf-8"))
        InputPosition(**progress["position"])
        progress["splits"]["train"], progress["splits"]["val"]  # noqa: B018 - shape check
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{file} is corrupt ({exc}); start over with `acornlm data prepare ... --resume false`") from exc
    return progress


def write_progress(out: Path, fingerprint: dict[str, Any], position: InputPosition,
                   writers: dict[str, ShardWriter]) -> None:
    """Record a resumable point: open shards are fsynced first, then the file is replaced atomically."""
    for writer in writers.values():
        writer.sync()
    atomic_write_json(out / PROGRESS_FILE, {
        "format": "acornlm-data-progress",
        "fingerprint": fingerprint,
        "position": {"file": position.file, "offset": position.offset, "line": position.line},
        "splits": {split: {"shards": w.finished, "open": w.open_state()} for split, w in writers.items()},
    })


def verify_shards(out: Path, shards: list[dict[str, Any]], dtype: type, resume_hint: str) -> None:
    """Check that each finished shard is there with its size and SHA-256; name the first bad one."""
    itemsize = np.dtype(dtype).itemsize
    for shard in shards:
        file = out / shard["file"]
        if not file.is_file():
            raise DataError(f"{file} (a finished shard of the interrupted run) is missing; {resume_hint}")
        if file.stat().st_size != shard["tokens"] * itemsize:
            raise DataError(f"{file} holds {file.stat().st_size} bytes, but the run recorded "
                            f"{shard['tokens'] * itemsize}; {resume_hint}")
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != shard["sha256"]:
            raise DataError(f"{file} does not match the SHA-256 recorded when it was written (corrupt); {resume_hint}")


def disk_full_message(out: Path, exc: OSError, writers: dict[str, ShardWriter]) -> DiskFullError:
    done = sum(len(w.finished) for w in writers.values())
    return DiskFullError(
        f"disk full while writing {exc.filename or out} ({os.strerror(exc.errno)}): the {done} finished shards "
        f"and {PROGRESS_FILE} in {out} are kept; free some space and run the same command again to resume")
