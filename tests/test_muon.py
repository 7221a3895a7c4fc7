"""Muon + AdamW: which parameters each trains, the orthogonalised update, the learning-rate schedule,
GradScaler, exact resume through the CLI, and clear refusals."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from acornlm.cli import main
from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.lora import LoraConfig, apply_lora
from acornlm.train.checkpointing import LATEST_FILE, checkpoint_name, checkpoints_root, load_train_state
from acornlm.train.config import TrainConfig
from acornlm.train.muon import MuonWithAdamW, split_parameters
from acornlm.train.optim import build_optimizer
from acornlm.train.schedule import learning_rate_at

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
HIDDEN = 32


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return Transformer(ModelConfig(**(fields | overrides)))


def names(pairs) -> set[str]:
    return {name for name, _ in pairs}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = small_model(tie_word_embeddings=False, attention_bias=True)
    muon, adamw = split_parameters(model)
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert names(muon) == {f"model.layers.{i}.{p}.weight" for i in range(2) for p in projections}
    assert names(adamw) == {name for name, _ in model.named_parameters()} - names(muon)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_proj.bias", "model.layers.1.input_layernorm.weight"} <= names(adamw)

    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.02, learning_rate=1e-3), CPU)
    assert isinstance(optimizer.muon, torch.optim.Muon) and isinstance(optimizer.adamw, torch.optim.AdamW)
    muon_group = optimizer.muon.param_groups[0]
    assert muon_group["lr_scale"] == pytest.approx(20.0) and muon_group["nesterov"]
    assert muon_group["weight_decay"] * 0.02 == pytest.approx(0.1 * 1e-3)  # AdamW's per-step decay lr·λ
    decay, no_decay = optimizer.adamw.param_groups  # matrices decay, vectors do not (as with plain AdamW)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    counted = sum(len(group["params"]) for group in optimizer.param_groups)
    assert counted == len(list(model.parameters()))  # every parameter exactly once


def test_moe_routers_gates_and_stacked_experts_stay_on_adamw():
    model = small_model(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_shared_experts=1)
    muon, adamw = split_parameters(model)
    layer = "model.layers.0.mlp."
    assert {f"{layer}shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")} <= names(muon)
    assert {f"{layer}gate.weight", f"{layer}shared_expert_gate.weight", f"{layer}experts.gate_up_proj",
            f"{layer}experts.down_proj"} <= names(adamw)
    assert all(param.dim() == 2 for _, param in muon)
    build_optimizer(model, TrainConfig(optimizer="muon"), CPU)  # torch's Muon accepts every one of them


def test_a_muon_step_moves_a_matrix_along_its_orthogonalised_gradient():
    """Muon's promise: the update is ~U V^T of the gradient's SVD G = U S V^T, every singular value
    near 1 (the quintic Newton-Schulz gives ~0.7-1.2), whatever the spread of S."""
    model = small_model()
    config = TrainConfig(optimizer="muon", weight_decay=0.0, muon_lr=0.02)
    optimizer = build_optimizer(model, config, CPU)
    weight = model.model.layers[0].mlp.up_proj.weight  # [64, 32]: taller than wide
    before = weight.detach().clone()
    u, _, vh = torch.linalg.svd(torch.randn(64, 32), full_matrices=False)
    spread = torch.logspace(0, -2, 32)  # singular values from 1 down to 0.01
    gradient = u @ torch.diag(spread) @ vh
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    weight.grad = gradient.clone()
    for group in optimizer.param_groups:
        group["lr"] = 1e-3 * group["lr_scale"]
    optimizer.step()
    adjusted_lr = 0.02 * math.sqrt(64 / 32)  # Keller Jordan's sqrt(max(1, rows / cols))
    update = (before - weight.detach()) / adjusted_lr
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.3  # S spanned 100x; the update's < 2.6x
    polar = u @ vh
    cosine = (update * polar).sum() / (update.norm() * polar.norm())
    assert cosine > 0.95


def test_trainer_schedule_reaches_muon_lr_and_resume_is_bitwise(prepared_data, tmp_path):
    args = ["train", "pretrain", "--config", "tiny", "--data", str(prepared_data), "--train.max_steps", "8",
            "--train.save_interval", "4", "--train.eval_interval", "4", "--train.keep_last", "3",
            "--train.progress", "false", "--model.dropout", "0.1", "--train.optimizer", "muon",
            "--train.muon_lr", "0.03"]
    run = tmp_path / "run"
    main([*args, "--out", str(run)])
    last = checkpoints_root(run) / checkpoint_name(8)
    state = load_train_state(last)["optimizer"]
    assert set(state) == {"muon", "adamw"}
    # after step 8 of 8 the schedule (tiny: lr 3e-3 -> 3e-4, warmup 2) wrote its step-7 value
    lr = learning_rate_at(7, 3e-3, 3e-4, 2, 8)
    assert state["adamw"]["param_groups"][0]["lr"] == pytest.approx(lr)
    assert state["muon"]["param_groups"][0]["lr"] == pytest.approx(lr * 0.03 / 3e-3)
    assert all(len(s) == 1 for s in state["muon"]["state"].values())  # one momentum buffer per matrix

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (checkpoints_root(resumed) / LATEST_FILE).write_text(checkpoint_name(4) + "\n")  # as if it died after step 4
    main([*args, "--out", str(resumed), "--resume"])
    expected, again = load_file(last / "model.safetensors"), load_file(
        checkpoints_root(resumed) / checkpoint_name(8) / "model.safetensors")
    assert all(torch.equal(again[name], expected[name]) for name in expected)
    resumed_state = load_train_state(checkpoints_root(resumed) / checkpoint_name(8))["optimizer"]
    for part in ("muon", "adamw"):
        for key, values in state[part]["state"].items():
            for field, value in values.items():
                assert torch.equal(resumed_state[part]["state"][key][field], value), (part, key, field)


def test_grad_scaler_skips_an_overflowing_step_for_both_optimizers():
    model = small_model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # as scaler.scale(loss).backward() would (this makes the scale tensor)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3 * group["lr_scale"]
    before = [param.detach().clone() for param in model.parameters()]
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    model.model.embed_tokens.weight.grad[0, 0] = math.inf  # an overflow in AdamW's part only
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(param, old) for param, old in zip(model.parameters(), before))  # nothing moved
    assert scaler.get_scale() == 512.0
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    scaler.scale(torch.ones(()))
    scaler.step(optimizer)  # finite gradients: both optimizers step
    changed = [not torch.equal(param, old) for param, old in zip(model.parameters(), before)]
    assert all(changed)


def test_fp16_training_with_muon_runs_through_the_cli(prepared_data, tmp_path):
    out = tmp_path / "fp16"
    main(["train", "pretrain", "--config", "tiny", "--data", str(prepared_data), "--out", str(out),
          "--train.max_steps", "3", "--train.progress", "false", "--train.optimizer", "muon",
          "--train.dtype", "float16"])
    state = load_train_state(checkpoints_root(out) / checkpoint_name(3))
    assert state["scaler"]["scale"] > 0 and set(state["optimizer"]) == {"muon", "adamw"}


def test_refusals_are_clear():
    lora_only = small_model()
    apply_lora(lora_only, LoraConfig(rank=2, alpha=4))
    with pytest.raises(ConfigError, match="no trainable hidden matrices"):
        build_optimizer(lora_only, TrainConfig(optimizer="muon"), CPU)
    optimizer = build_optimizer(small_model(), TrainConfig(optimizer="muon"), CPU)
    adamw_state = build_optimizer(small_model(), TrainConfig(), CPU).state_dict()
    with pytest.raises(ValueError, match="--train.optimizer adamw"):
        optimizer.load_state_dict(adamw_state)
    assert isinstance(optimizer, MuonWithAdamW)
