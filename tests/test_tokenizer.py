"""Tokenizers: exact round trips, special tokens, save/load, transformers compatibility, errors, CLI."""

import json
import random

import numpy as np
import pytest

from acornlm.cli import tokenizer as tokenizer_cli
from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer
from acornlm.tokenizer.bpe import MIN_BPE_VOCAB_SIZE, bytes_to_unicode
from acornlm.tokenizer.chat_template import render_text
from acornlm.tokenizer.special_tokens import CHAT_TOKENS, UNK_TOKEN

BPE_VOCAB_SIZE = 400
SYLLABLES = ["ka", "to", "ri", "mu", "sen", "lo", "pa", "qi", "zu", "be", "the", "ing", "and", "or"]

# Strings the training text barely covers (one short Chinese line, no emoji): BPE must still be exact.
ROUND_TRIP_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！莎士比亚",
    "🤖👍🏽 family 👨‍👩‍👧",
    "mixed: kato 你好 🤖 ÿ café naïve 123,456.78",
    "  leading and trailing spaces  ",
    "\n\n\n\t\t  \r\n  runs of whitespace\n\n",
    "\x00\x01 control bytes \x7f",
    "a<|endoftext|>b<|im_start|>user\nhi<|im_end|>\n",
    "",
]


def make_corpus(seed: int = 0, documents: int = 40) -> list[str]:
    """Pseudo-words made of syllables, plus a little Chinese: enough pairs for a few hundred merges."""
    rng = random.Random(seed)
    texts = []
    for _ in range(documents):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(150)]
        texts.append(" ".join(words) + ".\n\n")
    texts.append("你好世界")
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return train_tokenizer(corpus, kind="bpe", vocab_size=BPE_VOCAB_SIZE)


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return train_tokenizer(["hello world\n", "To be, or not to be 你好"], kind="char", vocab_size=4096)


# --- special tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_tokens_have_the_lowest_ids_and_are_recognised_in_text(kind, bpe, char_tok):
    tok = bpe if kind == "bpe" else char_tok
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [tok.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eot_id == 0
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token) == [token_id]
        assert tok.token_bytes(token_id) == token.encode()
    ids = tok.encode("he<|im_start|>lo<|endoftext|>")
    assert ids == tok.encode("he") + [1] + tok.encode("lo") + [0]
    assert tok.decode(ids, skip_special_tokens=True) == "helo"
    assert tok.decode(tok.encode("hello")) == "hello"  # nothing is added around plain text
    assert not set(tok.encode("hello")) & {0, 1, 2}


# --- byte-level BPE -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_STRINGS)
def test_bpe_round_trip_is_exact(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


@pytest.mark.parametrize("text", ROUND_TRIP_STRINGS)
def test_bpe_token_bytes_concatenate_to_the_utf8_text(bpe, text):
    assert b"".join(bpe.token_bytes(i) for i in bpe.encode(text)) == text.encode("utf-8")


def test_bpe_splits_unseen_characters_into_bytes(bpe):
    ids = bpe.encode("🤖")  # never in the training text: one token per UTF-8 byte
    assert [bpe.token_bytes(i) for i in ids] == [bytes([b]) for b in "🤖".encode()]


def test_bpe_vocab_holds_every_byte_and_learned_merges(bpe, corpus):
    assert bpe.kind == "bpe" and bpe.vocab_size == len(bpe) == BPE_VOCAB_SIZE
    single_bytes = {bpe.token_bytes(i) for i in range(bpe.vocab_size) if len(bpe.token_bytes(i)) == 1}
    assert single_bytes == {bytes([b]) for b in range(256)}
    text = corpus[0]
    assert len(bpe.encode(text)) < len(text.encode()) / 2  # merges compress the training text
    assert len(bytes_to_unicode()) == 256 and len(set(bytes_to_unicode().values())) == 256


def test_bpe_training_is_deterministic(corpus):
    first = train_tokenizer(corpus, "bpe", 300)
    again = train_tokenizer(iter(corpus), "bpe", 300)  # a one-pass iterator works too
    other = train_tokenizer(make_corpus(seed=1), "bpe", 300)
    assert first.fingerprint == again.fingerprint
    assert first.encode(corpus[0]) == again.encode(corpus[0])
    assert first.fingerprint != other.fingerprint
    assert len(first.fingerprint) == 64


def test_encode_batch_matches_encode(bpe):
    texts = [t for t in ROUND_TRIP_STRINGS if t] * 3
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_decode_accepts_numpy_ids(bpe):
    ids = bpe.encode("kato ripa 你好")
    assert bpe.decode(np.array(ids, dtype=np.uint16)) == "kato ripa 你好"


def test_token_bytes_rejects_ids_outside_the_vocab(bpe):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.token_bytes(bpe.vocab_size)


# --- char ---------------------------------------------------------------------------------------


def test_char_vocab_is_specials_unk_then_sorted_characters(char_tok):
    chars = sorted(set("hello world\n" + "To be, or not to be 你好"))
    expected = [*SPECIAL_TOKENS, UNK_TOKEN, *chars, *CHAT_TOKENS]  # the chat tokens take the last ids
    assert char_tok.kind == "char"
    assert char_tok.vocab_size == len(chars) + 4 + len(CHAT_TOKENS)
    assert [char_tok.id_to_token(i) for i in range(char_tok.vocab_size)] == expected


@pytest.mark.parametrize("text", ["hello world\n", "To be, or not\n\n  to be", "你好 hello", "  \n\n  "])
def test_char_round_trip_and_one_token_per_character(char_tok, text):
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text
    assert b"".join(char_tok.token_bytes(i) for i in ids) == text.encode()


def test_char_unseen_character_becomes_unk(char_tok):
    ids = char_tok.encode("h☃e")
    assert ids == [char_tok.encode("h")[0], 3, char_tok.encode("e")[0]]
    assert char_tok.decode(ids) == "h<|unk|>e"
    assert char_tok.decode(ids, skip_special_tokens=True) == "he"


def test_char_vocab_size_is_an_upper_bound_keeping_the_most_frequent(recwarn):
    tok = train_tokenizer(["aaaa bbb cc d"], "char", vocab_size=13)  # 4 reserved + 3 characters + 6 chat
    assert [tok.id_to_token(i) for i in range(4, 7)] == [" ", "a", "b"]
    assert tok.encode("abcd") == [5, 6, 3, 3]
    assert any("do not fit" in str(w.message) for w in recwarn)
    small = train_tokenizer(["ab"], "char", vocab_size=4096)  # fewer characters: a smaller vocab, no error
    assert small.vocab_size == 6 + len(CHAT_TOKENS)


# --- save / load --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_preserves_encodings_fingerprint_and_kind(kind, bpe, char_tok, tmp_path):
    tok = bpe if kind == "bpe" else char_tok
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert (loaded.kind, loaded.vocab_size, loaded.fingerprint) == (tok.kind, tok.vocab_size, tok.fingerprint)
    for text in ["hello world", "to be 你好<|im_end|>", "h☃"]:
        assert loaded.encode(text) == tok.encode(text)
    assert [loaded.token_bytes(i) for i in range(loaded.vocab_size)] == [
        tok.token_bytes(i) for i in range(tok.vocab_size)]
    loaded.save(tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").fingerprint == tok.fingerprint


def test_kind_is_inferred_without_tokenizer_config(bpe, char_tok, tmp_path):
    for tok in (bpe, char_tok):
        tok.save(tmp_path / tok.kind)
        (tmp_path / tok.kind / "tokenizer_config.json").unlink()
        assert load_tokenizer(tmp_path / tok.kind).kind == tok.kind


def test_tokenizer_config_has_what_transformers_needs(char_tok, tmp_path):
    char_tok.save(tmp_path, model_max_length=256)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["acornlm_kind"] == "char"
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["unk_token"] == UNK_TOKEN
    assert config["model_max_length"] == 256
    assert config["clean_up_tokenization_spaces"] is False
    assert [config["added_tokens_decoder"][str(i)]["content"] for i in range(4)] == [*SPECIAL_TOKENS, UNK_TOKEN]
    assert "<|im_start|>" in config["chat_template"]


# --- transformers -------------------------------------------------------------------------------

HF_STRINGS = ["hello world kato ripa", "你好，世界！莎士比亚", "🤖👍🏽 family 👨‍👩‍👧", "  x\n\n y ",
              "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "unseen ☃ char"]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_autotokenizer_encodes_and_decodes_like_acornlm(kind, bpe, char_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = bpe if kind == "bpe" else char_tok
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == hf.pad_token_id == tok.eot_id
    assert len(hf) == tok.vocab_size
    for text in HF_STRINGS:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf(text)["input_ids"] == ids  # the default adds nothing either
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_chat_template_renders_chatml(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好?"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好?<|im_end|>\n"
    assert hf.apply_chat_template(messages, tokenize=False) == expected == render_text(messages)
    with_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == expected + "<|im_start|>assistant\n" == render_text(messages, add_generation_prompt=True)
    assert bpe.encode(with_prompt)[:1] == [1] and bpe.encode(with_prompt).count(2) == 2


# --- errors -------------------------------------------------------------------------------------


def test_bpe_vocab_below_bytes_plus_specials_is_rejected():
    assert MIN_BPE_VOCAB_SIZE == 265
    with pytest.raises(ConfigError, match="minimum is 265"):
        train_tokenizer(["some text"], "bpe", 258)
    assert train_tokenizer(["some text"], "bpe", 265).vocab_size == 265


def test_bpe_vocab_above_what_the_corpus_supports_says_the_reached_size():
    with pytest.raises(DataError, match=r"only supports a BPE vocabulary of (\d+) tokens") as info:
        train_tokenizer(["abab abab"], "bpe", 5000)
    reached = int(info.value.args[0].split("vocabulary of ")[1].split()[0])
    assert MIN_BPE_VOCAB_SIZE < reached < 5000
    assert f"--vocab-size {reached}" in str(info.value)
    assert train_tokenizer(["abab abab"], "bpe", reached).vocab_size == reached  # the suggestion works


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_empty_training_text_is_rejected(kind, texts):
    with pytest.raises(DataError, match="training text is empty"):
        train_tokenizer(texts, kind, 300)


def test_bad_kind_and_bad_char_vocab_are_rejected():
    with pytest.raises(ConfigError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer(["text"], "wordpiece", 300)
    with pytest.raises(ConfigError, match="minimum is 11"):
        train_tokenizer(["text"], "char", 4)
    with pytest.raises(DataError, match="not a string"):
        train_tokenizer(["text", b"bytes"], "char", 100)


def test_loading_a_missing_directory_or_file_names_it(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_loading_a_corrupt_tokenizer_names_the_file_and_line(bpe, tmp_path):
    bpe.save(tmp_path)
    file = tmp_path / "tokenizer.json"
    text = file.read_text()
    file.write_text(text[: len(text) // 2])  # truncated mid-file
    with pytest.raises(DataError, match=r"tokenizer\.json is corrupt: line \d+"):
        load_tokenizer(tmp_path)
    file.write_text('{"model": 42}')  # valid JSON, not a tokenizer
    with pytest.raises(DataError, match=r"tokenizer\.json is not a valid tokenizer file"):
        load_tokenizer(tmp_path)


def test_loading_a_tokenizer_without_acornlm_specials_is_rejected(tmp_path):
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models

    BackendTokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"tokenizer\.json is not an acornlm tokenizer.*has id 1"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config_is_named(char_tok, tmp_path):
    char_tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{\n  oops")
    with pytest.raises(DataError, match=r"tokenizer_config\.json is corrupt: line 2"):
        load_tokenizer(tmp_path)


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture()
def corpus_dir(tmp_path, corpus):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index, text in enumerate(corpus[:6]):
        (folder / f"doc{index}.txt").write_text(text, encoding="utf-8")
    return folder


def test_cli_train_then_stats_end_to_end(corpus_dir, tmp_path, capsys):
    out = tmp_path / "bpe"
    trained = tokenizer_cli.train(input=[str(corpus_dir)], kind="bpe", vocab_size=300, out=str(out))
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300
    assert "300 tokens" in capsys.readouterr().out

    result = tokenizer_cli.stats(tokenizer=str(out), input=[str(corpus_dir)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0]) == result
    assert "bytes/token" in lines[1]
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.iterdir())]
    assert result["documents"] == len(texts) == trained["documents"]
    assert result["tokens"] == sum(len(tok.encode(t)) for t in texts) == trained["tokens"]
    assert result["bytes"] == sum(len(t.encode()) for t in texts)
    assert result["bytes_per_token"] == pytest.approx(result["bytes"] / result["tokens"], abs=1e-3)
    assert result["vocab_size"] == 300 and result["kind"] == "bpe"

    tokenizer_cli.train(input=[str(corpus_dir)], kind="char", out=str(tmp_path / "char"))
    char_result = tokenizer_cli.stats(tokenizer=str(tmp_path / "char"), input=[str(corpus_dir)])
    assert char_result["tokens"] == char_result["chars"]  # one token per character
    assert char_result["unknown_tokens"] == 0
    assert result["bytes_per_token"] > char_result["bytes_per_token"]  # BPE compresses better


def test_cli_requires_input_out_and_tokenizer(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="--input is required"):
        tokenizer_cli.train(out=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="--out is required"):
        tokenizer_cli.train(input=[str(corpus_dir)])
    with pytest.raises(ConfigError, match="--tokenizer is required"):
        tokenizer_cli.stats(input=[str(corpus_dir)])


def test_cli_train_on_an_empty_corpus_is_a_data_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        tokenizer_cli.train(input=[str(tmp_path / "empty.txt")], out=str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()


def test_cli_errors_option_reaches_the_corpus_reader(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xc3\xa9 ok \xff\xfe end")
    with pytest.raises(DataError, match="bad.txt"):
        tokenizer_cli.train(input=[str(bad)], kind="char", out=str(tmp_path / "strict"))
    tokenizer_cli.train(input=[str(bad)], kind="char", out=str(tmp_path / "replace"), errors="replace")
    tok = load_tokenizer(tmp_path / "replace")
    assert tok.decode(tok.encode("café \ufffd")) == "café \ufffd"  # U+FFFD became a normal character
