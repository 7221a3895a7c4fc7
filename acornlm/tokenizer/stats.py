"""How well a tokenizer compresses text: the numbers that let you compare char and BPE side by side.

bytes per token = UTF-8 bytes / tokens. Higher means each token carries more text, so the same
context length covers more of the document and training sees more text per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

from acornlm.tokenizer.special_tokens import UNK_TOKEN
from acornlm.tokenizer.tokenizer import Tokenizer

ENCODE_BATCH_DOCUMENTS = 256  # documents handed to the parallel encoder at once


def compression_stats(tokenizer: Tokenizer, texts: Iterable[str], max_bytes: int | None = None) -> dict[str, Any]:
    """Encode `texts` and count tokens, bytes and characters.

    max_bytes: stop after the batch that passes this many bytes (None = all of it); `documents`
    says how many were measured.
    """
    unk_id = tokenizer.token_to_id(UNK_TOKEN)
    documents = tokens = num_bytes = chars = unknown = 0
    text_iter = iter(texts)
    while batch := list(islice(text_iter, ENCODE_BATCH_DOCUMENTS)):
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            documents += 1
            tokens += len(ids)
            num_bytes += len(text.encode("utf-8"))
            chars += len(text)
            if unk_id is not None:
                unknown += ids.count(unk_id)
        if max_bytes is not None and num_bytes >= max_bytes:
            break
    return {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "documents": documents,
        "tokens": tokens,
        "bytes": num_bytes,
        "chars": chars,
        "bytes_per_token": round(num_bytes / tokens, 4) if tokens else 0.0,
        "chars_per_token": round(chars / tokens, 4) if tokens else 0.0,
        "unknown_tokens": unknown,
    }


def describe_stats(stats: dict[str, Any]) -> str:
    """One readable line for `compression_stats` output."""
    line = (
        f"{stats['kind']} tokenizer, {stats['vocab_size']:,} tokens in vocab: {stats['tokens']:,} tokens for "
        f"{stats['bytes']:,} bytes ({stats['chars']:,} chars, {stats['documents']:,} documents) = "
        f"{stats['bytes_per_token']:.2f} bytes/token, {stats['chars_per_token']:.2f} chars/token"
    )
    if stats["unknown_tokens"]:
        line += f"; {stats['unknown_tokens']:,} characters unknown to the tokenizer became {UNK_TOKEN}"
    return line
