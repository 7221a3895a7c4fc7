"""Save on signal: SIGTERM or Ctrl-C stop a real run after the current step with a checkpoint, and
`--resume auto` continues it to the same bits as a run that was never stopped; a second Ctrl-C
aborts at once and leaves the checkpoints as they were; under torchrun a signal that reaches one
rank stops every rank at the same step, with one checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from acornlm.cli import main
from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.train.config import TrainConfig
from acornlm.train.metrics import TIMING_FIELDS
from acornlm.train.pretrain import find_resume_checkpoint, run_pretrain
from acornlm.train.signals import StopOnSignal, requested_stop
from acornlm.train.trainer import Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_STEPS = 80
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+); checkpoint (\S+); continue with --resume auto")


def pretrain_args(data, out, *extra: str) -> list[str]:
    # many short steps (one metrics line each) give the test time to signal a run mid-way
    return ["train", "pretrain", "--config", "tiny", "--data", str(data), "--out", str(out),
            "--train.max_steps", str(MAX_STEPS), "--train.eval_interval", "20", "--train.save_interval", "1000",
            "--train.progress", "false", *extra]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "acornlm", *args]


def run_here(args: list[str]) -> str:
    """Run the CLI in this process and return what it wrote to stderr. Only the runs that are
    signalled need a process of their own; this saves an interpreter start-up per run."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        main(args)
    return buffer.getvalue()


def metrics_without_timing(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def checkpoint_dirs(run_dir: Path) -> list[str]:
    """Every folder in checkpoints/: finished step-* checkpoints and temporary ones of a save in progress."""
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def signal_after_steps(command: list[str], run_dir: Path, steps: int,
                       sig: signal.Signals = signal.SIGTERM) -> subprocess.CompletedProcess:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: logged_steps(run_dir) >= steps, process, f"{steps} logged steps")
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted(prepared_data, tmp_path_factory, one_thread) -> tuple[Path, str]:
    """The reference run, never stopped; `--resume auto` on an empty directory starts it fresh."""
    run_dir = tmp_path_factory.mktemp("signals") / "uninterrupted"
    return run_dir, run_here(pretrain_args(prepared_data, run_dir, "--resume", "auto"))


# --------------------------------------------------------------------------- real CLI runs

def test_sigterm_saves_the_step_and_resume_auto_ends_bitwise_equal(prepared_data, uninterrupted, tmp_path):
    straight, straight_log = uninterrupted
    assert f"--resume auto: no checkpoint in {straight} yet, starting a fresh run" in straight_log

    run_dir = tmp_path / "stopped"
    stopped = signal_after_steps(cli(*pretrain_args(prepared_data, run_dir)), run_dir, steps=8)
    assert stopped.returncode == 128 + signal.SIGTERM == 143, stopped.stderr[-3000:]
    assert "SIGTERM received: finishing the current step, then saving a checkpoint" in stopped.stderr
    found = STOPPED.search(stopped.stderr)
    assert found, stopped.stderr[-3000:]
    step = int(found.group(2))
    assert found.group(1) == "SIGTERM" and 8 <= step < MAX_STEPS, "the run ended before it was signalled"
    assert Path(found.group(3)) == run_dir / "checkpoints" / f"step-{step:07d}"
    assert latest(run_dir) == f"step-{step:07d}"
    assert checkpoint_dirs(run_dir) == [f"step-{step:07d}"]  # save_interval 1000: the stop wrote the only one
    assert (run_dir / "checkpoints" / f"step-{step:07d}" / "train_state.pt").is_file()
    assert logged_steps(run_dir) == step  # the step in progress was finished, no later one began

    resumed = run_here(pretrain_args(prepared_data, run_dir, "--resume", "auto"))
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{step:07d}'}" in resumed
    assert metrics_without_timing(run_dir) == metrics_without_timing(straight)
    final = Path("checkpoints") / f"step-{MAX_STEPS:07d}" / "model.safetensors"
    assert (run_dir / final).read_bytes() == (straight / final).read_bytes()


# Holds the save the first Ctrl-C asks for half-way (its files written into the temporary folder,
# not yet renamed into place), says where, then runs the real CLI.
HALF_WRITTEN_SAVE = """
import os, sys, time
from pathlib import Path
from acornlm.train.signals import requested_stop

rename = os.replace

def hold_the_stop_save(source, target, **kwargs):
    if requested_stop() is not None and Path(source).name.startswith(".tmp-step-"):
        Path(sys.argv[1]).write_text(str(source))
        time.sleep(60)
    rename(source, target, **kwargs)

os.replace = hold_the_stop_save
from acornlm.cli import main
main(sys.argv[2:])
"""


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_checkpoints(prepared_data, tmp_path):
    script, marker, run_dir = tmp_path / "entry.py", tmp_path / "saving", tmp_path / "run"
    script.write_text(HALF_WRITTEN_SAVE)
    command = [sys.executable, str(script), str(marker), *pretrain_args(prepared_data, run_dir),
               "--train.save_interval", "5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: latest(run_dir) is not None and logged_steps(run_dir) >= 7, process, "a checkpoint")
        process.send_signal(signal.SIGINT)
        wait_for(marker.exists, process, "the final save")
        half_written = Path(marker.read_text())
        assert half_written.name.startswith(".tmp-") and (half_written / "model.safetensors").is_file()
        before = latest(run_dir), [name for name in checkpoint_dirs(run_dir) if name.startswith("step-")]
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        seconds = time.monotonic() - started
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert seconds < 20  # not the 60 s the held save would have taken
    assert "SIGINT after Ctrl-C: aborting now, without a final checkpoint" in stderr
    assert "acornlm: interrupted" in stderr and "stopped by" not in stderr
    assert not half_written.exists()  # the atomic writer removed its temporary folder...
    assert (latest(run_dir), checkpoint_dirs(run_dir)) == before  # ...and `latest` and the checkpoints are unchanged


# Runs the real CLI under torchrun and leaves, per rank, its pid (so that the test can signal one
# rank) and how it exited.
RANK_ENTRY = """
import os, sys
from pathlib import Path
prefix, rank = sys.argv[1], os.environ["RANK"]
Path(f"{prefix}.rank{rank}.pid").write_text(str(os.getpid()))
status = "exception"
try:
    from acornlm.cli import main
    main(sys.argv[2:])
    status = "0"
except SystemExit as exc:
    status = str(exc.code)
    raise
finally:
    Path(f"{prefix}.rank{rank}.exit").write_text(status)
"""


def test_under_torchrun_a_signal_to_one_rank_stops_all_ranks_with_one_checkpoint(prepared_data, uninterrupted,
                                                                                  tmp_path):
    straight, _ = uninterrupted
    script, prefix, run_dir = tmp_path / "entry.py", tmp_path / "rank", tmp_path / "ddp"
    script.write_text(RANK_ENTRY)
    # two ranks x 2 sequences = the uninterrupted run's global batch of 4
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(prefix), *pretrain_args(prepared_data, run_dir, "--train.batch_size", "2")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        rank1 = Path(f"{prefix}.rank1.pid")
        wait_for(lambda: rank1.exists() and logged_steps(run_dir) >= 5, process, "5 logged steps")
        os.kill(int(rank1.read_text()), signal.SIGTERM)  # rank 1 alone: rank 0 must learn it from rank 1
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    exits = [Path(f"{prefix}.rank{rank}.exit").read_text() for rank in (0, 1)]
    assert exits == ["143", "143"], stderr[-3000:]  # both ranks ended cleanly, with SIGTERM's status
    assert process.returncode != 0  # torchrun reports the run as not finished
    found = STOPPED.search(stderr)  # printed by rank 0, which received no signal itself
    assert found, stderr[-3000:]
    step = int(found.group(2))
    assert step < MAX_STEPS, "the run ended before it was signalled"
    assert checkpoint_dirs(run_dir) == [f"step-{step:07d}"] and latest(run_dir) == f"step-{step:07d}"
    assert logged_steps(run_dir) == step

    # resume on one process with the same global batch: it continues the two-process run
    resumed = run_here(pretrain_args(prepared_data, run_dir, "--resume", "auto"))
    assert "resuming a 2-process run on 1" in resumed
    got, want = metrics_without_timing(run_dir), metrics_without_timing(straight)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    assert [r["tokens_seen"] for r in got] == [r["tokens_seen"] for r in want]
    for a, b in zip(got, want):  # the same run up to float rounding of the all-reduce
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


# --------------------------------------------------------------------------- the handler itself

def test_first_signal_asks_to_stop_a_second_after_ctrl_c_raises_and_handlers_come_back(capfd):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopOnSignal() as stop:
        assert stop.installed and requested_stop() is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM and requested_stop() == signal.SIGTERM
        signal.raise_signal(signal.SIGTERM)  # schedulers send SIGTERM once: a repeat only repeats the note
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    with StopOnSignal() as stop:  # torchrun forwards a first Ctrl-C as SIGINT and a second one as SIGTERM
        signal.raise_signal(signal.SIGINT)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    assert requested_stop() is None
    assert {sig: signal.getsignal(sig) for sig in before} == before
    err = capfd.readouterr().err
    assert err.count("SIGTERM received: finishing the current step") == 1
    assert "SIGTERM again" in err and "SIGINT after Ctrl-C: aborting now" in err
    assert "SIGTERM after Ctrl-C: aborting now" in err


def test_outside_the_main_thread_nothing_is_installed_and_it_says_so(capfd):
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def worker():
        with StopOnSignal() as stop:
            seen["installed"], seen["handler"] = stop.installed, signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"installed": False, "handler": before}
    assert "not in the main thread, so Ctrl-C and SIGTERM are not caught" in capfd.readouterr().err


# --------------------------------------------------------------------------- the Trainer's stop, in-process

VOCAB = 32


class CountingBatches:
    tokens_per_step = 4 * 16

    def batch(self, step: int, micro_step: int):
        generator = torch.Generator().manual_seed(step)
        sequence = torch.randint(0, VOCAB, (4, 17), generator=generator)
        return sequence[:, :-1], sequence[:, 1:]

    def eval_batch(self, index: int):
        return self.batch(10_000 + index, 0)


def signalling_loss(signal_at_step: int | None):
    """Cross-entropy that raises SIGTERM in the middle of training step `signal_at_step` (1-based)."""
    calls = {"train": 0}

    def loss(model, batch):
        if model.training:
            calls["train"] += 1
            if calls["train"] == signal_at_step:
                signal.raise_signal(signal.SIGTERM)
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))

    return loss


def trainer(run_dir: Path, signal_at_step: int | None, save_interval: int) -> Trainer:
    seed_everything(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=32))
    config = TrainConfig(max_steps=8, batch_size=4, seq_len=16, warmup_steps=1, eval_interval=0, eval_batches=1,
                         save_interval=save_interval, log_interval=1, progress=False, device="cpu")
    return Trainer(model, config, run_dir, CountingBatches(), signalling_loss(signal_at_step))


def test_a_signal_during_a_step_saves_that_step_once_and_returns(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    saves = []
    save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, *args, **kwargs: saves.append(self.progress.step)
                        or save(self, *args, **kwargs))
    with StopOnSignal():
        summary = trainer(run_dir, signal_at_step=3, save_interval=3).fit()
    assert summary["stopped_by_signal"] == "SIGTERM" and summary["steps"] == 3
    assert saves == [3]  # the scheduled save of step 3 is the stop's checkpoint: not written twice
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / "step-0000003")
    assert latest(run_dir) == "step-0000003"


def test_a_signal_before_the_first_step_trains_and_saves_nothing(tmp_path, capfd):
    run_dir = tmp_path / "run"
    fit = trainer(run_dir, signal_at_step=None, save_interval=0)
    with StopOnSignal():
        signal.raise_signal(signal.SIGTERM)
        summary = fit.fit()
    assert summary["stopped_by_signal"] == "SIGTERM" and summary["steps"] == 0 and summary["checkpoint"] is None
    assert not (run_dir / "checkpoints").exists()
    assert "stopped by SIGTERM at step 0; no checkpoint (no step was trained yet)" in capfd.readouterr().err


def test_without_the_handler_a_run_ignores_nothing_and_reports_no_signal(tmp_path):
    summary = trainer(tmp_path / "run", signal_at_step=None, save_interval=0).fit()
    assert summary["stopped_by_signal"] is None and summary["steps"] == 8


# --------------------------------------------------------------------------- --resume auto

STAGE_RUNS = {  # command line -> the function it calls
    ("train", "pretrain"): "acornlm.train.pretrain.run_pretrain",
    ("train", "sft"): "acornlm.train.sft.run_sft",
    ("train", "dpo"): "acornlm.train.dpo.run_dpo",
    ("train", "grpo"): "acornlm.train.grpo.run_grpo",
    ("train", "ppo"): "acornlm.train.ppo.run_ppo",
    ("train", "distill"): "acornlm.train.distill.run_distill",
    ("train", "reward"): "acornlm.train.reward.run_reward",
}


def fake_run(received: list):
    def run(*args, **kwargs):
        received.append(kwargs["resume"])
        return {"rank": 1, "stopped_by_signal": None}  # rank 1 prints nothing
    return run


@pytest.mark.parametrize("command", list(STAGE_RUNS), ids=lambda command: command[1])
def test_every_train_command_passes_resume_auto_on(command, monkeypatch):
    received = []
    monkeypatch.setattr(STAGE_RUNS[command], fake_run(received))
    main([*command, "--data", "data", "--out", "out", "--resume", "auto"])
    assert received == ["auto"]


def test_resume_true_false_and_bare_keep_their_meaning(monkeypatch):
    received = []
    monkeypatch.setattr(STAGE_RUNS["train", "pretrain"], fake_run(received))
    base = ["train", "pretrain", "--data", "data", "--out", "out"]
    for value in (["true"], ["false"], []):
        main([*base, "--resume", *value])
    main(base)
    assert received == [True, False, True, False]


def test_resume_must_be_true_false_or_auto(prepared_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "pretrain", "--data", "d", "--out", "o", "--resume", "sometimes"])
    assert exit_info.value.code == 2 and "resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"resume must be true, false or \"auto\", got 'yes'"):
        run_pretrain(prepared_data, tmp_path / "out", ModelConfig(), TrainConfig(), resume="yes")


def test_resume_auto_finds_the_latest_checkpoint_or_none(tmp_path):
    assert find_resume_checkpoint(tmp_path / "empty", "auto") is None
    step = tmp_path / "run" / "checkpoints" / "step-0000010"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (step.parent / "latest").write_text("step-0000010\n")
    assert find_resume_checkpoint(tmp_path / "run", "auto") == step
    assert find_resume_checkpoint(tmp_path / "run", True) == step
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        find_resume_checkpoint(tmp_path / "run", False)
