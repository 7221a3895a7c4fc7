"""`acornlm export hf`: a checkpoint as a standard Hugging Face transformers model directory, proven equal.

    plan      which transformers class can hold this ModelConfig exactly (or refuse, with the reasons)
    convert   rename (and for GPT-2 fuse and transpose) the weights, cast them to the export dtype
    write     config.json, generation_config.json, model.safetensors, tokenizer files, README.md,
              into a temporary directory next to --out
    verify    load the temporary directory with transformers itself, compare logits and greedy tokens
    publish   rename the temporary directory to --out (so a failed export leaves nothing behind)

The Llama family already uses transformers' Llama/Qwen3 parameter names, so its weights are
copied as they are. GPT-2 stores q, k and v as one fused `c_attn` matrix in a `Conv1D` layer,
whose weight is the transpose of `nn.Linear`'s ([in, out] instead of [out, in]).

config.json is written by hand (not by transformers) so that transformers 4.x and 5.x both read it
the same way: top-level `rope_theta` and `rope_scaling` (4.x) next to `rope_parameters` (5.x),
and both `torch_dtype` (4.x) and `dtype` (5.x).

Mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral) live in `acornlm.export.hf_moe`.
A reward model (`acornlm train reward`, config.json "head": "score") is exported as the family's
sequence classifier (LlamaForSequenceClassification, ...): the same weights, `score` instead of
`lm_head`, num_labels 1, verified by comparing rewards (`export_reward_hf`).
Adding an architecture means: a branch in
`choose_architecture`, its config fields in `hf_config`, and its weight names in `weights_to_hf`
(and the inverse in `weights_from_hf`, which `acornlm.export.hf_import` uses).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from acornlm.errors import CheckpointError, ConfigError
from acornlm.export.hf_moe import (
    MOE_MODEL_TYPES,
    choose_moe_architecture,
    moe_config_fields,
    moe_weights_from_hf,
    moe_weights_to_hf,
)
from acornlm.export.model_card import architecture_rows, model_card, table, training_rows
from acornlm.files import atomic_path
from acornlm.infer.generate import generate_tokens
from acornlm.infer.sampling import SamplingParams
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    checkpoint_model_config,
    load_model,
    model_state_for_saving,
    read_checkpoint_config,
    resolve_checkpoint,
)
from acornlm.model.rope import normalize_rope_scaling
from acornlm.tokenizer.chat_template import CHAT_TEMPLATE
from acornlm.tokenizer.hf_config import read_tokenizer_config
from acornlm.tokenizer.special_tokens import EOT_TOKEN, IM_END_TOKEN, IM_START_TOKEN
from acornlm.train.reward_model import is_reward_checkpoint, load_reward_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMA, QWEN3, GPT2 = "LlamaForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", GPT2: "gpt2", **MOE_MODEL_TYPES}

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template (imported models)
MODEL_CARD_FILE = "README.md"

# Verification: the same weights must give the same logits in fp32 (summation order differs a little).
LOGITS_TOLERANCE = 1e-4
GREEDY_TOKENS = 32
VERIFY_PROMPT = f"{EOT_TOKEN}Once upon a time, in a quiet town by the sea, "
# When to warn that the export dtype damages the model. Rounding is relative (bf16 keeps 8 significant
# bits, f16 11), so weights of a normal size (|w| < 4) move by < 0.008 in bf16; an error above
# LOSSY_WEIGHT_ERROR means values of 16 or more (bf16) / 128 or more (f16) lost their fractional digits.
# A logit moved by more than LOSSY_LOGITS_DIFF (nats) changes that token's probability by a factor > e.
LOSSY_WEIGHT_ERROR = 0.05
LOSSY_LOGITS_DIFF = 1.0
# Config fields that mark a mixture-of-experts feed-forward (not exportable yet).
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size", "num_shared_experts", "n_shared_experts", "use_moe")


class VerificationError(CheckpointError):
    """transformers does not compute what acornlm computes with the exported files."""


@dataclass
class DtypeLoss:
    """What casting the fp32 weights to the export dtype costs."""

    max_weight_error: float = 0.0  # max |cast(w) - w| over every weight
    worst_tensor: str = ""  # the tensor where it happens
    overflowed: int = 0  # finite values that became inf (float16 tops out at 65504)
    max_logits_diff: float = 0.0  # max |logits(cast weights) - logits(fp32 weights)| on the test prompt

    @property
    def lossy(self) -> bool:
        return bool(self.overflowed or not self.max_weight_error <= LOSSY_WEIGHT_ERROR
                    or not self.max_logits_diff <= LOSSY_LOGITS_DIFF)  # `not <=` also catches NaN


# ---------------------------------------------------------------------------------------------
# plan: which transformers class represents the model exactly
# ---------------------------------------------------------------------------------------------

def moe_fields(config: ModelConfig) -> list[str]:
    """The mixture-of-experts settings a config uses ([] for a dense model, whose MoE fields keep defaults)."""
    if not getattr(config, "num_experts", 0):
        return []
    return [name for name in MOE_FIELDS if getattr(config, name, None)]


def rope_scaling_of(config: ModelConfig) -> Any:
    """The config's RoPE scaling setting, if the model has one (None / "none" = plain RoPE)."""
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        return None if kind in (None, "none", "default") else scaling
    return None if scaling in (None, "none", "default", "") else scaling


def architecture_problems(config: ModelConfig) -> dict[str, list[str]]:
    """For each candidate class, why it cannot hold this model exactly (an empty list = it can)."""
    c = config
    common = []
    if moe_fields(c):
        common.append(f"mixture-of-experts layers ({', '.join(moe_fields(c))}) need an MoE class "
                      "(Qwen2-MoE, Qwen3-MoE or Mixtral: see acornlm.export.hf_moe)")
    llama = list(common)
    if c.position != "rope":
        llama.append(f"position={c.position!r}, but Llama/Qwen3 use rotary positions (rope)")
    if c.norm != "rmsnorm":
        llama.append(f"norm={c.norm!r}, but Llama/Qwen3 use RMSNorm")
    if c.mlp != "swiglu":
        llama.append(f"mlp={c.mlp!r}, but Llama/Qwen3 use a SwiGLU feed-forward")
    qwen3 = list(llama)
    if c.mlp_bias:
        qwen3.append("mlp_bias=true, but Qwen3's feed-forward has no biases")
    gpt2 = list(common)
    if c.position != "learned":
        gpt2.append(f"position={c.position!r}, but GPT-2 uses learned absolute positions")
    if c.norm != "layernorm":
        gpt2.append(f"norm={c.norm!r}, but GPT-2 uses LayerNorm")
    if c.mlp != "gelu":
        gpt2.append(f"mlp={c.mlp!r}, but GPT-2 uses a GELU feed-forward")
    if c.qk_norm:
        gpt2.append("qk_norm=true, but GPT-2 has no QK-norm")
    if c.num_key_value_heads != c.num_attention_heads:
        gpt2.append(f"grouped-query attention ({c.num_key_value_heads} KV heads for {c.num_attention_heads} "
                    "query heads), but GPT-2 has one KV head per query head")
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        gpt2.append(f"head_dim={c.head_dim} x {c.num_attention_heads} heads != hidden_size={c.hidden_size}")
    if not c.tie_word_embeddings:
        gpt2.append("tie_word_embeddings=false, but GPT2LMHeadModel always ties its output head to the embedding")
    return {LLAMA: llama, QWEN3: qwen3, GPT2: gpt2}


def choose_architecture(config: ModelConfig) -> str:
    """The transformers class for this model, or a ConfigError saying why none fits exactly."""
    if getattr(config, "num_experts", 0):
        return choose_moe_architecture(config)
    problems = architecture_problems(config)
    wanted = {"gpt2": GPT2, "qwen3": QWEN3, "llama": LLAMA}[config.family]
    if not problems[wanted]:
        return wanted
    raise ConfigError(
        f"this model cannot be exported exactly to {wanted} (the standard class for its family): "
        + "; ".join(problems[wanted])
        + ". Export supports Llama (rope + rmsnorm + swiglu), Qwen3 (the same with qk_norm) and "
        "GPT-2 (learned positions + layernorm + gelu, tied embeddings)"
    )


# ---------------------------------------------------------------------------------------------
# convert: weight names and layouts
# ---------------------------------------------------------------------------------------------

def weights_to_hf(state: dict[str, torch.Tensor], config: ModelConfig, architecture: str) -> dict[str, torch.Tensor]:
    """acornlm parameter names -> the class's names (a tied lm_head is already absent from `state`)."""
    if architecture in MOE_MODEL_TYPES:
        return moe_weights_to_hf(state, config, architecture)
    if architecture in (LLAMA, QWEN3):
        return dict(state)  # acornlm uses Llama/Qwen3 names already
    return gpt2_weights_to_hf(state, config)


def gpt2_weights_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama-style names -> GPT2LMHeadModel: q/k/v fused into c_attn, Linear [out, in] -> Conv1D [in, out].

    GPT-2 always has biases; a model trained without them gets zero biases, which compute the same.
    """
    dtype = state["model.embed_tokens.weight"].dtype

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size, dtype=dtype))

    out = {
        "transformer.wte.weight": state["model.embed_tokens.weight"],
        "transformer.wpe.weight": state["model.embed_positions.weight"],
        "transformer.ln_f.weight": state["model.norm.weight"],
        "transformer.ln_f.bias": bias("model.norm.bias", config.hidden_size),
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        qkv = [f"{ours}self_attn.{p}_proj" for p in "qkv"]
        out[theirs + "attn.c_attn.weight"] = torch.cat([state[p + ".weight"] for p in qkv], dim=0).t().contiguous()
        out[theirs + "attn.c_attn.bias"] = torch.cat([bias(p + ".bias", config.hidden_size) for p in qkv])
        for our_name, their_name, size in (("self_attn.o_proj", "attn.c_proj", config.hidden_size),
                                           ("mlp.up_proj", "mlp.c_fc", config.intermediate_size),
                                           ("mlp.down_proj", "mlp.c_proj", config.hidden_size)):
            out[f"{theirs}{their_name}.weight"] = state[f"{ours}{our_name}.weight"].t().contiguous()
            out[f"{theirs}{their_name}.bias"] = bias(f"{ours}{our_name}.bias", size)
        for our_name, their_name in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[f"{theirs}{their_name}.weight"] = state[f"{ours}{our_name}.weight"]
            out[f"{theirs}{their_name}.bias"] = bias(f"{ours}{our_name}.bias", config.hidden_size)
    return out


def weights_from_hf(state: dict[str, torch.Tensor], config: ModelConfig, architecture: str) -> dict[str, torch.Tensor]:
    """The inverse of `weights_to_hf`: the class's names -> acornlm's (biases kept, as GPT-2 has them)."""
    if architecture in MOE_MODEL_TYPES:
        return moe_weights_from_hf(state, config, architecture)
    if architecture != GPT2:
        return dict(state)
    get = state.__getitem__
    out = {
        "model.embed_tokens.weight": get("transformer.wte.weight"),
        "model.embed_positions.weight": get("transformer.wpe.weight"),
        "model.norm.weight": get("transformer.ln_f.weight"),
        "model.norm.bias": get("transformer.ln_f.bias"),
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k, v = get(theirs + "attn.c_attn.weight").t().chunk(3, dim=0)
        q_bias, k_bias, v_bias = get(theirs + "attn.c_attn.bias").chunk(3)
        for name, weight, bias in (("q", q, q_bias), ("k", k, k_bias), ("v", v, v_bias)):
            out[f"{ours}self_attn.{name}_proj.weight"] = weight.contiguous()
            out[f"{ours}self_attn.{name}_proj.bias"] = bias.contiguous()
        for our_name, their_name in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                                     ("mlp.down_proj", "mlp.c_proj")):
            out[f"{ours}{our_name}.weight"] = get(f"{theirs}{their_name}.weight").t().contiguous()
            out[f"{ours}{our_name}.bias"] = get(f"{theirs}{their_name}.bias")
        for our_name, their_name in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[f"{ours}{our_name}.weight"] = get(f"{theirs}{their_name}.weight")
            out[f"{ours}{our_name}.bias"] = get(f"{theirs}{their_name}.bias")
    return out


@torch.no_grad()
def cast_model_weights(model: Transformer, dtype: torch.dtype, prompt_ids: list[int]) -> tuple[
        dict[str, torch.Tensor], DtypeLoss]:
    """The model's weights in `dtype`, and what rounding cost. The model keeps fp32 storage but takes
    the rounded values, so verification compares transformers with acornlm on the same numbers."""
    state = model_state_for_saving(model)
    if dtype == torch.float32:
        return state, DtypeLoss()
    cast = {name: tensor.to(dtype) for name, tensor in state.items()}
    loss = DtypeLoss()
    for name, tensor in state.items():
        back = cast[name].float()
        loss.overflowed += int((torch.isfinite(tensor) & ~torch.isfinite(back)).sum())
        error = (back - tensor).abs().max().item() if tensor.numel() else 0.0
        if error > loss.max_weight_error or error != error:
            loss.max_weight_error, loss.worst_tensor = error, name
    ids = torch.tensor([prompt_ids])
    before = model(ids)
    model.load_state_dict({name: tensor.float() for name, tensor in cast.items()}, strict=False)
    loss.max_logits_diff = (model(ids) - before).abs().max().item()
    return cast, loss


def warn_if_lossy(loss: DtypeLoss, dtype: str) -> None:
    """A warning (not an error: the export may still be what you want) when the dtype damages the model."""
    if not loss.lossy:
        return
    overflow = f"; {loss.overflowed} values overflow to inf" if loss.overflowed else ""
    warnings.warn(
        f"exporting in {dtype} changes the weights by up to {loss.max_weight_error:.3g} (in {loss.worst_tensor}) "
        f"and the logits on the test prompt by up to {loss.max_logits_diff:.3g}{overflow}: the model has values "
        f"too large for {dtype} to keep; export with --dtype float32"
        + (" or bfloat16" if dtype == "float16" else ""),
        UserWarning, stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------
# write: config.json, generation_config.json, tokenizer files
# ---------------------------------------------------------------------------------------------

@dataclass
class SpecialTokens:
    """Token ids transformers needs in config.json / generation_config.json."""

    bos: int | None
    eos: int | None
    pad: int | None
    im_end: int | None


def token_name(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def load_backend_tokenizer(ckpt: Path) -> Any:
    """tokenizer.json as a `tokenizers.Tokenizer`: any tokenizer (also one acornlm did not train)."""
    from tokenizers import Tokenizer as BackendTokenizer

    file = ckpt / TOKENIZER_FILE
    try:
        return BackendTokenizer.from_file(str(file))
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        raise CheckpointError(f"{file} is not a valid tokenizer file: {exc}") from exc


def read_special_tokens(ckpt: Path) -> SpecialTokens:
    """bos/eos/pad ids from the checkpoint's tokenizer files (acornlm: <|endoftext|> plays all three)."""
    backend = load_backend_tokenizer(ckpt)
    config = read_tokenizer_config(ckpt)

    def token_id(key: str) -> int | None:
        name = token_name(config.get(key))
        return backend.token_to_id(name) if name else None

    eos = token_id("eos_token")
    eos = eos if eos is not None else backend.token_to_id(EOT_TOKEN)
    bos = token_id("bos_token")
    pad = token_id("pad_token")
    return SpecialTokens(bos=bos if bos is not None else eos, eos=eos, pad=pad if pad is not None else eos,
                         im_end=backend.token_to_id(IM_END_TOKEN))


def is_chat_model(info: dict[str, Any]) -> bool:
    """Models past pretraining (SFT, DPO, ...) end their turns with <|im_end|>."""
    return info.get("stage") not in (None, "pretrain", "import")


def stop_token_ids(special: SpecialTokens, info: dict[str, Any]) -> list[int]:
    """generation_config's eos list: end-of-text, plus <|im_end|> for chat models
    (an imported model keeps the list its generation_config.json had)."""
    imported = (info.get("source") or {}).get("eos_token_id") if isinstance(info.get("source"), dict) else None
    if imported:
        return [int(i) for i in (imported if isinstance(imported, list) else [imported])]
    ids = [special.eos] if special.eos is not None else []
    if is_chat_model(info) and special.im_end is not None and special.im_end not in ids:
        ids.append(special.im_end)
    return ids


def hf_rope_scaling(config: ModelConfig) -> dict[str, Any] | None:
    """The model's RoPE scaling with only the keys transformers takes for its type (None = plain RoPE).

    transformers' linear and dynamic types have no original_max_position_embeddings (dynamic
    reads the original length from max_position_embeddings, see `rope_fields`).
    """
    scaling = normalize_rope_scaling(rope_scaling_of(config))
    if scaling is None:
        return None
    if scaling["rope_type"] in ("linear", "dynamic"):
        return {"rope_type": scaling["rope_type"], "factor": scaling["factor"]}
    return scaling


def rope_fields(config: ModelConfig) -> dict[str, Any]:
    """RoPE settings as both transformers 4.x (top-level `rope_theta`, `rope_scaling`) and 5.x
    (`rope_parameters`) read them.

    transformers' dynamic NTK takes the trained length from `max_position_embeddings` (it does not
    cap sequences there), so for dynamic scaling this overrides it with original_max_position_embeddings.
    """
    scaling = hf_rope_scaling(config)
    fields = {
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta},
    }
    if scaling and scaling["rope_type"] == "dynamic":
        fields["max_position_embeddings"] = config.rope_scaling["original_max_position_embeddings"]
    return fields


def hf_config(config: ModelConfig, architecture: str, special: SpecialTokens, dtype: str) -> dict[str, Any]:
    """config.json for `architecture`, readable by transformers 4.x and 5.x."""
    c = config
    common = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": c.vocab_size,
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "use_cache": True,
        "torch_dtype": dtype,  # transformers 4.x
        "dtype": dtype,  # transformers 5.x
    }
    if architecture == GPT2:
        return {
            **common,
            "n_embd": c.hidden_size,
            "n_layer": c.num_hidden_layers,
            "n_head": c.num_attention_heads,
            "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings,
            "n_ctx": c.max_position_embeddings,
            "activation_function": "gelu_new",  # the tanh approximation, as acornlm's GELU
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
        }
    fields = {
        **common,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
        **rope_fields(c),
        "attention_bias": c.attention_bias,
        "attention_dropout": c.dropout,
    }
    if architecture in MOE_MODEL_TYPES:
        return {**fields, **moe_config_fields(c, architecture)}
    if architecture == LLAMA:
        return {**fields, "mlp_bias": c.mlp_bias, "pretraining_tp": 1}
    return {  # Qwen3: every layer attends to the whole context
        **fields,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.num_hidden_layers,
        "layer_types": ["full_attention"] * c.num_hidden_layers,
    }


def generation_config(special: SpecialTokens, eos_ids: list[int]) -> dict[str, Any]:
    return {
        "bos_token_id": special.bos,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": special.pad,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
    }


def write_tokenizer_files(ckpt: Path, out: Path, context_length: int) -> None:
    """tokenizer.json as it is; tokenizer_config.json with the fast-tokenizer class, the context length
    and the chat template (which transformers 5 may have kept in chat_template.jinja)."""
    shutil.copyfile(ckpt / TOKENIZER_FILE, out / TOKENIZER_FILE)
    config = read_tokenizer_config(ckpt)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # no custom code: tokenizer.json holds everything
    config["model_max_length"] = context_length
    template_file = ckpt / CHAT_TEMPLATE_FILE
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    if "chat_template" not in config:
        config["chat_template"] = CHAT_TEMPLATE
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# verify: transformers itself loads the files and must compute what acornlm computes
# ---------------------------------------------------------------------------------------------

def prompt_token_ids(ckpt: Path, text: str, context_length: int) -> list[int]:
    """The test prompt's ids from tokenizer.json (any tokenizer), leaving room for the greedy tokens."""
    ids = load_backend_tokenizer(ckpt).encode(text, add_special_tokens=False).ids
    room = max(1, context_length - GREEDY_TOKENS)
    return ids[:room] or [0]


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and advice (padding, deprecations) would bury the export's own result."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


@torch.no_grad()
def verify_export(out: Path, model: Transformer, prompt_text: str, prompt_ids: list[int],
                  eos_ids: list[int], pad_id: int | None) -> dict[str, Any]:
    """Load `out` with AutoModelForCausalLM / AutoTokenizer and compare with `model` (same weights, fp32).

    Checks: the tokenizer encodes the prompt to the same ids; the logits of every prompt position agree
    within LOGITS_TOLERANCE; greedy decoding gives the same GREEDY_TOKENS tokens (a divergence is only
    accepted at a near-tie, where the two best logits are closer than the tolerance).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer


    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if version >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    try:
        with quiet_transformers():
            hf_model = AutoModelForCausalLM.from_pretrained(str(out), **{dtype_key: torch.float32}).eval()
            hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    except Exception as exc:  # transformers raises many types; all mean "the export does not load"
        raise VerificationError(f"transformers {transformers.__version__} cannot load the export: {exc}") from exc

    hf_ids = hf_tokenizer(prompt_text, add_special_tokens=False)["input_ids"][:len(prompt_ids)]
    if hf_ids != prompt_ids:
        raise VerificationError(f"AutoTokenizer encodes the test prompt as {hf_ids[:12]}..., "
                                f"acornlm's tokenizer as {prompt_ids[:12]}...")

    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    ours, theirs = model(ids), hf_model(ids, attention_mask=mask).logits
    max_diff = (ours - theirs).abs().max().item()
    if not max_diff <= LOGITS_TOLERANCE:  # also catches NaN
        raise VerificationError(f"logits differ from transformers by up to {max_diff:.3g} "
                                f"(tolerance {LOGITS_TOLERANCE:g}) on a {len(prompt_ids)}-token prompt")

    budget = max(0, min(GREEDY_TOKENS, model.config.max_position_embeddings - len(prompt_ids) + 1))
    our_tokens = list(generate_tokens(model, prompt_ids, SamplingParams(max_new_tokens=budget, temperature=0.0),
                                      eos_ids=eos_ids))
    with quiet_transformers():
        generated = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=budget,
                                      temperature=None, top_k=None,  # greedy: unset the sampling defaults
                                      eos_token_id=eos_ids or None, pad_token_id=pad_id)
    their_tokens = []
    for token in generated[0, len(prompt_ids):].tolist():
        if token in eos_ids:
            break
        their_tokens.append(token)
    greedy = "identical"
    if our_tokens != their_tokens:
        greedy = explain_greedy_difference(model, prompt_ids, our_tokens, their_tokens)
    return {
        "transformers_version": transformers.__version__,
        "prompt_tokens": len(prompt_ids),
        "logits_max_abs_diff": max_diff,
        "greedy_tokens": len(our_tokens),
        "greedy": greedy,
        "greedy_text": hf_tokenizer.decode(our_tokens),
    }


def explain_greedy_difference(model: Transformer, prompt_ids: list[int], ours: list[int], theirs: list[int]) -> str:
    """Accept a greedy divergence only at a near-tie (top-2 logits within the tolerance); else fail."""
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    logits = model(torch.tensor([prompt_ids + ours[:step]]))[0, -1]
    top2 = logits.topk(2).values
    gap = (top2[0] - top2[1]).item()
    if gap <= 2 * LOGITS_TOLERANCE:
        return f"identical for {step} tokens, then a near-tie (top-2 logit gap {gap:.2g})"
    raise VerificationError(
        f"greedy decoding diverges from transformers at token {step + 1} of {max(len(ours), len(theirs))} "
        f"(acornlm {ours[step:step + 3]}, transformers {theirs[step:step + 3]}; top-2 logit gap {gap:.3g})"
    )


# ---------------------------------------------------------------------------------------------
# publish: all or nothing
# ---------------------------------------------------------------------------------------------

def check_output_path(out: Path, force: bool, protected: Path | None = None, file: bool = False) -> None:
    """Refuse to overwrite without --force, and never overwrite the input itself: a directory output
    (`file` False) may not overlap `protected`; a file output may not be a directory."""
    if file and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the path of the file to write")
    resolved, source = out.resolve(), protected.resolve() if protected is not None else None
    if not file and source is not None and (resolved == source or source.is_relative_to(resolved)
                                            or resolved.is_relative_to(source)):
        raise ConfigError(f"--out {out} overlaps the input {protected}; choose a separate directory")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it, or choose another --out")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(tmp: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; an export is meant to be shared or served,
    so it gets the usual permissions of new files before it is published."""
    mask = current_umask()
    os.chmod(tmp, 0o777 & ~mask)
    for file in tmp.iterdir():
        os.chmod(file, 0o666 & ~mask)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def describe_export(summary: dict[str, Any]) -> str:
    """The few lines a person wants to read after an export (the CLI and `acornlm demo` print them)."""
    if summary.get("head") == "score":
        return describe_reward_export(summary)
    lines = [f"exported {summary['checkpoint']} -> {summary['out']} "
             f"({summary['architecture']}, {summary['dtype']}, {summary['parameters']:,} parameters)"]
    loss = summary["dtype_loss"]
    if summary["dtype"] != "float32":
        lines.append(f"{summary['dtype']} rounding changes weights by up to {loss['max_weight_error']:.2g} and "
                     f"the test prompt's logits by up to {loss['max_logits_diff']:.2g}")
    check = summary["verification"]
    if check is None:
        lines.append("not verified (transformers is not installed, or --verify false)")
    else:
        lines.append(f"verified with transformers {check['transformers_version']}: logits max |diff| "
                     f"{check['logits_max_abs_diff']:.2g} (<= {LOGITS_TOLERANCE:g}) on {check['prompt_tokens']} "
                     f"prompt tokens; greedy {check['greedy_tokens']} tokens: {check['greedy']}")
    return "\n".join(lines)


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "float32", verify: bool | None = None,
              force: bool = False) -> dict[str, Any]:
    """Export a checkpoint as a transformers model directory, verified in transformers itself.

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint).
        out: Directory to create (refused if it exists, unless `force`).
        dtype: Weight dtype of the export: "float32", "bfloat16" or "float16".
        verify: Load the export with transformers and compare logits and greedy tokens;
            None = when transformers is installed.
        force: Replace `out` if it exists.

    Returns:
        A summary: out, architecture, dtype, parameters, dtype_loss and (when verified) verification.
    """
    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    ckpt_dir = resolve_checkpoint(ckpt)
    check_output_path(out, force, ckpt_dir)
    info = read_checkpoint_config(ckpt_dir)
    config = checkpoint_model_config(info, ckpt_dir / CONFIG_FILE)
    architecture = choose_architecture(config)
    if not (ckpt_dir / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt_dir} holds no {TOKENIZER_FILE}; an export needs the model's tokenizer "
                              "(copy it from the prepared data directory's tokenizer/ folder)")
    tokenizer_size = load_backend_tokenizer(ckpt_dir).get_vocab_size(with_added_tokens=True)
    if tokenizer_size > config.vocab_size:
        raise CheckpointError(f"{ckpt_dir / TOKENIZER_FILE} has {tokenizer_size} tokens but the model only "
                              f"{config.vocab_size}: they do not belong together")
    if verify is None:
        verify = transformers_available()
    if verify and not transformers_available():
        raise ConfigError("--verify needs transformers: pip install 'acornlm[export]' (or pass --verify false)")

    if is_reward_checkpoint(info):  # a reward model (acornlm train reward): a sequence classifier
        return export_reward_hf(ckpt_dir, out, info, config, architecture, dtype, verify)
    model, _ = load_model(ckpt_dir, device="cpu", dtype=torch.float32)
    special = read_special_tokens(ckpt_dir)
    eos_ids = stop_token_ids(special, info)
    prompt_ids = prompt_token_ids(ckpt_dir, VERIFY_PROMPT, config.max_position_embeddings)
    state, loss = cast_model_weights(model, DTYPES[dtype], prompt_ids)
    warn_if_lossy(loss, dtype)
    summary: dict[str, Any] = {
        "out": str(out), "checkpoint": str(ckpt_dir), "architecture": architecture, "dtype": dtype,
        "parameters": model.num_params(), "eos_token_ids": eos_ids,
        "dtype_loss": {"max_weight_error": loss.max_weight_error, "max_logits_diff": loss.max_logits_diff,
                       "overflowed": loss.overflowed},
        "verification": None,
    }

    with atomic_path(out, directory=True) as tmp:
        write_json(tmp / CONFIG_FILE, hf_config(config, architecture, special, dtype))
        write_json(tmp / GENERATION_CONFIG_FILE, generation_config(special, eos_ids))
        save_file(weights_to_hf(state, config, architecture), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_tokenizer_files(ckpt_dir, tmp, config.max_position_embeddings)
        if verify:
            summary["verification"] = verify_export(tmp, model, VERIFY_PROMPT, prompt_ids, eos_ids, special.pad)
        (tmp / MODEL_CARD_FILE).write_text(model_card(config, architecture, info, summary), encoding="utf-8")
        shareable(tmp)
    return summary


# ---------------------------------------------------------------------------------------------
# reward models: a sequence classifier (acornlm train reward)
# ---------------------------------------------------------------------------------------------

# The sequence-classification class of each causal class: the same decoder, `score` instead of `lm_head`.
SEQUENCE_CLASSIFIERS = {LLAMA: "LlamaForSequenceClassification", QWEN3: "Qwen3ForSequenceClassification",
                        GPT2: "GPT2ForSequenceClassification"}
# A chat turn to score at verification (no <|endoftext|>: that is the padding token transformers skips).
REWARD_VERIFY_TEXT = (f"{IM_START_TOKEN}user\nWhat is 17 + 25?{IM_END_TOKEN}\n"
                      f"{IM_START_TOKEN}assistant\n17 + 25 = 42{IM_END_TOKEN}\n")


def sequence_classifier(architecture: str) -> str:
    """LlamaForCausalLM -> LlamaForSequenceClassification (Qwen2-MoE, Qwen3-MoE and Mixtral follow the pattern)."""
    return SEQUENCE_CLASSIFIERS.get(architecture) or architecture.replace("ForCausalLM", "ForSequenceClassification")


def reward_hf_config(config: ModelConfig, architecture: str, special: SpecialTokens, dtype: str,
                     pad_id: int) -> dict[str, Any]:
    """config.json of the causal class, turned into its sequence classifier with one output (a reward).

    transformers reads the score at each row's last token that is not `pad_token_id`, so the pad id
    must be set (it is also what acornlm pads with: <|endoftext|>, which chats never contain).
    """
    return {**hf_config(config, architecture, special, dtype), "architectures": [sequence_classifier(architecture)],
            "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad_id}


@torch.no_grad()
def verify_reward_export(out: Path, model: Any, prompt_ids: list[int], pad_id: int) -> dict[str, Any]:
    """Load `out` with AutoModelForSequenceClassification and compare its rewards (the logits at each
    row's last real token) with `model`'s on a right-padded batch: a whole chat and half of it."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if version >= (4, 56) else "torch_dtype"
    try:
        with quiet_transformers():
            hf_model = AutoModelForSequenceClassification.from_pretrained(
                str(out), **{dtype_key: torch.float32}).eval()
    except Exception as exc:  # transformers raises many types; all mean "the export does not load"
        raise VerificationError(f"transformers {transformers.__version__} cannot load the export: {exc}") from exc
    rows = [prompt_ids, prompt_ids[:max(1, len(prompt_ids) // 2)]]
    lengths = torch.tensor([len(row) for row in rows])
    ids = torch.tensor([row + [pad_id] * (len(prompt_ids) - len(row)) for row in rows])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    ours, theirs = model(ids, lengths), hf_model(ids, attention_mask=mask).logits[:, 0]
    max_diff = (ours - theirs).abs().max().item()
    if not max_diff <= LOGITS_TOLERANCE:  # also catches NaN
        raise VerificationError(f"rewards differ from transformers by up to {max_diff:.3g} "
                                f"(tolerance {LOGITS_TOLERANCE:g}) on {len(rows)} sequences")
    return {"transformers_version": transformers.__version__, "prompt_tokens": len(prompt_ids),
            "sequences": len(rows), "rewards_max_abs_diff": max_diff}


def reward_model_card(config: ModelConfig, classifier: str, info: dict[str, Any], summary: dict[str, Any]) -> str:
    """README.md of an exported reward model: what it is, how it was trained, how to score with it."""
    check = summary.get("verification")
    verified = (f"At export, transformers {check['transformers_version']} loaded these files and gave rewards "
                f"within {check['rewards_max_abs_diff']:.2g} of acornlm's on {check['sequences']} sequences."
                if check else "This export was not verified (transformers was not installed or `--verify false`).")
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-classification",
        f"tags: [acornlm, reward-model, {MODEL_TYPES.get(summary.get('base_architecture', ''), 'llama')}]", "---", "",
        "# A small reward model trained with acornlm", "",
        f"Exported by `acornlm export hf` as a standard `{classifier}` with one output: the reward of a "
        "conversation, read at its last token (Bradley-Terry: P(a beats b) = sigmoid(r(a) - r(b))).", "",
        "## Architecture", "", *table(architecture_rows(config, classifier, summary.get("parameters", 0))), "",
        "## Training", "", *(table(rows) if (rows := reward_training_rows(info)) else
                             ["No training information was recorded."]), "",
        "## Use", "", "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")',
        'chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]',
        'ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)',
        'print(model(**ids).logits[0, 0].item())  # higher = better',
        "```", "", "## Verification", "", verified, "",
        "This is a small model trained for learning; do not rely on its judgement.", ""])


def reward_training_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The model card's training facts, with the validation loss named as what it is here: the
    Bradley-Terry loss per pair (not nats per token, so no perplexity)."""
    rows = training_rows({key: value for key, value in info.items() if key != "val_loss"})
    val_loss = info.get("val_loss")
    if isinstance(val_loss, (int, float)) and val_loss == val_loss:
        rows.append(("validation loss", f"{val_loss:.4f} (Bradley-Terry, -log sigmoid(r_chosen - r_rejected))"))
    return rows


def describe_reward_export(summary: dict[str, Any]) -> str:
    """`describe_export` for a reward model (its verification compares rewards, not generations)."""
    lines = [f"exported reward model {summary['checkpoint']} -> {summary['out']} "
             f"({summary['architecture']}, {summary['dtype']}, {summary['parameters']:,} parameters)"]
    if summary["dtype"] != "float32":
        lines.append(f"{summary['dtype']} rounding changes the test rewards by up to "
                     f"{summary['dtype_loss']['max_logits_diff']:.2g}")
    check = summary["verification"]
    if check is None:
        lines.append("not verified (transformers is not installed, or --verify false)")
    else:
        lines.append(f"verified with transformers {check['transformers_version']}: rewards max |diff| "
                     f"{check['rewards_max_abs_diff']:.2g} (<= {LOGITS_TOLERANCE:g}) on {check['sequences']} "
                     f"sequences of up to {check['prompt_tokens']} tokens")
    return "\n".join(lines)


def export_reward_hf(ckpt_dir: Path, out: Path, info: dict[str, Any], config: ModelConfig, architecture: str,
                     dtype: str, verify: bool) -> dict[str, Any]:
    """`export_hf` for a reward checkpoint: the backbone's weights renamed as for `architecture`,
    plus `score.weight`, under its sequence-classification class with num_labels 1."""
    model = load_reward_model(ckpt_dir, device="cpu").float()
    special = read_special_tokens(ckpt_dir)
    pad_id = special.pad if special.pad is not None else load_backend_tokenizer(ckpt_dir).token_to_id(EOT_TOKEN)
    if pad_id is None:
        raise CheckpointError(f"{ckpt_dir / TOKENIZER_FILE} has no pad or {EOT_TOKEN} token; a sequence "
                              "classifier needs pad_token_id to find each row's last token")
    prompt_ids = prompt_token_ids(ckpt_dir, REWARD_VERIFY_TEXT, config.max_position_embeddings)
    state, loss = cast_model_weights(model, DTYPES[dtype], prompt_ids)
    warn_if_lossy(loss, dtype)
    score = state.pop("score.weight")
    weights = {**weights_to_hf(state, config, architecture), "score.weight": score}
    classifier = sequence_classifier(architecture)
    summary: dict[str, Any] = {
        "out": str(out), "checkpoint": str(ckpt_dir), "architecture": classifier,
        "base_architecture": architecture, "head": "score", "dtype": dtype, "parameters": model.num_params(),
        "pad_token_id": pad_id,
        "dtype_loss": {"max_weight_error": loss.max_weight_error, "max_logits_diff": loss.max_logits_diff,
                       "overflowed": loss.overflowed},
        "verification": None,
    }
    with atomic_path(out, directory=True) as tmp:
        write_json(tmp / CONFIG_FILE, reward_hf_config(config, architecture, special, dtype, pad_id))
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_tokenizer_files(ckpt_dir, tmp, config.max_position_embeddings)
        if verify:
            summary["verification"] = verify_reward_export(tmp, model, prompt_ids, pad_id)
        (tmp / MODEL_CARD_FILE).write_text(reward_model_card(config, classifier, info, summary), encoding="utf-8")
        shareable(tmp)
    return summary
