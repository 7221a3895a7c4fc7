"""The training core: schedule, optimizer groups, accumulation, NaN skips, atomic checkpoints,
metrics, and the pretraining stage's checks and outputs."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from acornlm.cli import main
from acornlm.errors import CheckpointError, ConfigError, DataError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model
from acornlm.presets import load_preset
from acornlm.train import checkpointing
from acornlm.train.config import TrainConfig
from acornlm.train.optim import parameter_groups
from acornlm.train.pretrain import run_pretrain
from acornlm.train.schedule import learning_rate_at
from acornlm.train.trainer import Trainer, TrainingDivergedError, seed_everything

VOCAB = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(**overrides) -> Transformer:
    seed_everything(0)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=32)
    return Transformer(ModelConfig(**(fields | overrides)))


def train_config(**overrides) -> TrainConfig:
    fields = dict(max_steps=6, batch_size=4, seq_len=16, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2,
                  eval_interval=0, eval_batches=1, save_interval=0, log_interval=1, progress=False)
    return TrainConfig(**(fields | overrides))


class GlobalBatches:
    """A toy batch source obeying the loader contract: at step s, one global batch of
    `global_batch` sequences; micro-step a takes rows [a*batch_size, (a+1)*batch_size)."""

    tokens_per_byte = 0.5

    def __init__(self, batch_size: int, grad_accum_steps: int, seq_len: int = 16) -> None:
        self.batch_size, self.accum, self.seq_len = batch_size, grad_accum_steps, seq_len
        self.tokens_per_step = batch_size * grad_accum_steps * seq_len

    def _rows(self, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (count, 1), generator=generator)
        sequence = (starts + 3 * torch.arange(self.seq_len + 1)) % VOCAB  # learnable: +3 each token
        return sequence[:, :-1], sequence[:, 1:]

    def batch(self, step: int, micro_step: int):
        x, y = self._rows(step, self.batch_size * self.accum)
        rows = slice(micro_step * self.batch_size, (micro_step + 1) * self.batch_size)
        return x[rows], y[rows]

    def eval_batch(self, index: int):
        return self._rows(10_000 + index, self.batch_size)


def token_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- schedule and optimizer ---

def test_schedule_warmup_peak_cosine_and_floor():
    lr = lambda step: learning_rate_at(step, max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)  # (0 + 1) / 10 of the peak
    assert lr(4) == pytest.approx(0.5)
    assert lr(10) == pytest.approx(1.0)  # peak right after warmup
    assert lr(60) == pytest.approx(0.55)  # half-way through the cosine: (max + min) / 2
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_adamw_decays_matrices_only():
    model = tiny_model(norm="layernorm", attention_bias=True, mlp_bias=True)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"model.embed_tokens.weight",
                                                        "model.layers.0.self_attn.q_proj.weight"}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.norm.weight" in no_decay_names and "model.layers.0.self_attn.q_proj.bias" in no_decay_names
    assert all(p.dim() < 2 for p in no_decay["params"])
    # every parameter exactly once (the tied head is the embedding)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


# --- the Trainer core ---

def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """accum 2 x batch 2 sees the same global batch as accum 1 x batch 4 and must end at the same weights."""
    runs = {}
    for name, (batch, accum) in {"accum": (2, 2), "big": (4, 1)}.items():
        config = train_config(max_steps=4, batch_size=batch, grad_accum_steps=accum, grad_clip=0.5)
        trainer = Trainer(tiny_model(), config, tmp_path / name, GlobalBatches(batch, accum), token_loss)
        trainer.fit()
        runs[name] = (trainer.raw_model.state_dict(), read_jsonl(tmp_path / name / "metrics.jsonl"))
    (weights_a, log_a), (weights_b, log_b) = runs["accum"], runs["big"]
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(log_a, log_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens_seen"] == b["tokens_seen"]
    initial = tiny_model().state_dict()
    assert not torch.equal(initial["model.norm.weight"], weights_a["model.norm.weight"])  # it did train


def nan_on_steps(bad_steps: set[int]):
    """A loss that is NaN on the given 0-based training steps (evaluation stays finite)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        loss = token_loss(model, batch)
        if model.training:
            step = calls["n"]
            calls["n"] += 1
            if step in bad_steps:
                return loss * float("nan")
        return loss

    return loss_fn


def test_nan_loss_is_skipped_and_counted(tmp_path):
    trainer = Trainer(tiny_model(), train_config(max_steps=6, max_bad_steps=2), tmp_path,
                      GlobalBatches(4, 1), nan_on_steps({2, 3}))
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    summary = trainer.fit()
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 2, 2, 2]
    assert log[2]["loss"] is None and log[3]["loss"] is None  # NaN is written as null
    assert all(math.isfinite(r["loss"]) for r in log if r["step"] not in (3, 4))
    assert summary["skipped_steps"] == 2 and math.isfinite(summary["val_loss"])
    assert all(torch.isfinite(v).all() for v in trainer.raw_model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())
    # the optimizer took 4 steps, not 6
    assert int(next(iter(trainer.optimizer.state.values()))["step"]) == 4


def test_too_many_bad_steps_stop_with_last_checkpoint_intact(tmp_path):
    config = train_config(max_steps=12, save_interval=3, max_bad_steps=2)
    trainer = Trainer(tiny_model(), config, tmp_path, GlobalBatches(4, 1), nan_on_steps(set(range(3, 100))))
    with pytest.raises(TrainingDivergedError) as info:
        trainer.fit()
    message = str(info.value)
    good = tmp_path / "checkpoints" / "step-0000003"
    assert str(good) in message and "intact" in message and "max_bad_steps=2" in message
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert [step for step, _ in checkpointing.list_checkpoints(tmp_path)] == [3]
    model, info_json = load_model(tmp_path)
    assert info_json["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_save_leaves_previous_checkpoint_and_latest(tmp_path, monkeypatch):
    trainer = Trainer(tiny_model(), train_config(max_steps=2, save_interval=2), tmp_path,
                      GlobalBatches(4, 1), token_loss)
    trainer.fit()
    root = tmp_path / "checkpoints"
    good = root / "step-0000002"
    files_before = {p.name: p.read_bytes() for p in good.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    trainer.progress.step = 4
    with pytest.raises(CheckpointError) as info:
        trainer.save(val_loss=1.0)
    assert "No space left" in str(info.value) and "intact" in str(info.value) and str(good) in str(info.value)
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step-0000002"]  # no temp dir left
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files_before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-save: nothing partial is left either
        trainer.save(val_loss=1.0)
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step-0000002"]


def test_keep_last_prunes_but_keeps_best(tmp_path):
    """Validation loss is lowest at the first evaluation here (the model gets worse), so `best`
    must survive pruning although it is the oldest checkpoint."""
    calls = {"eval": 0}

    def worsening_eval(model, batch):
        loss = token_loss(model, batch)
        if not model.training:
            calls["eval"] += 1
            return loss.detach() * 0 + calls["eval"]  # val loss 1, 2, 3, ...
        return loss

    config = train_config(max_steps=8, save_interval=2, eval_interval=2, keep_last=2)
    Trainer(tiny_model(), config, tmp_path, GlobalBatches(4, 1), worsening_eval).fit()
    root = tmp_path / "checkpoints"
    assert [step for step, _ in checkpointing.list_checkpoints(tmp_path)] == [2, 6, 8]
    assert (root / "best").read_text().strip() == "step-0000002"
    assert (root / "latest").read_text().strip() == "step-0000008"
    state = torch.load(root / "step-0000008" / "train_state.pt", weights_only=True)
    assert state["best_val_loss"] == 1.0 and state["step"] == 8 and state["data_position"] == 8


def test_time_budget_stops_with_eval_and_checkpoint(tmp_path):
    config = train_config(max_steps=50, max_minutes=1e-6, eval_interval=0, save_interval=0)
    summary = Trainer(tiny_model(), config, tmp_path, GlobalBatches(4, 1), token_loss).fit()
    assert summary["stopped_early"] and summary["steps"] == 1
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(log) == 1 and "val_loss" in log[0] and summary["val_loss"] == log[0]["val_loss"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000001"


def test_missing_tensorboard_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    trainer = Trainer(tiny_model(), train_config(tensorboard=True), tmp_path, GlobalBatches(4, 1), token_loss)
    with pytest.raises(ConfigError, match=r"pip install 'acornlm\[tensorboard\]'"):
        trainer.fit()


def test_resume_removes_abandoned_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-0000005", "step-0000010", ".tmp-step-0000015-123"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    (root / "latest").write_text("step-0000005\n")
    removed = checkpointing.remove_abandoned(tmp_path, resumed_step=5)
    assert sorted(p.name for p in removed) == [".tmp-step-0000015-123", "step-0000010"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000005"]


# --- the pretraining stage on real prepared data ---

def tiny_preset() -> tuple[ModelConfig, TrainConfig]:
    preset = load_preset("tiny")
    model = ModelConfig(**preset["model"])
    train = TrainConfig(**(preset["train"] | dict(max_steps=30, keep_last=1, progress=False)))
    return model, train


@pytest.fixture(scope="module")
def pretrain_run(prepared_data, tmp_path_factory):
    """One 30-step tiny pretraining run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    model, train = tiny_preset()
    summary = run_pretrain(prepared_data, out, model, train)
    return out, summary


def test_pretrain_loss_decreases_and_metrics_are_complete(pretrain_run):
    out, summary = pretrain_run
    log = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 31))  # log_interval 1
    required = {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "skipped_steps"}
    assert all(required <= r.keys() for r in log)
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["val_bpb"] > 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(300)
    assert sum(r["loss"] for r in log[-5:]) / 5 < log[0]["loss"] - 1.0
    assert log[-1]["tokens_seen"] == 30 * 4 * 64 and all(r["skipped_steps"] == 0 for r in log)
    assert summary["steps"] == 30 and summary["val_loss"] == evals[-1]["val_loss"]
    assert summary["params"] > 0 and summary["tokens_per_s"] > 0 and summary["mfu"] > 0
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrain_checkpoint_holds_everything_and_loads(pretrain_run, prepared_data):
    out, summary = pretrain_run
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000030"
    assert (root / "best").read_text().strip() == "step-0000030"
    assert [step for step, _ in checkpointing.list_checkpoints(out)] == [30]  # keep_last 1
    ckpt = root / "step-0000030"
    assert {"config.json", "model.safetensors", "train_state.pt", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}

    model, info = load_model(out)
    meta = json.loads((prepared_data / "meta.json").read_text())
    assert info["tokenizer"]["fingerprint"] == meta["tokenizer"]["fingerprint"]
    assert info["step"] == 30 and info["val_loss"] == summary["val_loss"] and info["train"]["max_steps"] == 30
    assert model.config.vocab_size == meta["tokenizer"]["vocab_size"]  # vocab_size 0 -> tokenizer's
    assert all(p.dtype == torch.float32 for p in model.parameters())

    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["step"] == state["data_position"] == 30 and state["tokens_seen"] == 30 * 4 * 64
    assert state["world_size"] == 1 and state["consecutive_bad_steps"] == 0
    assert isinstance(state["rng"]["numpy"]["keys"], list) and isinstance(state["rng"]["torch"], torch.Tensor)
    exp_avg = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert exp_avg and all(t.dtype == torch.float32 for t in exp_avg)


def test_out_dir_with_checkpoints_needs_resume(pretrain_run, prepared_data):
    out, _ = pretrain_run
    before = (out / "metrics.jsonl").read_bytes()
    model, train = tiny_preset()
    with pytest.raises(ConfigError, match="--resume"):
        run_pretrain(prepared_data, out, model, train)
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_other_tokenizer_and_changed_model(pretrain_run, prepared_data, other_prepared_data):
    out, _ = pretrain_run
    before = (out / "metrics.jsonl").read_bytes()
    model, train = tiny_preset()
    data_fp = json.loads((other_prepared_data / "meta.json").read_text())["tokenizer"]["fingerprint"]
    ckpt_fp = json.loads((prepared_data / "meta.json").read_text())["tokenizer"]["fingerprint"]
    with pytest.raises(DataError) as info:
        run_pretrain(other_prepared_data, out, model, train, resume=True)
    assert data_fp[:16] in str(info.value) and ckpt_fp[:16] in str(info.value)

    wider = ModelConfig(**(model.to_dict() | dict(hidden_size=128, num_key_value_heads=0, head_dim=0)))
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint 64, command line 128"):
        run_pretrain(prepared_data, out, wider, train, resume=True)
    assert (out / "metrics.jsonl").read_bytes() == before


def test_impossible_configs_fail_before_training(prepared_data, tmp_path):
    model, train = tiny_preset()
    too_long = TrainConfig(**(dataclasses.asdict(train) | dict(seq_len=256)))
    with pytest.raises(ConfigError, match="train.seq_len=256 .*max_position_embeddings=128"):
        run_pretrain(prepared_data, tmp_path / "a", model, too_long)
    small_vocab = ModelConfig(**(model.to_dict() | dict(vocab_size=100)))
    with pytest.raises(ConfigError, match="vocab_size=100 .* 300"):
        run_pretrain(prepared_data, tmp_path / "b", small_vocab, train)
    assert not any(tmp_path.rglob("*"))  # nothing was written


def test_resume_without_checkpoint_starts_fresh(prepared_data, tmp_path, capsys):
    model, train = tiny_preset()
    short = TrainConfig(**(dataclasses.asdict(train) | dict(max_steps=2, eval_batches=1)))
    summary = run_pretrain(prepared_data, tmp_path / "run", model, short, resume=True)
    assert "starting a fresh run" in capsys.readouterr().err
    assert summary["steps"] == 2 and (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()


# --- the command line ---

def test_cli_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "pretrain", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert f"--train.{field.name}" in text
    for field in dataclasses.fields(ModelConfig):
        assert f"--model.{field.name}" in text
    assert "--resume" in text and "default: 1000" in text and "Peak learning rate" in text


def test_cli_invalid_model_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "pretrain", "--data", "x", "--out", "y",
              "--model.hidden_size", "100", "--model.num_attention_heads", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("acornlm: error: model.hidden_size=100 is not divisible") and "\n" not in err


def test_cli_derives_kv_heads_from_the_users_heads(prepared_data, tmp_path):
    """`--model.num_attention_heads 6` alone must give 6 KV heads, not the default model's 8."""
    out = tmp_path / "run"
    main(["train", "pretrain", "--data", str(prepared_data), "--out", str(out),
          "--model.hidden_size", "48", "--model.num_attention_heads", "6", "--model.num_hidden_layers", "1",
          "--model.intermediate_size", "64", "--model.max_position_embeddings", "32",
          "--train.seq_len", "16", "--train.batch_size", "2", "--train.max_steps", "1",
          "--train.eval_batches", "1", "--train.progress", "false"])
    config = json.loads((out / "checkpoints" / "step-0000001" / "config.json").read_text())
    assert config["model"]["num_key_value_heads"] == 6 and config["model"]["head_dim"] == 8
    assert config["model"]["vocab_size"] == 300
