"""Invariants of the Transformer: causality, GQA, RoPE, the KV cache, Hugging Face name and
numerics compatibility, parameter/FLOP formulas, initialisation and config errors."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer, manual_backward, onednn_attention, ops
from acornlm.model.manual_backward import apply_rotary_manual, rms_norm
from acornlm.model.onednn_attention import onednn_causal_attention
from acornlm.model.transformer import apply_rotary, one_query_attention, rope_frequencies

transformers = pytest.importorskip("transformers")


def llama_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=10000.0, norm_eps=1e-5)
    fields.update(overrides)
    return ModelConfig(**fields)


def gpt2_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, norm="layernorm", mlp="gelu",
                  position="learned", norm_eps=1e-5, attention_bias=True, mlp_bias=True)
    fields.update(overrides)
    return ModelConfig(**fields)


FAMILIES = {
    "llama": llama_config,
    "qwen3": lambda **kw: llama_config(qk_norm=True, **kw),
    "gpt2": gpt2_config,
}


def build(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so conventions are really tested
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def random_ids(config: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- causality, GQA, RoPE -------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_changing_a_future_token_never_changes_earlier_logits(family):
    config = FAMILIES[family]()
    model = build(config)
    ids = random_ids(config, seq=16)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4  # the change is visible from its own position on


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_config = llama_config(num_attention_heads=4, num_key_value_heads=2)
    gqa = build(gqa_config)
    mha = Transformer(llama_config(num_attention_heads=4, num_key_value_heads=4)).eval()
    state = gqa.state_dict()
    group = gqa_config.num_attention_heads // gqa_config.num_key_value_heads
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = tensor.view(gqa_config.num_key_value_heads, gqa_config.head_dim, -1)
            state[name] = heads.repeat_interleave(group, dim=0).reshape(-1, tensor.shape[-1])
    mha.load_state_dict(state)
    ids = random_ids(gqa_config)
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), rtol=1e-5, atol=1e-5)


def test_rope_is_identity_at_position_zero_and_relative():
    head_dim = 16
    cos, sin = rope_frequencies(head_dim, 64, theta=10000.0)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()

    def rotated(x, p):
        return apply_rotary(x, cos[p], sin[p])

    torch.testing.assert_close(rotated(q, 0), q)
    # Each pair of coordinates is rotated, so lengths are kept...
    torch.testing.assert_close(rotated(q, 37).norm(), q.norm())
    # ...and q·k depends only on the offset between the two positions.
    for offset in (0, 3, 11):
        dots = [rotated(q, p + offset) @ rotated(k, p) for p in (0, 5, 20, 40)]
        for dot in dots[1:]:
            torch.testing.assert_close(dot, dots[0], rtol=1e-6, atol=1e-6)
    # A different offset gives a different score (positions are really encoded).
    assert abs(float(rotated(q, 4) @ rotated(k, 0) - rotated(q, 0) @ rotated(k, 0))) > 1e-3


# --- the KV cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_decode_equals_full_forward(family):
    config = FAMILIES[family]()
    model = build(config)
    ids = random_ids(config, seq=14)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_length=20)
        steps = [model(ids[:, :5], cache)]  # prefill
        steps.append(model(ids[:, 5:9], cache))  # several new tokens after a cached prefix
        steps += [model(ids[:, t:t + 1], cache) for t in range(9, 14)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 14


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_at_one_position_per_row_equal_the_full_forward(family):
    config = FAMILIES[family]()
    model = build(config)
    ids = random_ids(config, seq=14)
    at = torch.tensor([13, 6])
    with torch.no_grad():
        full = model(ids)
        picked = model(ids, logits_at=at)
    assert picked.shape == (2, 1, config.vocab_size)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(2), at], rtol=1e-5, atol=1e-5)


def test_kv_cache_reset_starts_over_and_overflow_is_a_config_error():
    config = llama_config()
    model = build(config)
    ids = random_ids(config, seq=6)
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_length=6)
        first = model(ids, cache)
        cache.reset()
        torch.testing.assert_close(model(ids, cache), first)
        with pytest.raises(ConfigError, match="KV cache"):
            model(ids[:, :1], cache)


# --- Hugging Face compatibility -------------------------------------------------------------------

def hf_model(config: ModelConfig) -> torch.nn.Module:
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads,
                  num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                  max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
                  rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_word_embeddings,
                  attention_bias=config.attention_bias, hidden_act="silu", attn_implementation="eager")
    if config.qk_norm:
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_and_logits_match_transformers(family, tied):
    config = FAMILIES[family](tie_word_embeddings=tied)
    ours = build(config)
    theirs = hf_model(config)
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert our_shapes == their_shapes
    theirs.load_state_dict(ours.state_dict())
    ids = random_ids(config, seq=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_family_matches_transformers_gpt2():
    """Same parameter count and, after mapping names (GPT-2 fuses q/k/v into a transposed Conv1D),
    the same logits: proves learned positions, LayerNorm, tanh-GELU and biases follow GPT-2."""
    config = gpt2_config()
    ours = build(config)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_embd=config.hidden_size, n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads, n_positions=config.max_position_embeddings,
        n_inner=config.intermediate_size, layer_norm_epsilon=config.norm_eps, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")).eval()
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    s = ours.state_dict()
    mapped = {"transformer.wte.weight": s["model.embed_tokens.weight"],
              "transformer.wpe.weight": s["model.embed_positions.weight"],
              "transformer.ln_f.weight": s["model.norm.weight"], "transformer.ln_f.bias": s["model.norm.bias"],
              "lm_head.weight": s["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        ours_p, theirs_p = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = ours_p + "self_attn."
        for kind in ("weight", "bias"):
            mapped[theirs_p + "ln_1." + kind] = s[ours_p + "input_layernorm." + kind]
            mapped[theirs_p + "ln_2." + kind] = s[ours_p + "post_attention_layernorm." + kind]
        qkv_w = torch.cat([s[attn + f"{n}_proj.weight"] for n in "qkv"])
        mapped[theirs_p + "attn.c_attn.weight"] = qkv_w.t()
        mapped[theirs_p + "attn.c_attn.bias"] = torch.cat([s[attn + f"{n}_proj.bias"] for n in "qkv"])
        mapped[theirs_p + "attn.c_proj.weight"] = s[attn + "o_proj.weight"].t()
        mapped[theirs_p + "attn.c_proj.bias"] = s[attn + "o_proj.bias"]
        mapped[theirs_p + "mlp.c_fc.weight"] = s[ours_p + "mlp.up_proj.weight"].t()
        mapped[theirs_p + "mlp.c_fc.bias"] = s[ours_p + "mlp.up_proj.bias"]
        mapped[theirs_p + "mlp.c_proj.weight"] = s[ours_p + "mlp.down_proj.weight"].t()
        mapped[theirs_p + "mlp.c_proj.bias"] = s[ours_p + "mlp.down_proj.bias"]
    theirs.load_state_dict(mapped, strict=False)  # strict=False: older versions keep attn.bias buffers
    ids = random_ids(config, seq=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


# --- formulas and initialisation ------------------------------------------------------------------

def test_num_params_formula():
    c = llama_config(tie_word_embeddings=False, qk_norm=True)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = (c.hidden_size * (q + 2 * kv) + q * c.hidden_size  # q, k, v, o
                 + 3 * c.hidden_size * c.intermediate_size  # gate, up, down
                 + 2 * c.hidden_size + 2 * c.head_dim)  # two norms, q_norm and k_norm
    expected = 2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
    model = Transformer(c)
    assert model.num_params() == expected
    tied = Transformer(llama_config(tie_word_embeddings=True, qk_norm=True))
    assert tied.num_params() == expected - c.vocab_size * c.hidden_size


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_is_6n_plus_attention(family, tied):
    """6N over the matrices that multiply (the head counted once, embedding lookups not), plus
    12·L·H·Q·T for the attention scores and the weighted sum."""
    c = FAMILIES[family](tie_word_embeddings=tied)
    model = Transformer(c)
    lookups = 0 if tied else c.vocab_size * c.hidden_size
    if c.position == "learned":
        lookups += c.max_position_embeddings * c.hidden_size
    n = model.num_params() - lookups
    seq = 32
    attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq
    assert model.flops_per_token(seq) == 6 * n + attention


def test_init_std_and_residual_scaling():
    c = llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                     num_hidden_layers=8, vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(c)
    residual_std = 0.02 / math.sqrt(2 * c.num_hidden_layers)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert param.std().item() == pytest.approx(residual_std, rel=0.05), name
        else:
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(param.mean().item()) < 0.002, name
    gpt2 = Transformer(gpt2_config())
    for name, param in gpt2.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name


# --- config errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=60, num_attention_heads=8), "not divisible"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "does not divide"),
    (dict(head_dim=15), "even head_dim"),
    (dict(num_hidden_layers=0), "positive integer"),
])
def test_bad_configs_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        llama_config(**overrides)


def test_sequence_longer_than_context_is_a_config_error():
    config = llama_config(max_position_embeddings=16)
    model = build(config)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        model(random_ids(config, seq=17))
    cache = model.new_cache(batch_size=2, max_length=32)
    with torch.no_grad():
        model(random_ids(config, seq=10), cache)
        with pytest.raises(ConfigError, match="max_position_embeddings"):
            model(random_ids(config, seq=7), cache)
    with pytest.raises(ConfigError, match="vocab_size"):
        Transformer(llama_config(vocab_size=0))


# --- the oneDNN linear layer ------------------------------------------------------------------------

@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("in_features, out_features", [(24, 8), (8, 24)])  # both weight-gradient orders
def test_onednn_linear_matches_f_linear_forward_and_backward(in_features, out_features):
    x = torch.randn(3, 5, in_features, requires_grad=True)
    layer = ops.Linear(in_features, out_features, bias=True)
    grad = torch.randn(3, 5, out_features)
    ops.linear(x, layer.weight, layer.bias).backward(grad)
    ours = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    expected = F.linear(x, layer.weight, layer.bias)
    expected.backward(grad)
    for got, t in zip(ours, (x, layer.weight, layer.bias)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the inference path skips autograd
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.acornlm.onednn_linear.default, (x, layer.weight, layer.bias))


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
def test_training_gradients_do_not_depend_on_the_matmul_backend(monkeypatch):
    config = FAMILIES["qwen3"]()
    model = build(config).train()
    ids = random_ids(config, seq=10)
    grads = []
    for use_onednn in (True, False):
        monkeypatch.setattr(ops, "USE_ONEDNN", use_onednn)
        model.zero_grad(set_to_none=True)
        model(ids).logsumexp(-1).mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# --- packed weights for inference -------------------------------------------------------------------

@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_f_linear_and_follows_weight_changes(dtype, bias):
    layer = ops.pack_for_inference(ops.Linear(24, 40, bias=bias).to(dtype))
    x = torch.randn(3, 5, 24, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **tol)
        first = layer.packed_weight.weight
        assert first is not None, "the packed path was not taken"
        layer(x[0])
        assert layer.packed_weight.weight is first, "an unchanged weight is packed only once"
        layer.weight.mul_(-2)  # in place, as an optimizer step
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **tol)
        layer.load_state_dict({name: torch.randn_like(t) for name, t in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **tol)
    layer.weight.data = torch.randn_like(layer.weight)  # replaced, not changed in place
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **tol)


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_and_fused_projections_give_the_same_logits(family):
    config = FAMILIES[family](attention_bias=True)
    model = build(config).eval()
    ids = random_ids(config, seq=9)
    with torch.no_grad():
        plain = model(ids)
    ops.pack_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain, rtol=1e-5, atol=1e-5)
    fused = {type(m).__name__ for m in model.modules()
             if isinstance(m, ops.FusableLinears) and m.fused_linears is not None and m.fused_linears.weight is not None}
    assert fused == ({"CausalSelfAttention"} if config.mlp == "gelu" else {"CausalSelfAttention", "FeedForward"})


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
def test_lora_added_after_packing_is_not_bypassed():
    from acornlm.train.lora import LoraConfig, apply_lora

    config = FAMILIES["llama"]()
    model = ops.pack_for_inference(build(config).eval())
    ids = random_ids(config, seq=9)
    apply_lora(model, LoraConfig(rank=2, targets="q_proj,up_proj"))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight)
    with torch.no_grad():
        packed = model(ids)
        ops.pack_for_inference(model, enable=False)
        torch.testing.assert_close(packed, model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
def test_packed_model_trains_saves_and_copies_like_a_plain_one():
    config = FAMILIES["llama"]()
    model = build(config).eval()
    ids = random_ids(config, seq=9)
    with torch.no_grad():
        plain = model(ids)
    ops.pack_for_inference(model)
    assert model.lm_head.packed_weight.weight is not None, "weights are packed up front, not on the first request"
    assert model.model.layers[0].self_attn.fused_linears.weight is not None
    assert model.state_dict().keys() == build(config).state_dict().keys()
    twin = copy.deepcopy(model)  # the opaque packed tensors are not copied, only repacked on use
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), plain, rtol=1e-5, atol=1e-5)
    pickle.loads(pickle.dumps(model))
    # gradients take the plain oneDNN path and match an unpacked model's
    model.train()
    model(ids).logsumexp(-1).mean().backward()
    reference = build(config).train()
    reference.load_state_dict(model.state_dict())
    reference(ids).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    ops.pack_for_inference(model, enable=False)
    assert all(m.packed_weight is None for m in model.modules() if isinstance(m, ops.Linear))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_one_query_attention_equals_sdpa_with_a_padding_mask(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(5, 4, 1, 8)
    k, v = torch.randn(5, kv_heads, 11, 8), torch.randn(5, kv_heads, 11, 8)
    lengths = torch.tensor([10, 0, 3, 7, 5])
    mask = (torch.arange(11)[None, :] <= lengths[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(one_query_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


# --- CPU training kernels: oneDNN attention, hand-written RMSNorm and RoPE backward ----------------

@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("kv_heads, seq", [(4, 9), (2, 16), (1, 7)])  # MHA, GQA, MQA
def test_onednn_causal_attention_equals_sdpa_forward_and_backward(kv_heads, seq):
    torch.manual_seed(0)
    batch, heads, dim = 3, 4, 8
    # laid out as the model makes them: [B, T, heads, D] memory seen as [B, heads, T, D]
    q = torch.randn(batch, seq, heads, dim).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, seq, kv_heads, dim).transpose(1, 2).requires_grad_()
    v = torch.randn(batch, seq, kv_heads, dim).transpose(1, 2).requires_grad_()
    grad = torch.randn(batch, seq, heads * dim)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
    expected = expected.transpose(1, 2).reshape(batch, seq, heads * dim)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    out = onednn_causal_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # evaluation keeps no probabilities
        torch.testing.assert_close(onednn_causal_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_manual_rms_norm_and_rope_backward_match_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), F.rms_norm(x, (8,), weight, 1e-5))
    torch.testing.assert_close(torch.autograd.grad(rms_norm(x, weight, 1e-5), (x, weight), grad),
                               torch.autograd.grad(F.rms_norm(x, (8,), weight, 1e-5), (x, weight), grad))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, weight))
    # general cos/sin tables (halves not equal), so a wrong half in the backward shows
    cos, sin = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary_manual(x, cos, sin), apply_rotary(x, cos, sin))
    torch.testing.assert_close(torch.autograd.grad(apply_rotary_manual(x, cos, sin), x, grad),
                               torch.autograd.grad(apply_rotary(x, cos, sin), x, grad))
    assert torch.autograd.gradcheck(lambda x: apply_rotary_manual(x, cos, sin), (x,))


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cpu_training_kernels_give_the_logits_and_gradients_of_the_plain_path(family, monkeypatch):
    import acornlm.model.transformer as transformer

    config = FAMILIES[family]()
    model = build(config).train()
    ids = random_ids(config, seq=10)
    calls = {"attention": 0, "rms_norm": 0, "rope": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(transformer, "onednn_causal_attention", counted("attention", onednn_causal_attention))
    monkeypatch.setattr(transformer, "rms_norm", counted("rms_norm", rms_norm))
    monkeypatch.setattr(transformer, "apply_rotary_manual", counted("rope", apply_rotary_manual))
    monkeypatch.setattr(onednn_attention, "MIN_ROWS", 0)  # the tiny model's shapes take the fast path too
    results = []
    for fast in (True, False):
        monkeypatch.setattr(onednn_attention, "ENABLED", fast)
        monkeypatch.setattr(transformer, "use_manual_backward", manual_backward.use_manual_backward if fast
                            else lambda *tensors: False)
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
        if fast:
            layers = config.num_hidden_layers
            assert calls == {"attention": layers, "rms_norm": (2 + 2 * config.qk_norm) * layers + 1,
                             "rope": 2 * layers}  # q and k
            changed = ids.clone()
            changed[:, -1] = (changed[:, -1] + 1) % config.vocab_size  # causality on the fast path
            with torch.no_grad():
                torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1].detach())
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(onednn_attention, "ENABLED", True)
    with torch.no_grad():  # a prefill into the KV cache takes the oneDNN attention too, then decoding goes on
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        steps = [model(ids[:, :7], cache)] + [model(ids[:, i:i + 1], cache) for i in range(7, ids.shape[1])]
    assert calls["attention"] == 3 * config.num_hidden_layers  # training, the causality check, the prefill
    torch.testing.assert_close(torch.cat(steps, dim=1), results[1][0], rtol=1e-5, atol=1e-5)
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
def test_onednn_attention_is_chosen_by_shape_and_memory():
    q = torch.empty(8, 8, 256, 4)  # minimind2-small's training shape: 1024 stacked rows, 16 MiB of probabilities
    assert onednn_attention.use_onednn_attention(q.requires_grad_(), kv_heads=2, dropout=0.0)
    assert not onednn_attention.use_onednn_attention(q, kv_heads=2, dropout=0.1)
    assert not onednn_attention.use_onednn_attention(q, kv_heads=8, dropout=0.0)  # 256 rows per product
    big = torch.empty(32, 8, 512, 4, requires_grad=True)  # 256 MiB of probabilities per layer: SDPA
    assert not onednn_attention.use_onednn_attention(big, kv_heads=2, dropout=0.0)
    with torch.no_grad():  # nothing is kept without gradients
        assert onednn_attention.use_onednn_attention(big, kv_heads=2, dropout=0.0)
    assert not onednn_attention.use_onednn_attention(torch.empty(1, 8, 1024, 4), kv_heads=2, dropout=0.0)
