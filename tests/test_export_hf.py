"""`acornlm export hf`: parity with transformers for every architecture, refusals, atomic output, dtypes, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from acornlm import cli
from acornlm.errors import CheckpointError, ConfigError
from acornlm.export import hf as hf_export
from acornlm.export.hf import (
    VerificationError,
    architecture_problems,
    choose_architecture,
    explain_greedy_difference,
    export_hf,
    read_special_tokens,
    stop_token_ids,
    transformers_available,
)
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.tokenizer import train_tokenizer
from acornlm.tokenizer.chat_template import render_text

needs_transformers = pytest.mark.skipif(not transformers_available(), reason="pip install 'acornlm[export]'")

TEXT = "Once upon a time, in a quiet town by the sea, there lived a cat who liked the king and the queen. "
FAMILIES = {
    # Llama: grouped-query attention, tied embeddings
    "llama_gqa_tied": dict(num_key_value_heads=2),
    # Llama: untied head, biases everywhere, a vocabulary padded past the tokenizer's
    "llama_untied_bias": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, extra_vocab=12),
    # Qwen3: QK-norm, GQA, untied, head_dim != hidden / heads
    "qwen3_gqa_untied": dict(num_key_value_heads=2, qk_norm=True, tie_word_embeddings=False, head_dim=16),
    # GPT-2 with biases
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", attention_bias=True, mlp_bias=True,
                 norm_eps=1e-5),
    # nanoGPT-style GPT-2: no biases at all and an MLP width GPT-2 would not guess (n_inner)
    "gpt2_nobias": dict(position="learned", norm="layernorm", mlp="gelu", norm_bias=False, norm_eps=1e-5,
                        intermediate_size=48),
    # MoE (tests/test_moe.py has the rest): a gated shared expert (MiniMind2-MoE's layout), GQA
    "qwen2_moe_shared": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             num_shared_experts=1, shared_expert_intermediate_size=40),
    # QK-norm, no shared expert, top-k weights not renormalised, untied
    "qwen3_moe": dict(qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      norm_topk_prob=False, tie_word_embeddings=False),
    # no QK-norm, no shared expert, renormalised top-k: Mixtral
    "mixtral": dict(num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16),
}
EXPECTED_CLASS = {"llama_gqa_tied": "LlamaForCausalLM", "llama_untied_bias": "LlamaForCausalLM",
                  "qwen3_gqa_untied": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "gpt2_nobias": "GPT2LMHeadModel",
                  "qwen2_moe_shared": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([TEXT * 3, "the king and the queen walk by the river"] * 3, "bpe", 300).save(directory)
    return directory


def tiny_config(vocab_size: int, extra_vocab: int = 0, **fields) -> ModelConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, rope_theta=5000.0, initializer_range=0.3)
    return ModelConfig(vocab_size=vocab_size + extra_vocab, **{**base, **fields})


def make_checkpoint(directory: Path, tokenizer_dir: Path, seed: int = 0, stage: str = "pretrain",
                    edit=None, **fields) -> Path:
    """A checkpoint whose every weight (norm gains and biases included) is random, so a misplaced tensor shows."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(300, **fields))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        if edit is not None:
            edit(model)
    directory.mkdir(parents=True)
    info = {"stage": stage, "data": "data/demo", "step": 10, "tokens_seen": 12345, "val_loss": 3.25}
    write_model_files(directory, model, info, tokenizer_dir=tokenizer_dir)
    return directory


def hf_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits


def acornlm_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    from acornlm.model.checkpoint import load_model

    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model(ids)


@needs_transformers
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_matches_transformers(tmp_path, tokenizer_dir, family):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, **FAMILIES[family])
    summary = export_hf(ckpt, tmp_path / "hf")
    check = summary["verification"]
    assert summary["architecture"] == EXPECTED_CLASS[family]
    assert check["logits_max_abs_diff"] <= 1e-4
    assert check["greedy"] == "identical" and check["greedy_tokens"] > 0

    # independently of the built-in check: the whole context (every position's RoPE / embedding) agrees
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    assert (hf_logits(tmp_path / "hf", ids) - acornlm_logits(ckpt, ids)).abs().max().item() <= 1e-4

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [EXPECTED_CLASS[family]]
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == 0
    assert config["tie_word_embeddings"] == FAMILIES[family].get("tie_word_embeddings", True)
    if EXPECTED_CLASS[family] == "GPT2LMHeadModel":
        assert config["n_ctx"] == config["n_positions"] == 64
    else:
        assert config["rope_theta"] == 5000.0 and "rope_scaling" in config
        assert config["head_dim"] == FAMILIES[family].get("head_dim", 8)
    assert "greedy continuation of" in (tmp_path / "hf" / "README.md").read_text()
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_max_length"] == 64


@needs_transformers
def test_tokenizer_chat_template_and_model_card(tmp_path, tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, stage="sft")
    export_hf(ckpt, tmp_path / "hf", verify=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_text(messages)
    # the exported template is the one with tools and thinking
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    agentic = [{"role": "user", "content": "hello"},
               {"role": "assistant", "content": "", "reasoning_content": "hm",
                "tool_calls": [{"name": "f", "arguments": {"x": 1}}]},
               {"role": "tool", "content": "2"}]
    assert tokenizer.apply_chat_template(agentic, tools=tools, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False) \
        == render_text(agentic, tools, add_generation_prompt=True, enable_thinking=False)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]  # a chat model also stops at <|im_end|>
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "12,345" in card and "3.2500" in card and "not verified" in card


def test_base_model_stops_only_at_end_of_text(tmp_path, tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    special = read_special_tokens(ckpt)
    assert (special.bos, special.eos, special.pad, special.im_end) == (0, 0, 0, 2)
    assert stop_token_ids(special, {"stage": "pretrain"}) == [0]
    assert stop_token_ids(special, {"stage": "sft"}) == [0, 2]


REFUSALS = {
    "gpt2_rmsnorm": (dict(position="learned", norm="rmsnorm", mlp="gelu"), "GPT-2 uses LayerNorm"),
    "gpt2_untied": (dict(position="learned", norm="layernorm", mlp="gelu", tie_word_embeddings=False),
                    "always ties"),
    "gpt2_gqa": (dict(position="learned", norm="layernorm", mlp="gelu", num_key_value_heads=2), "grouped-query"),
    "gpt2_swiglu": (dict(position="learned", norm="layernorm", mlp="swiglu"), "GELU feed-forward"),
    "rope_layernorm": (dict(norm="layernorm", mlp="gelu"), "Llama/Qwen3 use RMSNorm"),
    "swiglu_layernorm": (dict(norm="layernorm"), "Llama/Qwen3 use RMSNorm"),
    "llama_gelu": (dict(mlp="gelu"), "SwiGLU"),
    "qwen3_mlp_bias": (dict(qk_norm=True, mlp_bias=True), "Qwen3's feed-forward has no biases"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unrepresentable_models_are_refused_before_writing(tmp_path, tokenizer_dir, case):
    fields, reason = REFUSALS[case]
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, **fields)
    with pytest.raises(ConfigError, match=reason):
        export_hf(ckpt, tmp_path / "hf", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_moe_without_an_exact_class_is_refused():
    config = tiny_config(300, num_experts=4, moe_intermediate_size=16)
    assert any("mixture-of-experts" in p for p in architecture_problems(config)["LlamaForCausalLM"])
    assert choose_architecture(config) == "MixtralForCausalLM"
    # QK-norm with a shared expert: Qwen2-MoE has no QK-norm and Qwen3-MoE no shared expert
    config = tiny_config(300, num_experts=4, moe_intermediate_size=16, num_shared_experts=1, qk_norm=True)
    with pytest.raises(ConfigError, match="Qwen2-MoE has no QK-norm.*Qwen3-MoE has no shared expert"):
        choose_architecture(config)
    config = tiny_config(300, num_experts=4, moe_intermediate_size=16, norm_topk_prob=False)
    with pytest.raises(ConfigError, match="Mixtral always renormalises"):
        choose_architecture(config)
    assert choose_architecture(tiny_config(300)) == "LlamaForCausalLM"


def test_existing_output_needs_force(tmp_path, tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--force"):
        export_hf(ckpt, out, verify=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_hf(ckpt, out, verify=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="overlaps"):  # --force must never delete the checkpoint itself
        export_hf(ckpt, tmp_path, verify=False, force=True)
    assert (ckpt / "model.safetensors").is_file()


@needs_transformers
def test_failed_verification_leaves_nothing(tmp_path, tokenizer_dir, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    real = hf_export.weights_to_hf

    def off_by_a_little(state, config, architecture):
        out = real(state, config, architecture)
        out["model.norm.weight"] = out["model.norm.weight"] * 1.01
        return out

    monkeypatch.setattr(hf_export, "weights_to_hf", off_by_a_little)
    with pytest.raises(VerificationError, match="logits differ"):
        export_hf(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temporary folder


def test_greedy_divergence_is_accepted_only_at_a_near_tie(tokenizer_dir):
    torch.manual_seed(0)
    model = Transformer(tiny_config(300, tie_word_embeddings=False)).eval()
    prompt = [0, 5, 9]
    with torch.no_grad():
        best = model(torch.tensor([prompt]))[0, -1].argmax().item()
        other = (best + 1) % 300
        with pytest.raises(VerificationError, match="diverges"):
            explain_greedy_difference(model, prompt, [best], [other])
        model.lm_head.weight[other] = model.lm_head.weight[best]  # an exact tie between two tokens
        assert "near-tie" in explain_greedy_difference(model, prompt, [best], [other])


@needs_transformers
def test_bfloat16_export(tmp_path, tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary weights: no precision warning
        summary = export_hf(ckpt, tmp_path / "hf", dtype="bfloat16")
    assert summary["verification"]["logits_max_abs_diff"] <= 1e-4  # same (rounded) weights on both sides
    assert 0 < summary["dtype_loss"]["max_weight_error"] < 1e-2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}


def test_lossy_dtype_warns_with_the_error(tmp_path, tokenizer_dir):
    def huge_unused_embedding(model):
        model.model.embed_tokens.weight[-1] = 1000.3  # a padded id the prompt never uses
        model.model.embed_tokens.weight[-2] = 1e6  # beyond float16's largest value (65504)

    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, tie_word_embeddings=False, extra_vocab=4,
                           edit=huge_unused_embedding)
    with pytest.warns(UserWarning, match=r"bfloat16 changes the weights by up to [0-9.]+ \(in model.embed_tokens"):
        export_hf(ckpt, tmp_path / "bf16", dtype="bfloat16", verify=False)
    with pytest.warns(UserWarning, match="overflow to inf.*float32 or bfloat16"):
        summary = export_hf(ckpt, tmp_path / "f16", dtype="float16", verify=False)
    assert summary["dtype_loss"]["overflowed"] == 32  # the 1e6 row: hidden_size values


def test_unknown_dtype_and_missing_tokenizer(tmp_path, tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    with pytest.raises(ConfigError, match="float32, bfloat16, float16"):
        export_hf(ckpt, tmp_path / "hf", dtype="int8")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        export_hf(ckpt, tmp_path / "hf", verify=False)
    assert not (tmp_path / "hf").exists()


def cli_main(argv: list[str], monkeypatch) -> None:
    """Run `acornlm ...` with the export commands registered (whether or not the lead has yet)."""
    from acornlm.cli import export, importing

    registered = cli.build_commands
    monkeypatch.setattr(cli, "build_commands", lambda: {
        **registered(), "export": {"hf": export.hf, "gguf": export.gguf}, "import": {"hf": importing.hf}})
    cli.main(argv)


@needs_transformers
def test_cli(tmp_path, tokenizer_dir, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    cli_main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")], monkeypatch)
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "verified with transformers" in printed and "identical" in printed
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")], monkeypatch)
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    cli_main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--force", "--verify", "false",
              "--dtype", "bfloat16"], monkeypatch)
    assert "not verified" in capsys.readouterr().out
    assert "not verified" in (tmp_path / "hf" / "README.md").read_text()
    with pytest.raises(SystemExit):
        cli_main(["export", "hf", "--ckpt", str(ckpt)], monkeypatch)
    assert "--out is required" in capsys.readouterr().err


def test_model_card_describes_experts_and_rope_scaling():
    from acornlm.export.model_card import architecture_rows

    moe = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, num_shared_experts=1,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512})
    rows = dict(architecture_rows(moe, "Qwen2MoeForCausalLM", 1000))
    assert rows["feed-forward"] == ("mixture of experts: 4 SwiGLU experts (48 wide), top-2 per token"
                                    " + 1 gated shared expert (48 wide)")
    assert rows["positions"] == "RoPE, theta 1e+06, yarn scaling x4 (trained at 512 tokens)"
