"""Exact resume: a run SIGKILLed after a checkpoint and resumed with --resume ends bitwise equal
(weights, optimizer state and every non-timing metric) to a run that was never interrupted."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
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


# --------------------------------------------------------------------------- a full disk during a save

TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456"


def tiny_transformer():
    from acornlm.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=32))


def fake_tokenizer_dir(path):
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text("{}")
    return path


def fail_with(error: BaseException):
    def writer(*args, **kwargs):
        raise error
    return writer


def save_with_tokenizer_save(error: BaseException):
    """A stage's model writer that also saves a tokenizer with `Tokenizer.save`, whose Rust
    backend fails the way it does on a full disk (a bare Exception with the OS error inside)."""
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a few words to train on, a few words"] * 4, "char", 40)

    class FullDiskBackend:
        def save(self, *args, **kwargs):
            raise error

        def __getattr__(self, name):
            return getattr(tokenizer.backend, name)

    tokenizer.backend = FullDiskBackend()

    def write_model(directory, model, info=None, tokenizer_dir=None):
        write_model_files(directory, model, info=info)
        tokenizer.save(directory)
    return write_model


def disk_full_cases():
    from safetensors import SafetensorError

    rust = "No space left on device (os error 28)"
    return {
        "weights (safetensors)": ("acornlm.model.checkpoint.save_file",
                                  SafetensorError(f"Error while serializing: I/O error: {rust}")),
        "weights (OSError)": ("acornlm.model.checkpoint.save_file", OSError(errno.ENOSPC, "No space left on device")),
        "train state (torch zip writer)": ("torch.save", RuntimeError(TORCH_DISK_FULL)),
        "train state (file write failed)": ("torch.save", RuntimeError(
            "PytorchStreamWriter failed writing file data/0: file write failed")),
        "tokenizer files (copy)": ("shutil.copyfile", OSError(errno.ENOSPC, "No space left on device")),
        "tokenizer files (Tokenizer.save)": ("write_model", Exception(rust)),
        "config.json": ("pathlib.Path.write_text", OSError(errno.EDQUOT, "Disk quota exceeded")),
    }


@pytest.fixture
def saved_once(tmp_path):
    """A run directory with one good checkpoint (step 2) and a tokenizer to copy into the next one."""
    from acornlm.train.checkpointing import save_checkpoint

    model, tokenizer_dir = tiny_transformer(), fake_tokenizer_dir(tmp_path / "tokenizer")
    run_dir = tmp_path / "run"
    good = save_checkpoint(run_dir, 2, model, {"step": 2}, {"step": 2}, tokenizer_dir)
    return run_dir, good, model, tokenizer_dir


@pytest.mark.parametrize("case", list(disk_full_cases()))
def test_full_disk_during_a_save_is_one_clear_error_and_keeps_the_last_checkpoint(saved_once, monkeypatch, case):
    from acornlm.errors import DiskFullError
    from acornlm.train.checkpointing import save_checkpoint

    run_dir, good, model, tokenizer_dir = saved_once
    root = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    target, error = disk_full_cases()[case]
    write_model = {}
    if target == "write_model":
        write_model = {"write_model": save_with_tokenizer_save(error)}
    else:
        monkeypatch.setattr(target, fail_with(error))
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(run_dir, 4, model, {"step": 4}, {"step": 4}, tokenizer_dir, **write_model)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the disk is full at {root}: could not write step-0000004")
    assert f"checkpoint 2 ({good}, the last good one) is kept intact" in message
    assert f"{root / 'latest'} still names it; free space, then rerun with --resume" in message
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002"]  # no temp dir left
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_full_disk_at_the_first_save_says_there_is_nothing_to_keep(tmp_path, monkeypatch):
    from acornlm.errors import DiskFullError
    from acornlm.train.checkpointing import save_checkpoint

    monkeypatch.setattr("torch.save", fail_with(RuntimeError(TORCH_DISK_FULL)))
    with pytest.raises(DiskFullError, match="no earlier checkpoint exists yet; free space, then rerun the command"):
        save_checkpoint(tmp_path, 2, tiny_transformer(), {}, {})
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), ValueError("a bug"),
                                   "safetensors"])
def test_other_errors_during_a_save_still_propagate(saved_once, monkeypatch, error):
    from safetensors import SafetensorError

    from acornlm.errors import CheckpointError
    from acornlm.train.checkpointing import save_checkpoint

    run_dir, _, model, tokenizer_dir = saved_once
    if error == "safetensors":
        error = SafetensorError("Error while serializing: tensor a is not contiguous")
    monkeypatch.setattr("torch.save", fail_with(error))
    with pytest.raises(type(error)) as info:
        save_checkpoint(run_dir, 4, model, {}, {}, tokenizer_dir)
    assert not isinstance(info.value, CheckpointError)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000002"]


def test_tokenizer_save_turns_the_backends_os_error_into_an_oserror(tmp_path):
    from acornlm.tokenizer.tokenizer import save_backend

    class Backend:
        def __init__(self, error):
            self.error = error

        def save(self, *args, **kwargs):
            raise self.error

    with pytest.raises(OSError) as info:
        save_backend(Backend(Exception("No space left on device (os error 28)")), tmp_path / "tokenizer.json")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "tokenizer.json")
    with pytest.raises(Exception, match="some other failure") as info:
        save_backend(Backend(Exception("some other failure")), tmp_path / "tokenizer.json")
    assert not isinstance(info.value, OSError)


def test_cli_run_that_fills_the_disk_ends_in_one_line_and_resumes(prepared_data, tmp_path, monkeypatch, capsys):
    """`acornlm train pretrain` with the disk full at the step-4 save: one line on stderr, no
    traceback; after "freeing space" (the writer works again) --resume finishes the run."""
    from acornlm.cli import main

    out = tmp_path / "run"
    command = ["train", "pretrain", "--config", "tiny", "--data", str(prepared_data), "--out", str(out),
               "--train.max_steps", "4", "--train.save_interval", "2", "--train.eval_interval", "0",
               "--train.progress", "false"]
    real_save = torch.save

    def fills_the_disk_at_step_4(obj, file, *args, **kwargs):
        if "step-0000004" in str(file):
            raise RuntimeError(TORCH_DISK_FULL)
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr("torch.save", fills_the_disk_at_step_4)
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 2
    err = capsys.readouterr().err
    root = out / "checkpoints"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"acornlm: error: the disk is full at {root}: could not write step-0000004")
    assert "checkpoint 2 (" in err and "rerun with --resume" in err
    assert latest_step(out) == 2 and not any(p.name.startswith(".tmp-") for p in root.iterdir())

    monkeypatch.setattr("torch.save", real_save)
    main([*command, "--resume"])
    assert latest_step(out) == 4


def test_full_disk_while_logging_metrics_is_one_clear_error(tmp_path):
    """A disk that fills between checkpoints fails the next metrics line: one AcornError naming the
    file and how to go on, not an OSError traceback."""
    from acornlm.errors import CheckpointError, DiskFullError
    from acornlm.train.metrics import MetricsLog

    class FullFile:
        def __init__(self, code: int) -> None:
            self.code = code

        def write(self, text: str) -> int:
            raise OSError(self.code, os.strerror(self.code))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    for code, error in ((errno.ENOSPC, DiskFullError), (errno.EACCES, CheckpointError)):
        log = MetricsLog(tmp_path / "run", resume_step=None)
        log._file.close()
        log._file = FullFile(code)
        with pytest.raises(error, match="could not append to .*metrics.jsonl.*rerun with --resume"):
            log.write({"step": 3, "loss": 1.0})
