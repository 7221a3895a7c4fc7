"""Multi-node training as on two machines, here as two torchrun launchers on one: each is a "node"
with one process, and they meet through a c10d rendezvous on 127.0.0.1 (the commands a user runs on
each node, docs/scale-out.md). Trained with FSDP at a global batch of 8, the loss equals the
single-process run's at the same global batch (float32 rounding: rel 1e-5), and the sharded
checkpoint written by both "nodes" into the shared run directory is complete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from acornlm.train.metrics import TIMING_FIELDS

STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(data, out) -> list[str]:
    return ["-m", "acornlm", "train", "pretrain", "--config", "tiny", "--data", str(data), "--out", str(out),
            "--train.max_steps", str(STEPS), "--train.global_batch_size", "8", "--train.eval_interval", "2",
            "--train.eval_batches", "2", "--train.save_interval", str(STEPS), "--train.progress", "false"]


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def test_two_nodes_match_one_process(prepared_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    result = subprocess.run([sys.executable, *train_args(prepared_data, single)], capture_output=True, text=True,
                            timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    port = free_port()
    launchers = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                          "--rdzv_id", "acornlm-test", "--rdzv_conf", "join_timeout=120",
                          *train_args(prepared_data, nodes), "--train.parallel", "fsdp"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for node in (0, 1)
    ]
    try:
        outputs = [launcher.communicate(timeout=240) for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    for launcher, (_, stderr) in zip(launchers, outputs):
        assert launcher.returncode == 0, stderr[-3000:]

    one, two = metrics(single), metrics(nodes)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert b["tokens_seen"] == a["tokens_seen"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]
    shards = nodes / "checkpoints" / f"step-{STEPS:07d}" / "optimizer"
    assert {p.name for p in shards.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
