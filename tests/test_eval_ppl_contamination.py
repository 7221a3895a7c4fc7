"""`acornlm eval ppl` (perplexity and bits per byte, equal to a hand computation) and `acornlm eval
contamination` (n-gram overlap of benchmark items with a training corpus, in words and in token ids)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from eval_fixtures import make_checkpoint, write_ceval, write_jsonl

import acornlm
from acornlm import cli
from acornlm.errors import ConfigError
from acornlm.eval import contamination as contamination_module
from acornlm.eval.benchmarks import Item, load_items
from acornlm.eval.contamination import BenchmarkNgrams, check_contamination, ngram_hashes, scan_corpus, words
from acornlm.eval.perplexity import perplexity
from acornlm.model.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["The sky is blue and the grass is green. " * 9, "天空是蓝色的。😀 Question: which is a fruit?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ppl") / "ckpt", context=64)


def hand_nll(model, ids: list[int], eot: int) -> float:
    """-log p(text) with the whole document in one forward pass (it fits a big enough context)."""
    sequence = torch.tensor([[eot, *ids]])
    with torch.no_grad():
        logprobs = model(sequence[:, :-1]).log_softmax(-1)[0]
    return -sum(logprobs[i, token].item() for i, token in enumerate(ids))


def test_perplexity_and_bits_per_byte_equal_the_hand_computation(ckpt):
    lm = acornlm.load(ckpt)
    model, _ = load_model(ckpt)
    short = [DOCS[1], "Answer: apple."]
    result = perplexity(lm, short, progress=False)
    nll = sum(hand_nll(model, lm.tokenizer.encode(d), lm.tokenizer.eot_id) for d in short)
    tokens = sum(len(lm.tokenizer.encode(d)) for d in short)
    assert result["tokens"] == tokens and result["bytes"] == sum(len(d.encode()) for d in short)
    assert result["cross_entropy"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / result["bytes"], rel=1e-5)
    # a document longer than the context: more context per token (smaller stride) never hurts much,
    # and disjoint windows (stride = window) score the same tokens
    long = perplexity(lm, [DOCS[0]], stride=64, progress=False)
    sliding = perplexity(lm, [DOCS[0]], stride=16, progress=False)
    assert long["tokens"] == sliding["tokens"] > 64
    assert math.isfinite(long["perplexity"]) and math.isfinite(sliding["perplexity"])
    with pytest.raises(ConfigError, match="--stride must be between 1 and --window"):
        perplexity(lm, DOCS, window=32, stride=33, progress=False)
    with pytest.raises(ConfigError, match="no text"):
        perplexity(lm, ["", ""], progress=False)


def test_ppl_cli_writes_json(tmp_path, ckpt, capsys):
    corpus = write_jsonl(tmp_path / "mine.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "ppl.json"
    cli.main(["eval", "ppl", "--ckpt", str(ckpt), "--input", str(corpus), "--stride", "32", "--out", str(out),
              "--progress", "false"])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["documents"] == 2 and result["stride"] == 32 and result["bits_per_byte"] > 0
    assert "bits/byte" in capsys.readouterr().out


def test_words_are_normalised_and_chinese_characters_are_words():
    assert words("Hello, WORLD! ＡＢＣ 2024") == ["hello", "world", "abc", "2024"]
    assert words("天空是蓝色的。") == ["天", "空", "是", "蓝", "色", "的"]
    assert words("the_cat's") == ["the", "cat", "s"]


def test_ngram_hashes_match_a_plain_loop():
    hashes = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint64)
    rolled = ngram_hashes(hashes, 3)
    assert len(rolled) == 6
    same = [ngram_hashes(hashes[i:i + 3], 3)[0] for i in range(6)]
    assert list(rolled) == same
    assert rolled[1] == rolled[1] and rolled[1] != rolled[3]  # (1,4,1) vs (1,5,9)
    assert len(ngram_hashes(hashes, 9)) == 0


def items(*texts: str) -> list[Item]:
    return [Item("arc", "s", text, ("yes", "no"), 0, f"q{n}") for n, text in enumerate(texts)]


def test_contamination_fractions_in_words_across_chunks_and_files(tmp_path, monkeypatch):
    copied = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    half = "a completely fresh question about planets that nobody wrote down anywhere at all ever"
    chinese = "床前明月光疑是地上霜举头望明月低头思故乡"
    monkeypatch.setattr(contamination_module, "CHUNK_BYTES", 64)  # many chunks: n-grams across their edges count
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Intro text. " + copied.upper() + ", and more words follow here.\n", encoding="utf-8")
    (corpus / "b.jsonl").write_text(json.dumps({"text": "李白写道：" + chinese}, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    (corpus / "c.txt").write_text(" ".join(half.split()[:8]) + " unrelated tail words", encoding="utf-8")
    report = check_contamination(items(copied, half, chinese, "too short"), [corpus], n=13, threshold=0.5)
    fractions = {row["where"]: row["fraction"] for row in report["items"]}
    # 15 + 2 words ("yes no" follow the question) give 5 13-grams, 3 inside the copy; 20 + 2 characters: 10, 8
    assert fractions["q0"] == pytest.approx(3 / 5) and fractions["q2"] == pytest.approx(8 / 10)
    assert fractions["q1"] == 0.0 and fractions["q3"] is None
    assert report["contaminated"] == 2 and report["checked"] == 3 and report["n"] == 4
    assert report["corpus_bytes"] > 0 and report["peak_memory_mb"] > 0


def test_prepared_token_data_is_compared_in_token_ids(prepared_data):
    from acornlm.data.loader import open_tokens, read_meta
    from acornlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared_data / "tokenizer")
    ids = open_tokens(prepared_data, read_meta(prepared_data), "train")
    copied = tokenizer.decode([int(t) for t in ids[100:160]])
    grams = BenchmarkNgrams.from_texts({"copied": copied, "fresh": "zq xv " * 20}, n=13)
    token_grams = BenchmarkNgrams.from_texts({"copied": copied, "fresh": "zq xv " * 20}, n=13, tokenizer=tokenizer)
    scan = scan_corpus([prepared_data], grams, token_grams)
    fractions = token_grams.fractions(scan.found_ids)
    assert fractions["copied"] > 0.8 and fractions["fresh"] == 0.0
    assert scan.tokens == len(ids) + len(open_tokens(prepared_data, read_meta(prepared_data), "val"))


def test_contamination_cli_and_bench_exclusion(tmp_path, ckpt, capsys):
    root = write_ceval(tmp_path / "ceval")
    questions = load_items([root]).items
    leaked = questions[0].question + "\n" + "\n".join(questions[0].choices)
    (tmp_path / "train.txt").write_text(("一些无关的文字。" * 20) + leaked * 2, encoding="utf-8")
    out = tmp_path / "c.json"
    cli.main(["eval", "contamination", "--train", str(tmp_path / "train.txt"), "--data", str(root),
              "--ngram", "5", "--out", str(out)])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["items"][0]["fraction"] == 1.0 and report["contaminated"] >= 1
    assert "MB/s" in capsys.readouterr().out
    bench_out = tmp_path / "b.json"
    cli.main(["eval", "bench", "--ckpt", str(ckpt), "--data", str(root), "--exclude_contaminated",
              "--train", str(tmp_path / "train.txt"), "--ngram", "5", "--out", str(bench_out), "--progress", "false"])
    bench = json.loads(bench_out.read_text(encoding="utf-8"))
    assert bench["clean"]["excluded"] == report["contaminated"]
    assert bench["clean"]["n"] == bench["n"] - report["contaminated"]
    with pytest.raises(SystemExit):
        cli.main(["eval", "contamination", "--train", str(tmp_path / "missing.txt"), "--data", str(root)])
    assert "does not exist" in capsys.readouterr().err
