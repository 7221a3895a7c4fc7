"""`acornlm data prepare` at corpus scale: MB/s, peak memory of the process tree, and resume overhead.

Generates a corpus of `--size-mb` MB of UTF-8 text (2 GB by default) as jsonl and as parquet (written
streaming, row groups of 4,096 documents), trains a BPE tokenizer on its first 16 MB, then times
`acornlm data prepare` on each format in a fresh process while sampling the resident memory of that
process and its tokenizer workers every 0.5 s. With `--resume-check` it also kills a jsonl run with
SIGKILL halfway, resumes it, and checks the shards and meta.json are byte-identical to the one-shot run.

The text mixes English-like sentences (a Zipf-weighted word list plus invented words, so the BPE
word cache also misses), Chinese sentences (3-byte UTF-8 characters in long unspaced runs), numbers,
emoji and code lines. Every document is a different slice of a 32 MB pool with its own header line, so
no two documents are equal (the validation hold-out hashes each text).

    .venv/bin/python benchmarks/data_prepare_scale.py [--size-mb 2048] [--formats jsonl,parquet]
        [--workers 0] [--resume-check] [--work /tmp/acornlm-data-scale] [--keep] [--generate-only]

Prints one JSON object. The generated files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402
from eval_bench import HANZI, WORDS  # noqa: E402

EMOJI = "😀😂🥲😍🤔🙏👍🔥🎉🚀🌟🍜🐼🌸💡📚✅❌⚡🌍"
CODE = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }\n",
        "SELECT name, COUNT(*) FROM users GROUP BY name;\n", "import numpy as np\nprint(np.arange(10))\n"]
POOL_CHARS = 32 << 20
ROW_GROUP = 4096
PREPARE = [sys.executable, "-m", "acornlm", "data", "prepare"]


def text_pool(rng: random.Random) -> str:
    """32 MB of mixed text: paragraphs of English-like and Chinese sentences, numbers, emoji and code."""
    words = list(WORDS) + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 11)))
                           for _ in range(20000)]  # an invented long tail
    cum_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))  # Zipf
    parts, size = [], 0
    while size < POOL_CHARS:
        kind = rng.random()
        if kind < 0.6:
            sentence = " ".join(rng.choices(words, cum_weights=cum_weights, k=rng.randint(6, 30))).capitalize()
            piece = sentence + rng.choice([".", ".", "!", "?", f" ({rng.randint(0, 10**6)})."]) + " "
        elif kind < 0.9:
            piece = "".join(rng.choices(HANZI, k=rng.randint(8, 40))) + rng.choice("，。！？；")
        elif kind < 0.95:
            piece = rng.choice(EMOJI) * rng.randint(1, 3) + " "
        else:
            piece = rng.choice(CODE)
        if rng.random() < 0.08:
            piece += "\n\n"
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


def documents(total_bytes: int, seed: int = 0):
    """Documents of 200-12,000 characters until `total_bytes` UTF-8 bytes: distinct slices of the pool."""
    rng = random.Random(seed)
    pool = text_pool(rng)
    written, index = 0, 0
    while written < total_bytes:
        length = int(min(12000, max(200, rng.lognormvariate(7.5, 0.8))))
        start = rng.randrange(len(pool) - length)
        text = f"Document {index} · id {rng.getrandbits(48):012x}\n" + pool[start:start + length]
        yield text
        written += len(text.encode("utf-8"))
        index += 1


def generate(work: Path, size_mb: float, formats: list[str]) -> dict:
    """Write corpus.jsonl and/or corpus.parquet (the same documents) streaming; return sizes and seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    jsonl = open(work / "corpus.jsonl", "w", encoding="utf-8") if "jsonl" in formats else None
    writer = pq.ParquetWriter(work / "corpus.parquet", pa.schema([("text", pa.string())])) \
        if "parquet" in formats else None
    rows, count, text_bytes = [], 0, 0
    sample = open(work / "sample.txt", "w", encoding="utf-8")
    for text in documents(int(size_mb * 1e6)):
        count += 1
        text_bytes += len(text.encode("utf-8"))
        if text_bytes < 16e6:
            sample.write(text + "\n")
        if jsonl:
            jsonl.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        if writer:
            rows.append(text)
            if len(rows) == ROW_GROUP:
                writer.write_table(pa.table({"text": rows}))
                rows = []
    if writer:
        if rows:
            writer.write_table(pa.table({"text": rows}))
        writer.close()
    if jsonl:
        jsonl.close()
    sample.close()
    files = {f: (work / f"corpus.{f}").stat().st_size for f in formats}
    return {"documents": count, "text_bytes": text_bytes, "file_bytes": files,
            "seconds": round(time.perf_counter() - started, 1)}


class TreeMemory:
    """Peak memory of a process and all its children, sampled every `interval` seconds.

    RSS summed over the processes counts pages they share (libraries) once per process; PSS
    (proportional set size) splits each shared page among its sharers, so its sum is the tree's
    real footprint.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.process, self.interval = psutil.Process(pid), interval
        self.peak = {"rss_tree": 0, "pss_tree": 0, "pss_main": 0, "pss_worker": 0}
        self.processes = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:
                tree = []
            rss = pss = 0
            for proc in tree:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss = rss + info.rss, pss + info.pss
                key = "pss_main" if proc.pid == self.process.pid else "pss_worker"
                self.peak[key] = max(self.peak[key], info.pss)
            self.peak["rss_tree"] = max(self.peak["rss_tree"], rss)
            self.peak["pss_tree"] = max(self.peak["pss_tree"], pss)
            self.processes = max(self.processes, len(tree))
            self.done.wait(self.interval)

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return {f"peak_{key}_mb": round(value / 2**20, 1) for key, value in self.peak.items()} | \
            {"processes": self.processes}


def run_prepare(args: list[str], kill_after: float | None = None, kill_when=None) -> dict:
    """Run `acornlm data prepare` in a fresh process group; optionally SIGKILL it when kill_when() turns true."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(PREPARE + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    memory = TreeMemory(proc.pid)
    killed = False
    if kill_after is not None:
        while proc.poll() is None:
            if time.perf_counter() - started >= kill_after and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    result = {"wall_s": round(wall, 1), **memory.stop(), "returncode": proc.returncode}
    if killed:
        result["killed_after_s"] = round(wall, 1)
    elif proc.returncode != 0:
        raise SystemExit(f"data prepare failed:\n{stderr[-3000:]}")
    found = re.search(r"in ([\d.]+) s: ([\d.]+) M tokens/s, ([\d.]+) MB/s", stdout)
    if found:
        result |= {"tokenize_s": float(found[1]), "m_tokens_per_s": float(found[2]), "mb_per_s": float(found[3])}
    return result


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every shard and of meta.json."""
    digests = {}
    for file in sorted(folder.iterdir()):
        if file.suffix == ".bin" or file.name == "meta.json":
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            digests[file.name] = digest.hexdigest()
    return digests


def shards_done(out: Path) -> int:
    try:
        progress = json.loads((out / "prepare-progress.json").read_text())
        return sum(len(s["shards"]) for s in progress["splits"].values())
    except (OSError, ValueError, KeyError):
        return 0


def resume_check(work: Path, fmt: str, one_shot: dict, common: list[str]) -> dict:
    """SIGKILL a run halfway (once a shard is done), rerun the same command, compare with the one-shot output."""
    out, resumed = work / f"out-{fmt}", work / f"resumed-{fmt}"
    inputs = ["--input", str(work / f"corpus.{fmt}"), "--out", str(resumed), *common]
    first = run_prepare(inputs, kill_after=one_shot["wall_s"] / 2, kill_when=lambda: shards_done(resumed) > 0)
    kept = shards_done(resumed)
    second = run_prepare(inputs)
    same = file_digests(resumed) == file_digests(out)
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "format": fmt, "killed_run": first, "shards_kept": kept, "resumed_run": second,
        "byte_identical_to_one_shot": same,
        "startup_s_one_shot": round(one_shot["wall_s"] - one_shot.get("tokenize_s", 0), 1),
        "startup_s_resumed": round(second["wall_s"] - second.get("tokenize_s", 0), 1),
        "total_wall_s_with_interruption": round(first["wall_s"] + second["wall_s"], 1),
        "overhead_s": round(first["wall_s"] + second["wall_s"] - one_shot["wall_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=2048)
    parser.add_argument("--formats", default="jsonl,parquet")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--shard-tokens", type=int, default=0, help="0 = acornlm's default")
    parser.add_argument("--resume-check", action="store_true")
    parser.add_argument("--work", default="/tmp/acornlm-data-scale")
    parser.add_argument("--keep", action="store_true", help="keep the corpus (a later run with the same --work, "
                        "--size-mb and --formats reuses it)")
    parser.add_argument("--generate-only", action="store_true", help="write the corpus and stop (implies --keep)")
    args = parser.parse_args()
    formats = args.formats.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "data_prepare_scale", "environment": environment(),
                    "uptime_before": os.popen("uptime").read().strip()}
    try:
        manifest = work / "corpus.json"
        wanted = {"size_mb": args.size_mb, "formats": formats}
        if manifest.is_file() and json.loads(manifest.read_text())["wanted"] == wanted:
            report["corpus"] = json.loads(manifest.read_text())["corpus"] | {"reused": True}
        else:
            report["corpus"] = generate(work, args.size_mb, formats)
            manifest.write_text(json.dumps({"wanted": wanted, "corpus": report["corpus"]}))
        if args.generate_only:
            print(json.dumps(report["corpus"]))
            return
        from acornlm.tokenizer import train_tokenizer

        started = time.perf_counter()
        sample = (work / "sample.txt").read_text(encoding="utf-8").split("\n\n")
        train_tokenizer(sample, kind="bpe", vocab_size=args.vocab_size).save(work / "tokenizer")
        report["tokenizer"] = {"kind": "bpe", "vocab_size": args.vocab_size, "trained_on_mb": 16,
                               "seconds": round(time.perf_counter() - started, 1)}
        common = ["--tokenizer", str(work / "tokenizer"), "--val-fraction", "0.01", "--workers", str(args.workers)]
        if args.shard_tokens:
            common += ["--shard-tokens", str(args.shard_tokens)]
        report["runs"] = {}
        for fmt in formats:
            out = work / f"out-{fmt}"
            run = run_prepare(["--input", str(work / f"corpus.{fmt}"), "--out", str(out), *common])
            meta = json.loads((out / "meta.json").read_text())
            run["shards"] = {s: len(meta[s]["shards"]) for s in ("train", "val")}
            run["tokens"] = meta["train"]["tokens"] + meta["val"]["tokens"]
            run["input_mb_per_s"] = round(report["corpus"]["file_bytes"][fmt] / 1e6 / run["wall_s"], 2)
            report["runs"][fmt] = run
            print(json.dumps({fmt: run}), file=sys.stderr, flush=True)  # partial results as they come
            if fmt != formats[0] or not args.resume_check:
                shutil.rmtree(out, ignore_errors=True)
        if args.resume_check:  # last, so the one-shot figures of every format come first
            report["resume"] = resume_check(work, formats[0], report["runs"][formats[0]], common)
            print(json.dumps({"resume": report["resume"]}), file=sys.stderr, flush=True)
    finally:
        if not (args.keep or args.generate_only):
            shutil.rmtree(work, ignore_errors=True)
    report["uptime_after"] = os.popen("uptime").read().strip()
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
