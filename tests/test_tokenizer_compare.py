"""`acornlm tokenizer compare`: the pieces always join back to the text (Chinese and emoji included),
a character split over byte tokens or unknown to a char tokenizer is shown as such, and the
command compares given tokenizers or ones it trains itself."""

from __future__ import annotations

import json

import pytest
from conftest import generated_documents

from acornlm.cli import main
from acornlm.cli.tokenizer import COMPARE_TEXTS, compare
from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer import train_tokenizer
from acornlm.tokenizer.compare import boundaries, bytes_as_text, compare_tokenizers, cut_bytes, segment

TEXTS = [
    "Hello world",
    "床前明月光，疑是地上霜。",
    "Good night 🌙 👩‍💻 ok",
    "mixed: héllo 中文 😀😀\n\nnew\tline <|endoftext|> end",
    " leading and trailing spaces  ",
    "",
]


@pytest.fixture(scope="module")
def tokenizers():
    english = generated_documents(40, seed=3)
    return {"char": train_tokenizer(english, "char", 200), "bpe": train_tokenizer(english, "bpe", 300)}


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_back_to_the_text(tokenizers, kind, text):
    seg = segment(tokenizers[kind], text)
    assert "".join(seg.pieces) == text
    assert sum(seg.piece_tokens) == len(seg.ids) == len(seg.tokens)
    assert seg.bytes_per_token == (len(text.encode("utf-8")) / len(seg.ids) if seg.ids else 0.0)


def test_bpe_spreads_an_unseen_character_over_its_bytes(tokenizers):
    seg = segment(tokenizers["bpe"], "a 床🌙")
    assert seg.pieces[-2:] == ["床", "🌙"] and seg.piece_tokens[-2:] == [3, 4]
    assert seg.tokens[-7:] == ["<e5>", "<ba>", "<8a>", "<f0>", "<9f>", "<8c>", "<99>"]
    assert boundaries(seg).endswith("|[床×3]|[🌙×4]")
    assert seg.unknown == 0


def test_char_marks_characters_it_never_saw(tokenizers):
    seg = segment(tokenizers["char"], "the 霜")
    assert boundaries(seg) == "t|h|e| |[霜→<|unk|>]"
    assert seg.unknown == 1 and seg.tokens[-1] == "<|unk|>"


def test_a_token_across_two_characters_joins_them_into_one_piece():
    data = "床前".encode()  # e5 ba 8a | e5 89 8d, cut as [e5 ba] [8a e5] [89 8d]
    assert cut_bytes([2, 2, 2], data) == (["床前"], [3])
    assert cut_bytes([3, 3], data) == (["床", "前"], [1, 1])
    assert bytes_as_text(b"a\xe5\xba") == "a<e5><ba>" and bytes_as_text("床".encode()) == "床"


def test_compare_counts_bytes_per_token_over_all_texts(tokenizers):
    result = compare_tokenizers(tokenizers, ["the king", "床"])
    assert result["tokenizers"]["bpe"]["bytes"] == 8 + 3
    bpe = result["texts"][1]["tokenizers"]["bpe"]
    assert bpe["tokens"] == 3 and bpe["bytes_per_token"] == 1.0 and bpe["boundaries"] == "[床×3]"


def test_compare_command_with_given_tokenizers_and_json(tokenizers, tmp_path, capsys):
    for name, tokenizer in tokenizers.items():
        tokenizer.save(tmp_path / name)
    (tmp_path / "ckpt").mkdir()  # a checkpoint directory holds its tokenizer's files too
    tokenizers["bpe"].save(tmp_path / "ckpt")
    out = tmp_path / "compare.json"
    text = "the king 床前明月光 👩‍💻"
    main(["tokenizer", "compare", "--tokenizers", str(tmp_path / "char"), str(tmp_path / "ckpt"),
          "--text", text, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "[床×3]" in printed and "[床→<|unk|>]" in printed and "<U+200D>" in printed
    data = json.loads(out.read_text(encoding="utf-8"))
    assert list(data["tokenizers"]) == [str(tmp_path / "char"), str(tmp_path / "ckpt")]
    for seg in data["texts"][0]["tokenizers"].values():
        assert "".join(seg["pieces"]) == text


def test_compare_trains_char_and_bpe_when_given_no_tokenizers(monkeypatch, capsys):
    """Without --tokenizers it trains on the Shakespeare train split (a small stand-in here: no download)."""
    import acornlm.data.shakespeare as shakespeare

    def fake_fetch(out, cache=None, archive=None):
        (out / "train").mkdir(parents=True)
        for i, doc in enumerate(generated_documents(30, seed=5)):
            (out / "train" / f"{i}.txt").write_text(doc, encoding="utf-8")
        return out

    monkeypatch.setattr(shakespeare, "fetch_shakespeare", fake_fetch)
    result = compare(vocab_size=300)
    assert [s["kind"] for s in result["tokenizers"].values()] == ["char", "bpe"]
    assert [row["text"] for row in result["texts"]] == list(COMPARE_TEXTS)
    for row in result["texts"]:
        for seg in row["tokenizers"].values():
            assert "".join(seg["pieces"]) == row["text"]
    assert "bpe-300" in capsys.readouterr().out


def test_compare_refuses_bad_input(tokenizers, tmp_path):
    tokenizers["bpe"].save(tmp_path / "bpe")
    with pytest.raises(ConfigError, match="--text is empty"):
        compare(text="", tokenizers=[str(tmp_path / "bpe")])
    with pytest.raises(ConfigError, match="either --text or --input"):
        compare(text="a", input=[str(tmp_path)], tokenizers=[str(tmp_path / "bpe")])
    with pytest.raises(DataError, match="does not exist"):
        compare(text="a", tokenizers=[str(tmp_path / "missing")])
    (tmp_path / "text.txt").write_text("from a file 中文", encoding="utf-8")
    result = compare(input=[str(tmp_path / "text.txt")], tokenizers=[str(tmp_path / "bpe")])
    assert result["texts"][0]["text"] == "from a file 中文"
