"""Invariants of the Transformer: causality, GQA, RoPE, the KV cache, Hugging Face name and
numerics compatibility, parameter/FLOP formulas, initialisation and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.transformer import apply_rotary, rope_frequencies

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
