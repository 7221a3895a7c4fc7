"""GGUF export: one file that llama.cpp, Ollama and LM Studio load as it is.

A GGUF file holds three things, written here in this order:

1. hyperparameters under llama.cpp's keys for one of its architectures (`llama`, `qwen3`, `gpt2`);
2. the tokenizer: our byte-level BPE vocabulary and merges as llama.cpp's `gpt2` tokenizer model,
   the special tokens as CONTROL tokens, and the ChatML chat template;
3. every weight under llama.cpp's tensor name (`blk.0.attn_q.weight`, ...), as f32, f16 or q8_0.

We write the file directly with the `gguf` package (llama.cpp's own Python library) instead of going
through llama.cpp's `convert_hf_to_gguf.py`, which refuses tokenizers it has not seen before, and
every newly trained BPE tokenizer is one of those.

The one subtle step is RoPE. acornlm (like Hugging Face) rotates the two *halves* of each head
(`rotate_half`, the GPT-NeoX convention). llama.cpp's `qwen3` architecture does the same, but its
`llama` architecture rotates *adjacent pairs* (the original Meta layout). So for `llama` the rows of
the query and key projections are reordered once here (what `convert_hf_to_gguf.py` does for every
Hugging Face Llama), and the model computes exactly the same function in llama.cpp.

Needs the `export` extra: `pip install 'acornlm[export]'`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acornlm.errors import CheckpointError, ConfigError
from acornlm.export.gguf_moe import choose_moe_gguf_architecture, moe_layer_tensors, write_moe_hyperparameters
from acornlm.export.hf import check_output_path
from acornlm.files import atomic_path
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model, resolve_checkpoint
from acornlm.tokenizer import Tokenizer, load_tokenizer
from acornlm.tokenizer.hf_config import read_tokenizer_config

# --type -> (the type of weight matrices, llama.cpp's general.file_type). Norms, biases and
# position embeddings stay f32 whatever the type, as in llama.cpp's converter and quantizer.
FILE_TYPES = ("f32", "f16", "q8_0")
F16_MAX = 65504.0  # the largest finite float16: bigger weights would become inf
Q8_0_BLOCK = 32  # q8_0 stores each row in blocks of 32 values sharing one scale

# acornlm family -> llama.cpp architecture; MoE models map to qwen2moe / qwen3moe (acornlm.export.gguf_moe).
ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3", "gpt2": "gpt2"}
# llama.cpp architectures that load `output.weight` without falling back to token_embd for tied models
OUTPUT_REQUIRED = ("qwen2moe",)
# Config fields of features this exporter does not write yet (MoE).
NOT_YET_EXPORTED = ("num_local_experts", "n_routed_experts", "n_shared_experts")


@dataclass
class GGUFTensor:
    """One tensor under its llama.cpp name, in numpy (row-major) order: a Linear weight is [out, in]."""

    name: str
    data: np.ndarray  # float32
    follows_type: bool  # a weight matrix stored in the file type; False = always f32 (norms, biases)


@dataclass
class Vocabulary:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) tokenizer model describes it."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right", highest priority first
    special_ids: dict[str, int]  # "bos" | "eos" | "pad" | "unk" -> id
    chat_template: str | None


def export_gguf(ckpt: str | Path, out: str | Path, type: str = "f16", force: bool = False) -> Path:
    """Write the checkpoint `ckpt` (checkpoint or run directory) as the GGUF file `out`; returns its path.

    type: "f32" (exact), "f16" (half the size; weights rounded to float16) or "q8_0" (about a quarter
    of the f32 size; weight matrices in 8-bit blocks of 32 with a float16 scale).
    Everything is checked and converted before the file is written, and the file appears only when
    complete (written to a temporary name, then renamed), so a refusal leaves nothing behind.
    """
    gguf = import_gguf()
    if type not in FILE_TYPES:
        raise ConfigError(f"unknown GGUF type {type!r}: choose one of {', '.join(FILE_TYPES)}")
    out = Path(out)
    check_output_path(out, force, file=True)
    ckpt_dir = resolve_checkpoint(ckpt)
    model, info = load_model(ckpt_dir, device="cpu", dtype=torch.float32)
    arch = choose_architecture(model.config)
    vocab = gguf_vocabulary(load_tokenizer(ckpt_dir), model.config.vocab_size, ckpt_dir)
    tensors = [encode_tensor(tensor, type) for tensor in model_tensors(arch, model)]

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(model_name(ckpt_dir, info))
        writer.add_type(gguf.GGUFType.MODEL)
        write_hyperparameters(writer, arch, model.config, type)
        write_vocabulary(writer, vocab)
        for name, data, raw_dtype in tensors:
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return out


def import_gguf() -> Any:
    """The `gguf` package, or a ConfigError saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise ConfigError("GGUF export needs the `gguf` package: pip install 'acornlm[export]' (or pip install gguf)") from exc
    return gguf


def model_name(ckpt_dir: Path, info: dict[str, Any]) -> str:
    """general.name: the run's name (`runs/NAME/checkpoints/step-N` -> NAME), else the directory's."""
    if isinstance(info.get("name"), str):
        return info["name"]
    ckpt_dir = ckpt_dir.resolve()
    if ckpt_dir.parent.name == "checkpoints":
        return ckpt_dir.parent.parent.name
    return ckpt_dir.name


# --- architecture and hyperparameters ---------------------------------------------------------------

def choose_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for `config`, or a ConfigError naming what it cannot represent."""
    if getattr(config, "num_experts", 0):
        problems = rope_scaling_problems(config)
        if problems:
            raise ConfigError(f"cannot export this model to GGUF: {'; '.join(problems)}")
        return choose_moe_gguf_architecture(config)
    for field in NOT_YET_EXPORTED:
        if getattr(config, field, None):
            raise ConfigError(
                f"model.{field}={getattr(config, field)!r}: GGUF export of this feature (MoE / RoPE scaling) "
                "is not implemented yet; export to Hugging Face format instead (acornlm export hf)"
            )
    family = config.family
    arch = ARCHITECTURES[family]
    problems = []
    if family in ("llama", "qwen3"):
        problems += rope_scaling_problems(config)
        if config.norm != "rmsnorm" or config.mlp != "swiglu":
            problems.append(f"llama.cpp's `{arch}` needs norm=rmsnorm and mlp=swiglu "
                            f"(this model has norm={config.norm}, mlp={config.mlp})")
        if family == "qwen3" and (config.attention_bias or config.mlp_bias):
            problems.append("llama.cpp's `qwen3` has no biases on its projections "
                            f"(this model has attention_bias={config.attention_bias}, mlp_bias={config.mlp_bias})")
    else:  # gpt2: learned positions
        if config.norm != "layernorm" or config.mlp != "gelu" or config.qk_norm:
            problems.append("llama.cpp's `gpt2` needs norm=layernorm, mlp=gelu and no qk_norm "
                            f"(this model has norm={config.norm}, mlp={config.mlp}, qk_norm={config.qk_norm})")
        if config.num_attention_heads * config.head_dim != config.hidden_size:
            problems.append(f"llama.cpp's `gpt2` needs num_attention_heads * head_dim == hidden_size "
                            f"({config.num_attention_heads} * {config.head_dim} != {config.hidden_size})")
    if problems:
        raise ConfigError(f"cannot export this model to GGUF: {'; '.join(problems)}. "
                          "Export it to Hugging Face format instead (acornlm export hf)")
    return arch


def rope_scaling_problems(config: ModelConfig) -> list[str]:
    """Why llama.cpp cannot reproduce this model's RoPE scaling exactly ([] = it can, or none is set).

    llama.cpp fixes the RoPE frequencies when it loads the model (no dynamic NTK), computes YaRN's
    attention factor itself as 0.1·ln(s) + 1 and rounds the ramp's ends outwards (truncate=true).
    """
    scaling = config.rope_scaling
    if not scaling:
        return []
    if scaling["rope_type"] == "dynamic":
        return ["llama.cpp has no dynamic NTK RoPE scaling (its frequencies are fixed at load time); "
                "use rope_scaling yarn or linear"]
    custom = [key for key in ("attention_factor", "mscale", "mscale_all_dim") if key in scaling]
    if custom:
        return [f"YaRN with {', '.join(custom)}: llama.cpp computes the attention factor itself as 0.1*ln(factor)+1"]
    if scaling.get("truncate") is False:
        return ["YaRN with truncate=false: llama.cpp rounds the correction range outwards (truncate=true)"]
    return []


def write_rope_scaling(writer: Any, config: ModelConfig) -> None:
    """`{arch}.rope.scaling.*`: type, factor, original context length and YaRN's beta_fast/beta_slow."""
    from gguf import RopeScalingType

    scaling = config.rope_scaling
    if not scaling:
        return
    writer.add_rope_scaling_type(RopeScalingType.YARN if scaling["rope_type"] == "yarn" else RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(scaling["factor"])
    if "original_max_position_embeddings" in scaling:
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    if scaling["rope_type"] == "yarn":
        writer.add_rope_scaling_yarn_beta_fast(scaling.get("beta_fast", 32.0))
        writer.add_rope_scaling_yarn_beta_slow(scaling.get("beta_slow", 1.0))


def write_hyperparameters(writer: Any, arch: str, config: ModelConfig, type: str) -> None:
    """The `{arch}.*` keys llama.cpp reads to build the model, plus general.file_type."""
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    if getattr(config, "num_experts", 0):
        write_moe_hyperparameters(writer, config)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)  # RoPE rotates the whole head
        write_rope_scaling(writer, config)
        writer.add_key_length(config.head_dim)  # head_dim may differ from hidden_size / heads
        writer.add_value_length(config.head_dim)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[type])
    if type == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)


# --- tokenizer --------------------------------------------------------------------------------------

def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int, tokenizer_dir: Path) -> Vocabulary:
    """Our tokenizer as llama.cpp's `gpt2` tokenizer: tokens, types, merges, special ids, chat template.

    The model may have more embedding rows than the tokenizer has tokens (a vocabulary padded to a
    round size); llama.cpp takes its vocabulary size from the token list, so the extra ids become
    UNUSED tokens named [PAD<id>], as llama.cpp's converter names them.
    """
    from gguf import TokenType

    if tokenizer.kind != "bpe":
        raise ConfigError(
            f"the checkpoint's tokenizer is {tokenizer.kind}-level, which GGUF cannot express: llama.cpp's "
            "byte-level BPE tokenizer splits text into UTF-8 bytes and merges them, so a character "
            "vocabulary would need byte tokens and merges the model has no embeddings for. Train a BPE "
            "tokenizer (acornlm tokenizer train --kind bpe), or export to Hugging Face format (acornlm export hf)"
        )
    spec = json.loads(tokenizer.backend.to_str())
    check_gpt2_compatible(spec, tokenizer_dir)
    if vocab_size < tokenizer.vocab_size:
        raise CheckpointError(f"{tokenizer_dir}: the model has {vocab_size} token embeddings but its tokenizer "
                              f"has {tokenizer.vocab_size} tokens")
    added = {token.content: token.special for token in tokenizer.backend.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = tokenizer.id_to_token(token_id) if token_id < tokenizer.vocab_size else None
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(token)
            if token in added:
                types.append(TokenType.CONTROL if added[token] else TokenType.USER_DEFINED)
            else:
                types.append(TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    config = read_tokenizer_config(tokenizer_dir)
    special_ids = {}
    for role in ("bos", "eos", "pad", "unk"):
        token = config.get(f"{role}_token")
        if isinstance(token, dict):  # {"content": "...", ...} in some transformers versions
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            special_ids[role] = tokenizer.token_to_id(token)
    chat_template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
    return Vocabulary(tokens, [int(t) for t in types], merges, special_ids, chat_template)


def check_gpt2_compatible(spec: dict[str, Any], tokenizer_dir: Path) -> None:
    """llama.cpp's `gpt-2` pre-tokenizer splits text like ByteLevel(use_regex=True) without a prefix
    space or normalizer; any other setup would tokenize differently there, so it is refused."""
    pre = spec.get("pre_tokenizer") or {}
    problems = []
    if (spec.get("model") or {}).get("type") != "BPE":
        problems.append(f"model type {(spec.get('model') or {}).get('type')!r} (expected BPE)")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append(f"pre-tokenizer {pre} (expected ByteLevel with use_regex and no prefix space)")
    if spec.get("normalizer") is not None:
        problems.append(f"normalizer {spec['normalizer'].get('type')!r} (expected none)")
    if problems:
        raise ConfigError(f"{tokenizer_dir / 'tokenizer.json'}: llama.cpp's gpt-2 tokenizer cannot reproduce "
                          f"this tokenizer: {'; '.join(problems)}")


def write_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 regex our ByteLevel pre-tokenizer uses
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "pad": writer.add_pad_token_id, "unk": writer.add_unk_token_id}
    for role, token_id in vocab.special_ids.items():
        setters[role](token_id)
    writer.add_add_bos_token(False)  # acornlm places <|endoftext|> explicitly; nothing is prepended
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --- tensors ----------------------------------------------------------------------------------------

def model_tensors(arch: str, model: Transformer) -> Iterator[GGUFTensor]:
    """Every weight of `model` under llama.cpp's name for `arch`."""
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    if arch == "gpt2":
        yield from gpt2_tensors(model.config, state)
    else:
        yield from llama_tensors(model.config, state, arch)


def llama_tensors(config: ModelConfig, state: dict[str, np.ndarray], arch: str) -> Iterator[GGUFTensor]:
    """Tensors of llama.cpp's `llama`, `qwen3` and MoE architectures (same names; qwen3 adds the
    QK-norms, the MoE ones the expert tensors). Only `llama` rotates interleaved pairs."""
    interleave_rope = arch == "llama"
    yield GGUFTensor("token_embd.weight", state["model.embed_tokens.weight"], True)
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"blk.{i}."
        yield GGUFTensor(dst + "attn_norm.weight", state[src + "input_layernorm.weight"], False)
        for proj, name, heads in (("q_proj", "attn_q", config.num_attention_heads),
                                  ("k_proj", "attn_k", config.num_key_value_heads),
                                  ("v_proj", "attn_v", 0), ("o_proj", "attn_output", 0)):
            for kind in ("weight", "bias"):
                key = f"{src}self_attn.{proj}.{kind}"
                if key in state:
                    data = state[key]
                    if interleave_rope and heads:
                        data = rotate_half_to_interleaved(data, heads)
                    yield GGUFTensor(f"{dst}{name}.{kind}", data, kind == "weight")
        if config.qk_norm:
            yield GGUFTensor(dst + "attn_q_norm.weight", state[src + "self_attn.q_norm.weight"], False)
            yield GGUFTensor(dst + "attn_k_norm.weight", state[src + "self_attn.k_norm.weight"], False)
        yield GGUFTensor(dst + "ffn_norm.weight", state[src + "post_attention_layernorm.weight"], False)
        for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            for kind in ("weight", "bias"):
                key = f"{src}mlp.{proj}.{kind}"
                if key in state:
                    yield GGUFTensor(f"{dst}{name}.{kind}", state[key], kind == "weight")
        if config.num_experts:
            for name, data, follows_type in moe_layer_tensors(config, state, i):
                yield GGUFTensor(name, data, follows_type)
    yield GGUFTensor("output_norm.weight", state["model.norm.weight"], False)
    # tied: llama.cpp reuses token_embd when `output` is absent, except where the architecture requires it
    if not config.tie_word_embeddings or arch in OUTPUT_REQUIRED:
        yield GGUFTensor("output.weight", state["lm_head.weight"], True)


def rotate_half_to_interleaved(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder the output rows of a query/key projection from the rotate_half RoPE layout to the
    interleaved one (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py).

    rotate_half pairs dimension j of a head with dimension j + head_dim/2; llama.cpp's `llama`
    architecture pairs dimensions 2j and 2j+1, with the same frequency theta^(-2j/head_dim). Moving
    row j to 2j and row j + head_dim/2 to 2j+1 makes both compute the same rotation, and since
    q·k sums over all dimensions, the attention scores are unchanged. Works for weights and biases.
    """
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def gpt2_tensors(config: ModelConfig, state: dict[str, np.ndarray]) -> Iterator[GGUFTensor]:
    """Tensors of llama.cpp's `gpt2` architecture.

    acornlm's Linear weights are already [out, in] (Hugging Face's GPT-2 Conv1D is [in, out], which
    is why llama.cpp's converter transposes them). llama.cpp's gpt2 wants one fused QKV projection,
    and it requires every bias: a model trained without biases gets zero biases, which add nothing.
    """
    def bias_or_zeros(key: str, size: int) -> np.ndarray:
        return state[key] if key in state else np.zeros(size, dtype=np.float32)

    hidden = config.hidden_size
    yield GGUFTensor("token_embd.weight", state["model.embed_tokens.weight"], True)
    yield GGUFTensor("position_embd.weight", state["model.embed_positions.weight"], False)  # f32, as llama.cpp
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"blk.{i}."
        for norm, name in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            yield GGUFTensor(f"{dst}{name}.weight", state[f"{src}{norm}.weight"], False)
            yield GGUFTensor(f"{dst}{name}.bias", bias_or_zeros(f"{src}{norm}.bias", hidden), False)
        attn = src + "self_attn."
        qkv = [state[f"{attn}{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        yield GGUFTensor(dst + "attn_qkv.weight", np.concatenate(qkv, axis=0), True)
        yield GGUFTensor(dst + "attn_qkv.bias", np.concatenate(
            [bias_or_zeros(f"{attn}{p}.bias", w.shape[0]) for p, w in zip(("q_proj", "k_proj", "v_proj"), qkv)]), False)
        yield GGUFTensor(dst + "attn_output.weight", state[attn + "o_proj.weight"], True)
        yield GGUFTensor(dst + "attn_output.bias", bias_or_zeros(attn + "o_proj.bias", hidden), False)
        for proj, name, size in (("up_proj", "ffn_up", config.intermediate_size), ("down_proj", "ffn_down", hidden)):
            yield GGUFTensor(f"{dst}{name}.weight", state[f"{src}mlp.{proj}.weight"], True)
            yield GGUFTensor(f"{dst}{name}.bias", bias_or_zeros(f"{src}mlp.{proj}.bias", size), False)
    yield GGUFTensor("output_norm.weight", state["model.norm.weight"], False)
    yield GGUFTensor("output_norm.bias", bias_or_zeros("model.norm.bias", hidden), False)
    if not config.tie_word_embeddings:
        yield GGUFTensor("output.weight", state["lm_head.weight"], True)


def encode_tensor(tensor: GGUFTensor, type: str) -> tuple[str, np.ndarray, Any]:
    """(name, data, raw_dtype) for GGUFWriter.add_tensor, or a ConfigError when `type` would lose the tensor.

    q8_0 stores each row as blocks of 32 values, so a matrix whose rows are not a multiple of 32
    long cannot be q8_0; rather than silently keeping it at f16 (llama.cpp's converter does that),
    the export is refused with the tensor's name, so `--type q8_0` always means what it says.
    """
    from gguf import GGMLQuantizationType, quants

    data = np.ascontiguousarray(tensor.data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise CheckpointError(f"tensor {tensor.name} holds NaN or inf values; the checkpoint is broken")
    if not tensor.follows_type or type == "f32":
        return tensor.name, data, GGMLQuantizationType.F32
    largest = float(np.abs(data).max(initial=0.0))
    if type == "f16":
        if largest > F16_MAX:
            raise ConfigError(f"--type f16 would turn tensor {tensor.name} into inf: its largest value is "
                              f"{largest:.4g}, float16 stops at {F16_MAX:g}. Use --type f32")
        return tensor.name, data.astype(np.float16), GGMLQuantizationType.F16
    row = data.shape[-1]
    if row % Q8_0_BLOCK:
        raise ConfigError(
            f"--type q8_0 cannot store tensor {tensor.name} of shape {list(data.shape)}: q8_0 needs rows "
            f"whose length is a multiple of {Q8_0_BLOCK}, and these rows have {row} values. Use --type f16, "
            f"or sizes (hidden_size, intermediate_size, head_dim x heads) that are multiples of {Q8_0_BLOCK}"
        )
    if largest / 127 > F16_MAX:  # the per-block scale is a float16
        raise ConfigError(f"--type q8_0 cannot store tensor {tensor.name}: its largest value {largest:.4g} "
                          "overflows the float16 block scale. Use --type f32")
    return tensor.name, quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
