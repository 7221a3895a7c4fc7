"""Data parallelism on CPU: two gloo processes with accumulation 1 see the same global batch as
one process with accumulation 2, so their losses must agree; and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# Runs the real CLI; an audit hook records every attempt of this rank to create, write, rename
# or delete something in the run directory, and saves the list next to it.
ENTRY_SCRIPT = """
import json, os, sys
run_dir = os.path.abspath(sys.argv[1])
inside = lambda path: os.path.abspath(os.fsdecode(path)).startswith(run_dir + os.sep)
rank = int(os.environ.get("RANK", "0"))
writes = []
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile"}

def hook(event, args):
    if event == "open":
        path, mode = args[0], args[1]
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writing = True
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            if inside(path):
                writes.append((event, os.fsdecode(path)))
    elif event in WRITE_EVENTS:
        for arg in args:
            if isinstance(arg, (str, os.PathLike)) and inside(arg):
                writes.append((event, os.fspath(arg)))

sys.addaudithook(hook)
from acornlm.cli import main
main(["train", "pretrain", "--out", run_dir] + sys.argv[2:])
with open(f"{run_dir}.rank{rank}.writes.json", "w") as f:
    json.dump(writes, f)
"""

STEPS = 6


def train_args(data, accum: int) -> list[str]:
    return ["--config", "tiny", "--data", str(data), "--train.max_steps", str(STEPS),
            "--train.grad_accum_steps", str(accum), "--train.eval_interval", "3", "--train.save_interval", "3",
            "--train.progress", "false"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_accumulation(prepared_data, tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(ENTRY_SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, str(script), str(single), *train_args(prepared_data, accum=2)])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(ddp), *train_args(prepared_data, accum=1)])

    one, two = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert b["tokens_seen"] == a["tokens_seen"]  # the same global batch size
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]  # it trained, so the comparison means something

    state = torch.load(ddp / "checkpoints" / f"step-{STEPS:07d}" / "train_state.pt",
                                      weights_only=True)
    assert state["world_size"] == 2 and state["tokens_seen"] == one[-1]["tokens_seen"]
    assert json.loads((tmp_path / "ddp.rank1.writes.json").read_text()) == []  # rank 1 wrote nothing
    rank0_writes = {os.path.basename(path) for _, path in json.loads((tmp_path / "ddp.rank0.writes.json").read_text())}
    assert {"metrics.jsonl", "config.json", "loss_curve.png"} <= rank0_writes  # the hook does see writes

    # Resuming the 2-process run in 1 process: the global step and tokens seen carry on.
    per_step_one_process = 4 * 64  # tiny preset: batch 4 x seq_len 64, accumulation 1
    run([sys.executable, str(script), str(ddp), *train_args(prepared_data, accum=1),
         "--train.max_steps", str(STEPS + 2), "--resume"])
    resumed = read_metrics(ddp)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 3))
    assert resumed[-1]["tokens_seen"] == two[-1]["tokens_seen"] + 2 * per_step_one_process
