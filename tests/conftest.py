"""Shared fixtures: a small generated corpus, a tiny BPE tokenizer and prepared token data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("the king queen castle river stone green light dark sword song night morning bread "
         "friend enemy walks speaks sleeps sings finds keeps under over near with from and but").split()


def generated_documents(count: int, seed: int) -> list[str]:
    """Pseudo-English documents from a fixed word list: learnable structure, no download."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def write_prepared_data(out: Path, train_docs: list[str], val_docs: list[str], vocab_size: int = 300) -> Path:
    """Train a BPE tokenizer on `train_docs` and prepare both splits with the real `prepare_data`."""
    from acornlm.data.prepare import prepare_data
    from acornlm.tokenizer import train_tokenizer

    corpus = out.parent / f"{out.name}-corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
        (corpus / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    train_tokenizer(train_docs, kind="bpe", vocab_size=vocab_size).save(corpus / "tokenizer")
    prepare_data(inputs=[corpus / "train.jsonl"], tokenizer_dir=corpus / "tokenizer", out=out,
                 val_inputs=[corpus / "val.jsonl"], workers=1)
    return out


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """Prepared data of a ~40 KB generated corpus with a 300-token BPE tokenizer."""
    root = tmp_path_factory.mktemp("prepared")
    return write_prepared_data(root / "data", generated_documents(120, seed=1), generated_documents(12, seed=2))


@pytest.fixture(scope="session")
def other_prepared_data(tmp_path_factory) -> Path:
    """The same kind of data, prepared with a different tokenizer (another vocabulary size)."""
    root = tmp_path_factory.mktemp("prepared-other")
    return write_prepared_data(root / "data", generated_documents(120, seed=1), generated_documents(12, seed=2),
                               vocab_size=280)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models gain nothing from threads, and on a busy 2-core
    machine thread hand-offs cost 10x. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
