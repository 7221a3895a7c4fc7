"""Read a training corpus as a stream of documents, whatever format it comes in.

A *document* is the unit the rest of the pipeline works with: `prepare` separates documents with
`<|endoftext|>` and holds out whole documents for validation. The formats:

    notes.txt, README.md, ...   one file = one document (plain-text suffixes, see TEXT_SUFFIXES)
    a folder                    every supported file inside, recursively, in sorted order; hidden files skipped
    data.jsonl                  one JSON object per line with a "text" string (MiniMind pretrain format)
    shard.parquet               the "text" column, one row = one document (FineWeb, nanochat shards)
    hf:NAME[:SPLIT]             a Hugging Face dataset's "text" column (optional, needs the `hf` extra)
    https://.../file.txt        a remote .txt/.jsonl file, downloaded once into the cache (optional)

Text must be UTF-8 (a leading byte-order mark is tolerated). With `errors="replace"` undecodable bytes
become U+FFFD instead of stopping the run. Empty documents are skipped; a corpus with no text at all is
an error, because training on nothing is never what was meant.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from acornlm.errors import DataError
from acornlm.files import atomic_path
from acornlm.paths import cache_dir

Errors = Literal["strict", "replace"]

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
UTF8_BOM = b"\xef\xbb\xbf"
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    """One training document and where it came from (`file`, `file:line` or `file#row`)."""

    text: str
    source: str


@dataclass(frozen=True)
class InputPosition:
    """Where a document starts in the list of input files: what a resumed `data prepare` seeks to.

    `file` indexes the list from `input_files`; `offset` is the byte offset of the line (.jsonl),
    the row number (.parquet, hf:) or 0 (a plain-text file is one document); `line` is the
    1-based line number at that offset (.jsonl only), so error messages keep naming the right line.
    """

    file: int = 0
    offset: int = 0
    line: int = 1


def iter_documents(paths: Sequence[str | Path], errors: Errors = "strict") -> Iterator[Document]:
    """Yield the non-empty documents of every input in order; DataError if they hold no text at all."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for _, document in iter_positioned_documents(input_files(paths), errors, described_as=paths):
        yield document


def input_files(paths: Sequence[str | Path]) -> list[str]:
    """The inputs as a flat list of files (folders walked in sorted order), hf: names and downloaded URLs."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[str] = []
    for spec in map(str, paths):
        if spec.startswith("hf:"):
            files.append(spec)
        elif spec.startswith(("http://", "https://")):
            files.append(str(_download_url(spec)))
        elif Path(spec).is_dir():
            files += [str(file) for file in _walk_folder(Path(spec))]
        elif Path(spec).is_file():
            files.append(spec)
        else:
            raise DataError(f"input {spec} does not exist (expected a file, a folder, hf:NAME or a URL)")
    return files


def iter_positioned_documents(files: Sequence[str], errors: Errors = "strict", start: InputPosition | None = None,
                              described_as: Sequence[str | Path] | None = None,
                              ) -> Iterator[tuple[InputPosition, Document]]:
    """(where it starts, document) for the non-empty documents of `files` (from `input_files`), from `start` on.

    Starting at a position seeks there (a byte offset in .jsonl, a row group in .parquet) instead of
    reading what comes before it. A corpus with no text at all is a DataError, checked only when
    reading from the very beginning.
    """
    if errors not in ("strict", "replace"):
        raise DataError(f"errors must be 'strict' or 'replace', got {errors!r}")
    start = start or InputPosition()
    found_any = start != InputPosition()
    for index in range(start.file, len(files)):
        here = start if index == start.file else InputPosition(index)
        for position, document in _iter_file_from(files[index], here, errors):
            if document.text:
                found_any = True
                yield position, document
    if not found_any:
        listed = ", ".join(str(p) for p in (described_as if described_as is not None else files)) or "(no inputs given)"
        raise DataError(f"the corpus is empty: no document with text in {listed}; "
                        f"supported inputs are {', '.join(SUPPORTED_SUFFIXES)} files, folders of them, "
                        f"hf:NAME and http(s) URLs")


def _walk_folder(folder: Path) -> list[Path]:
    """Supported files under `folder`, recursively, sorted by path so every run sees the same order."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(SUPPORTED_SUFFIXES):
                files.append(Path(root) / name)
    return sorted(files)


def _iter_file_from(spec: str, start: InputPosition, errors: Errors) -> Iterator[tuple[InputPosition, Document]]:
    """Read one input file by its suffix from `start`; any other suffix named explicitly is read as plain text."""
    if spec.startswith("hf:"):
        yield from _iter_hf_dataset(spec, start)
        return
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, errors, start)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path, start)
    elif start.offset == 0:
        yield start, Document(decode_utf8(path.read_bytes(), str(path), errors), str(path))


def decode_utf8(data: bytes, where: str, errors: Errors = "strict", base_offset: int = 0) -> str:
    """UTF-8 text of `data` without a leading BOM; DataError naming the byte offset of the first bad byte."""
    skipped = 0
    if data.startswith(UTF8_BOM):
        data, skipped = data[len(UTF8_BOM):], len(UTF8_BOM)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        offset = base_offset + skipped + exc.start
        raise DataError(f"{where}: not valid UTF-8 at byte offset {offset} (byte 0x{data[exc.start]:02x}); "
                        f"convert the file to UTF-8, or pass --errors replace to substitute U+FFFD") from exc


def _iter_jsonl(path: Path, errors: Errors, start: InputPosition) -> Iterator[tuple[InputPosition, Document]]:
    """One {"text": ...} object per line; blank lines are skipped, anything else malformed names its line."""
    offset = start.offset
    with open(path, "rb") as f:
        f.seek(offset)
        for line_number, raw in enumerate(f, start=start.line):
            where = f"{path}:{line_number}"
            position = InputPosition(start.file, offset, line_number)
            line = decode_utf8(raw, where, errors, base_offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
                                f'each line must be one object like {{"text": "..."}}') from exc
            if not isinstance(record, dict):
                raise DataError(f'{where}: expected a JSON object like {{"text": "..."}}, '
                                f"got {type(record).__name__}")
            if "text" not in record:
                raise DataError(f'{where}: the object has no "text" field (keys: {", ".join(record) or "none"})')
            if not isinstance(record["text"], str):
                raise DataError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')
            yield position, Document(record["text"], where)


def _iter_parquet(path: Path, start: InputPosition) -> Iterator[tuple[InputPosition, Document]]:
    """The `text` column, read in row batches so a multi-GB shard never sits in memory at once.

    Memory: one row group's text column at most (pyarrow decodes a column chunk per row group).
    Starting at row `start.offset` skips whole row groups unread.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: reading .parquet files needs pyarrow: pip install 'acornlm[parquet]'") from exc
    try:
        # pre_buffer=False: with pyarrow's default, iter_batches over all row groups buffers the whole file
        # (measured: 1.7 GB resident for a 1.6 GB file); without it, one row group at a time.
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(columns)})")
    first_group, row = 0, 0
    groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    while first_group < len(groups) and row + groups[first_group] <= start.offset:
        row += groups[first_group]
        first_group += 1
    if first_group == len(groups):
        return
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"],
                                   row_groups=range(first_group, len(groups)))
    for batch in batches:
        for value in batch.column(0).to_pylist():
            if row >= start.offset:
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{path}#{row}: the 'text' column must hold strings, got {type(value).__name__}")
                if value:
                    yield InputPosition(start.file, row, 1), Document(value, f"{path}#{row}")
            row += 1


# --- Optional online sources: never needed by the tests or the default pipeline. ---

def _iter_hf_dataset(spec: str, start: InputPosition) -> Iterator[tuple[InputPosition, Document]]:
    """`hf:NAME[:SPLIT]` streamed with the `datasets` package (its own cache applies); resumes by row count."""
    name, _, split = spec[len("hf:"):].partition(":")
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise DataError(f"{spec}: Hugging Face datasets need the hf extra: pip install 'acornlm[hf]'") from exc
    dataset = load_dataset(name, split=split or "train", streaming=True)
    if start.offset:
        dataset = dataset.skip(start.offset)
    for row, record in enumerate(dataset, start=start.offset):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{spec}#{row}: no string 'text' field (fields: {', '.join(record)})")
        yield InputPosition(start.file, row, 1), Document(text, f"{spec}#{row}")


def _download_url(url: str) -> Path:
    """Download a .txt/.jsonl URL once into the cache and return the local copy."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download.txt"
    if not name.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise DataError(f"{url}: only .txt and .jsonl URLs are supported; download other files first")
    target = cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target) as partial, urllib.request.urlopen(url, timeout=60) as response, \
                    open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except OSError as exc:
            raise DataError(f"could not download {url}: {exc}; download it yourself and pass the file") from exc
    return target
