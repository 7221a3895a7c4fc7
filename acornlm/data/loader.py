"""Batches of token windows from a prepared data folder, as a pure function of the training step.

Training samples random windows of `seq_len + 1` tokens from the memory-mapped split (x is the window
without its last token, y the window without its first: next-token targets). The window starts of global
step `s` come from `numpy.random.Generator(PCG64([seed, s]))`, drawn for the whole global batch at once:

    batch_size x grad_accum_steps x world_size starts;  rank r at micro-step a takes the slice
    [(a * world_size + r) * batch_size, +batch_size)

so a batch depends on nothing but (seed, step, micro_step, rank, world_size). Resuming only needs the step,
and one process accumulating 2 micro-batches sees exactly what 2 processes with 1 micro-batch each see.

A split written as several shards (`train-00000.bin`, ...) is read as one stream: the shards back to
back, exactly the tokens a single file would hold. A window may span two shards (shards end between
documents, so that is no different from spanning two documents inside one shard), and the batches of
sharded data equal those of the same tokens in one file. Folders from before shards (one `train.bin`
per split, meta.json version 1) load unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acornlm.errors import DataError

META_FILE = "meta.json"
# Evaluation draws from its own random stream, [seed, EVAL_STREAM, index], which no training step reaches.
EVAL_STREAM = 2**31 - 1


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta.json of a prepared data folder, with the fields the loader and trainer rely on."""
    file = Path(data_dir) / META_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        hint = "does not exist" if not Path(data_dir).exists() else f"holds no {META_FILE}"
        raise DataError(f"{data_dir} {hint}: prepare it first with `acornlm data prepare --out {data_dir} ...`") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{file} is corrupt ({exc}); run `acornlm data prepare` again") from exc
    required = {"tokenizer": dict, "dtype": str, "train": dict, "val": dict}
    for key, kind in required.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), kind):
            raise DataError(f"{file} is not acornlm data meta: missing or malformed {key!r}; "
                            f"run `acornlm data prepare` again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{file}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
    return meta


def check_tokenizer(meta: dict[str, Any], fingerprint: str, data_dir: str | Path, tokenizer_source: str) -> None:
    """Refuse to train a model on tokens produced by a different tokenizer: the ids would mean other strings."""
    expected = meta["tokenizer"].get("fingerprint")
    if expected != fingerprint:
        info = meta["tokenizer"]
        raise DataError(
            f"data in {data_dir} was prepared with a {info.get('kind')} tokenizer of {info.get('vocab_size')} tokens "
            f"(fingerprint {str(expected)[:16]}), but the model uses the tokenizer from {tokenizer_source} "
            f"(fingerprint {fingerprint[:16]}); prepare the data again with "
            f"`acornlm data prepare --tokenizer {tokenizer_source} ...`"
        )


class TokenLoader:
    """Random (x, y) windows of one split; see the module docstring for the sampling rule."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, grad_accum_steps: int = 1):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.meta = read_meta(data_dir)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.tokens = open_tokens(Path(data_dir), self.meta, split)
        self.n_tokens = len(self.tokens)
        if self.n_tokens < seq_len + 2:
            raise DataError(f"the {split} split of {data_dir} has {self.n_tokens} tokens, but seq_len {seq_len} "
                            f"needs at least {seq_len + 2}; use a smaller --train.seq_len or more {split} data")

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step across all ranks and micro-steps."""
        return self.batch_size * self.seq_len * self.grad_accum_steps * self.world_size

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch `micro_step` of global step `step`: int64 (x, y), each [batch_size, seq_len]."""
        if not 0 <= micro_step < self.grad_accum_steps:
            raise ValueError(f"micro_step {micro_step} is outside 0..{self.grad_accum_steps - 1}")
        count = self.batch_size * self.grad_accum_steps * self.world_size
        starts = self.window_starts([self.seed, step], count)
        first = (micro_step * self.world_size + self.rank) * self.batch_size
        return self.windows(starts[first:first + self.batch_size])

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation micro-batch `index`: the same windows at every evaluation, different on each rank."""
        starts = self.window_starts([self.seed, EVAL_STREAM, index], self.batch_size * self.world_size)
        first = self.rank * self.batch_size
        return self.windows(starts[first:first + self.batch_size])

    def window_starts(self, key: list[int], count: int) -> np.ndarray:
        """`count` uniform window starts in [0, n_tokens - seq_len - 1), in draw order."""
        rng = np.random.Generator(np.random.PCG64(key))
        return rng.integers(0, self.n_tokens - self.seq_len - 1, size=count)

    def windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for windows of seq_len + 1 tokens at `starts`."""
        rows = self.tokens.windows(starts, self.seq_len + 1).astype(np.int64)  # [batch, seq_len + 1]
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TokenStream:
    """A split's shard files, memory-mapped, read as one array of token ids.

    Supports len(), integer and slice indexing (step 1), `windows` for batches and np.asarray. Only
    the pages a read touches are loaded, so a 50 GB split costs no memory up front.
    """

    def __init__(self, arrays: list[np.ndarray], dtype: np.dtype):
        self.arrays = [a for a in arrays if len(a)]
        self.dtype = np.dtype(dtype)
        lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.ends = np.cumsum(lengths)  # shard i holds stream positions [ends[i] - len_i, ends[i])
        self.starts = self.ends - lengths

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: int | slice) -> np.ndarray | np.integer:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("TokenStream slices must have step 1")
            return self.read(start, max(stop - start, 0))
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} is outside the split's {len(self)} tokens")
        shard = int(np.searchsorted(self.ends, index, side="right"))
        return self.arrays[shard][index - self.starts[shard]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        tokens = self.read(0, len(self))
        return tokens if dtype is None else tokens.astype(dtype)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, joined across shard boundaries."""
        if length <= 0:
            return np.zeros(0, dtype=self.dtype)
        shard = int(np.searchsorted(self.ends, start, side="right"))
        offset = start - int(self.starts[shard])
        if offset + length <= len(self.arrays[shard]):
            return self.arrays[shard][offset:offset + length]  # the common case: a view, no copy
        pieces, remaining = [], length
        while remaining > 0 and shard < len(self.arrays):
            piece = self.arrays[shard][offset:offset + remaining]
            pieces.append(piece)
            remaining -= len(piece)
            shard, offset = shard + 1, 0
        return np.concatenate(pieces)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] token windows; one fancy-indexing read when the split is one file."""
        if len(self.arrays) == 1:
            return self.arrays[0][starts[:, None] + np.arange(length)]
        return np.stack([self.read(int(start), length) for start in starts])


def shard_list(meta: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The files of a split: its shard index (version 2) or the single `train.bin` of version 1."""
    info = meta[split]
    if "shards" in info:
        return info["shards"]
    return [{"file": info.get("file", f"{split}.bin"), "tokens": info.get("tokens"),
             "documents": info.get("documents"), "bytes": info.get("bytes")}]


def open_tokens(data_dir: Path, meta: dict[str, Any], split: str) -> TokenStream:
    """Memory-map a split's shard files as one stream, after checking each file's size against meta.json."""
    shards = shard_list(meta, split)
    arrays = [open_token_file(Path(data_dir), meta, shard, f"shard {i + 1} of {len(shards)} of the {split} split")
              for i, shard in enumerate(shards)]
    return TokenStream(arrays, np.dtype(meta["dtype"]))


def token_file_entry(meta: dict[str, Any], file_name: str) -> tuple[str, dict[str, Any]]:
    """(split, index entry) of the token file `file_name` (a shard, or a version-1 train.bin/val.bin)."""
    for split in ("train", "val"):
        for shard in shard_list(meta, split):
            if shard["file"] == file_name:
                return split, shard
    raise DataError(f"{file_name} is not one of the token files listed in {META_FILE}")


def open_token_file_named(data_dir: Path, meta: dict[str, Any], file_name: str) -> np.ndarray:
    """Memory-map one token file of a prepared folder by its name, checked against meta.json."""
    split, shard = token_file_entry(meta, file_name)
    return open_token_file(Path(data_dir), meta, shard, f"a shard of the {split} split")


def open_token_file(data_dir: Path, meta: dict[str, Any], shard: dict[str, Any], what: str) -> np.ndarray:
    """Memory-map one token file listed in meta.json; DataError naming it when missing or the wrong size."""
    file = data_dir / shard["file"]
    dtype = np.dtype(meta["dtype"])
    if not file.is_file():
        raise DataError(f"{file} is missing ({what}); restore it or prepare the data again with `acornlm data prepare`")
    size = file.stat().st_size
    expected = shard.get("tokens")
    if size % dtype.itemsize or (isinstance(expected, int) and size // dtype.itemsize != expected):
        raise DataError(f"{file} holds {size} bytes, but meta.json says {expected} {dtype.name} tokens "
                        f"({expected * dtype.itemsize if isinstance(expected, int) else '?'} bytes) for {what}; "
                        f"the file is truncated or from another run: prepare the data again")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files; the caller reports too few tokens
    return np.memmap(file, dtype=dtype, mode="r")
