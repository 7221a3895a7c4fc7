"""Sharded `data prepare`: the shard index, the loader's stream across shards, resuming to the same bytes,
and the errors of missing/corrupt shards, mismatched resumes and a full disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from acornlm.cli import main as cli_main
from acornlm.data import prepare as prepare_module
from acornlm.data.corpus import input_files, iter_positioned_documents
from acornlm.data.loader import TokenLoader, open_tokens, read_meta
from acornlm.data.prepare import prepare_data
from acornlm.data.shards import LOCK_FILE, PROGRESS_FILE, ShardWriter
from acornlm.errors import DataError, DiskFullError
from acornlm.tokenizer import load_tokenizer, train_tokenizer

SHARD_TOKENS = 400
DOCS = [f"Doc {i}: {'to be or not to be, ' * (i % 9 + 1)}naïve café {i * 37}. 春眠不觉晓 🌸 {'x' * (i % 5)}\n"
        for i in range(160)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    train_tokenizer(DOCS, kind="bpe", vocab_size=300).save(directory)
    return directory


def write_corpus(folder: Path, kind: str) -> list[Path]:
    """The same documents as one jsonl file, a parquet file of small row groups, or a folder of .txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" + ("\n" if i % 10 == 0 else "")
                        for i, t in enumerate(DOCS))
        (folder / "corpus.jsonl").write_text(lines, encoding="utf-8")
        return [folder / "corpus.jsonl"]
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS}), folder / "corpus.parquet", row_group_size=7)
        return [folder / "corpus.parquet"]
    for i, text in enumerate(DOCS):
        (folder / "txt" / f"{i:04d}.txt").parent.mkdir(exist_ok=True)
        (folder / "txt" / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    return [folder / "txt"]


@pytest.fixture
def corpus(tmp_path) -> list[Path]:
    return write_corpus(tmp_path / "corpus", "jsonl")


def prepare(inputs, bpe_dir, out, **kwargs):
    options = {"val_fraction": 0.2, "workers": 1, "shard_tokens": SHARD_TOKENS} | kwargs
    return prepare_data(inputs, bpe_dir, out, **options)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a prepared folder (shards, meta.json, the tokenizer copy) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def crash_after_commits(monkeypatch, commits: int, error: BaseException, before_recording: bool = False) -> None:
    """Make the run fail right after its `commits`-th progress write (i.e. after that many shards closed),
    or with `before_recording` between publishing that shard and recording it."""
    calls = {"n": 0}
    real = prepare_module.write_progress

    def write_then_crash(*args, **kwargs):
        calls["n"] += 1
        if before_recording and calls["n"] == commits:
            raise error
        real(*args, **kwargs)
        if calls["n"] == commits:
            raise error

    monkeypatch.setattr(prepare_module, "write_progress", write_then_crash)


def interrupted_prepare(monkeypatch, commits: int, corpus, tokenizer_dir, out) -> None:
    """A `prepare` into `out` that a Ctrl-C stops after `commits` shards closed (the patch is then undone)."""
    crash_after_commits(monkeypatch, commits, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tokenizer_dir, out)
    monkeypatch.undo()


# --- shards and index ---


def test_prepare_writes_several_whole_document_shards_and_an_index(tmp_path, bpe_dir, corpus):
    meta = prepare(corpus, bpe_dir, tmp_path / "out")
    out = tmp_path / "out"
    eot = meta["tokenizer"]["eot_id"]
    assert read_meta(out)["version"] == 2 and meta["shard_tokens"] == SHARD_TOKENS
    listed = set()
    for split in ("train", "val"):
        shards = meta[split]["shards"]
        assert len(shards) >= (3 if split == "train" else 2)
        assert [s["file"] for s in shards] == [f"{split}-{i:05d}.bin" for i in range(len(shards))]
        for shard in shards:
            data = (out / shard["file"]).read_bytes()
            tokens = np.frombuffer(data, dtype=np.uint16)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["tokens"] == len(tokens) <= SHARD_TOKENS
            assert tokens[-1] == eot and shard["documents"] == int((tokens == eot).sum())  # whole documents
        for key in ("tokens", "documents", "bytes"):
            assert meta[split][key] == sum(s[key] for s in shards)
        listed |= {s["file"] for s in shards}
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(DOCS)
    assert {p.name for p in out.iterdir()} == listed | {"meta.json", "tokenizer"}  # no progress, lock or partials


def test_sharding_does_not_change_the_token_stream(tmp_path, bpe_dir, corpus):
    sharded = prepare(corpus, bpe_dir, tmp_path / "sharded")
    single = prepare(corpus, bpe_dir, tmp_path / "single", shard_tokens=10**9)
    assert len(single["train"]["shards"]) == 1 and len(sharded["train"]["shards"]) > 1
    for split in ("train", "val"):
        joined = np.concatenate([np.fromfile(tmp_path / "sharded" / s["file"], dtype=np.uint16)
                                 for s in sharded[split]["shards"]])
        assert np.array_equal(joined, np.fromfile(tmp_path / "single" / f"{split}-00000.bin", dtype=np.uint16))
        assert {k: sharded[split][k] for k in ("tokens", "documents", "bytes")} == \
               {k: single[split][k] for k in ("tokens", "documents", "bytes")}


def test_a_document_longer_than_a_shard_gets_a_shard_of_its_own(tmp_path, bpe_dir):
    long_doc = "to be or not to be " * 200
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["short a", long_doc, "short b"]))
    (tmp_path / "v.txt").write_text("held out", encoding="utf-8")
    meta = prepare([tmp_path / "c.jsonl"], bpe_dir, tmp_path / "out", val_fraction=0.0,
                   val_inputs=[tmp_path / "v.txt"], shard_tokens=50)
    assert [s["documents"] for s in meta["train"]["shards"]] == [1, 1, 1]
    assert meta["train"]["shards"][1]["tokens"] > 50


# --- the loader ---


def test_loader_batches_of_shards_equal_those_of_one_file(tmp_path, bpe_dir, corpus):
    prepare(corpus, bpe_dir, tmp_path / "sharded")
    prepare(corpus, bpe_dir, tmp_path / "single", shard_tokens=10**9)
    stream = open_tokens(tmp_path / "sharded", read_meta(tmp_path / "sharded"), "train")
    whole = np.fromfile(tmp_path / "single" / "train-00000.bin", dtype=np.uint16)
    assert len(stream) == len(whole) and np.array_equal(np.asarray(stream), whole)
    boundary = int(stream.ends[0])
    assert np.array_equal(stream[boundary - 5:boundary + 700], whole[boundary - 5:boundary + 700])  # 3 shards
    assert stream[boundary] == whole[boundary] and stream[-1] == whole[-1]
    for split in ("train", "val"):
        a = TokenLoader(tmp_path / "sharded", split, batch_size=8, seq_len=48, seed=3, grad_accum_steps=2)
        b = TokenLoader(tmp_path / "single", split, batch_size=8, seq_len=48, seed=3, grad_accum_steps=2)
        for step in range(4):
            for micro in range(2):
                assert all(torch.equal(p, q) for p, q in zip(a.batch(step, micro), b.batch(step, micro)))
        assert torch.equal(a.eval_batch(1)[0], b.eval_batch(1)[0])
    # some of those windows crossed a shard boundary, so the joined read was exercised
    starts = np.concatenate([np.random.Generator(np.random.PCG64([3, step])).integers(0, len(whole) - 49, size=16)
                             for step in range(4)])
    shard_of = np.searchsorted(stream.ends, starts, side="right")
    assert (shard_of != np.searchsorted(stream.ends, starts + 48, side="right")).any()


def test_version_1_single_file_folder_still_loads(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    np.arange(3000, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(900, dtype=np.uint16).tofile(folder / "val.bin")
    meta = {"format": "acornlm-data", "version": 1, "dtype": "uint16",
            "tokenizer": {"fingerprint": "f" * 64, "kind": "bpe", "vocab_size": 65536, "eot_id": 0},
            "train": {"file": "train.bin", "tokens": 3000, "documents": 1, "bytes": 3000},
            "val": {"file": "val.bin", "tokens": 900, "documents": 1, "bytes": 900}}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    loader = TokenLoader(folder, "train", batch_size=4, seq_len=16, seed=7)
    x, y = loader.batch(2)
    starts = np.random.Generator(np.random.PCG64([7, 2])).integers(0, 3000 - 17, size=4)
    assert x[:, 0].tolist() == starts.tolist() and torch.equal(y, x + 1)
    assert np.array_equal(np.asarray(open_tokens(folder, read_meta(folder), "val")), np.arange(900))


def test_missing_or_truncated_shard_is_named_with_what_to_do(tmp_path, bpe_dir, corpus):
    meta = prepare(corpus, bpe_dir, tmp_path / "out")
    shards = meta["train"]["shards"]
    second = tmp_path / "out" / shards[1]["file"]
    data = second.read_bytes()
    second.write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"train-00001\.bin holds {len(data) - 2} bytes, but meta\.json says "
                                        rf"{shards[1]['tokens']} uint16 tokens .* shard 2 of {len(shards)} of the "
                                        rf"train split.*prepare the data again"):
        TokenLoader(tmp_path / "out", "train", batch_size=1, seq_len=8, seed=0)
    second.unlink()
    with pytest.raises(DataError, match=rf"train-00001\.bin is missing \(shard 2 of {len(shards)} of the train "
                                        rf"split\); restore it or prepare the data again"):
        TokenLoader(tmp_path / "out", "train", batch_size=1, seq_len=8, seed=0)


# --- reading the inputs from a position ---


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_reading_from_a_recorded_position_gives_the_rest_of_the_corpus(tmp_path, kind):
    files = input_files(write_corpus(tmp_path, kind))
    everything = list(iter_positioned_documents(files))
    assert [d.text for _, d in everything] == DOCS
    for cut in (1, 57, len(DOCS) - 1):
        position = everything[cut][0]
        rest = list(iter_positioned_documents(files, start=position))
        assert rest == everything[cut:]
    if kind == "jsonl":
        assert everything[57][0].offset > 0 and everything[57][1].source.endswith(f":{everything[57][0].line}")


def test_parquet_is_read_one_row_group_at_a_time(tmp_path):
    """Memory stays at about one row group, however large the file (pyarrow's default pre-buffering
    would hold the whole file)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [rng.bytes(2048).hex() for _ in range(48 * 128)]  # incompressible: 4 KB per row, 512 KB per group
    pq.write_table(pa.table({"text": rows}), tmp_path / "big.parquet", row_group_size=128, compression="none")
    assert (tmp_path / "big.parquet").stat().st_size > 24 << 20
    peak = count = 0
    for _ in iter_positioned_documents(input_files([tmp_path / "big.parquet"])):
        peak, count = max(peak, pa.total_allocated_bytes()), count + 1
    assert count == len(rows) and peak < 10 << 20, peak  # the whole file would be > 24 MB


# --- resuming ---


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "val_inputs"])
def test_resume_after_a_crash_is_byte_identical_to_one_shot(tmp_path, bpe_dir, kind, monkeypatch, capsys):
    inputs = write_corpus(tmp_path / "corpus", "jsonl" if kind == "val_inputs" else kind)
    options = {}
    if kind == "val_inputs":
        (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t[::-1]}) + "\n" for t in DOCS[:40]))
        options = {"val_inputs": [tmp_path / "val.jsonl"], "val_fraction": 0.0}
    one_shot = prepare(inputs, bpe_dir, tmp_path / "one-shot", **options)
    commits = len(one_shot["train"]["shards"]) + len(one_shot["val"]["shards"]) - 1
    out = tmp_path / "resumed"
    crash_after_commits(monkeypatch, commits - 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, bpe_dir, out, **options)
    assert "run the same command again to resume" in capsys.readouterr().err
    progress = json.loads((out / PROGRESS_FILE).read_text())
    assert not (out / "meta.json").exists() and sum(len(s["shards"]) for s in progress["splits"].values()) >= 2
    monkeypatch.undo()
    prepare(inputs, bpe_dir, out, **options)  # the same command: resumes by itself
    assert f"continuing at input file {progress['position']['file'] + 1}" in capsys.readouterr().err
    assert progress["position"] != {"file": 0, "offset": 0, "line": 1}
    assert folder_bytes(out) == folder_bytes(tmp_path / "one-shot")


def test_crash_between_publishing_a_shard_and_recording_it(tmp_path, bpe_dir, corpus, monkeypatch):
    """The hard case: the split that closes had an open shard in the last record, whose partial file was
    then published under its final name."""
    closed_by = []  # which split closed a shard at each progress write of a one-shot run
    real = prepare_module.write_progress

    def spy(out, fingerprint, position, writers):
        closed_by.append(max(writers, key=lambda split: (writers[split].open_state()["tokens"] == 0,
                                                         len(writers[split].finished))))
        real(out, fingerprint, position, writers)

    monkeypatch.setattr(prepare_module, "write_progress", spy)
    prepare(corpus, bpe_dir, tmp_path / "one-shot")
    monkeypatch.undo()
    commit = next(n for n in range(2, len(closed_by) + 1) if closed_by[n - 1] != closed_by[n - 2])
    out = tmp_path / "out"
    crash_after_commits(monkeypatch, commit, KeyboardInterrupt(), before_recording=True)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, bpe_dir, out)
    recorded = json.loads((out / PROGRESS_FILE).read_text())["splits"]
    on_disk = sorted(p.name for p in out.glob("*.bin"))
    assert len(on_disk) == sum(len(s["shards"]) for s in recorded.values()) + 1  # one published, unrecorded
    monkeypatch.undo()
    prepare(corpus, bpe_dir, out)
    assert folder_bytes(out) == folder_bytes(tmp_path / "one-shot")


def test_kill_9_then_the_same_command_gives_the_same_bytes(tmp_path, bpe_dir, corpus):
    """A real SIGKILL of the whole process group (parent and 2 tokenizer workers) after the 3rd shard."""
    prepare(corpus, bpe_dir, tmp_path / "one-shot")
    out = tmp_path / "killed"
    script = (
        "import os, signal, sys\n"
        "from acornlm.data import prepare\n"
        "real, calls = prepare.write_progress, []\n"
        "def write_then_die(*a, **k):\n"
        "    real(*a, **k); calls.append(1)\n"
        "    if len(calls) == 3: os.killpg(0, signal.SIGKILL)\n"
        "prepare.write_progress = write_then_die\n"
        "from acornlm.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["data", "prepare", "--input", str(corpus[0]), "--tokenizer", str(bpe_dir), "--out", str(out),
            "--val-fraction", "0.2", "--shard-tokens", str(SHARD_TOKENS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run([sys.executable, "-c", script, *args, "--workers", "2"], env=env,
                            start_new_session=True, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert (out / PROGRESS_FILE).is_file() and any(out.glob(".*.partial")) and not (out / "meta.json").exists()
    cli_main([*args, "--workers", "1"])  # resumed with another worker count: still the same bytes
    assert folder_bytes(out) == folder_bytes(tmp_path / "one-shot")


def test_resume_of_other_inputs_or_tokenizer_is_refused(tmp_path, bpe_dir, corpus, monkeypatch):
    prepare(corpus, bpe_dir, tmp_path / "one-shot")
    out = tmp_path / "out"
    interrupted_prepare(monkeypatch, 2, corpus, bpe_dir, out)
    other_tokenizer = tmp_path / "other-bpe"
    train_tokenizer(DOCS, kind="bpe", vocab_size=280).save(other_tokenizer)
    with pytest.raises(DataError, match=r"holds an interrupted run of other inputs or options \(tokenizer: .*"
                                        r"pass --resume false to discard it"):
        prepare(corpus, other_tokenizer, out)
    with pytest.raises(DataError, match=r"shard_tokens: 400 then, 500 now"):
        prepare(corpus, bpe_dir, out, shard_tokens=500)
    with open(corpus[0], "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DataError, match=r"input file corpus\.jsonl differs"):
        prepare(corpus, bpe_dir, out, resume=True)
    assert (out / PROGRESS_FILE).is_file()  # a refused resume destroys nothing
    prepare(corpus, bpe_dir, out, resume=False)  # start over
    assert read_meta(out)["train"]["documents"] + read_meta(out)["val"]["documents"] == len(DOCS) + 1
    with pytest.raises(DataError, match=r"nothing to resume in .*out: no prepare-progress\.json"):
        prepare(corpus, bpe_dir, out, resume=True)


def test_corrupt_finished_shard_is_named_on_resume(tmp_path, bpe_dir, corpus, monkeypatch):
    out = tmp_path / "out"
    interrupted_prepare(monkeypatch, 3, corpus, bpe_dir, out)
    shard = out / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00000\.bin does not match the SHA-256 recorded when it was written "
                                        r"\(corrupt\); start over with `acornlm data prepare \.\.\. --resume false`"):
        prepare(corpus, bpe_dir, out)
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00000\.bin \(a finished shard of the interrupted run\) is missing"):
        prepare(corpus, bpe_dir, out)


def test_full_disk_while_writing_a_shard_keeps_the_finished_ones(tmp_path, bpe_dir, corpus, monkeypatch):
    prepare(corpus, bpe_dir, tmp_path / "one-shot")
    out = tmp_path / "out"
    real_add, count = ShardWriter.add, {"n": 0}

    def add_until_full(self, tokens, num_bytes):
        count["n"] += 1
        if count["n"] == 100:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.partial))
        real_add(self, tokens, num_bytes)

    monkeypatch.setattr(ShardWriter, "add", add_until_full)
    with pytest.raises(DiskFullError) as info:
        prepare(corpus, bpe_dir, out)
    message = str(info.value)
    assert "\n" not in message and "disk full while writing" in message and ".partial" in message
    assert "finished shards and prepare-progress.json" in message and "run the same command again" in message
    finished = sorted(p.name for p in out.glob("*.bin"))
    assert finished and all((out / name).read_bytes() == (tmp_path / "one-shot" / name).read_bytes()
                            for name in finished)
    monkeypatch.undo()
    prepare(corpus, bpe_dir, out)
    assert folder_bytes(out) == folder_bytes(tmp_path / "one-shot")


def test_failure_before_the_first_shard_leaves_nothing_behind(tmp_path, bpe_dir, corpus, monkeypatch):
    def full(self, tokens, num_bytes):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.partial))

    monkeypatch.setattr(ShardWriter, "add", full)
    with pytest.raises(DiskFullError, match="the 0 finished shards"):
        prepare(corpus, bpe_dir, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, bpe_dir, corpus):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DataError, match=r"another `acornlm data prepare` is writing .*out"):
            prepare(corpus, bpe_dir, out)


def test_cli_shard_tokens_and_resume_options(tmp_path, bpe_dir, corpus, capsys):
    args = ["data", "prepare", "--input", str(corpus[0]), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "out"),
            "--val-fraction", "0.2", "--workers", "1", "--shard-tokens", "600", "--resume", "false"]
    cli_main(args)
    assert read_meta(tmp_path / "out")["shard_tokens"] == 600 and "shards" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args[:-2], "--resume", "true"])
    assert exit_info.value.code != 0 and "nothing to resume" in capsys.readouterr().err
    assert load_tokenizer(tmp_path / "out" / "tokenizer").fingerprint == load_tokenizer(bpe_dir).fingerprint
