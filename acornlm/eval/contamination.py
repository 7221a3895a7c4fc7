"""Benchmark contamination: how much of each benchmark question appears word for word in a
training corpus.

An item's contamination is the fraction of its n-grams (13 words by default, the convention of
GPT-3's and lm-evaluation-harness's decontamination) found anywhere in the corpus:

    contamination(item) = |ngrams(item) ∩ ngrams(corpus)| / |ngrams(item)|

Text is normalised first (NFKC, lower case, punctuation dropped), and a "word" is a run of
letters or digits, or a single CJK character, so Chinese text (which has no spaces) gets
n-grams too. A prepared token file (.bin) is compared in token ids instead: the items are
encoded with the tokenizer the data was prepared with.

Memory stays bounded by the benchmark, not the corpus: the items' n-gram hashes form one sorted
array, the corpus streams past it in chunks, and only the hashes it matches are kept.

    grams = BenchmarkNgrams.from_texts({"q1": "...", "q2": "..."}, n=13)
    scan = scan_corpus(["corpus.txt"], grams)       # scan.found, scan.bytes, scan.seconds
    fractions = grams.fractions(scan.found)         # {"q1": 0.0, "q2": 1.0}
"""

from __future__ import annotations

import codecs
import re
import resource
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from acornlm.data.corpus import JSONL_SUFFIXES, PARQUET_SUFFIXES, iter_documents
from acornlm.data.loader import META_FILE, open_token_file_named, open_tokens, read_meta, token_file_entry
from acornlm.data.prepare import TOKENIZER_SUBDIR
from acornlm.errors import ConfigError
from acornlm.eval.benchmarks import Item
from acornlm.tokenizer import Tokenizer, load_tokenizer

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
CJK_CHAR = re.compile(f"[{CJK}]")
WORD = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")
CHUNK_BYTES = 4 << 20  # text read per step: ~50 MB of Python strings at a time, whatever the corpus size
CHUNK_TOKENS = 4 << 20  # token ids read per step from a prepared .bin
BITMAP_SIZE = 1 << 24  # 16 MB; with a million benchmark n-grams, 6% of corpus n-grams pass to the exact check
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # the golden-ratio constant of Fibonacci hashing


def words(text: str) -> list[str]:
    """Normalised words: NFKC, lower case, runs of letters/digits, each CJK character on its own."""
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def word_hashes(tokens: Sequence[str]) -> np.ndarray:
    """One 64-bit hash per word (Python's string hash: fixed within a run, which is all we need)."""
    return np.fromiter(map(hash, tokens), dtype=np.int64, count=len(tokens)).view(np.uint64)


def id_hashes(ids: np.ndarray) -> np.ndarray:
    """Token ids spread over 64 bits, so nearby ids do not give nearby n-gram hashes."""
    return (ids.astype(np.uint64) + np.uint64(1)) * MULTIPLIER


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """A polynomial hash of every run of n consecutive elements: h_j = sum_i hashes[j+i] * B^(n-1-i)
    (mod 2^64), computed with n vector operations instead of a Python loop per n-gram."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            out = out * MULTIPLIER + hashes[i:i + count]
    return out


@dataclass
class BenchmarkNgrams:
    """The n-gram hashes of every benchmark item, one sorted array of all of them, and a bitmap of
    their low bits: a Bloom filter with one hash function, which rejects almost every corpus n-gram
    with one memory lookup before the exact (binary search) check."""

    n: int
    per_item: dict[str, np.ndarray]
    table: np.ndarray = field(init=False)
    bitmap: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        arrays = [h for h in self.per_item.values() if len(h)]
        self.table = np.unique(np.concatenate(arrays)) if arrays else np.empty(0, dtype=np.uint64)
        self.bitmap = np.zeros(BITMAP_SIZE, dtype=bool)
        self.bitmap[self.table & np.uint64(BITMAP_SIZE - 1)] = True

    @classmethod
    def from_texts(cls, texts: Mapping[str, str], n: int = 13, tokenizer: Tokenizer | None = None) -> BenchmarkNgrams:
        """Items keyed by id; with a tokenizer, n-grams of token ids (for a prepared .bin corpus)."""
        if n < 1:
            raise ConfigError(f"--ngram must be >= 1, got {n}")
        per_item = {}
        for key, text in texts.items():
            if tokenizer is None:
                hashes = word_hashes(words(text))
            else:
                hashes = id_hashes(np.asarray(tokenizer.encode(text), dtype=np.int64))
            per_item[key] = np.unique(ngram_hashes(hashes, n))
        return cls(n, per_item)

    def mark(self, hashes: np.ndarray, seen: np.ndarray) -> None:
        """Set seen[i] for every benchmark n-gram table[i] among the corpus n-gram `hashes`."""
        if not len(self.table) or not len(hashes):
            return
        hashes = hashes[self.bitmap[hashes & np.uint64(BITMAP_SIZE - 1)]]
        at = np.minimum(np.searchsorted(self.table, hashes), len(self.table) - 1)
        seen[at[self.table[at] == hashes]] = True

    def fractions(self, found: np.ndarray) -> dict[str, float | None]:
        """Each item's contaminated fraction; None for an item shorter than n words (nothing to check)."""
        return {key: (float(np.isin(h, found).mean()) if len(h) else None) for key, h in self.per_item.items()}


@dataclass
class Scan:
    """What a corpus scan found: the benchmark n-grams seen (word and token-id ones) and what it read."""

    found: np.ndarray
    found_ids: np.ndarray
    bytes: int
    tokens: int
    seconds: float


def safe_cut(text: str) -> int:
    """The last place `text` can be cut without splitting a word: after a space, punctuation or a
    CJK character (Chinese text may have no spaces for megabytes)."""
    for cut in range(len(text), max(0, len(text) - 4096), -1):
        if not text[cut - 1].isalnum() or CJK_CHAR.match(text[cut - 1]):
            return cut
    return len(text)  # a "word" of 4096 letters: cutting it costs nothing


def _text_chunks(file: Path) -> Iterator[str]:
    """A text file in pieces of about CHUNK_BYTES, each ending where no word is cut."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry = ""
    with open(file, "rb") as handle:
        while True:
            data = handle.read(CHUNK_BYTES)
            try:
                text = carry + decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{file} is not UTF-8 text near byte {handle.tell() - len(data) + exc.start}") from exc
            if not data:
                if text:
                    yield text
                return
            cut = safe_cut(text)
            yield text[:cut]
            carry = text[cut:]


def _document_chunks(paths: Sequence[Path]) -> Iterator[str]:
    """jsonl/parquet documents grouped into pieces of about CHUNK_BYTES."""
    group: list[str] = []
    size = 0
    for document in iter_documents(paths):
        group.append(document.text)
        size += len(document.text)
        if size >= CHUNK_BYTES:
            yield "\n".join(group)
            group, size = [], 0
    if group:
        yield "\n".join(group)


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and (path / META_FILE).is_file():
            files.append(path)  # a prepared data folder
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"training corpus {path} does not exist")
    if not files:
        raise ConfigError("no training corpus files were found in " + ", ".join(map(str, paths)))
    return files


def prepared_folder(path: Path) -> Path | None:
    """The prepared data folder that `path` is (or whose .bin file it is), else None."""
    folder = path if path.is_dir() else path.parent
    return folder if (folder / META_FILE).is_file() and (path.is_dir() or path.suffix == ".bin") else None


def scan_corpus(paths: Sequence[str | Path], grams: BenchmarkNgrams,
                token_grams: BenchmarkNgrams | None = None) -> Scan:
    """Stream the corpus past the benchmark's n-grams; the matched hashes and what was read.

    Text, jsonl and parquet files are compared in words (`grams`); a prepared data folder or its
    .bin files in token ids (`token_grams`, built with that data's tokenizer).
    """
    seen = np.zeros(len(grams.table), dtype=bool)
    seen_ids = np.zeros(len(token_grams.table) if token_grams is not None else 0, dtype=bool)
    total_bytes = total_tokens = 0
    started = time.perf_counter()
    for file in corpus_files(paths):
        folder = prepared_folder(file)
        if folder is not None:
            if token_grams is None:
                raise ConfigError(f"{file} holds token ids: the n-grams of its tokenizer are needed (token_grams)")
            meta = read_meta(folder)
            if file.suffix == ".bin":  # one token file: a shard, or a whole split in the version-1 layout
                pieces = [(open_token_file_named(folder, meta, file.name), token_file_entry(meta, file.name)[1])]
            else:
                pieces = [(open_tokens(folder, meta, split), meta[split]) for split in ("train", "val")]
            for ids, info in pieces:
                for start in range(0, len(ids), CHUNK_TOKENS):  # chunks overlap by n-1 tokens
                    piece = np.asarray(ids[start:start + CHUNK_TOKENS + token_grams.n - 1], dtype=np.int64)
                    token_grams.mark(ngram_hashes(id_hashes(piece), token_grams.n), seen_ids)
                total_tokens += len(ids)
                total_bytes += int(info.get("bytes") or 0)
            continue
        suffix = file.suffix.lower()
        chunks = _document_chunks([file]) if suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES else _text_chunks(file)
        tail = np.empty(0, dtype=np.uint64)  # the last n-1 words, so n-grams across chunks are seen
        for chunk in chunks:
            hashes = np.concatenate([tail, word_hashes(words(chunk))])
            grams.mark(ngram_hashes(hashes, grams.n), seen)
            tail = hashes[len(hashes) - grams.n + 1:] if grams.n > 1 else tail
            total_bytes += len(chunk.encode("utf-8"))
    return Scan(grams.table[seen], token_grams.table[seen_ids] if token_grams is not None else np.empty(0, np.uint64),
                total_bytes, total_tokens, time.perf_counter() - started)


def item_text(question: str, choices: Iterable[str]) -> str:
    """What of an item is looked for: the question and all its options."""
    return "\n".join([question, *choices])


def needs_tokenizer(paths: Sequence[str | Path]) -> Path | None:
    """The tokenizer folder of the first prepared data folder among `paths`, if any."""
    for file in corpus_files(paths):
        folder = prepared_folder(file)
        if folder is not None:
            return folder / TOKENIZER_SUBDIR
    return None


def load_data_tokenizer(folder: Path) -> Tokenizer:
    if not folder.is_dir():
        raise ConfigError(f"{folder} is missing: the prepared data's tokenizer is needed to compare token ids")
    return load_tokenizer(folder)


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def check_contamination(items: Sequence[Item], train: Sequence[str | Path], n: int = 13,
                        threshold: float = 0.5) -> dict[str, Any]:
    """Each item's contaminated fraction in the `train` corpus, per subject and overall.

    An item counts as contaminated when its fraction is at least `threshold` (0.5: half of its
    n-grams are in the corpus word for word). Items shorter than n words cannot be checked and are
    counted apart. With a prepared data folder among `train`, an item's fraction is the larger of
    its word and token-id fractions.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be between 0 and 1, got {threshold}")
    texts = {item.where: item_text(item.question, item.choices) for item in items}
    grams = BenchmarkNgrams.from_texts(texts, n)
    tokenizer_dir = needs_tokenizer(train)
    token_grams = (BenchmarkNgrams.from_texts(texts, n, load_data_tokenizer(tokenizer_dir))
                   if tokenizer_dir is not None else None)
    scan = scan_corpus(train, grams, token_grams)
    by_words = grams.fractions(scan.found)
    by_ids = token_grams.fractions(scan.found_ids) if token_grams is not None else {}
    fractions = {key: max((f for f in (by_words[key], by_ids.get(key)) if f is not None), default=None)
                 for key in texts}
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in items:
        groups.setdefault((item.benchmark, item.subject), []).append(item)

    def summary(group: Sequence[Item]) -> dict[str, Any]:
        checked = [fractions[i.where] for i in group if fractions[i.where] is not None]
        return {"n": len(group), "checked": len(checked),
                "contaminated": sum(f >= threshold for f in checked),
                "contaminated_fraction": sum(f >= threshold for f in checked) / len(checked) if checked else None,
                "mean_overlap": sum(checked) / len(checked) if checked else None}

    megabytes = scan.bytes / 1e6
    return {
        "ngram": n, "threshold": threshold, **summary(items),
        "corpus_bytes": scan.bytes, "corpus_tokens": scan.tokens, "seconds": round(scan.seconds, 3),
        "mb_per_second": round(megabytes / scan.seconds, 2) if scan.seconds > 0 else None,
        "peak_memory_mb": peak_memory_mb(),
        "subjects": [{"benchmark": bench, "subject": subject, **summary(group)}
                     for (bench, subject), group in sorted(groups.items())],
        "items": [{"where": item.where, "subject": item.subject, "fraction": fractions[item.where]} for item in items],
    }


def contaminated_items(report: Mapping[str, Any]) -> set[str]:
    """The `where` of every item at or above the report's threshold."""
    return {row["where"] for row in report["items"]
            if row["fraction"] is not None and row["fraction"] >= report["threshold"]}
