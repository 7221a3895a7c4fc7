"""Tokenize a corpus once into flat token files that training can memory-map.

    out/train.bin   every training document's token ids followed by <|endoftext|>, back to back
    out/val.bin     the same for the validation documents
    out/meta.json   tokenizer identity, dtype, and per split: tokens, documents, UTF-8 bytes, sources
    out/tokenizer/  a copy of the tokenizer, so the data folder is self-describing

The files are raw arrays of np.uint16 (vocabularies up to 65,536 ids) or np.uint32, exactly like
nanoGPT's `train.bin`. The UTF-8 byte counts let evaluation report bits per byte, which (unlike loss
per token) is comparable across tokenizers.

Validation data comes from, in order of preference: `val_inputs`; the `train/` and `val/` subfolders of
a single input folder (what `acornlm data fetch` writes); or `val_fraction` of the documents, chosen by
a hash of each document's text. Hashing the text (not the position) makes the choice independent of
input order and sends identical documents to the same split, so duplicates cannot leak into validation.

Output is deterministic: the same inputs and tokenizer give byte-identical files, whatever `workers` is.
Documents stream through in batches and go straight to disk, so memory stays bounded for any corpus size.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from acornlm.data.corpus import Document, Errors, iter_documents
from acornlm.errors import ConfigError, DataError
from acornlm.files import atomic_path, atomic_write_json
from acornlm.tokenizer import load_tokenizer
from acornlm.version import __version__

META_FILE = "meta.json"
TOKENIZER_SUBDIR = "tokenizer"
SPLITS = ("train", "val")
BATCH_CHARACTERS = 1 << 20  # ~1 MB of text per batch handed to a worker
BATCH_DOCUMENTS = 1024


def prepare_data(inputs: Sequence[str | Path], tokenizer_dir: str | Path, out: str | Path,
                 val_inputs: Sequence[str | Path] | None = None, val_fraction: float = 0.0,
                 workers: int = 0, errors: Errors = "strict", seed: int = 0) -> dict[str, Any]:
    """Write train.bin, val.bin, meta.json and tokenizer/ into `out`; return meta plus throughput.

    `workers`: 0 = one process per CPU core; 1 = tokenize in this process; N = N worker processes.
    """
    train_inputs, val_inputs = resolve_split_inputs(inputs, val_inputs, val_fraction)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    documents = labelled_documents(train_inputs, val_inputs, val_fraction, errors, seed)
    writers: dict[str, SplitWriter] = {}
    try:
        for split in SPLITS:
            writers[split] = SplitWriter(out / f"{split}.bin", dtype)
        with TokenEncoder(tokenizer, tokenizer_dir, dtype, resolve_workers(workers)) as encoder, \
                tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=None) as progress:
            for batch, encoded in encoder.encode(batched(documents)):
                for (split, _), (tokens, num_bytes) in zip(batch, encoded):
                    writers[split].add(tokens, num_bytes)
                    progress.update(num_bytes)
        check_both_splits(writers, train_inputs, val_inputs, val_fraction)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    seconds = time.perf_counter() - started

    meta = {
        "format": "acornlm-data",
        "version": 1,
        "acornlm_version": __version__,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind,
                      "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
        "dtype": np.dtype(dtype).name,
        **{split: writers[split].stats() for split in SPLITS},
        # With a fraction, val documents are the train inputs' documents whose text hash falls below it.
        "sources": {"train": [str(p) for p in train_inputs],
                    "val": [str(p) for p in val_inputs] if val_inputs is not None else [],
                    "val_fraction": val_fraction if val_inputs is None else 0.0,
                    "seed": seed},
    }
    (out / META_FILE).unlink(missing_ok=True)  # an older run's meta must never describe the new files
    for writer in writers.values():
        writer.commit()
    save_tokenizer_copy(tokenizer, out / TOKENIZER_SUBDIR)
    atomic_write_json(out / META_FILE, meta)  # written last: its presence means the folder is complete

    throughput = measure_throughput(meta, seconds)
    print_summary(meta, throughput, out)
    return {**meta, "throughput": throughput}


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


def labelled_documents(train_inputs: list, val_inputs: list | None, val_fraction: float,
                       errors: Errors, seed: int) -> Iterator[tuple[str, Document]]:
    """Every document with the split it goes to, in input order (train inputs first)."""
    if val_inputs is None:
        for document in iter_documents(train_inputs, errors):
            yield ("val" if is_validation(document.text, val_fraction, seed) else "train"), document
        return
    for document in iter_documents(train_inputs, errors):
        yield "train", document
    for document in iter_documents(val_inputs, errors):
        yield "val", document


def batched(items: Iterable[tuple[str, Document]]) -> Iterator[list[tuple[str, Document]]]:
    """Group documents into batches of about BATCH_CHARACTERS characters (at most BATCH_DOCUMENTS)."""
    batch, characters = [], 0
    for item in items:
        batch.append(item)
        characters += len(item[1].text)
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

    _worker_tokenizer, _worker_dtype = load_tokenizer(tokenizer_dir), dtype


def _encode_in_worker(texts: list[str]) -> list[tuple[np.ndarray, int]]:
    return encode_texts(_worker_tokenizer, texts, _worker_dtype)


def encode_texts(tokenizer, texts: list[str], dtype: type) -> list[tuple[np.ndarray, int]]:
    """(token ids + <|endoftext|>, UTF-8 byte count) for each text."""
    eot = tokenizer.eot_id
    return [(np.array([*ids, eot], dtype=dtype), len(text.encode("utf-8")))
            for ids, text in zip(tokenizer.encode_batch(texts), texts)]


class TokenEncoder:
    """Encode batches in order, either in this process or in a pool of worker processes.

    At most 2 x workers batches are in flight, so a huge corpus never piles up in memory
    (Pool.imap would read the whole input ahead).
    """

    def __init__(self, tokenizer, tokenizer_dir: str | Path, dtype: type, workers: int):
        self.tokenizer, self.dtype, self.workers = tokenizer, dtype, workers
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context().Pool(
                workers, initializer=_start_worker, initargs=(str(tokenizer_dir), dtype))

    def encode(self, batches: Iterable[list[tuple[str, Document]]]) -> Iterator[tuple[list, list]]:
        if self.pool is None:
            for batch in batches:
                yield batch, encode_texts(self.tokenizer, [doc.text for _, doc in batch], self.dtype)
            return
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append((batch, self.pool.apply_async(_encode_in_worker, ([doc.text for _, doc in batch],))))
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


# --- Output files: written under temporary names, renamed into place only when complete. ---

class SplitWriter:
    """Append tokens of one split to a temporary file and count tokens, documents and bytes."""

    def __init__(self, path: Path, dtype: type):
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.tokens = self.documents = self.bytes = 0

    def add(self, tokens: np.ndarray, num_bytes: int) -> None:
        self.file.write(tokens.tobytes())
        self.tokens += len(tokens)
        self.documents += 1
        self.bytes += num_bytes

    def stats(self) -> dict[str, Any]:
        return {"file": self.path.name, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def check_both_splits(writers: dict[str, SplitWriter], train_inputs: list, val_inputs: list | None,
                      val_fraction: float) -> None:
    """Training needs documents in both splits; say how to get them when a split came out empty."""
    total = writers["train"].documents + writers["val"].documents
    if val_inputs is None and writers["val"].documents == 0:
        raise DataError(f"--val-fraction {val_fraction} held out none of the {total} documents (whole documents "
                        f"are held out); raise --val-fraction, pass --val-input FILES, or split the corpus "
                        f"into more documents")
    if writers["train"].documents == 0:
        where = ", ".join(str(p) for p in train_inputs)
        raise DataError(f"no training documents left in {where} (all {total} went to validation); "
                        f"lower --val-fraction or add more documents")


def save_tokenizer_copy(tokenizer, target: Path) -> None:
    """Save the tokenizer next to the data (temp folder, then rename)."""
    with atomic_path(target, directory=True) as tmp:
        tokenizer.save(tmp)


def measure_throughput(meta: dict, seconds: float) -> dict[str, float]:
    tokens = sum(meta[split]["tokens"] for split in SPLITS)
    num_bytes = sum(meta[split]["bytes"] for split in SPLITS)
    seconds = max(seconds, 1e-9)
    return {"seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
            "mb_per_second": round(num_bytes / 1e6 / seconds, 3)}


def print_summary(meta: dict, throughput: dict[str, float], out: Path) -> None:
    for split in SPLITS:
        s = meta[split]
        ratio = s["bytes"] / max(s["tokens"] - s["documents"], 1)
        print(f"{split}: {s['documents']:,} documents, {s['bytes']:,} bytes -> {s['tokens']:,} tokens "
              f"({ratio:.2f} bytes/token)")
    print(f"wrote {out} ({meta['dtype']}) in {throughput['seconds']:.1f} s: "
          f"{throughput['tokens_per_second'] / 1e6:.2f} M tokens/s, {throughput['mb_per_second']:.2f} MB/s")
