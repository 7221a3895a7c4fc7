"""LoRA: only adapters train, non-square layers work, merge keeps the function, PEFT files load in peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import acornlm
from acornlm.errors import CheckpointError, ConfigError
from acornlm.infer.api import LanguageModel
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model
from acornlm.model.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_layers,
    merge_lora,
    parameter_counts,
    save_adapter,
    write_lora_checkpoint,
)
from acornlm.tokenizer import train_tokenizer
from acornlm.train.trainer import seed_everything

VOCAB = 48
ALL_SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(**overrides) -> Transformer:
    seed_everything(0)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rope_theta=10000.0)
    return Transformer(ModelConfig(**(fields | overrides)))


def tokens(seed: int = 1, batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_a_few_steps(model: Transformer, steps: int = 3, always: int | None = None) -> None:
    """A few AdamW steps on random tokens (or, with `always`, towards always predicting that id)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = tokens(seed=step)
        y = x[:, 1:] if always is None else torch.full_like(x[:, 1:], always)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_only_adapters_train_and_non_square_layers_are_adapted():
    model = tiny_model()
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        before = model(tokens())
    wrapped = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL_SEVEN))
    assert len(wrapped) == 2 * 7 and all(isinstance(m, LoraLinear) for m in lora_layers(model).values())
    with torch.no_grad():  # B = 0: the adapted model starts as exactly the base model
        assert torch.equal(model(tokens()), before)

    down = model.model.layers[0].mlp.down_proj  # 48 -> 32, not square
    assert down.lora_A.weight.shape == (4, 48) and down.lora_B.weight.shape == (32, 4)
    assert not torch.all(down.lora_A.weight == 0) and torch.all(down.lora_B.weight == 0)
    trainable, total = parameter_counts(model)
    per_layer = 4 * (32 + 32) * 2 + 4 * (32 + 16) * 2 + 4 * (32 + 48) * 2 + 4 * (48 + 32)  # q,o k,v gate,up down
    assert trainable == 2 * per_layer
    assert total == model.num_params()
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())

    train_a_few_steps(model)
    after = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(after[name], tensor), f"{name} changed but is frozen"
    assert all(not torch.all(layer.lora_B.weight == 0) for layer in lora_layers(model).values())


def test_all_targets_every_block_linear_layer_but_not_the_head():
    model = tiny_model(tie_word_embeddings=False)
    wrapped = apply_lora(model, LoraConfig(rank=2))
    assert len(wrapped) == 14 and "lm_head" not in wrapped


def test_targets_that_match_nothing_name_the_existing_layers():
    with pytest.raises(ConfigError) as error:
        apply_lora(tiny_model(), LoraConfig(rank=4, targets="q_proj,qkv"))
    message = str(error.value)
    assert "qkv" in message and all(name in message for name in ALL_SEVEN.split(","))
    with pytest.raises(ConfigError, match="gate_proj"):  # the GPT-2 family has no gate projection
        apply_lora(tiny_model(mlp="gelu", norm="layernorm", position="learned"), LoraConfig(rank=4, targets=ALL_SEVEN))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        apply_lora(tiny_model(), LoraConfig(rank=4, targets="lm_head"))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=-1)


def test_merge_gives_the_same_logits():
    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=ALL_SEVEN))
    train_a_few_steps(model)
    x = tokens(seed=9)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=2e-5)
    assert torch.equal(merged.argmax(-1), unmerged.argmax(-1))


def test_adapter_files_follow_the_peft_layout(tmp_path):
    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1, targets="q_proj,down_proj"))
    save_adapter(model, tmp_path, base_model_name_or_path="runs/base")
    config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == ["down_proj", "q_proj"]
    assert config["base_model_name_or_path"] == "runs/base"
    weights = load_file(tmp_path / ADAPTER_WEIGHTS_FILE)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert weights["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert len(weights) == 2 * 2 * 2


def lora_checkpoint(tmp_path) -> tuple[Transformer, object]:
    """A trained LoRA model saved the way the Trainer saves it, plus a char tokenizer."""
    tokenizer = train_tokenizer(["abcdefghijklmnopqrstuvwxyz .,!?"], kind="char", vocab_size=VOCAB)
    tokenizer.save(tmp_path / "tok")
    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=ALL_SEVEN))
    train_a_few_steps(model, steps=15, always=tokenizer.token_to_id("z"))  # the adapter learns to say "zzz"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_lora_checkpoint(ckpt, model, info={"init": "runs/base"}, tokenizer_dir=tmp_path / "tok")
    return model.eval(), tokenizer


def test_checkpoint_holds_the_base_and_generation_works_unmerged(tmp_path):
    from acornlm.cli.finetune import lora_merge
    from acornlm.model.lora import load_model_with_adapter

    model, tokenizer = lora_checkpoint(tmp_path)
    base, _ = load_model(tmp_path / "ckpt")  # model.safetensors is the untouched base
    reference = tiny_model()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in reference.state_dict().items())

    loaded, _ = load_model_with_adapter(tmp_path / "ckpt")
    x = tokens(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not any(p.requires_grad for p in loaded.parameters())

    lora_merge(ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "merged"))
    merged, info = load_model(tmp_path / "merged")
    assert not (tmp_path / "merged" / ADAPTER_CONFIG_FILE).exists() and info["merged_from"]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=2e-5)

    greedy = dict(max_new_tokens=12, temperature=0.0)
    unmerged_text = LanguageModel(loaded, tokenizer).generate("abc", **greedy)
    assert unmerged_text == LanguageModel(merged, tokenizer).generate("abc", **greedy)
    assert unmerged_text == "z" * 12 != LanguageModel(base, tokenizer).generate("abc", **greedy)
    # acornlm.load (used by generate, chat, serve and eval) applies the adapter too
    assert acornlm.load(tmp_path / "ckpt", device="cpu").generate("abc", **greedy) == unmerged_text

    with pytest.raises(ConfigError, match="not empty"):
        lora_merge(ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "merged"))
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        lora_merge(ckpt=str(tmp_path / "merged"), out=str(tmp_path / "again"))


def test_a_damaged_adapter_is_a_checkpoint_error(tmp_path):
    from acornlm.model.lora import load_model_with_adapter

    lora_checkpoint(tmp_path)
    config_file = tmp_path / "ckpt" / ADAPTER_CONFIG_FILE
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_with_adapter(tmp_path / "ckpt")
    config_file.write_text("{")
    with pytest.raises(CheckpointError, match="not a LoRA adapter config"):
        load_model_with_adapter(tmp_path / "ckpt")


def test_peft_loads_the_adapter_onto_the_hugging_face_model(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    model, _ = lora_checkpoint(tmp_path)
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    hf_model = transformers.LlamaForCausalLM(hf_config)
    base, _ = load_model(tmp_path / "ckpt")
    missing, unexpected = hf_model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    peft_model = PeftModel.from_pretrained(hf_model.eval(), str(tmp_path / "ckpt")).eval()
    x = tokens(seed=5)
    with torch.no_grad():
        expected = model(x)
        got = peft_model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), peft_model.disable_adapter():
        without_adapter = peft_model(input_ids=x).logits
    assert (without_adapter - expected).abs().max() > 1e-3  # the adapter really contributes
