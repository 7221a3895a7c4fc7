"""benchmarks/gpu_check.sh stays runnable between the rare runs on a GPU: its tiny CPU version runs
every step (bf16 training through the CLI, flash vs math SDPA, resume, the engine, the plan)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def run_check(*args: str, env: dict | None = None) -> dict:
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                            env=env or ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # stdout is the JSON report and nothing else


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    report = run_check("--device", "cpu", "--smoke", "--out", str(tmp_path))
    summary = report["summary"]
    assert summary["errors"] == []
    assert set(summary["ok"]) == {"environment", "data", "train/tiny/eager", "sdpa", "resume", "engine", "plan"}
    assert set(summary["skipped"]) == {"train/tiny/compile", "distributed"}
    assert report["train"]["tiny/compile"]["reason"] and report["distributed"]["reason"]

    eager = report["train"]["tiny/eager"]
    assert eager["steps"] == 6 and eager["tokens_per_s"] > 0 and eager["mfu_vs_measured_matmul_peak"] > 0
    assert eager["loss_last"] < eager["loss_first"]
    assert report["resume"]["bitwise"] and report["resume"]["metrics_equal"]  # exact on the CPU
    assert report["sdpa"]["flash_within_tolerance"]
    assert report["engine"]["tokens_per_s_batch1"] > 0 and report["engine"]["tokens_per_s_batch16"] > 0
    assert report["plan"]["tiny"]["predicted_gib"] > 0
    run = tmp_path / "run-tiny-eager"
    config = json.loads((run / "checkpoints" / "step-0000006" / "config.json").read_text())
    assert config["train"]["dtype"] == "bfloat16" and config["train"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_gpu_check_without_a_gpu_says_it_skipped():
    report = run_check()
    assert "no CUDA GPU" in report["skipped"]
