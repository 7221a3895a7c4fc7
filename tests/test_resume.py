"""Exact resume: a run SIGKILLed after a checkpoint and resumed with --resume ends bitwise equal
(weights, optimizer state and every non-timing metric) to a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from acornlm.train.metrics import TIMING_FIELDS

MAX_STEPS = 40
SAVE_INTERVAL = 8


def pretrain_command(data, out, *extra: str) -> list[str]:
    # dropout > 0 makes the result depend on torch's RNG, so its saved state must be restored too
    return [sys.executable, "-m", "acornlm", "train", "pretrain", "--config", "tiny",
            "--data", str(data), "--out", str(out), "--model.dropout", "0.1",
            "--train.max_steps", str(MAX_STEPS), "--train.save_interval", str(SAVE_INTERVAL),
            "--train.eval_interval", "10", "--train.keep_last", "2", "--train.progress", "false", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def metrics_without_timing(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def latest_step(run_dir) -> int | None:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return None


def last_logged_step(run_dir) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_past_a_checkpoint(command: list[str], run_dir) -> int:
    """Start a run and SIGKILL it once it has a checkpoint *and* has logged steps after it
    (which the resumed run must drop); return the step `latest` points to."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    try:
        while True:
            saved = latest_step(run_dir)
            if saved is not None and last_logged_step(run_dir) > saved:
                break
            assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared within 240 s"
            time.sleep(0.005)
        still_running = process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert still_running, "the run finished before it could be killed; raise MAX_STEPS"
    assert process.returncode == -signal.SIGKILL
    return latest_step(run_dir)


def test_sigkill_and_resume_matches_uninterrupted_run(prepared_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(pretrain_command(prepared_data, straight))

    killed_at = kill_past_a_checkpoint(pretrain_command(prepared_data, resumed), resumed)
    assert killed_at is not None and killed_at < MAX_STEPS  # it really had not finished
    assert last_logged_step(resumed) > killed_at  # lines the resumed run has to drop
    assert not (resumed / "checkpoints" / f"step-{MAX_STEPS:07d}").exists()
    run(pretrain_command(prepared_data, resumed, "--resume"))

    assert metrics_without_timing(resumed) == metrics_without_timing(straight)
    assert [r["step"] for r in metrics_without_timing(resumed)] == list(range(1, MAX_STEPS + 1))
    final = f"checkpoints/step-{MAX_STEPS:07d}"
    weights_a, weights_b = load_file(straight / final / "model.safetensors"), load_file(resumed / final / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    state_a = torch.load(straight / final / "train_state.pt", weights_only=True)
    state_b = torch.load(resumed / final / "train_state.pt", weights_only=True)
    for key in ("step", "tokens_seen", "skipped_steps", "best_val_loss", "last_val_loss"):
        assert state_a[key] == state_b[key]
    for param_id, moments in state_a["optimizer"]["state"].items():
        for name, tensor in moments.items():
            assert torch.equal(tensor, state_b["optimizer"]["state"][param_id][name])
    config_a = json.loads((straight / final / "config.json").read_text())
    config_b = json.loads((resumed / final / "config.json").read_text())
    assert config_a == config_b
