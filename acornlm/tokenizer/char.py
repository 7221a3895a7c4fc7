"""Character-level tokenizer (one token per unicode code point), as in nanoGPT's shakespeare_char.

It is stored as an ordinary `tokenizers` tokenizer.json so saving, loading and
`transformers.AutoTokenizer` work exactly as for BPE: a WordLevel model whose "words" are single
characters, a pre-tokenizer that splits every character off, and a decoder that glues them back
together without spaces.

Vocabulary: the three specials (ids 0-2), `<|unk|>` (id 3), then the training characters in sorted
order. A character never seen in training encodes to `<|unk|>` (id 3) and decodes as the text
"<|unk|>" (or disappears with skip_special_tokens=True); it never raises.

`vocab_size` is an upper bound: when the corpus has more distinct characters than fit, the most
frequent ones are kept and the rare rest become `<|unk|>` (a warning says how many). A corpus with
fewer characters simply gives a smaller vocabulary.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from acornlm.errors import ConfigError
from acornlm.tokenizer.special_tokens import CHAT_TOKENS, SPECIAL_TOKENS, UNK_TOKEN

CHAR_RESERVED_TOKENS = (*SPECIAL_TOKENS, UNK_TOKEN)
# the reserved tokens, the chat tokens (added after the characters) and at least one character
MIN_CHAR_VOCAB_SIZE = len(CHAR_RESERVED_TOKENS) + len(CHAT_TOKENS) + 1


def count_characters(texts: Iterable[str]) -> Counter[str]:
    """How often each character occurs in `texts`."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    return counts


def check_char_vocab_size(vocab_size: int) -> None:
    """Reject a vocab size with no room for a single character."""
    if vocab_size < MIN_CHAR_VOCAB_SIZE:
        raise ConfigError(
            f"vocab size {vocab_size} is too small for a char tokenizer: the minimum is {MIN_CHAR_VOCAB_SIZE} "
            f"({len(CHAR_RESERVED_TOKENS)} reserved tokens + {len(CHAT_TOKENS)} chat tokens + 1 character)"
        )


def choose_characters(counts: Counter[str], vocab_size: int) -> list[str]:
    """The characters that get their own id: the most frequent that fit in `vocab_size`, sorted."""
    check_char_vocab_size(vocab_size)
    room = vocab_size - len(CHAR_RESERVED_TOKENS) - len(CHAT_TOKENS)
    if len(counts) <= room:
        return sorted(counts)
    by_frequency = sorted(counts, key=lambda char: (-counts[char], char))  # ties broken by the char: deterministic
    kept, dropped = by_frequency[:room], by_frequency[room:]
    dropped_share = sum(counts[char] for char in dropped) / sum(counts.values())
    warnings.warn(
        f"char tokenizer: {len(counts)} distinct characters do not fit in vocab size {vocab_size}; "
        f"the {len(dropped)} rarest ({dropped_share:.3%} of the text) will encode as {UNK_TOKEN}",
        stacklevel=3,
    )
    return sorted(kept)


def build_char_tokenizer(characters: list[str]) -> BackendTokenizer:
    """A WordLevel tokenizer over single characters, with the reserved tokens at ids 0-3."""
    vocab = {token: index for index, token in enumerate([*CHAR_RESERVED_TOKENS, *characters])}
    backend = BackendTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Mark the reserved tokens as special so "<|im_start|>" in text is one token, not 12 characters.
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CHAR_RESERVED_TOKENS])
    # `[\s\S]` is any code point, newline included ("." would skip "\n").
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator
    return backend
