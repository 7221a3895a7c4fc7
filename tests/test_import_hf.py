"""`acornlm import hf`: small random transformers models (built here, never downloaded) become acornlm
checkpoints with the same logits; export -> import -> export is lossless; unsupported options are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import acornlm
from acornlm.errors import CheckpointError, ConfigError
from acornlm.export.hf import export_hf
from acornlm.export.hf_import import import_hf
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint, write_model_files
from acornlm.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers", reason="these tests build models with transformers")

VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
MOE_SHAPE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                 mlp_only_layers=[])
GPT2_SHAPE = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48,
                  bos_token_id=0, eos_token_id=0)
HF_MODELS = {  # name: (config class, model class, config fields)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(SHAPE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rope_theta=5000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SHAPE, sliding_window=None, rope_theta=20000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SHAPE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SHAPE, head_dim=16, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(GPT2_SHAPE, activation_function="gelu_new")),
    # mixture of experts (every layer sparse); Qwen2-MoE with q/k/v biases, and without (acornlm's layout)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(SHAPE, **MOE_SHAPE, shared_expert_intermediate_size=40,
                                                                norm_topk_prob=True)),
    "qwen2_moe_nobias": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(SHAPE, **MOE_SHAPE, qkv_bias=False,
                                                                       shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(SHAPE, **MOE_SHAPE, head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SHAPE, intermediate_size=24, num_local_experts=3,
                                                            num_experts_per_tok=2, sliding_window=None)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    text = "Once upon a time, in a quiet town by the sea, the king and the queen walk by the river. "
    train_tokenizer([text * 3] * 3, "bpe", VOCAB).save(directory)
    return directory


def save_hf_model(name: str, directory: Path, tokenizer_dir: Path | None = None, seed: int = 0, **save_options):
    """A random transformers model (every weight random, norms and biases included) saved with save_pretrained."""
    config_class, model_class, fields = HF_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.dim() == 1 and param.mean() == 1 else 0.0))
    model.save_pretrained(str(directory), **save_options)
    if tokenizer_dir is not None:
        for file in tokenizer_dir.iterdir():
            shutil.copyfile(file, directory / file.name)
    return model


def random_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(7))


def max_logits_diff(hf_model, ckpt: Path) -> float:
    ours, _ = load_model(ckpt)
    ids = random_ids()
    with torch.no_grad():
        return (hf_model(ids, attention_mask=torch.ones_like(ids)).logits - ours(ids)).abs().max().item()


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_import_matches_transformers(tmp_path, tokenizer_dir, name):
    hf_model = save_hf_model(name, tmp_path / "hf", tokenizer_dir)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert max_logits_diff(hf_model, ckpt) <= 1e-4
    info = read_checkpoint_config(ckpt)
    assert info["source"]["architecture"] == HF_MODELS[name][1]
    assert info["tokenizer"]["vocab_size"] == VOCAB  # acornlm can use the tokenizer: it is recorded
    if name == "llama":  # the checkpoint works in acornlm itself
        text = acornlm.load(ckpt, device="cpu").generate("the king", max_new_tokens=5, temperature=0.0)
        assert isinstance(text, str)


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "qwen3", "qwen2_moe_nobias", "qwen3_moe", "mixtral"])
def test_import_export_import_is_lossless(tmp_path, tokenizer_dir, name):
    save_hf_model(name, tmp_path / "hf", tokenizer_dir, seed=1)
    first = import_hf(tmp_path / "hf", tmp_path / "ckpt1")
    summary = export_hf(first, tmp_path / "hf2")  # verified against transformers
    assert summary["verification"]["logits_max_abs_diff"] <= 1e-4
    # Qwen2 (biases on q/k/v only) becomes Llama with a zero o_proj bias: the same computation
    assert summary["architecture"] == {"qwen2": "LlamaForCausalLM"}.get(name, HF_MODELS[name][1])
    original, exported = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(
        str(tmp_path / "hf2" / "model.safetensors"))
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    def eos(folder: str):
        return json.loads((tmp_path / folder / "generation_config.json").read_text())["eos_token_id"]

    assert eos("hf2") == eos("hf")  # the model's own end-of-generation ids survive the trip
    second = import_hf(tmp_path / "hf2", tmp_path / "ckpt2")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_checkpoint_config(first)["model"] == read_checkpoint_config(second)["model"]


def test_export_import_export_of_a_bias_free_gpt2(tmp_path, tokenizer_dir):
    """nanoGPT-style (no biases): exported with zero biases, imported with them, re-exported identically."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, norm="layernorm", mlp="gelu",
                         position="learned", norm_bias=False, attention_bias=False, mlp_bias=False,
                         initializer_range=0.3)
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", Transformer(config), {"stage": "pretrain"}, tokenizer_dir=tokenizer_dir)
    export_hf(tmp_path / "ckpt", tmp_path / "hf1", verify=False)
    import_hf(tmp_path / "hf1", tmp_path / "ckpt2")
    export_hf(tmp_path / "ckpt2", tmp_path / "hf2", verify=False)
    a, b = load_file(str(tmp_path / "hf1" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hf1" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf2" / "config.json").read_text())


def test_sharded_safetensors_and_missing_shard(tmp_path):
    hf_model = save_hf_model("llama", tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert max_logits_diff(hf_model, ckpt) <= 1e-4
    (tmp_path / "hf" / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shards[-1]}"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt2")
    assert not (tmp_path / "ckpt2").exists()


class NotATensor:
    """Anything pickle can carry besides tensors; torch.load(weights_only=True) must refuse it."""


def test_pytorch_bin_is_read_without_running_code(tmp_path):
    hf_model = save_hf_model("gpt2", tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.warns(UserWarning):
        ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert max_logits_diff(hf_model, ckpt) <= 1e-4
    torch.save({"transformer.wte.weight": NotATensor()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt2")
    assert not (tmp_path / "ckpt2").exists()


def test_foreign_tokenizer_is_copied_with_a_warning_and_reexport_still_verifies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    save_hf_model("qwen3", tmp_path / "hf")
    foreign = Tokenizer(models.BPE(vocab={"<s>": 0, "a": 1, "b": 2, "Ġ": 3}, merges=[]))
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.save(str(tmp_path / "hf" / "tokenizer.json"))
    with pytest.warns(UserWarning, match="not one acornlm can load"):
        ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert (ckpt / "tokenizer.json").is_file() and "tokenizer" not in read_checkpoint_config(ckpt)
    summary = export_hf(ckpt, tmp_path / "hf2")
    assert summary["verification"]["logits_max_abs_diff"] <= 1e-4


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 64}
GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 64, "n_embd": 32,
               "n_layer": 2, "n_head": 4, "n_positions": 64}
REFUSALS = {
    "longrope": ({**LLAMA_CONFIG, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}},
                 "rope_scaling type 'longrope'"),
    "llama3_rope_v5": ({**LLAMA_CONFIG, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
                       "rope_parameters type 'llama3'"),
    "mistral_window": ({**LLAMA_CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 16},
                       "sliding_window=16 < max_position_embeddings=64"),
    "mistral_default_window": ({**LLAMA_CONFIG, "architectures": ["MistralForCausalLM"], "max_position_embeddings": 8192},
                               "sliding_window=4096 < max_position_embeddings=8192"),
    "qwen2_window": ({**LLAMA_CONFIG, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
                     "use_sliding_window"),
    "moe_dense_layers": ({**LLAMA_CONFIG, "architectures": ["Qwen3MoeForCausalLM"], "decoder_sparse_step": 2},
                         "decoder_sparse_step=2"),
    "moe_mlp_only": ({**LLAMA_CONFIG, "architectures": ["Qwen2MoeForCausalLM"], "mlp_only_layers": [0]},
                     r"mlp_only_layers=\[0\]"),
    "mixtral_window": ({**LLAMA_CONFIG, "architectures": ["MixtralForCausalLM"], "sliding_window": 16},
                       "sliding_window=16"),
    "unknown": ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "'BertForMaskedLM' is not supported"),
    "exact_gelu": ({**GPT2_CONFIG, "activation_function": "gelu"}, "activation_function='gelu'"),
    "gelu_llama": ({**LLAMA_CONFIG, "hidden_act": "gelu"}, "hidden_act='gelu'"),
    "quantized": ({**LLAMA_CONFIG, "quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    "no_shape": ({"architectures": ["LlamaForCausalLM"], "vocab_size": 64}, "lacks integer hidden_size"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_configs_are_refused_by_name(tmp_path, case):
    config, reason = REFUSALS[case]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=reason):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        import_hf(tmp_path / "nowhere", tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "vocab_size": }')
    with pytest.raises(CheckpointError, match="line 2"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(CheckpointError, match="holds no weights"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_weights_that_do_not_match_the_config(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.2"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_cli_and_force(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from acornlm import cli
    from acornlm.cli import export, importing

    registered = cli.build_commands
    monkeypatch.setattr(cli, "build_commands", lambda: {
        **registered(), "export": {"hf": export.hf, "gguf": export.gguf}, "import": {"hf": importing.hf}})
    save_hf_model("gpt2", tmp_path / "hf", tokenizer_dir)
    cli.main(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    cli.main(["import", "hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--force"])
    assert not (tmp_path / "ckpt" / "stale.txt").exists() and (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_imported_model_continues_pretraining_from_its_weights(tmp_path, tokenizer_dir, prepared_data, capsys):
    """`train pretrain --init CKPT`: the first step's loss is the imported model's loss on that batch."""
    from conftest import generated_documents

    from acornlm.cli import main
    from acornlm.data.loader import TokenLoader
    from acornlm.data.prepare import prepare_data
    from acornlm.train.losses import next_token_loss

    save_hf_model("qwen3", tmp_path / "hf", tokenizer_dir)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in generated_documents(40, seed=3)), "utf-8")
    data = tmp_path / "data"
    prepare_data(inputs=[corpus], tokenizer_dir=ckpt, out=data, val_fraction=0.1, workers=1)
    train = ["--train.max_steps", "2", "--train.batch_size", "2", "--train.seq_len", "32", "--train.eval_interval",
             "2", "--train.eval_batches", "1", "--train.log_interval", "1", "--train.progress", "false"]
    main(["train", "pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--init", str(ckpt), *train])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    model, _ = load_model(ckpt)
    with torch.no_grad():
        expected = next_token_loss(model, TokenLoader(data, "train", batch_size=2, seq_len=32, seed=1337).batch(0))
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert read_checkpoint_config(resolve_checkpoint(tmp_path / "run"))["init"] == str(ckpt)

    capsys.readouterr()
    with pytest.raises(SystemExit):  # the model comes from the checkpoint: a contradicting option is refused
        main(["train", "pretrain", "--data", str(data), "--out", str(tmp_path / "x"), "--init", str(ckpt),
              "--model.hidden_size", "64", *train])
    assert "--init continues the model saved in" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # token ids of another tokenizer mean nothing to this model
        main(["train", "pretrain", "--data", str(prepared_data), "--out", str(tmp_path / "y"), "--init", str(ckpt),
              *train])
    assert "tokenizer" in capsys.readouterr().err
