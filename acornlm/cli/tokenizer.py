"""`acornlm tokenizer train` and `acornlm tokenizer stats`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, Literal

from acornlm.errors import ConfigError

# `train` reports compression on at most this much of the training text, so a huge corpus is not encoded twice.
TRAIN_STATS_MAX_BYTES = 64 * 1024 * 1024


def train(
    input: list[str] | None = None,
    kind: Literal["bpe", "char"] = "bpe",
    vocab_size: int = 4096,
    out: str | None = None,
    errors: Literal["strict", "replace"] = "strict",
) -> dict[str, Any]:
    """Train a tokenizer on a corpus and save it (tokenizer.json + tokenizer_config.json).

    Args:
        input: Corpus files or folders (.txt/.md one document per file, .jsonl {"text": ...} per line, .parquet text column).
        kind: "bpe" (byte-level BPE, GPT-2 style; never an unknown token) or "char" (one token per character, nanoGPT style).
        vocab_size: Tokens in the vocabulary, including the 3 special tokens. BPE needs at least 259 and raises if the
            corpus cannot support the size. For char it is an upper bound: the vocabulary is every character seen
            (plus 4 reserved tokens), and if that does not fit only the most frequent characters are kept.
        out: Directory to write the tokenizer to.
        errors: What to do with bytes that are not UTF-8: "strict" stops with the file and offset, "replace" uses U+FFFD.

    Returns:
        The compression statistics on the training text (see `acornlm tokenizer stats`).
    """
    from acornlm.tokenizer import train_tokenizer
    from acornlm.tokenizer.stats import compression_stats, describe_stats

    inputs = _require_inputs(input)
    if not out:
        raise ConfigError("--out is required: the directory to save the tokenizer in")
    print(f"training a {kind} tokenizer (vocab size {vocab_size}) on {', '.join(inputs)} ...", flush=True)
    # The library's progress bars only make sense on a terminal (in a log file they are blank lines).
    show_progress = sys.stderr.isatty()
    tokenizer = train_tokenizer(_texts(inputs, errors), kind=kind, vocab_size=vocab_size, show_progress=show_progress)
    tokenizer.save(out)
    print(f"saved a {kind} tokenizer with {tokenizer.vocab_size:,} tokens to {out} "
          f"(fingerprint {tokenizer.fingerprint[:12]})")
    stats = compression_stats(tokenizer, _texts(inputs, errors), max_bytes=TRAIN_STATS_MAX_BYTES)
    print(f"on the training text: {describe_stats(stats)}")
    return stats


def stats(
    tokenizer: str | None = None,
    input: list[str] | None = None,
    errors: Literal["strict", "replace"] = "strict",
) -> dict[str, Any]:
    """Measure how a tokenizer compresses a corpus: tokens, bytes, bytes per token, chars per token.

    Prints one JSON line (for scripts) and one readable line; run it with a char and a BPE tokenizer to compare.

    Args:
        tokenizer: Directory of a saved tokenizer (or a checkpoint / prepared-data directory holding one).
        input: Corpus files or folders to encode.
        errors: What to do with bytes that are not UTF-8: "strict" stops with the file and offset, "replace" uses U+FFFD.

    Returns:
        The statistics as a dict (the JSON line's contents).
    """
    from acornlm.tokenizer import load_tokenizer
    from acornlm.tokenizer.stats import compression_stats, describe_stats

    if not tokenizer:
        raise ConfigError("--tokenizer is required: the directory of a saved tokenizer")
    inputs = _require_inputs(input)
    result = {"tokenizer": tokenizer, **compression_stats(load_tokenizer(tokenizer), _texts(inputs, errors))}
    print(json.dumps(result))
    print(describe_stats(result))
    return result


def _require_inputs(input: list[str] | None) -> list[str]:
    if isinstance(input, str):
        input = [input]
    if not input:
        raise ConfigError("--input is required: one or more corpus files or folders (.txt, .jsonl, .parquet)")
    return list(input)


def _texts(inputs: list[str], errors: str) -> Iterator[str]:
    from acornlm.data.corpus import iter_documents

    for document in iter_documents(inputs, errors=errors):
        yield document.text
