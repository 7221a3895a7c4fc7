"""The teaching plots: captured attention weights are the reference model's own (same logits, causal
rows that sum to 1), the sampling view keeps exactly what generation samples from, and the CLI
writes real images and refuses bad input with one clear line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from acornlm.cli import main
from acornlm.cli.viz import attention, sampling
from acornlm.errors import ConfigError
from acornlm.eval.viz import (
    CAPTURE_NAME,
    attention_probs,
    capture_attention,
    capturing_attention,
    recording_attention,
    sampling_view,
    token_label,
)
from acornlm.infer.sampling import (
    SamplingParams,
    TokenSampler,
    apply_min_p,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.model.transformer import ATTENTION_FUNCTIONS
from acornlm.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTEXT = 24
FAMILIES = {
    "rope_gqa_qknorm": dict(position="rope", num_key_value_heads=2, qk_norm=True),
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", attention_bias=True, norm_eps=1e-5),
}


def tiny_model(family: str, vocab_size: int = 300, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, rope_theta=10000.0,
                         initializer_range=0.3, **FAMILIES[family])
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model saved with a BPE tokenizer that knows a little English and Chinese."""
    directory = tmp_path_factory.mktemp("viz") / "ckpt"
    directory.mkdir()
    tokenizer = train_tokenizer(["To be, or not to be, that is the question. 床前明月光 🌙"] * 3
                                + ["the king and the queen walk by the river"] * 3, "bpe", 296)
    tokenizer.save(directory / "tokenizer")
    write_model_files(directory, tiny_model("rope_gqa_qknorm", tokenizer.vocab_size), {"step": 1},
                      tokenizer_dir=directory / "tokenizer")
    return directory


def ids(n: int = 12, seed: int = 1) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- attention capture ---

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capturing_attention_keeps_the_reference_logits(family):
    model = tiny_model(family)
    tokens = torch.tensor([ids()])
    with torch.no_grad():
        reference = model.set_attention("eager")(tokens)
        sdpa = model.set_attention("sdpa")(tokens)
        with capturing_attention(model) as weights:
            captured = model(tokens)
    assert torch.equal(captured, reference)  # eager_attention's own output: bit for bit
    torch.testing.assert_close(captured, sdpa, rtol=1e-5, atol=1e-5)
    assert sorted(weights) == [0, 1]
    # the layers are back on their implementation and the capture functions are gone
    assert {layer.self_attn.attn_implementation for layer in model.model.layers} == {"sdpa"}
    assert not any(name.startswith(CAPTURE_NAME.format("")) for name in ATTENTION_FUNCTIONS)


def test_captured_rows_are_causal_distributions():
    model = tiny_model("rope_gqa_qknorm")
    weights = capture_attention(model, ids(10))
    assert sorted(weights) == [0, 1]
    for layer in weights.values():
        assert layer.shape == (4, 10, 10)  # one map per query head, even with 2 KV heads (GQA)
        torch.testing.assert_close(layer.sum(dim=-1), torch.ones(4, 10))
        assert torch.all(layer.triu(diagonal=1) == 0)  # the future gets exactly nothing
        assert torch.all(layer >= 0)
    assert torch.allclose(weights[0][:, 0, 0], torch.ones(4))  # the first token can only look at itself


def test_captured_weights_are_the_ones_that_mix_the_values():
    """P V with the recorded P reproduces the attention output, also for new tokens after cached ones."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)  # T=3 after 4 cached
    store = {}
    out = recording_attention(5, store)(q, k, v, None, True, 0.0)
    probs = store[5]
    assert probs.shape == (1, 4, 3, 7)
    mixed = torch.matmul(probs, v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(1, 3, 32)
    torch.testing.assert_close(mixed, out)
    assert torch.all(probs[0, :, 0, 5:] == 0) and torch.all(probs[0, :, 2] > 0)  # query t sees keys <= 4 + t
    torch.testing.assert_close(attention_probs(q, k, None, True), probs)


def test_capture_refuses_a_layer_out_of_range_and_leaves_the_model_alone():
    model = tiny_model("gpt2")
    with pytest.raises(ConfigError, match=r"layer index 2 is out of range: this model has 2 layers, 0\.\.1"):
        capture_attention(model, ids(), layers=[0, 2])
    with pytest.raises(ConfigError, match="empty"):
        capture_attention(model, [])
    assert {layer.self_attn.attn_implementation for layer in model.model.layers} == {"sdpa"}
    assert set(capture_attention(model, ids(), layers=[1])) == {1}


def test_token_labels_show_partial_characters_as_bytes(checkpoint):
    from acornlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    labels = [token_label(tokenizer, i) for i in tokenizer.encode("so 霜\n")]
    assert "<e9>" in "".join(labels)  # 霜 = e9 9c 9c, never seen: single byte tokens
    assert labels[-1] == "↵" and "␣" in "".join(labels)


# --- the sampling view ---

def filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What TokenSampler does to the logits before drawing, written out."""
    z = apply_temperature(logits[None].float(), params.temperature)
    return apply_min_p(apply_top_p(apply_top_k(z, params.top_k), params.top_p), params.min_p)[0]


SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6),
            dict(temperature=0.9, min_p=0.2), dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
            dict(temperature=0.0)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_the_kept_set_is_what_the_sampler_draws_from(settings):
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 2
    view = sampling_view(logits, **settings)
    params = SamplingParams(**settings)
    if params.greedy:
        assert view.kept.nonzero().flatten().tolist() == [int(logits.argmax())]
    else:
        assert torch.equal(view.kept, torch.isfinite(filtered(logits, params)))
        torch.testing.assert_close(view.final, filtered(logits, params).softmax(dim=-1))
    torch.testing.assert_close(view.final.sum(), torch.tensor(1.0))
    assert torch.all(view.final[~view.kept] == 0)
    sampler = TokenSampler(SamplingParams(**settings, seed=0), [], 400, 64, "cpu")
    drawn = set(sampler(logits[None].expand(400, -1)).tolist())
    assert drawn <= set(view.kept.nonzero().flatten().tolist())


def test_each_filter_keeps_what_its_formula_says():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda **s: sampling_view(logits, **s).kept.nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8: the third token is dropped
    assert kept(top_p=0.81) == [0, 1, 2]
    assert kept(min_p=0.2) == [0, 1, 2]  # p >= 0.2 x 0.5
    assert kept(temperature=0.0, top_k=3) == [0]
    view = sampling_view(logits, top_k=2)
    assert view.stages[2].probs[:2].tolist() == pytest.approx([0.625, 0.375])  # renormalised over the two
    assert [s.name for s in view.stages] == ["model", "temperature", "top-k", "top-p", "min-p"]


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=3.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(min_p=1.5), "min_p"), (dict(temperature=math.nan), "temperature"),
])
def test_sampling_view_refuses_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        sampling_view(torch.zeros(8), **settings)


# --- the commands ---

def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_viz_attention_command_writes_a_png_and_the_weights(checkpoint, tmp_path, capsys):
    out = tmp_path / "plots" / "attention.png"
    main(["viz", "attention", "--ckpt", str(checkpoint), "--text", "To be, 床前明月光 🌙", "--out", str(out),
          "--layers", "0", "1", "--heads", "1", "3", "--save_weights", "--device", "cpu"])
    assert_png(out)
    printed = capsys.readouterr().out
    assert "2 layer(s) x 2 head(s)" in printed and "床" in printed
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    weights = torch.tensor(data["weights"])
    n = len(data["token_ids"])
    assert data["layers"] == [0, 1] and data["heads"] == [1, 3] and weights.shape == (2, 2, n, n)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, n), atol=1e-5, rtol=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["attention.json", "attention.png"]  # no temporaries


def test_viz_attention_cuts_a_long_text_from_the_left(checkpoint, tmp_path, capsys):
    out = tmp_path / "long.png"
    attention(ckpt=str(checkpoint), text="the king and the queen walk by the river " * 10, out=str(out),
              layers=[1], heads=[0], device="cpu")
    assert_png(out)
    assert f"plotting its last {CONTEXT} tokens" in capsys.readouterr().out


def test_viz_sampling_command_prints_the_table_and_writes_a_png(checkpoint, tmp_path, capsys):
    out = tmp_path / "sampling.png"
    main(["viz", "sampling", "--ckpt", str(checkpoint), "--prompt", "To", "be,", "--temperature", "0.9",
          "--top_k", "8", "--top_p", "0.9", "--min_p", "0.05", "--top_n", "12", "--out", str(out), "--device", "cpu"])
    assert_png(out)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["#", "id", "token", "p"] and lines[0].split()[-1] == "min-p"
    kept = int(next(line for line in lines if line.startswith("kept ")).split()[1])
    assert 1 <= kept <= 8
    rows = lines[1:13]
    assert sum(row.split()[-1] != "-" for row in rows) == kept  # the kept tokens are among the top 12


@pytest.mark.parametrize("argv, message", [
    (["viz", "attention", "--ckpt", "{ckpt}", "--text", ""], "--text is required and must not be empty"),
    (["viz", "attention", "--ckpt", "{ckpt}", "--text", "hi", "--layers", "5"],
     "layer index 5 is out of range: this model has 2 layers, 0..1"),
    (["viz", "attention", "--ckpt", "{ckpt}", "--text", "hi", "--heads", "0", "4"],
     "head index 4 is out of range: this model has 4 heads, 0..3"),
    (["viz", "attention", "--ckpt", "{ckpt}", "--text", "hi", "--out", "plot.gif"], "--out must name a .png"),
    (["viz", "sampling", "--ckpt", "/nonexistent", "--prompt", "hi", "--temperature", "5"], "temperature must be"),
    (["viz", "sampling", "--ckpt", "/nonexistent", "--prompt", "hi", "--top_p", "0"], "top_p must be in"),
    (["viz", "sampling", "--ckpt", "/nonexistent", "--prompt", "hi", "--top_n", "0"], "top_n must be"),
    (["viz", "sampling", "--ckpt", "{ckpt}"], "--prompt is required"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, argv, message):
    argv = [a.replace("{ckpt}", str(checkpoint)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("acornlm: error: ") and "\n" not in err and message in err, err
    assert not list(tmp_path.glob("*.png"))


def test_an_empty_prompt_is_the_start_of_a_document(checkpoint, tmp_path, capsys):
    sampling(ckpt=str(checkpoint), prompt="", temperature=0.0, out=str(tmp_path / "s.png"), device="cpu")
    assert "kept 1 of" in capsys.readouterr().out
