"""Byte-level BPE (GPT-2 style), trained with the Hugging Face `tokenizers` library.

Text is first turned into UTF-8 bytes and every byte is shown as one printable unicode
character (GPT-2's `bytes_to_unicode` table). BPE then learns merges of frequent adjacent
pairs on top of those 256 byte symbols. Because all 256 bytes are in the vocabulary from the
start, any string (Chinese, emoji, binary junk) encodes without an unknown token and decodes
back exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer.special_tokens import CHAT_TOKENS, SPECIAL_TOKENS

NUM_BYTES = 256
# all bytes + specials + the chat tokens, before any merge
MIN_BPE_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS) + len(CHAT_TOKENS)


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Reject a vocabulary with no room for the bytes, the special tokens and the chat tokens."""
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ConfigError(
            f"vocab size {vocab_size} is too small for byte-level BPE: the minimum is {MIN_BPE_VOCAB_SIZE} "
            f"({NUM_BYTES} bytes + {len(SPECIAL_TOKENS)} special tokens + {len(CHAT_TOKENS)} chat tokens); "
            f"use --vocab-size {MIN_BPE_VOCAB_SIZE} or more"
        )


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> BackendTokenizer:
    """Learn `vocab_size - 259` merges from `texts`; the result always holds all 256 bytes and the specials
    (the caller adds the chat tokens after: see tokenizer.train_tokenizer)."""
    backend = BackendTokenizer(models.BPE())
    # use_regex=True splits text GPT-2 style (words, numbers, punctuation, spaces) so merges never cross words.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # listed first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def check_reached_vocab_size(backend: BackendTokenizer, learned: int, vocab_size: int) -> None:
    """The trainer stops early when no pair is left to merge; a smaller vocab than asked for is an error.
    `learned` is what BPE was asked for, `vocab_size` the user's figure (learned + the chat tokens)."""
    reached = backend.get_vocab_size(with_added_tokens=True)
    if reached < learned:
        supported = reached + vocab_size - learned
        raise DataError(
            f"the training text only supports a BPE vocabulary of {supported} tokens, not {vocab_size}: "
            f"no adjacent pair is left to merge. Use --vocab-size {supported} (or less), or train on more text"
        )


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's `bytes_to_unicode`: a printable character for every byte value.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    the characters from U+0100 upwards, in byte order. ByteLevel token strings are made of these.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    next_char = NUM_BYTES
    for byte in range(NUM_BYTES):
        if byte not in table:
            table[byte] = chr(next_char)
            next_char += 1
    return table


@cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: ByteLevel character -> byte value."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def bpe_token_bytes(token: str) -> bytes:
    """The raw bytes of a ByteLevel token string (e.g. 'Ġthe' -> b' the')."""
    table = unicode_to_bytes()
    return bytes(table[char] for char in token)
