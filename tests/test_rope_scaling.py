"""RoPE scaling (linear, dynamic NTK, YaRN): what changes and what does not, parity with transformers,
the KV cache, export/import (transformers and GGUF), config validation and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import read_checkpoint_config, write_model_files
from acornlm.model.rope import default_inv_freq, rope_inv_freq, rope_tables, yarn_inv_freq
from acornlm.tokenizer import train_tokenizer

TRAINED = 32  # the "trained" context length of the tiny models below
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    # DeepSeek-style attention factor, unrounded ramp and a narrower ramp
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": TRAINED,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
}


def tiny_model(scaling=None, seed: int = 0, max_positions: int = 4 * TRAINED, **fields) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         rope_theta=500.0, rope_scaling=scaling, initializer_range=0.3, **fields)
    return Transformer(config).eval()


def transformers_model(model: Transformer, tmp_path: Path):
    """The transformers model that acornlm's own config.json describes, with the same weights."""
    transformers = pytest.importorskip("transformers")
    from acornlm.export.hf import SpecialTokens, choose_architecture, hf_config

    config = model.config
    fields = hf_config(config, choose_architecture(config), SpecialTokens(0, 0, 0, None), "float32")
    (tmp_path / "config.json").write_text(json.dumps(fields))
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in name for name in missing)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


# --- what scaling changes, and what it does not ---------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_factor_one_is_plain_rope(kind):
    plain = rope_tables(16, 200, 500.0)
    scaled = rope_tables(16, 200, 500.0, {**SCALINGS[kind], "factor": 1.0})
    assert torch.equal(plain[0], scaled[0]) and torch.equal(plain[1], scaled[1])


def test_dynamic_ntk_changes_nothing_within_the_original_length():
    plain, dynamic = tiny_model(), tiny_model(SCALINGS["dynamic"])
    ids = torch.randint(0, 64, (2, TRAINED), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids), dynamic(ids))
        long_ids = torch.randint(0, 64, (2, 3 * TRAINED))
        assert not torch.allclose(plain(long_ids), dynamic(long_ids))  # beyond it, the base grows


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    """YaRN is not the identity within the original length (it is a static scaling): dimensions
    that turn more than beta_fast times in L keep their frequency, those turning fewer than
    beta_slow times are divided by the factor, and attention is sharpened by 0.1·ln(s) + 1."""
    head_dim, theta, scaling = 64, 10000.0, {**SCALINGS["yarn"], "original_max_position_embeddings": 2048}
    plain, yarn = default_inv_freq(head_dim, theta), yarn_inv_freq(head_dim, theta, scaling)
    rotations = 2048 * plain / (2 * math.pi)
    fast, slow = rotations > 32, rotations < 1
    assert fast.any() and slow.any()
    assert torch.equal(yarn[fast], plain[fast])
    assert torch.allclose(yarn[slow], plain[slow] / 4.0, rtol=1e-12)
    assert rope_inv_freq(head_dim, theta, scaling)[1] == pytest.approx(0.1 * math.log(4.0) + 1)


def test_linear_divides_every_frequency():
    inv_freq, attention_factor = rope_inv_freq(16, 500.0, SCALINGS["linear"])
    assert torch.allclose(inv_freq * 4.0, default_inv_freq(16, 500.0)) and attention_factor == 1.0


# --- parity with transformers, the KV cache --------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_logits_match_transformers_beyond_the_original_length(tmp_path, kind, qk_norm):
    model = tiny_model(SCALINGS[kind], qk_norm=qk_norm, tie_word_embeddings=not qk_norm)
    ids = torch.randint(0, 64, (2, 3 * TRAINED + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (TRAINED, ids.shape[1]):  # a fresh transformers model each time: its dynamic NTK is stateful
            hf = transformers_model(model, tmp_path)
            diff = (model(ids[:, :length]) - hf(ids[:, :length]).logits).abs().max().item()
            assert diff <= 1e-4, (kind, length, diff)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_kv_cache_decode_matches_full_forward(kind):
    model = tiny_model(SCALINGS[kind])
    ids = torch.randint(0, 64, (1, 3 * TRAINED), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        steps = [model(ids[:, :TRAINED - 4], cache)]
        steps += [model(ids[:, t:t + 1], cache) for t in range(TRAINED - 4, ids.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_per_row_positions_match_the_shared_path(kind):
    """Continuous batching passes each row's positions; dynamic NTK then counts the longest row."""
    model = tiny_model(SCALINGS[kind])
    ids = torch.randint(0, 64, (2, 3 * TRAINED), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(3 * TRAINED).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(model(ids, positions=positions), model(ids), atol=1e-5)


def test_dynamic_kv_cache_decode_matches_transformers_generate(tmp_path):
    """Dynamic NTK's frequencies follow the current length, so cached keys keep the frequencies of
    the step that computed them: decoding differs from one full forward past the original length,
    exactly as in transformers, and step by step it matches transformers' cached decode."""
    model = tiny_model(SCALINGS["dynamic"])
    hf = transformers_model(model, tmp_path)
    ids = torch.randint(0, 64, (1, 2 * TRAINED), generator=torch.Generator().manual_seed(3))
    prefill = TRAINED - 2
    with torch.no_grad():
        cache = model.new_cache(1)
        ours = [model(ids[:, :prefill], cache)]
        out = hf(ids[:, :prefill], use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        for t in range(prefill, ids.shape[1]):
            ours.append(model(ids[:, t:t + 1], cache))
            out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            theirs.append(out.logits)
            past = out.past_key_values
        ours, theirs = torch.cat(ours, dim=1), torch.cat(theirs, dim=1)
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert torch.allclose(ours[:, :TRAINED], model(ids[:, :TRAINED]), atol=1e-5)  # within: as full forward


# --- loading a checkpoint with a longer context ------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A model trained (here: initialised) at TRAINED tokens, with a tokenizer."""
    root = tmp_path_factory.mktemp("rope-ckpt")
    text = "the king and the queen walk by the river under the green light of morning. "
    tokenizer = train_tokenizer([text * 4] * 3, "bpe", 300)
    tokenizer.save(root / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=TRAINED, rope_theta=500.0,
                                    initializer_range=0.3))
    (root / "ckpt").mkdir()
    write_model_files(root / "ckpt", model, {"stage": "pretrain"}, tokenizer_dir=root / "tok")
    return root / "ckpt"


def test_language_model_runs_beyond_the_trained_length(checkpoint):
    from acornlm.infer.api import LanguageModel

    lm = LanguageModel.from_checkpoint(checkpoint, device="cpu", rope_scaling={"rope_type": "yarn", "factor": 4})
    assert lm.config.max_position_embeddings == 4 * TRAINED
    assert lm.config.rope_scaling["original_max_position_embeddings"] == TRAINED
    ids = torch.randint(0, 300, (1, 3 * TRAINED))
    assert lm.model(ids).shape == (1, 3 * TRAINED, 300)
    plain = LanguageModel.from_checkpoint(checkpoint, device="cpu", max_position_embeddings=2 * TRAINED)
    assert plain.config.rope_scaling is None and plain.config.max_position_embeddings == 2 * TRAINED


def test_generate_command_takes_rope_scaling(checkpoint, capsys):
    from acornlm import cli
    from acornlm.tokenizer import load_tokenizer

    prompt = "the king and the queen walk by the river, the stone and the sword " * 4
    assert len(load_tokenizer(checkpoint).encode(prompt)) > TRAINED  # runs past the trained length
    cli.main(["generate", "--ckpt", str(checkpoint), "--prompt", prompt, "--max_new_tokens", "8",
              "--temperature", "0", "--device", "cpu",
              "--rope_scaling", '{"rope_type": "dynamic", "factor": 4}'])
    assert capsys.readouterr().out.startswith(prompt)


def test_serve_and_chat_take_rope_scaling(checkpoint, monkeypatch):
    """The server's engine and the chat command load the model with its context extended."""
    import io

    from acornlm.cli.chat import chat
    from acornlm.serve.server import load_engine

    scaling = {"rope_type": "yarn", "factor": 4}
    engine = load_engine(checkpoint, device="cpu", max_batch=1, rope_scaling=scaling)
    assert engine.context_length == 4 * TRAINED and engine.model.config.rope_scaling["rope_type"] == "yarn"
    loaded = []
    monkeypatch.setattr("acornlm.cli.chat.run_chat", lambda lm, *args: loaded.append(lm))
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))
    chat(ckpt=str(checkpoint), device="cpu", rope_scaling=scaling, max_position_embeddings=3 * TRAINED)
    assert loaded[0].config.max_position_embeddings == 3 * TRAINED


def test_model_config_from_command_line_and_yaml(tmp_path, capsys):
    from acornlm import cli

    scaling = '{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64}'
    with pytest.raises(SystemExit):
        cli.main(["train", "pretrain", "--config", "tiny", "--model.rope_scaling", scaling, "--print_config"])
    assert "rope_type: yarn" in capsys.readouterr().out
    (tmp_path / "run.yaml").write_text("model:\n  rope_scaling:\n    rope_type: linear\n    factor: 2\n")
    with pytest.raises(SystemExit):
        cli.main(["train", "pretrain", "--config", "tiny", "--config", str(tmp_path / "run.yaml"), "--print_config"])
    assert "rope_type: linear" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "pretrain", "--config", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                  "--model.rope_scaling", '{"rope_type": "yarn", "factor": 4}'])
    assert exit_info.value.code == 2 and "original_max_position_embeddings" in capsys.readouterr().err


BAD = {
    "unknown type": ({"rope_type": "longrope", "factor": 2.0}, "rope_type='longrope'"),
    "factor below one": ({"rope_type": "linear", "factor": 0.5}, "factor must be a number in \\[1, 1024\\]"),
    "infinite factor": ({"rope_type": "linear", "factor": float("inf")}, "factor must be a number in"),
    "nan factor": ({"rope_type": "yarn", "factor": float("nan"), "original_max_position_embeddings": 8},
                   "factor must be a number in"),
    "infinite mscale": ({**SCALINGS["yarn"], "mscale": float("inf")}, "mscale must be a positive finite number"),
    "missing factor": ({"rope_type": "linear"}, "needs factor"),
    "missing original": ({"rope_type": "yarn", "factor": 4.0}, "needs original_max_position_embeddings"),
    "unknown key": ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8, "beta_fast": 4},
                    "unknown keys \\['beta_fast'\\]"),
    "betas reversed": ({**SCALINGS["yarn"], "beta_fast": 1, "beta_slow": 32}, "beta_fast=1.0 must be >= beta_slow"),
    "not a dict": ("yarn", "must be a dict"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rope_scaling_is_refused_by_name(case):
    scaling, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        tiny_model(scaling)


def test_learned_positions_cannot_be_scaled():
    with pytest.raises(ConfigError, match="rope_scaling needs position=rope"):
        tiny_model(SCALINGS["linear"], position="learned", norm="layernorm", mlp="gelu")


def test_old_type_key_and_default_are_understood():
    assert tiny_model({"type": "linear", "factor": 2}).config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert tiny_model({"rope_type": "default"}).config.rope_scaling is None


# --- export and import ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_export_to_transformers_and_import_back(tmp_path, checkpoint, kind):
    pytest.importorskip("transformers")
    from acornlm.export.hf import export_hf
    from acornlm.export.hf_import import import_hf
    from acornlm.infer.api import LanguageModel
    from acornlm.model.checkpoint import load_model

    lm = LanguageModel.from_checkpoint(checkpoint, device="cpu", rope_scaling={"rope_type": kind, "factor": 4})
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    write_model_files(scaled, lm.model, {"stage": "pretrain"}, tokenizer_dir=checkpoint)
    summary = export_hf(scaled, tmp_path / "hf")
    assert summary["verification"]["logits_max_abs_diff"] <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == config["rope_parameters"]["rope_type"] == kind
    assert config["rope_parameters"]["rope_theta"] == 500.0
    # transformers' dynamic NTK counts from max_position_embeddings; YaRN names its original length
    assert config["max_position_embeddings"] == (TRAINED if kind == "dynamic" else 4 * TRAINED)

    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert read_checkpoint_config(imported)["model"]["rope_scaling"] == lm.config.rope_scaling
    model, _ = load_model(imported)
    assert model.config.max_position_embeddings == 4 * TRAINED
    ids = torch.randint(0, 300, (1, 3 * TRAINED))
    with torch.no_grad():
        assert torch.allclose(model(ids), lm.model(ids), atol=1e-5)


def test_import_refuses_other_scalings_by_name(tmp_path):
    from acornlm.export.hf_import import import_hf

    (tmp_path / "hf").mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope'"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_gguf_metadata_and_refusal(tmp_path, checkpoint):
    gguf = pytest.importorskip("gguf")
    from acornlm.export.gguf import export_gguf
    from acornlm.infer.api import LanguageModel

    def scaled_checkpoint(name: str, scaling: dict) -> Path:
        lm = LanguageModel.from_checkpoint(checkpoint, device="cpu", rope_scaling=scaling)
        (tmp_path / name).mkdir()
        write_model_files(tmp_path / name, lm.model, {"stage": "pretrain"}, tokenizer_dir=checkpoint)
        return tmp_path / name

    out = export_gguf(scaled_checkpoint("yarn", {"rope_type": "yarn", "factor": 4, "beta_fast": 16}),
                      tmp_path / "yarn.gguf", type="f32")
    fields = gguf.GGUFReader(out).fields
    values = {key: fields[f"llama.rope.scaling.{key}"].contents()
              for key in ("type", "factor", "original_context_length", "yarn_beta_fast", "yarn_beta_slow")}
    assert values == {"type": "yarn", "factor": 4.0, "original_context_length": TRAINED,
                      "yarn_beta_fast": 16.0, "yarn_beta_slow": 1.0}
    assert fields["llama.context_length"].contents() == 4 * TRAINED
    with pytest.raises(ConfigError, match="no dynamic NTK"):
        export_gguf(scaled_checkpoint("dynamic", {"rope_type": "dynamic", "factor": 4}), tmp_path / "dyn.gguf")
