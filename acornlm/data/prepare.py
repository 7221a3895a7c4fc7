"""Tokenize a corpus once into shard files of token ids that training can memory-map.

    out/train-00000.bin, train-00001.bin, ...   every training document's token ids followed by
                                                 <|endoftext|>, back to back, cut into shards
    out/val-00000.bin, ...                       the same for the validation documents
    out/meta.json    tokenizer identity, dtype, and per split: tokens, documents, UTF-8 bytes and the
                     shard index (file, tokens, documents, bytes, SHA-256 of each shard); sources
    out/tokenizer/   a copy of the tokenizer, so the data folder is self-describing

Each shard is a raw array of np.uint16 (vocabularies up to 65,536 ids) or np.uint32, exactly like
nanoGPT's `train.bin`, and holds whole documents (see `shards.py` for the cut rule). The loader reads a
split's shards as one stream. The UTF-8 byte counts let evaluation report bits per byte, which (unlike
loss per token) is comparable across tokenizers.

Validation data comes from, in order of preference: `val_inputs`; the `train/` and `val/` subfolders of
a single input folder (what `acornlm data fetch` writes); or `val_fraction` of the documents, chosen by
a hash of each document's text. Hashing the text (not the position) makes the choice independent of
input order and sends identical documents to the same split, so duplicates cannot leak into validation.

Output is deterministic: the same inputs and tokenizer give byte-identical files, whatever `workers` is
and however often the run was interrupted and resumed (`shards.py` explains the progress file).

Memory is bounded whatever the corpus size: documents stream through in batches of ~1 MB of text, at
most 2 x workers batches are in flight, and tokens go straight to disk. Peak memory is about
(workers + 1) x (Python + tokenizer, ~100 MB) + 2 x workers x a few MB, plus one parquet row group.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from acornlm.data.corpus import Document, Errors, InputPosition, input_files, iter_positioned_documents
from acornlm.data.shards import (
    DEFAULT_SHARD_TOKENS,
    LOCK_FILE,
    PROGRESS_FILE,
    SHARD_PATTERN,
    ShardWriter,
    describe_difference,
    disk_full_message,
    input_fingerprint,
    read_progress,
    verify_shards,
    write_progress,
)
from acornlm.errors import ConfigError, DataError
from acornlm.files import atomic_path, atomic_write_json, is_out_of_space
from acornlm.tokenizer import load_tokenizer
from acornlm.version import __version__

META_FILE = "meta.json"
TOKENIZER_SUBDIR = "tokenizer"
SPLITS = ("train", "val")
BATCH_CHARACTERS = 1 << 18  # ~256 KB of text per batch handed to a worker (its encodings take ~100x that)
BATCH_DOCUMENTS = 1024
FORMAT_VERSION = 2  # 1: one train.bin/val.bin per split (still readable); 2: shards with an index
Resume = bool | Literal["auto"]
LabelledDocument = tuple[str, InputPosition, Document]


def prepare_data(inputs: Sequence[str | Path], tokenizer_dir: str | Path, out: str | Path,
                 val_inputs: Sequence[str | Path] | None = None, val_fraction: float = 0.0,
                 workers: int = 0, errors: Errors = "strict", seed: int = 0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, resume: Resume = "auto") -> dict[str, Any]:
    """Write the shards, meta.json and tokenizer/ into `out`; return meta plus this run's throughput.

    `workers`: 0 = one process per CPU core; 1 = tokenize in this process; N = N worker processes.
    `resume`: "auto" continues an interrupted run found in `out` when its inputs, tokenizer and options
    match (and refuses a mismatch), else starts afresh; True insists on continuing; False starts over.
    """
    train_inputs, val_inputs = resolve_split_inputs(inputs, val_inputs, val_fraction)
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if resume not in (True, False, "auto"):
        raise ConfigError(f"resume must be true, false or auto, got {resume!r}")
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_files = input_files(train_inputs)
    val_files = input_files(val_inputs) if val_inputs is not None else []
    fingerprint = {"format": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint, "dtype": np.dtype(dtype).name,
                   "shard_tokens": shard_tokens, "val_fraction": val_fraction if val_inputs is None else 0.0,
                   "seed": seed, "errors": errors, "files": {"train": len(train_files), "val": len(val_files)},
                   "inputs": input_fingerprint(train_files + val_files)}

    with exclusive_lock(out):
        progress = find_progress(out, fingerprint, resume)
        if progress is None:
            clear_unfinished(out)
        writers = open_writers(out, dtype, shard_tokens, progress)
        start = InputPosition(**progress["position"]) if progress else InputPosition()
        documents = labelled_documents(train_files, val_files, val_fraction, errors, seed, start,
                                       train_inputs, val_inputs)
        started = time.perf_counter()
        done_tokens, done_bytes = write_shards(
            out, fingerprint, writers, documents, TokenEncoder(tokenizer, tokenizer_dir, dtype, resolve_workers(workers)),
            check=lambda: check_both_splits(writers, train_inputs, val_inputs, val_fraction))
        seconds = time.perf_counter() - started

        meta = build_meta(tokenizer, dtype, shard_tokens, writers, train_inputs, val_inputs, val_fraction, seed)
        try:
            remove_stale_shards(out, meta)
            save_tokenizer_copy(tokenizer, out / TOKENIZER_SUBDIR)
            atomic_write_json(out / META_FILE, meta)  # written last: its presence means the folder is complete
        except OSError as exc:
            if is_out_of_space(exc):
                raise disk_full_message(out, exc, writers) from exc
            raise
        (out / PROGRESS_FILE).unlink(missing_ok=True)

    throughput = measure_throughput(done_tokens, done_bytes, seconds)
    print_summary(meta, throughput, out)
    return {**meta, "throughput": throughput}


def write_shards(out: Path, fingerprint: dict[str, Any], writers: dict[str, ShardWriter],
                 documents: Iterator[LabelledDocument], encoder: TokenEncoder,
                 check: Callable[[], None]) -> tuple[int, int]:
    """Tokenize the documents into the split writers, recording progress each time a shard closes;
    after the last document, `check` the splits and publish the last shards.

    Returns the tokens and UTF-8 bytes this run added. On failure, the finished shards and the open
    partial files are kept when a progress record exists (the run can resume), deleted otherwise.
    """
    done_tokens = done_bytes = 0
    try:
        with encoder, tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=None,
                           initial=sum(w.summary()["bytes"] + w.bytes for w in writers.values())) as bar:
            for batch, encoded in encoder.encode(batched(documents)):
                for (split, position, *_), (tokens, num_bytes) in zip(batch, encoded):
                    writer = writers[split]
                    if writer.would_overflow(len(tokens)):
                        writer.close_shard()
                        write_progress(out, fingerprint, position, writers)  # resume here: before this document
                    writer.add(tokens, num_bytes)
                    done_tokens += len(tokens)
                    done_bytes += num_bytes
                bar.update(sum(num_bytes for _, num_bytes in encoded))
        check()
        for writer in writers.values():
            writer.close_shard()
    except BaseException as exc:
        keep = (out / PROGRESS_FILE).is_file()
        for writer in writers.values():
            writer.close_file() if keep else writer.discard()
        if keep and isinstance(exc, KeyboardInterrupt):
            print(f"interrupted: the finished shards and {PROGRESS_FILE} are kept in {out}; "
                  f"run the same command again to resume", file=sys.stderr)
        if is_out_of_space(exc):
            raise disk_full_message(out, exc, writers) from exc
        raise
    return done_tokens, done_bytes


def build_meta(tokenizer, dtype: type, shard_tokens: int, writers: dict[str, ShardWriter], train_inputs: list,
               val_inputs: list | None, val_fraction: float, seed: int) -> dict[str, Any]:
    """meta.json: what the data is (tokenizer, dtype), the shard index of each split, and its sources."""
    return {
        "format": "acornlm-data",
        "version": FORMAT_VERSION,
        "acornlm_version": __version__,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind,
                      "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
        "dtype": np.dtype(dtype).name,
        "shard_tokens": shard_tokens,
        **{split: writers[split].summary() for split in SPLITS},
        # With a fraction, val documents are the train inputs' documents whose text hash falls below it.
        "sources": {"train": [str(p) for p in train_inputs],
                    "val": [str(p) for p in val_inputs] if val_inputs is not None else [],
                    "val_fraction": val_fraction if val_inputs is None else 0.0,
                    "seed": seed},
    }


@contextmanager
def exclusive_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` so two runs cannot write the same shards (released even on kill -9)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per folder is then the user's job
        yield
        return
    lock_path = out / LOCK_FILE
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DataError(f"another `acornlm data prepare` is writing {out}; wait for it or use another --out") from exc
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def find_progress(out: Path, fingerprint: dict[str, Any], resume: Resume) -> dict[str, Any] | None:
    """The interrupted run to continue, or None to start afresh; refuse a resume of different inputs."""
    if resume is False:
        return None
    progress = read_progress(out)
    if progress is None:
        if resume is True:
            raise DataError(f"nothing to resume in {out}: no {PROGRESS_FILE} from an interrupted run; "
                            f"drop --resume to start")
        return None
    if progress.get("fingerprint") != fingerprint:
        raise DataError(f"{out} holds an interrupted run of other inputs or options "
                        f"({describe_difference(progress.get('fingerprint') or {}, fingerprint)}); "
                        f"rerun it with the same inputs and options, pass --resume false to discard it, "
                        f"or choose another --out")
    return progress


def open_writers(out: Path, dtype: type, shard_tokens: int, progress: dict[str, Any] | None) -> dict[str, ShardWriter]:
    """One ShardWriter per split, continuing the interrupted run's shards after checking them."""
    if progress is None:
        return {split: ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    hint = "start over with `acornlm data prepare ... --resume false`"
    writers = {}
    for split in SPLITS:
        state = progress["splits"][split]
        verify_shards(out, state["shards"], dtype, hint)
        writers[split] = ShardWriter(out, split, dtype, shard_tokens, state["shards"], state["open"])
    done = {split: len(w.finished) for split, w in writers.items()}
    position = progress["position"]
    print(f"resuming {out}: {done['train']} train and {done['val']} val shards done; "
          f"continuing at input file {position['file'] + 1}, offset {position['offset']}", file=sys.stderr)
    return writers


def clear_unfinished(out: Path) -> None:
    """Before a fresh run: no meta.json (the folder is incomplete until the end), no leftover progress."""
    (out / META_FILE).unlink(missing_ok=True)  # an older run's meta must never describe the new files
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    for file in out.glob(".*.bin.partial"):
        file.unlink(missing_ok=True)


def remove_stale_shards(out: Path, meta: dict[str, Any]) -> None:
    """Delete shard files an older run left that the new index does not list (and an old train.bin/val.bin)."""
    listed = {shard["file"] for split in SPLITS for shard in meta[split]["shards"]}
    for file in out.iterdir():
        if (SHARD_PATTERN.match(file.name) and file.name not in listed) or file.name in ("train.bin", "val.bin"):
            file.unlink(missing_ok=True)


def resolve_split_inputs(inputs: Sequence[str | Path], val_inputs: Sequence[str | Path] | None,
                         val_fraction: float) -> tuple[list, list | None]:
    """(train inputs, validation inputs or None for a fraction hold-out), refusing ambiguous requests."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if isinstance(val_inputs, (str, Path)):
        val_inputs = [val_inputs]
    if not inputs:
        raise ConfigError("no input given: pass --input FILES_OR_FOLDERS")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_inputs:
        if val_fraction > 0:
            raise ConfigError("give either --val-input or --val-fraction, not both")
        return list(inputs), list(val_inputs)
    if len(inputs) == 1 and (Path(inputs[0]) / "train").is_dir() and (Path(inputs[0]) / "val").is_dir():
        if val_fraction > 0:
            raise ConfigError(f"{inputs[0]} already has train/ and val/ subfolders; drop --val-fraction")
        return [Path(inputs[0]) / "train"], [Path(inputs[0]) / "val"]
    if val_fraction > 0:
        return list(inputs), None
    raise ConfigError("no validation data: pass --val-input FILES, or --val-fraction 0.05 to hold out ~5% of "
                      "the documents, or a single folder with train/ and val/ subfolders")


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every id: uint16 up to 65,536 ids, else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def resolve_workers(workers: int) -> int:
    """0 means one worker per CPU core this process may use."""
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = all cores), got {workers}")
    if workers == 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return workers


def is_validation(text: str, val_fraction: float, seed: int) -> bool:
    """Hold out a document when the keyed BLAKE2b hash of its text, read as a number in [0, 1), is below the fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "big") / 2**64 < val_fraction


def labelled_documents(train_files: list[str], val_files: list[str], val_fraction: float, errors: Errors,
                       seed: int, start: InputPosition, train_inputs: list, val_inputs: list | None,
                       ) -> Iterator[LabelledDocument]:
    """Every document from `start` on with its split and position, in input order (train files first).

    Positions number the files of both groups together (train files, then val files), as the progress
    file records them.
    """
    groups = [(train_files, train_inputs, None)]
    if val_inputs is not None:
        groups.append((val_files, val_inputs, "val"))
    first = 0
    for files, described, label in groups:
        if start.file < first + len(files):
            local = (InputPosition(start.file - first, start.offset, start.line) if start.file >= first
                     else InputPosition())
            for position, document in iter_positioned_documents(files, errors, local, described_as=described):
                split = label or ("val" if is_validation(document.text, val_fraction, seed) else "train")
                yield split, InputPosition(position.file + first, position.offset, position.line), document
        first += len(files)


def batched(items: Iterable[LabelledDocument]) -> Iterator[list[LabelledDocument]]:
    """Group documents into batches of about BATCH_CHARACTERS characters (at most BATCH_DOCUMENTS)."""
    batch, characters = [], 0
    for item in items:
        batch.append(item)
        characters += len(item[2].text)
        if characters >= BATCH_CHARACTERS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


# --- Parallel tokenization: batches go to worker processes, results come back in order. ---

_worker_tokenizer = None
_worker_dtype = None


def _start_worker(tokenizer_dir: str, dtype: type) -> None:
    """Pool initializer: load the tokenizer once per worker; the processes are the parallelism."""
    global _worker_tokenizer, _worker_dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _worker_tokenizer, _worker_dtype = load_tokenizer(tokenizer_dir), dtype


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (kill -9 gives it no chance to stop the pool) exits by itself,
    instead of waiting forever on a task queue that no one writes to."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(texts: list[str]) -> list[tuple[np.ndarray, int]]:
    return encode_texts(_worker_tokenizer, texts, _worker_dtype)


def encode_texts(tokenizer, texts: list[str], dtype: type) -> list[tuple[np.ndarray, int]]:
    """(token ids + <|endoftext|>, UTF-8 byte count) for each text."""
    eot = tokenizer.eot_id
    backend = tokenizer.backend
    # encode_batch_fast (tokenizers >= 0.20) gives the same ids without computing character offsets.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encoded = []
    for encoding, text in zip(encode(texts, add_special_tokens=False), texts):
        tokens = np.empty(len(encoding.ids) + 1, dtype=dtype)
        tokens[:-1] = encoding.ids
        tokens[-1] = eot
        encoded.append((tokens, len(text.encode("utf-8"))))
    return encoded


class TokenEncoder:
    """Encode batches in order, either in this process or in a pool of worker processes.

    At most 2 x workers batches are in flight, so a huge corpus never piles up in memory
    (Pool.imap would read the whole input ahead).
    """

    def __init__(self, tokenizer, tokenizer_dir: str | Path, dtype: type, workers: int):
        self.tokenizer, self.dtype, self.workers = tokenizer, dtype, workers
        self.pool = None
        if workers > 1:
            # "spawn": workers start as fresh interpreters that import only this module (numpy and the
            # tokenizer, ~40 MB), not copies of a parent that may hold torch (the CLI imports it).
            self.pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_start_worker, initargs=(str(tokenizer_dir), dtype))

    def encode(self, batches: Iterable[list[LabelledDocument]]) -> Iterator[tuple[list, list]]:
        if self.pool is None:
            for batch in batches:
                yield batch, encode_texts(self.tokenizer, [doc.text for _, _, doc in batch], self.dtype)
            return
        in_flight: deque = deque()
        for batch in batches:
            texts = [doc.text for _, _, doc in batch]
            in_flight.append(([item[:2] for item in batch], self.pool.apply_async(_encode_in_worker, (texts,))))
            if len(in_flight) >= 2 * self.workers:
                done, result = in_flight.popleft()
                yield done, result.get()
        while in_flight:
            done, result = in_flight.popleft()
            yield done, result.get()

    def __enter__(self) -> TokenEncoder:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def check_both_splits(writers: dict[str, ShardWriter], train_inputs: list, val_inputs: list | None,
                      val_fraction: float) -> None:
    """Training needs documents in both splits; say how to get them when a split came out empty."""
    total = writers["train"].total_documents + writers["val"].total_documents
    if val_inputs is None and writers["val"].total_documents == 0:
        raise DataError(f"--val-fraction {val_fraction} held out none of the {total} documents (whole documents "
                        f"are held out); raise --val-fraction, pass --val-input FILES, or split the corpus "
                        f"into more documents")
    if writers["train"].total_documents == 0:
        where = ", ".join(str(p) for p in train_inputs)
        raise DataError(f"no training documents left in {where} (all {total} went to validation); "
                        f"lower --val-fraction or add more documents")


def save_tokenizer_copy(tokenizer, target: Path) -> None:
    """Save the tokenizer next to the data (temp folder, then rename)."""
    with atomic_path(target, directory=True) as tmp:
        tokenizer.save(tmp)


def measure_throughput(tokens: int, num_bytes: int, seconds: float) -> dict[str, float]:
    """Tokens/s and MB/s (of UTF-8 text) of this run, which for a resumed run is only the part it did."""
    seconds = max(seconds, 1e-9)
    return {"seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
            "mb_per_second": round(num_bytes / 1e6 / seconds, 3)}


def print_summary(meta: dict, throughput: dict[str, float], out: Path) -> None:
    for split in SPLITS:
        s = meta[split]
        ratio = s["bytes"] / max(s["tokens"] - s["documents"], 1)
        print(f"{split}: {s['documents']:,} documents, {s['bytes']:,} bytes -> {s['tokens']:,} tokens "
              f"({ratio:.2f} bytes/token) in {len(s['shards'])} shards")
    print(f"wrote {out} ({meta['dtype']}) in {throughput['seconds']:.1f} s: "
          f"{throughput['tokens_per_second'] / 1e6:.2f} M tokens/s, {throughput['mb_per_second']:.2f} MB/s")
