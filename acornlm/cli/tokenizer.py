"""`acornlm tokenizer train`, `stats`, `compare` and `add-chat-tokens`."""

from __future__ import annotations

import json
import sys
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from acornlm.errors import AcornError, ConfigError

if TYPE_CHECKING:
    from acornlm.tokenizer import Tokenizer

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


# The texts `compare` cuts when given none: English, Chinese (a Tang poem) and emoji (one a ZWJ sequence).
COMPARE_TEXTS = (
    "To be, or not to be, that is the question.",
    "床前明月光，疑是地上霜。",
    "Good night 🌙 👩‍💻",
)
# `compare` prints the boundaries of this many characters of a text (all of them go to --out).
COMPARE_SHOWN_CHARS = 300
COMPARE_SHOWN_TEXTS = 20


def compare(
    text: str | None = None,
    input: list[str] | None = None,
    tokenizers: list[str] | None = None,
    vocab_size: int = 4096,
    out: str | None = None,
    errors: Literal["strict", "replace"] = "strict",
) -> dict[str, Any]:
    """Cut the same texts with several tokenizers and show where each one puts its token boundaries.

    For each text: tokens, bytes per token and the boundaries side by side, e.g. `To| be|,| or` for
    BPE against `T|o| |b|e|,` for char. `[床×3]` is one character spread over 3 byte tokens (a BPE
    that never merged its bytes); `[床→<|unk|>]` a character a char tokenizer never saw. Without
    --tokenizers, a char and a BPE tokenizer are trained on the Shakespeare corpus (fetched once and
    cached, as `acornlm data fetch shakespeare`) in a temporary directory, as `make demo` trains its own.

    Args:
        text: The text to compare on. Default: an English sentence, a Chinese sentence and emoji.
        input: Text files or folders instead (.txt one text per file, .jsonl {"text": ...} per line, .parquet).
        tokenizers: Tokenizer directories, or checkpoint / run directories holding one (several allowed).
        vocab_size: Without --tokenizers: the BPE vocabulary size to train (the char vocabulary is every character seen).
        out: Also write everything (boundaries, pieces, token ids, bytes per token) to this JSON file.
        errors: What to do with bytes that are not UTF-8 in --input: "strict" stops with the file and offset, "replace" uses U+FFFD.

    Returns:
        The comparison (the JSON of --out).
    """
    from acornlm.files import atomic_write_json
    from acornlm.tokenizer.compare import compare_tokenizers

    if text is not None and input:
        raise ConfigError("give either --text or --input, not both")
    if text is not None:
        if not text:
            raise ConfigError("--text is empty: give some text to cut into tokens")
        texts = [text]
    elif input:
        texts = list(_texts(_require_inputs(input), errors))
    else:
        texts = list(COMPARE_TEXTS)
    if isinstance(tokenizers, str):
        tokenizers = [tokenizers]
    if tokenizers:
        loaded = {name: _load_any_tokenizer(name) for name in dict.fromkeys(tokenizers)}
    else:
        with tempfile.TemporaryDirectory(prefix="acornlm-compare-") as tmp:
            loaded = _train_shakespeare_tokenizers(tmp, vocab_size)
    result = compare_tokenizers(loaded, texts)
    print(_describe_comparison(result))
    if out:
        atomic_write_json(Path(out), result)
        print(f"wrote {out}")
    return result


def _load_any_tokenizer(path: str) -> Tokenizer:
    """A tokenizer directory, a checkpoint directory, or a run directory (its latest checkpoint)."""
    from acornlm.model.checkpoint import resolve_checkpoint
    from acornlm.tokenizer import load_tokenizer

    directory = Path(path)
    if not (directory / "tokenizer.json").is_file() and directory.is_dir():
        try:
            directory = resolve_checkpoint(directory)
        except AcornError:
            pass  # load_tokenizer below names what is missing
    return load_tokenizer(directory)


def _train_shakespeare_tokenizers(tmp: str, vocab_size: int) -> dict[str, Tokenizer]:
    """A char and a BPE tokenizer trained on the Shakespeare train split (4.7 MB, ~1 s each)."""
    from acornlm.data.shakespeare import fetch_shakespeare
    from acornlm.tokenizer import train_tokenizer

    try:
        corpus = fetch_shakespeare(Path(tmp) / "shakespeare") / "train"
    except AcornError as exc:
        raise type(exc)(f"{exc}; or compare tokenizers you have: --tokenizers DIR1 DIR2") from exc
    print(f"training a char and a BPE ({vocab_size}) tokenizer on the Shakespeare train split "
          "(pass --tokenizers to compare your own) ...", flush=True)
    texts = list(_texts([str(corpus)], "strict"))
    tokenizers = {}
    for kind in ("char", "bpe"):
        tokenizer = train_tokenizer(texts, kind=kind, vocab_size=vocab_size)
        name = f"{kind}-{tokenizer.vocab_size}"
        tokenizer.save(Path(tmp) / name)
        tokenizers[name] = tokenizer
    return tokenizers


def _describe_comparison(result: dict[str, Any]) -> str:
    """The comparison as text: per text a table (tokens, bytes/token, unknown) and one boundary line per tokenizer."""
    from acornlm.cli.terminal import visible

    def shown(text: str) -> str:
        """Newlines and tabs as \\n and \\t, invisible format characters (the zero-width joiner
        inside 👩‍💻) as <U+200D>, other control characters as escapes."""
        text = text.replace("\n", "\\n").replace("\t", "\\t")
        return visible("".join(f"<U+{ord(ch):04X}>" if unicodedata.category(ch) == "Cf" else ch for ch in text))

    names = list(result["tokenizers"])
    width = max(len(name) for name in [*names, "tokenizer"])
    lines = []
    for index, row in enumerate(result["texts"][:COMPARE_SHOWN_TEXTS], start=1):
        preview = row["text"] if len(row["text"]) <= 80 else row["text"][:77] + "..."
        lines.append(f"text {index}: {shown(preview)}  ({row['chars']} chars, {row['bytes']} bytes)")
        lines.append(f"  {'tokenizer'.ljust(width)}  tokens  bytes/token  chars/token  unknown")
        for name in names:
            seg = row["tokenizers"][name]
            lines.append(f"  {name.ljust(width)}  {seg['tokens']:6d}  {seg['bytes_per_token']:11.2f}  "
                         f"{seg['chars_per_token']:11.2f}  {seg['unknown_tokens']:7d}")
        for name in names:
            lines.append(f"  {name.ljust(width)}  {shown(_shown_boundaries(row['tokenizers'][name]))}")
        lines.append("")
    if len(result["texts"]) > COMPARE_SHOWN_TEXTS:
        lines.append(f"... {len(result['texts']) - COMPARE_SHOWN_TEXTS} more texts (all of them in --out)")
    total = ", ".join(f"{name} {summary['bytes_per_token']:.2f}" for name, summary in result["tokenizers"].items())
    lines.append(f"bytes per token over all texts: {total} (more bytes per token = more text per context window)")
    return "\n".join(lines)


def _shown_boundaries(seg: dict[str, Any]) -> str:
    """The boundaries of the first COMPARE_SHOWN_CHARS characters (whole pieces), then how many tokens follow."""
    from acornlm.tokenizer.compare import Segmentation, boundaries

    chars = tokens = count = 0
    for piece, piece_tokens in zip(seg["pieces"], seg["piece_tokens"]):
        if chars >= COMPARE_SHOWN_CHARS:
            break
        chars += len(piece)
        tokens += piece_tokens
        count += 1
    if count == len(seg["pieces"]):
        return seg["boundaries"]
    head = Segmentation("".join(seg["pieces"][:count]), seg["ids"][:tokens], seg["token_texts"][:tokens],
                        seg["pieces"][:count], seg["piece_tokens"][:count], 0)
    return f"{boundaries(head)}|... (+{seg['tokens'] - tokens} tokens)"


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


def add_chat_tokens(ckpt: str | None = None, out: str | None = None) -> None:
    """Give an older tokenizer (and its model) the chat tokens for thinking and tool calls.

    Appends <think>, </think>, <tool_call>, </tool_call>, <tool_response>, </tool_response> at the
    end of the vocabulary, so no id the model knows moves; a checkpoint's embedding (and untied
    output head) grows by as many rows, each the mean of the existing rows. The model gives the same
    logits as before on every text without the new tokens; fine-tune it on tool or reasoning chats
    to teach it what they mean. Tokenizers trained by acornlm since these tokens exist have them
    already (then there is nothing to do).

    Args:
        ckpt: A checkpoint or run directory (the model grows too), or a tokenizer directory.
        out: Directory for the result (must not exist yet, or be empty).
    """
    from acornlm.files import atomic_path
    from acornlm.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model, write_model_files
    from acornlm.model.vocab import resize_vocabulary
    from acornlm.tokenizer import load_tokenizer
    from acornlm.tokenizer.hf_config import read_tokenizer_config
    from acornlm.tokenizer.tokenizer import add_chat_tokens as extend

    if ckpt is None or out is None:
        raise ConfigError("--ckpt and --out are required: the checkpoint (or tokenizer) to extend, and where to "
                          "write the result")
    source, out_dir = Path(ckpt), Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty; choose a new --out")
    if (source / "checkpoints" / "latest").exists():
        source = source / "checkpoints" / "latest"
    tokenizer, added = extend(load_tokenizer(source))
    if not added:
        raise ConfigError(f"{source} already has every chat token; nothing to add")
    has_model = (source / WEIGHTS_FILE).is_file() and (source / CONFIG_FILE).is_file()
    with atomic_path(out_dir, directory=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        if has_model:
            model, info = load_model(source)
            if model.config.vocab_size < tokenizer.vocab_size:
                model = resize_vocabulary(model, tokenizer.vocab_size)
            keep = {k: v for k, v in info.items() if k not in ("format", "version", "model")}
            if isinstance(keep.get("tokenizer"), dict):  # the run's record of its tokenizer
                keep["tokenizer"] = {**keep["tokenizer"], "fingerprint": tokenizer.fingerprint,
                                     "vocab_size": tokenizer.vocab_size}
            write_model_files(tmp, model, info={**keep, "chat_tokens_added_from": str(source)})
        tokenizer.save(tmp, model_max_length=read_tokenizer_config(source).get("model_max_length"))
    what = "checkpoint" if has_model else "tokenizer"
    print(f"added {', '.join(added)} (ids {tokenizer.vocab_size - len(added)}..{tokenizer.vocab_size - 1}) "
          f"to the {what} in {out_dir}", file=sys.stderr)
