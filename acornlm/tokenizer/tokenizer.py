"""The `Tokenizer` every other module uses, plus `train_tokenizer` and `load_tokenizer`.

Both kinds (byte-level BPE and char) are plain Hugging Face `tokenizers` objects underneath,
saved as tokenizer.json + tokenizer_config.json, so the same files load in acornlm and in
`transformers.AutoTokenizer` and encode identically in both.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, models
from tokenizers import Tokenizer as BackendTokenizer
from tqdm import tqdm

from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer.bpe import bpe_token_bytes, check_bpe_vocab_size, check_reached_vocab_size, train_bpe
from acornlm.tokenizer.char import (
    build_char_tokenizer,
    check_char_vocab_size,
    choose_characters,
    count_characters,
)
from acornlm.tokenizer.hf_config import tokenizer_config
from acornlm.tokenizer.special_tokens import CHAT_TOKENS, EOT_TOKEN, SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
KINDS = ("bpe", "char")
OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how the Rust backend spells an OS error


class Tokenizer:
    """A trained tokenizer: text <-> token ids, plus what training and generation need to know about it."""

    def __init__(self, backend: BackendTokenizer, kind: str) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown tokenizer kind {kind!r}: choose one of {', '.join(KINDS)}")
        problem = special_token_problem(backend)
        if problem:
            raise ConfigError(f"not an acornlm tokenizer: {problem}")
        self.backend = backend
        self.kind = kind
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eot_id: int = SPECIAL_TOKENS.index(EOT_TOKEN)
        self.fingerprint: str = fingerprint_of(backend)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]!r})"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Adds no special tokens, but special-token strings in the text become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once; the library spreads the work over all CPU cores."""
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`. Bytes that do not form valid UTF-8 (a cut-off character) decode as U+FFFD."""
        return self.backend.decode([int(token_id) for token_id in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token; concatenating them for a BPE encoding gives back `text.encode()`.

        A single BPE token can hold part of a UTF-8 character, so streaming generation collects
        these bytes and only prints once they form complete characters.
        """
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._token_bytes_table[token_id]

    @property
    def missing_chat_tokens(self) -> list[str]:
        """The chat tokens (<think>, <tool_call>, ...) this tokenizer lacks; [] for tokenizers trained
        by acornlm since they existed. `add_chat_tokens` adds them."""
        return [token for token in CHAT_TOKENS if self.token_to_id(token) is None]

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (e.g. "<|im_end|>"), or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of a token id (ByteLevel characters for BPE, e.g. 'Ġthe')."""
        return self.backend.id_to_token(token_id)

    @cached_property
    def _token_bytes_table(self) -> list[bytes]:
        """token_bytes for every id, built on first use."""
        special = {token.content for token in self.backend.get_added_tokens_decoder().values()}
        table = []
        for token_id in range(self.vocab_size):
            token = self.backend.id_to_token(token_id)
            if token is None:
                table.append(b"")  # a hole in the id range: decodes to nothing
            elif token in special or self.kind == "char":
                table.append(token.encode("utf-8"))
            else:
                table.append(bpe_token_bytes(token))
        return table

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by `transformers.AutoTokenizer`).

        model_max_length: the context length of the model this tokenizer serves, if known.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_backend(self.backend, directory / TOKENIZER_FILE)
        added = {token_id: token.content for token_id, token in self.backend.get_added_tokens_decoder().items()}
        config = tokenizer_config(self.kind, added, model_max_length)
        (directory / TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def save_backend(backend: BackendTokenizer, file: Path) -> None:
    """Write tokenizer.json. The Rust backend reports a failed write as a bare Exception
    ("No space left on device (os error 28)"); it becomes the OSError it stands for, so callers
    such as checkpoint saves can tell a full disk from a bug."""
    try:
        backend.save(str(file), pretty=True)
    except Exception as exc:
        match = OS_ERROR.search(str(exc))
        if match is None:
            raise
        raise OSError(int(match.group(1)), str(exc), str(file)) from exc


def fingerprint_of(backend: BackendTokenizer) -> str:
    """sha256 of the canonical tokenizer.json (sorted keys, no whitespace), so saving and loading keep it."""
    canonical = json.dumps(json.loads(backend.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def special_token_problem(backend: BackendTokenizer) -> str | None:
    """Why `backend` breaks the acornlm convention of SPECIAL_TOKENS at ids 0, 1, 2 (None when it does not)."""
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual_id = backend.token_to_id(token)
        if actual_id != expected_id:
            where = "is missing" if actual_id is None else f"has id {actual_id}"
            return f"special token {token} {where}; acornlm tokenizers have {', '.join(SPECIAL_TOKENS)} at ids 0, 1, 2"
    return None


class _CountedTexts:
    """Passes texts through unchanged while counting them, so an empty corpus is caught in a single pass."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = texts
        self.documents = 0
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if not isinstance(text, str):
                raise DataError(f"training text #{self.documents + 1} is a {type(text).__name__}, not a string")
            self.documents += 1
            self.chars += len(text)
            yield text


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Train a tokenizer of `kind` ("bpe" or "char") on an iterable of documents.

    Streams `texts` once, so it may be a generator over a large corpus. The same texts give the
    same tokenizer (and fingerprint) every time. For kind="char", vocab_size is an upper bound
    (see acornlm.tokenizer.char); for kind="bpe" it is exact or a DataError says what the text supports.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}: choose one of {', '.join(KINDS)}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents (e.g. a list of strings), not a single string")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab size must be an integer, got {vocab_size!r}")
    counted = _CountedTexts(texts)
    learned = vocab_size - len(CHAT_TOKENS)  # the chat tokens take the last ids
    if kind == "bpe":
        check_bpe_vocab_size(vocab_size)
        backend = train_bpe(counted, learned, show_progress=show_progress)
        _check_not_empty(counted)
        check_reached_vocab_size(backend, learned, vocab_size)
    else:
        check_char_vocab_size(vocab_size)  # before reading the corpus
        documents = tqdm(counted, desc="counting characters", unit="doc", disable=not show_progress)
        counts = count_characters(documents)
        _check_not_empty(counted)
        backend = build_char_tokenizer(choose_characters(counts, vocab_size))
    add_chat_tokens_to(backend)
    return Tokenizer(backend, kind)


def add_chat_tokens_to(backend: BackendTokenizer) -> list[str]:
    """Append the chat tokens a tokenizer lacks at the end of its vocabulary (ids it has stay put);
    returns the tokens added. Matched whole in any text, kept by decoding (see special_tokens)."""
    missing = [token for token in CHAT_TOKENS if backend.token_to_id(token) is None]
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in missing])
    return missing


def add_chat_tokens(tokenizer: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """A copy of `tokenizer` with the chat tokens it lacks appended; (copy, tokens added).

    The model that uses it needs as many embedding rows: `acornlm tokenizer add-chat-tokens` grows
    a checkpoint's embeddings too (acornlm.model.checkpoint.resize_vocabulary).
    """
    backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
    added = add_chat_tokens_to(backend)
    return Tokenizer(backend, tokenizer.kind), added


def _check_not_empty(counted: _CountedTexts) -> None:
    if counted.chars == 0:
        raise DataError(
            f"the training text is empty ({counted.documents} documents, 0 characters): "
            "give the tokenizer some text to learn from"
        )


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save` (also works on a checkpoint or prepared-data directory)."""
    directory = Path(directory)
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        what = "does not exist" if not directory.exists() else f"holds no {TOKENIZER_FILE}"
        raise DataError(f"{directory} {what}: expected a tokenizer saved by `acornlm tokenizer train --out DIR`")
    _read_json(file)  # a clear file:line:column message for broken JSON before the library sees it
    try:
        backend = BackendTokenizer.from_file(str(file))
    except Exception as exc:  # the library raises a bare Exception for a malformed tokenizer
        raise DataError(f"{file} is not a valid tokenizer file: {exc}") from exc
    problem = special_token_problem(backend)
    if problem:
        raise DataError(f"{file} is not an acornlm tokenizer: {problem}")
    return Tokenizer(backend, _read_kind(directory, backend))


def _read_kind(directory: Path, backend: BackendTokenizer) -> str:
    """The kind written by `save`; without tokenizer_config.json, guessed from the model type."""
    config_file = directory / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        config = _read_json(config_file)
        kind = config.get("acornlm_kind") if isinstance(config, dict) else None
        if kind in KINDS:
            return kind
        if kind is not None:
            raise DataError(f"{config_file}: acornlm_kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(backend.model, models.BPE):
        return "bpe"
    if isinstance(backend.model, models.WordLevel):
        return "char"
    raise DataError(f"{directory / TOKENIZER_FILE}: unsupported model type {type(backend.model).__name__}")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is corrupt: not UTF-8 text (byte offset {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is corrupt: line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
