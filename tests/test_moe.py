"""Mixture-of-experts feed-forward: routing and dispatch equal a per-token reference, the
load-balancing loss follows its formula, the model still decodes with a KV cache, trains
(with the aux loss logged), resumes, adapts with LoRA, and refuses impossible configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model, write_model_files
from acornlm.model.moe import MoEFeedForward, load_balancing_loss
from acornlm.presets import load_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def moe_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=24, num_shared_experts=1,
                  shared_expert_intermediate_size=40, initializer_range=0.2)
    fields.update(overrides)
    return ModelConfig(**fields)


def moe_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(moe_config(**overrides))


def naive_moe(layer: MoEFeedForward, x: torch.Tensor, k: int, norm_topk_prob: bool) -> torch.Tensor:
    """The definition, one token at a time: Σ_j w_j expert_j(x) + σ(g·x) shared(x)."""
    out = torch.zeros_like(x)
    rows = x.reshape(-1, x.shape[-1])
    for n, token in enumerate(rows):
        probs = F.softmax(layer.gate.weight @ token, dim=-1)
        weights, ids = probs.topk(k)
        if norm_topk_prob:
            weights = weights / weights.sum()
        y = torch.zeros_like(token)
        for w, e in zip(weights, ids):
            gate, up = (layer.experts.gate_up_proj[e] @ token).chunk(2)
            y += w * (layer.experts.down_proj[e] @ (F.silu(gate) * up))
        if layer.shared_expert is not None:
            s = layer.shared_expert
            shared = s.down_proj.weight @ (F.silu(s.gate_proj.weight @ token) * (s.up_proj.weight @ token))
            y += torch.sigmoid(layer.shared_expert_gate.weight @ token) * shared
        out.view(-1, x.shape[-1])[n] = y
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("k", [1, 2, 4])
@torch.no_grad()
def test_moe_forward_equals_per_token_reference(norm_topk_prob, shared, k):
    model = moe_model(num_experts_per_tok=k, norm_topk_prob=norm_topk_prob, num_shared_experts=shared)
    layer = model.model.layers[0].mlp
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(layer(x), naive_moe(layer, x, k, norm_topk_prob), atol=1e-5, rtol=0)


@torch.no_grad()
def test_norm_topk_prob_makes_routing_weights_sum_to_one():
    x = torch.randn(10, 32)
    on = moe_model(norm_topk_prob=True).model.layers[0].mlp.gate
    off = moe_model(norm_topk_prob=False).model.layers[0].mlp.gate
    scores, weights_on, ids_on = on(x)
    torch.testing.assert_close(weights_on.sum(-1), torch.ones(10))
    scores_off, weights_off, ids_off = off(x)
    assert torch.equal(ids_on, ids_off)  # same seed, same router: renormalising never changes the choice
    torch.testing.assert_close(weights_off, scores_off.gather(-1, ids_off))
    assert (weights_off.sum(-1) < 1).all()
    torch.testing.assert_close(weights_on, weights_off / weights_off.sum(-1, keepdim=True))


def test_every_token_gets_its_k_distinct_experts():
    scores, _, ids = moe_model(num_experts=6, num_experts_per_tok=3).model.layers[0].mlp.gate(torch.randn(50, 32))
    assert ids.shape == (50, 3) and all(len(set(row.tolist())) == 3 for row in ids)
    chosen_min = scores.gather(-1, ids).min(-1).values
    unchosen = scores.masked_fill(F.one_hot(ids, 6).sum(1).bool(), -1).max(-1).values
    assert (chosen_min >= unchosen).all()  # top-k really are the largest


@torch.no_grad()
def test_moe_model_is_causal():
    model = moe_model().eval()
    ids = torch.randint(0, 61, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 5) % 61
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward():
    model = moe_model().eval()
    ids = torch.randint(0, 61, (2, 14))
    full = model(ids)
    cache = model.new_cache(2, 20)
    steps = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_aux_loss_matches_hand_computation():
    # 2 experts, top-1, two sequences of two tokens.
    scores = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.1, 0.9]]])
    ids = torch.tensor([[[0], [0]], [[1], [0]]])
    # token level: f = (3/4, 1/4), P = (0.45, 0.55): 2 · (0.75·0.45 + 0.25·0.55) = 0.95
    assert load_balancing_loss(scores, ids, 2, per_sequence=False).item() == pytest.approx(0.95)
    # sequence level: seq 1 f = (1, 0), P = (0.7, 0.3) -> 1.4; seq 2 f = (.5, .5), P = (.2, .8) -> 1.0
    assert load_balancing_loss(scores, ids, 2, per_sequence=True).item() == pytest.approx(1.2)


def test_aux_loss_is_one_for_balanced_routing_and_e_for_collapse():
    uniform = torch.full((2, 4, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]).expand(2, 4, 2)
    for per_sequence in (False, True):
        assert load_balancing_loss(uniform, balanced, 4, per_sequence).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(2, 4, dtype=torch.long), 4).float()
    assert load_balancing_loss(collapsed, torch.zeros(2, 4, 1, dtype=torch.long), 4, False).item() == 4.0
    # each sequence uses only half the experts but the batch is balanced: only seq-level aux sees it
    ids = torch.tensor([[[0, 1]] * 4, [[2, 3]] * 4])
    probs = F.one_hot(ids, 4).float().sum(2) / 2
    assert load_balancing_loss(probs, ids, 4, per_sequence=False).item() == pytest.approx(1.0)
    assert load_balancing_loss(probs, ids, 4, per_sequence=True).item() == pytest.approx(2.0)


def test_aux_loss_only_in_training_mode_and_trains_the_router():
    model = moe_model(aux_loss_type="sequence")
    ids = torch.randint(0, 61, (2, 9))
    model.eval()
    model(ids)
    assert model.aux_loss() is None  # evaluation never includes it
    model.train()
    model(ids)
    aux = model.aux_loss()
    assert aux is not None and 2 * 1.0 <= aux.item() <= 2 * 4  # two layers, each in [1, E]
    aux.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.clear_aux_loss()
    assert model.aux_loss() is None
    assert Transformer(moe_config(num_experts=0)).aux_loss() is None


def test_flops_count_active_parameters_only():
    c = moe_config(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2)
    model = Transformer(c)
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    assert model.num_params() - model.active_params() == c.num_hidden_layers * (8 - 2) * expert
    more_experts = Transformer(moe_config(num_hidden_layers=3, num_experts=16, num_experts_per_tok=2))
    assert more_experts.flops_per_token(32) - model.flops_per_token(32) == 6 * 3 * 8 * c.hidden_size
    # the router grows by 8 rows per layer; the experts that run per token do not change


def test_checkpoint_round_trip_keeps_stacked_experts(tmp_path):
    model = moe_model()
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", model, info={})
    loaded, info = load_model(tmp_path / "ckpt")
    assert info["model"]["num_experts"] == 4 and loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 48, 32)


def test_lora_adapts_attention_and_shared_expert_but_not_routed_experts():
    from acornlm.model.lora import LoraConfig, apply_lora, merge_lora

    model = moe_model()
    ids = torch.randint(0, 61, (1, 8))
    names = apply_lora(model, LoraConfig(rank=4, targets="all"))
    assert any(n.endswith("self_attn.q_proj") for n in names)
    assert any(n.endswith("mlp.shared_expert.up_proj") for n in names)
    assert not any(".experts." in n or n.endswith("mlp.gate") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    model.eval()
    before = model(ids)
    merge_lora(model)
    torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)


BAD_CONFIGS = {
    "top_k_above_experts": (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    "top_k_zero": (dict(num_experts=4, num_experts_per_tok=0), "num_experts_per_tok"),
    "negative_experts": (dict(num_experts=-1), "num_experts"),
    "two_shared": (dict(num_experts=4, num_shared_experts=2), "num_shared_experts"),
    "negative_coef": (dict(num_experts=4, router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    "aux_type": (dict(num_experts=4, aux_loss_type="batch"), "aux_loss_type"),
    "gelu_experts": (dict(num_experts=4, mlp="gelu"), "mlp"),
    "negative_size": (dict(num_experts=4, moe_intermediate_size=-3), "moe_intermediate_size"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_impossible_moe_config_is_refused_by_name(case):
    fields, name = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=f"model.{name}"):
        moe_config(**fields)


def test_moe_sizes_default_to_dense_and_moe_widths():
    c = moe_config(moe_intermediate_size=0, shared_expert_intermediate_size=0)
    assert c.moe_intermediate_size == c.intermediate_size == c.shared_expert_intermediate_size
    dense = ModelConfig(vocab_size=10, hidden_size=32, num_attention_heads=4)
    assert not dense.is_moe and dense.moe_intermediate_size == 0  # dense configs keep their defaults


def test_presets_have_the_documented_shapes():
    mm = ModelConfig(**load_preset("minimind2-moe")["model"])
    assert (mm.hidden_size, mm.num_hidden_layers, mm.num_attention_heads, mm.num_key_value_heads,
            mm.num_experts, mm.num_experts_per_tok, mm.num_shared_experts, mm.moe_intermediate_size,
            mm.norm_topk_prob, mm.aux_loss_type) == (640, 8, 8, 2, 4, 2, 1, 1728, True, "sequence")
    qwen = ModelConfig(**load_preset("qwen3-tiny")["model"])
    assert qwen.qk_norm and qwen.tie_word_embeddings and qwen.num_key_value_heads < qwen.num_attention_heads
    assert not qwen.is_moe


def test_pretrain_cli_trains_logs_aux_loss_and_resumes(prepared_data, tmp_path):
    from acornlm.cli import main

    out = tmp_path / "run"
    args = ["train", "pretrain", "--data", str(prepared_data), "--out", str(out), "--model", "minimind2-moe",
            "--model.vocab_size", "0", "--model.hidden_size", "32", "--model.num_hidden_layers", "2",
            "--model.num_attention_heads", "4", "--model.num_key_value_heads", "2",
            "--model.moe_intermediate_size", "32", "--model.max_position_embeddings", "32",
            "--train.seq_len", "16", "--train.batch_size", "8", "--train.learning_rate", "0.01",
            "--train.warmup_steps", "1", "--train.eval_interval", "8", "--train.eval_batches", "1",
            "--train.save_interval", "8", "--train.log_interval", "1", "--train.progress", "false"]
    main([*args, "--train.max_steps", "16"])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17))
    assert all(2.0 <= r["aux_loss"] <= 8.0 for r in log)  # each of the 2 layers in [1, E]
    assert sum(r["loss"] for r in log[-4:]) / 4 < log[0]["loss"] - 0.5
    evals = [r for r in log if "val_loss" in r]
    assert len(evals) == 2
    model, info = load_model(out)
    assert model.config.num_experts == 4 and model.config.num_shared_experts == 1
    main([*args, "--train.max_steps", "20", "--resume"])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert load_model(out)[1]["step"] == 20


GGUF_VARIANTS = {  # llama.cpp architecture: the model fields it can compute exactly
    "qwen2moe": dict(num_shared_experts=1, norm_topk_prob=False),
    "qwen3moe": dict(num_shared_experts=0, qk_norm=True, norm_topk_prob=True, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory):
    from acornlm.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(["the king and the queen walk by the river " * 5] * 3, "bpe", 280).save(directory)
    return directory


@pytest.mark.parametrize("arch", GGUF_VARIANTS)
def test_gguf_export_writes_expert_metadata_and_every_tensor(tmp_path, bpe_tokenizer_dir, arch):
    gguf = pytest.importorskip("gguf")
    from acornlm.export.gguf import export_gguf

    model = moe_model(vocab_size=300, **GGUF_VARIANTS[arch])
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", model, {"stage": "pretrain"}, tokenizer_dir=bpe_tokenizer_dir)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", type="f32"))

    def value(key):
        return reader.fields[key].contents()

    c = model.config
    assert value("general.architecture") == arch
    assert value(f"{arch}.expert_count") == 4 and value(f"{arch}.expert_used_count") == 2
    assert value(f"{arch}.expert_feed_forward_length") == c.moe_intermediate_size
    if arch == "qwen2moe":
        assert value(f"{arch}.expert_shared_feed_forward_length") == c.shared_expert_intermediate_size
    else:
        assert f"{arch}.expert_shared_feed_forward_length" not in reader.fields
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    size = c.moe_intermediate_size
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.mlp.", f"blk.{i}."
        np.testing.assert_array_equal(tensors[dst + "ffn_gate_inp.weight"], state[src + "gate.weight"])
        np.testing.assert_array_equal(tensors[dst + "ffn_gate_exps.weight"], state[src + "experts.gate_up_proj"][:, :size])
        np.testing.assert_array_equal(tensors[dst + "ffn_up_exps.weight"], state[src + "experts.gate_up_proj"][:, size:])
        np.testing.assert_array_equal(tensors[dst + "ffn_down_exps.weight"], state[src + "experts.down_proj"])
        np.testing.assert_array_equal(tensors[dst + "attn_q.weight"], state[f"model.layers.{i}.self_attn.q_proj.weight"])
        if arch == "qwen2moe":
            for proj in ("gate", "up", "down"):
                np.testing.assert_array_equal(tensors[f"{dst}ffn_{proj}_shexp.weight"],
                                              state[f"{src}shared_expert.{proj}_proj.weight"])
            np.testing.assert_array_equal(tensors[dst + "ffn_gate_inp_shexp.weight"],
                                          state[src + "shared_expert_gate.weight"])
            assert not tensors[dst + "attn_q.bias"].any()
        else:
            assert dst + "ffn_gate_shexp.weight" not in tensors and dst + "attn_q_norm.weight" in tensors
        assert dst + "ffn_gate.weight" not in tensors  # no dense feed-forward
    # llama.cpp's qwen2moe loader requires `output` even for tied embeddings (verified with llama.cpp)
    assert ("output.weight" in tensors) == (arch == "qwen2moe" or not c.tie_word_embeddings)
    if "output.weight" in tensors:
        np.testing.assert_array_equal(tensors["output.weight"], state["lm_head.weight"])
    expected = (3 + 4 * bool(arch == "qwen2moe") + 3 * bool(arch == "qwen2moe") + 1) * c.num_hidden_layers
    assert sum(".ffn_" in n and "norm" not in n or ".attn_q.bias" in n or ".attn_k.bias" in n
               or ".attn_v.bias" in n for n in tensors) == expected


def test_gguf_refuses_moe_llama_cpp_cannot_compute(tmp_path, bpe_tokenizer_dir):
    from acornlm.export.gguf import export_gguf

    pytest.importorskip("gguf")
    (tmp_path / "ckpt").mkdir()
    model = moe_model(vocab_size=300)  # shared expert + renormalised top-k: MiniMind2-MoE's layout
    write_model_files(tmp_path / "ckpt", model, {"stage": "pretrain"}, tokenizer_dir=bpe_tokenizer_dir)
    with pytest.raises(ConfigError, match="qwen2moe never renormalises"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
