"""Where tokenizers cut a text, side by side: the token boundaries and the bytes per token.

    seg = segment(tokenizer, "Hello world")
    boundaries(seg)                      # 'Hel|lo| wor|ld'
    "".join(seg.pieces) == "Hello world" # always: the pieces are cut from the text itself

A char-level tokenizer gives one token per character (and `<|unk|>` for characters it never saw);
byte-level BPE gives one token per learned merge, and falls back to single UTF-8 bytes for text it
never saw, so a Chinese character (3 bytes) or an emoji (4 bytes) can cost several tokens. Such a
character cannot be cut into text pieces, so a piece is the shortest run of tokens that ends between
two characters: `[床×3]` in `boundaries` is one character spread over three byte tokens.

bytes per token = UTF-8 bytes / tokens (see acornlm.tokenizer.stats): more bytes per token means a
context window of the same length holds more text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from acornlm.errors import DataError
from acornlm.tokenizer.special_tokens import UNK_TOKEN
from acornlm.tokenizer.tokenizer import Tokenizer


def bytes_as_text(data: bytes) -> str:
    """`data` decoded as UTF-8, with every byte that is not part of a complete character written as
    `<e4>`: a byte-level token can hold a fraction of a character, and printing it as U+FFFD would
    hide which bytes it holds."""
    out: list[str] = []
    while data:
        try:
            out.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            out.append(data[:exc.start].decode("utf-8"))
            out.extend(f"<{byte:02x}>" for byte in data[exc.start:exc.end])
            data = data[exc.end:]
    return "".join(out)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text one token stands for: its raw bytes as UTF-8 (`<e4>` for bytes of a partial character);
    special tokens and `<|unk|>` as their names."""
    return bytes_as_text(tokenizer.token_bytes(token_id))


@dataclass
class Segmentation:
    """How one tokenizer cuts one text.

    Attributes:
        text: The text.
        ids: Its token ids.
        tokens: The text of each token (`token_text`): `<e4>` for bytes of a partial character,
            `<|unk|>` for a character the tokenizer does not know.
        pieces: The text cut at every token boundary that falls between two characters; the pieces
            join to `text` exactly, whatever the tokenizer knows.
        piece_tokens: How many tokens each piece spans (more than 1 where a character is split
            across byte tokens).
        unknown: Tokens that are `<|unk|>` (characters a char-level tokenizer never saw in training).
    """

    text: str
    ids: list[int]
    tokens: list[str]
    pieces: list[str]
    piece_tokens: list[int]
    unknown: int

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes / tokens (0 for an empty text)."""
        return self.num_bytes / len(self.ids) if self.ids else 0.0

    @property
    def chars_per_token(self) -> float:
        return len(self.text) / len(self.ids) if self.ids else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": len(self.ids), "bytes": self.num_bytes, "chars": len(self.text),
                "bytes_per_token": round(self.bytes_per_token, 4), "chars_per_token": round(self.chars_per_token, 4),
                "unknown_tokens": self.unknown, "boundaries": boundaries(self), "pieces": self.pieces,
                "piece_tokens": self.piece_tokens, "token_texts": self.tokens, "ids": self.ids}


def segment(tokenizer: Tokenizer, text: str) -> Segmentation:
    """Encode `text` and cut it into the pieces each token (or run of byte tokens) covers."""
    ids = tokenizer.encode(text)
    raw = [tokenizer.token_bytes(token_id) for token_id in ids]
    data = text.encode("utf-8")
    if b"".join(raw) == data:  # byte-level BPE, or char-level on known characters: the bytes tile the text
        pieces, piece_tokens = cut_bytes([len(token) for token in raw], data)
    else:  # char-level with <|unk|>: the tokens' own bytes are not the text's, so use the encoder's offsets
        pieces, piece_tokens = cut_chars(tokenizer, text)
    unk_id = tokenizer.token_to_id(UNK_TOKEN)
    unknown = ids.count(unk_id) if unk_id is not None else 0
    return Segmentation(text, ids, [bytes_as_text(token) for token in raw], pieces, piece_tokens, unknown)


def cut_bytes(lengths: Sequence[int], data: bytes) -> tuple[list[str], list[int]]:
    """Pieces of `data` for tokens of these byte lengths that tile it, and the tokens in each piece.

    A piece ends after a token that ends between two characters: at the end of `data`, or before a
    byte that starts a character (a UTF-8 continuation byte is 0b10xxxxxx). A token that ends inside
    a character is joined with the tokens after it until one completes the character.
    """
    pieces: list[str] = []
    counts: list[int] = []
    start = position = pending = 0
    for length in lengths:
        position += length
        pending += 1
        if position >= len(data) or data[position] & 0xC0 != 0x80:
            pieces.append(data[start:position].decode("utf-8"))
            counts.append(pending)
            start, pending = position, 0
    return pieces, counts


def cut_chars(tokenizer: Tokenizer, text: str) -> tuple[list[str], list[int]]:
    """Pieces of `text` for a tokenizer whose tokens cover whole characters (char-level, `<|unk|>`
    included), cut where the encoder's character offsets say each token ends; one token each."""
    offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets
    if text and not offsets:
        raise DataError(f"the {tokenizer.kind} tokenizer encodes {text[:40]!r} to no tokens at all")
    pieces: list[str] = []
    start = 0
    for index, (_, end) in enumerate(offsets):
        end = len(text) if index == len(offsets) - 1 else max(start, min(end, len(text)))
        pieces.append(text[start:end])  # anything the encoder skipped belongs to the piece before it
        start = end
    return pieces, [1] * len(pieces)


def boundaries(seg: Segmentation) -> str:
    """The pieces joined by `|` (`Hel|lo| wor|ld`); a piece spread over k > 1 byte tokens is shown
    as `[床×3]`, and a piece the tokenizer does not know as `[床→<|unk|>]`."""
    shown, token = [], 0
    for piece, count in zip(seg.pieces, seg.piece_tokens):
        if count > 1:
            shown.append(f"[{piece}×{count}]")
        elif seg.tokens[token] != piece and seg.tokens[token] == UNK_TOKEN:
            shown.append(f"[{piece}→{UNK_TOKEN}]")
        else:
            shown.append(piece)
        token += count
    return "|".join(shown)


def compare_tokenizers(tokenizers: Mapping[str, Tokenizer], texts: Sequence[str]) -> dict[str, Any]:
    """Every text cut by every tokenizer, plus each tokenizer's bytes per token over all the texts:
    the JSON of `acornlm tokenizer compare --out`."""
    results, totals = [], {name: [0, 0, 0] for name in tokenizers}  # tokens, bytes, unknown
    for text in texts:
        row = {"text": text, "bytes": len(text.encode("utf-8")), "chars": len(text), "tokenizers": {}}
        for name, tokenizer in tokenizers.items():
            seg = segment(tokenizer, text)
            row["tokenizers"][name] = seg.to_dict()
            totals[name][0] += len(seg.ids)
            totals[name][1] += seg.num_bytes
            totals[name][2] += seg.unknown
        results.append(row)
    summary = {
        name: {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "tokens": totals[name][0],
               "bytes": totals[name][1], "unknown_tokens": totals[name][2],
               "bytes_per_token": round(totals[name][1] / totals[name][0], 4) if totals[name][0] else 0.0}
        for name, tokenizer in tokenizers.items()
    }
    return {"tokenizers": summary, "texts": results}
