"""acornlm.accel: the CPU kernels that `accelerate` applies to the reference model give its
logits and gradients (the contract of acornlm/accel/__init__.py)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model import FAMILIES, build, llama_config, random_ids

from acornlm.accel import accelerate, deaccelerate, modules, onednn_attention
from acornlm.accel import onednn as ops
from acornlm.accel.manual_backward import apply_rotary_manual, rms_norm
from acornlm.accel.onednn import OneDNNLinear
from acornlm.accel.onednn_attention import one_query_attention, onednn_causal_attention
from acornlm.model.transformer import ATTENTION_FUNCTIONS, apply_rotary

# --- the oneDNN linear layer ------------------------------------------------------------------------

@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("in_features, out_features", [(24, 8), (8, 24)])  # both weight-gradient orders
def test_onednn_linear_matches_f_linear_forward_and_backward(in_features, out_features):
    x = torch.randn(3, 5, in_features, requires_grad=True)
    layer = OneDNNLinear(in_features, out_features, bias=True)
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
    layer = ops.pack_for_inference(OneDNNLinear(24, 40, bias=bias).to(dtype))
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
    accelerate(model, mode="infer")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain, rtol=1e-5, atol=1e-5)
    fused = {type(m).__name__ for m in model.modules()
             if isinstance(m, ops.FusableLinears) and m.fused_linears is not None and m.fused_linears.weight is not None}
    assert fused == ({"FastCausalSelfAttention"} if config.mlp == "gelu"
                     else {"FastCausalSelfAttention", "FastFeedForward"})


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
def test_lora_added_after_packing_is_not_bypassed():
    from acornlm.model.lora import LoraConfig, apply_lora

    config = FAMILIES["llama"]()
    model = accelerate(build(config).eval(), mode="infer")
    ids = random_ids(config, seq=9)
    apply_lora(model, LoraConfig(rank=2, targets="q_proj,up_proj"))
    accelerate(model, mode="infer")  # the adapters' layers too (as the Trainer and the Engine do)
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
    accelerate(model, mode="infer")
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
    reference = build(config).train()  # the reference model, not accelerated
    reference.load_state_dict(model.state_dict())
    reference(ids).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    ops.pack_for_inference(model, enable=False)
    assert all(m.packed_weight is None for m in model.modules() if isinstance(m, OneDNNLinear))


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
def test_cpu_training_kernels_give_the_logits_and_gradients_of_the_reference(family, monkeypatch):
    """accelerate(model) runs oneDNN attention, the hand-written RMSNorm and RoPE backward passes;
    the reference model (the same weights, not accelerated) gives the same logits and gradients."""
    config = FAMILIES[family]()
    reference = build(config).train()
    model = accelerate(build(config).train())
    ids = random_ids(config, seq=10)
    calls = {"attention": 0, "rms_norm": 0, "rope": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(onednn_attention, "onednn_causal_attention", counted("attention", onednn_causal_attention))
    monkeypatch.setattr(modules, "rms_norm", counted("rms_norm", rms_norm))
    monkeypatch.setattr(modules, "apply_rotary_manual", counted("rope", apply_rotary_manual))
    monkeypatch.setattr(onednn_attention, "MIN_ROWS", 0)  # the tiny model's shapes take the fast path too
    results = []
    for candidate in (model, reference):
        logits = candidate(ids)
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), {name: p.grad.clone() for name, p in candidate.named_parameters()}))
    layers = config.num_hidden_layers
    assert calls == {"attention": layers, "rms_norm": (2 + 2 * config.qk_norm) * layers + 1,
                     "rope": 2 * layers}  # q and k; the reference called none of them
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % config.vocab_size  # causality on the fast path
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :-1], results[0][0][:, :-1])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
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


# --- the reference and its accelerated twin, whole models -------------------------------------------

ALL_FAMILIES = {**FAMILIES, "moe": lambda **kw: llama_config(num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=16, num_shared_experts=1, **kw)}


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_eager_attention_is_the_formula_sdpa_computes(family):
    """The written-out attention and PyTorch's fused kernel agree: full causal, cached and masked."""
    config = ALL_FAMILIES[family]()
    model = build(config)
    ids = random_ids(config, seq=11)
    with torch.no_grad():
        sdpa = model.set_attention("sdpa")(ids)
        eager = model.set_attention("eager")(ids)
        torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
        cache = model.new_cache(ids.shape[0], ids.shape[1])  # prefix, then several tokens, then one
        steps = [model(ids[:, :5], cache), model(ids[:, 5:9], cache), model(ids[:, 9:10], cache),
                 model(ids[:, 10:], cache)]
        torch.testing.assert_close(torch.cat(steps, dim=1), sdpa, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="unknown attention"):
        model.set_attention("flash-from-the-future")


@pytest.mark.skipif(not ops.ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_accelerated_model_gives_the_reference_logits_and_gradients(family, mode, monkeypatch):
    monkeypatch.setattr(onednn_attention, "MIN_ROWS", 0)  # the tiny shapes take the oneDNN attention too
    config = ALL_FAMILIES[family]()
    reference = build(config).train()
    model = accelerate(build(config).train(), mode=mode)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight or not config.tie_word_embeddings
    ids = random_ids(config, seq=10)
    results = []
    for candidate in (model, reference):
        logits = candidate(ids)
        (logits.logsumexp(-1).mean() + (candidate.aux_loss() or 0)).backward()
        results.append((logits.detach(), {n: p.grad for n, p in candidate.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        model.eval(), reference.eval()
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
    deaccelerate(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in reference.modules()}


def test_the_reference_model_imports_no_kernel():
    """A reader of acornlm/model/ meets the formulas only: no device-specific module is imported there."""
    model_dir = Path(__file__).parent.parent / "acornlm" / "model"
    for source in model_dir.glob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "from acornlm.accel" not in text and "import acornlm.accel" not in text, source.name
        assert "mkldnn" not in text, source.name
    assert set(ATTENTION_FUNCTIONS) >= {"eager", "sdpa", "acornlm_cpu"}


def test_without_the_cpu_kernels_only_rmsnorm_takes_the_fused_kernel(monkeypatch):
    """On a device without the oneDNN kernels (CUDA, or a PyTorch built without oneDNN), accelerate
    swaps RMSNorm's written-out formula for F.rms_norm and leaves everything else as the reference."""
    import acornlm.accel as accel

    monkeypatch.setattr(accel, "ONEDNN_AVAILABLE", False)
    config = FAMILIES["qwen3"]()
    reference, model = build(config), accelerate(build(config), mode="infer")
    assert {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__} == {"FastRMSNorm"}
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.model.layers[0].self_attn.attn_implementation == "sdpa"
    ids = random_ids(config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
