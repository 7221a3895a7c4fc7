"""The demo's tokenizers and prepared data, reused from an earlier demo in the same folder when they still fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from acornlm.cli.demo_budget import say
from acornlm.data.corpus import iter_documents
from acornlm.data.prepare import prepare_data
from acornlm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def ensure_tokenizer(tok_dir: Path, kind: str, vocab_size: int, inputs: list[Path]) -> Tokenizer:
    """The tokenizer saved in `tok_dir` when it is of this kind (and, for BPE, this size: a char
    vocabulary size is only an upper bound) and has the chat tokens; otherwise a new one trained on
    `inputs` and saved there."""
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_dir)
        if tokenizer.kind == kind and (kind == "char" or tokenizer.vocab_size == vocab_size) \
                and not tokenizer.missing_chat_tokens:
            say(f"      reusing {tok_dir}")
            return tokenizer
    tokenizer = train_tokenizer((d.text for d in iter_documents(inputs)), kind, vocab_size)
    tokenizer.save(tok_dir)
    return tokenizer


def ensure_data(train_inputs: list[Path], val_inputs: list[Path] | None, tok_dir: Path, data_dir: Path,
                tokenizer: Tokenizer) -> dict[str, Any]:
    """meta.json of the data prepared with `tokenizer`, preparing it unless `data_dir` already holds it
    (same tokenizer fingerprint). Without val inputs, 5% of the documents are held out."""
    meta_file = data_dir / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text())["tokenizer"]["fingerprint"] == tokenizer.fingerprint:
        say(f"      reusing {data_dir}")
    else:
        prepare_data(inputs=train_inputs, tokenizer_dir=tok_dir, out=data_dir, val_inputs=val_inputs,
                     val_fraction=0.0 if val_inputs else 0.05)
    return json.loads(meta_file.read_text())
