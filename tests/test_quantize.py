"""Weight-only int8 quantization: the product is the dequantized one, and the model still decodes right."""

from __future__ import annotations

import pytest
import torch
from test_engine import Collector, run_until_idle
from test_generate import checkpoint, random_ids, tiny_model, tokenizer  # noqa: F401 (fixtures)

import acornlm
from acornlm.accel.onednn import OneDNNLinear as Linear
from acornlm.cli import main
from acornlm.cli.terminal import visible
from acornlm.errors import ConfigError
from acornlm.infer import SamplingParams, generate_tokens
from acornlm.infer.engine import Engine
from acornlm.infer.quantize import Int8Linear, quantize_model, quantize_rows


def test_rows_round_to_the_nearest_step_of_their_scale():
    torch.manual_seed(0)
    weight = torch.randn(7, 33) * torch.logspace(-3, 2, 7)[:, None]  # rows of very different size
    weight[3] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.all(scale[[0, 1, 2, 4, 5, 6]] == weight.abs().amax(dim=1)[[0, 1, 2, 4, 5, 6]] / 127)
    error = (q.float() * scale[:, None] - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-12) and torch.all(q[3] == 0)


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_the_dequantized_product(bias):
    torch.manual_seed(0)
    linear = Linear(48, 20, bias=bias)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 48)
    q, scale = quantize_rows(linear.weight)
    # the kernel multiplies bf16 activations by the int8 weights and scales in bf16
    expected = (x.bfloat16().float() @ q.float().t()) * scale.bfloat16().float()
    if bias:
        expected = expected + linear.bias
    out = layer(x)
    assert out.shape == (2, 5, 20) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.detach(), rtol=2e-2, atol=2e-2)
    # and it stays close to the fp32 layer it replaced
    relative = (out - linear(x)).norm() / linear(x).norm()
    assert relative < 0.02


def test_quantized_model_keeps_its_logits_and_cache_invariant():
    model = tiny_model(vocab_size=64, seed=5)
    ids = torch.tensor([random_ids(12)])
    with torch.no_grad():
        reference = model(ids)
        quantize_model(model)
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert model.dtype == torch.float32 and model.new_cache(1, 4).keys.dtype == torch.float32
        full = model(ids)
        cache = model.new_cache(1, 12)
        stepwise = torch.cat([model(ids[:, :6], cache)] + [model(ids[:, i:i + 1], cache) for i in range(6, 12)], 1)
    assert (full - reference).abs().max() / reference.abs().max() < 0.05
    assert (full.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    # KV-cache decoding equals the full forward pass (up to bf16 rounding of the activations)
    torch.testing.assert_close(stepwise, full, rtol=2e-2, atol=2e-2)


def test_quantized_checkpoint_generates_through_api_engine_and_cli(checkpoint, capsys):  # noqa: F811
    run, _, _ = checkpoint
    lm = acornlm.load(run, device="cpu", quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in lm.model.modules())
    assert lm.model.num_params() == acornlm.load(run, device="cpu").model.num_params()
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    prompt = lm.encode("héllo")
    tokens = list(generate_tokens(lm.model, prompt, params))
    assert len(tokens) == 10

    engine = Engine(lm.model, lm.tokenizer, max_batch=2, stop_token_ids=[])
    collector = Collector()
    engine.submit(prompt, params, on_event=collector)
    run_until_idle(engine)
    assert collector.tokens == tokens

    main(["generate", "--ckpt", str(run), "--prompt", "héllo", "--max-new-tokens", "10", "--temperature", "0",
          "--device", "cpu", "--quantize", "int8"])
    assert capsys.readouterr().out == "héllo" + visible(lm.decode(tokens)) + "\n"


def test_bad_quantization_requests_are_refused(checkpoint, capsys):  # noqa: F811
    run, _, _ = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", str(run), "--prompt", "x", "--device", "cpu", "--quantize", "int4"])
    assert exit_info.value.code == 2 and "unknown quantization 'int4'" in capsys.readouterr().err

    from acornlm.model.lora import LoraConfig, apply_lora

    model = tiny_model()
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ConfigError, match="unmerged LoRA adapter"):
        quantize_model(model)
