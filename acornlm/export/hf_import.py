"""`acornlm import hf`: a local Hugging Face model directory as an acornlm checkpoint.

    config.json  -> ModelConfig   (every option acornlm cannot compute exactly is refused by name)
    weights      -> state dict    (model.safetensors, sharded safetensors, or pytorch_model.bin
                                   read with torch.load(weights_only=True), which cannot run code)
    tokenizer    -> copied        (tokenizer.json + tokenizer_config.json, if the directory has them)

Supported: LlamaForCausalLM, MistralForCausalLM (without a sliding window), Qwen2ForCausalLM,
Qwen3ForCausalLM and GPT2LMHeadModel. Qwen2 has biases on q/k/v but not on o_proj; acornlm's
`attention_bias` covers all four, so o_proj gets a zero bias, which computes the same thing.
Mixture-of-experts: Qwen2MoeForCausalLM, Qwen3MoeForCausalLM and MixtralForCausalLM with every layer
sparse (names and fields in acornlm.export.hf_moe).

The checkpoint is written in float32 (the dtype training keeps its master weights in), into a
temporary directory that is renamed at the end, so a refused or failed import leaves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from acornlm.errors import AcornError, CheckpointError, ConfigError
from acornlm.export.hf import (
    CHAT_TEMPLATE_FILE,
    GPT2,
    LLAMA,
    QWEN3,
    TOKENIZER_FILE,
    check_output_path,
    shareable,
    weights_from_hf,
)
from acornlm.export.hf_moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE, moe_fields_from_hf, qwen2_moe_attention_bias
from acornlm.files import atomic_path
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import read_json_config, write_model_files
from acornlm.model.rope import REQUIRED_KEYS as REQUIRED_ROPE_KEYS
from acornlm.model.rope import normalize_rope_scaling
from acornlm.tokenizer import load_tokenizer

MISTRAL, QWEN2 = "MistralForCausalLM", "Qwen2ForCausalLM"
MOE = (QWEN2_MOE, QWEN3_MOE, MIXTRAL)  # acornlm.export.hf_moe
SUPPORTED = (LLAMA, MISTRAL, QWEN2, QWEN3, GPT2, *MOE)
ARCHITECTURE_OF_MODEL_TYPE = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "gpt2": GPT2,
                              "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL}
NOT_YET = {  # standard classes acornlm's Transformer cannot compute yet, and why
    "Gemma2ForCausalLM": "logit soft-capping and sliding-window layers",
    "Phi3ForCausalLM": "fused qkv/gate-up projections and long-rope scaling",
}
# transformers' defaults for options a config.json may leave out (those of each config class).
DEFAULTS = {
    LLAMA: {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    MISTRAL: {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "sliding_window": 4096},
    QWEN2: {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    QWEN3: {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    QWEN2_MOE: {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    QWEN3_MOE: {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    MIXTRAL: {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    GPT2: {"n_positions": 1024, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
           "activation_function": "gelu_new", "resid_pdrop": 0.1},
}
REQUIRED = {
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head"),
}
SILU = ("silu", "swish")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # acornlm's GELU is the tanh approximation
# Buffers some checkpoints store although they are derived (RoPE frequencies, GPT-2's causal mask).
DERIVED_BUFFERS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
EXTRA_TOKENIZER_FILES = (CHAT_TEMPLATE_FILE, "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------

def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a Hugging Face folder, read by the same bounded reader as acornlm checkpoints."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory; pass a local Hugging Face model folder")
    return read_json_config(model_dir / "config.json", f": {model_dir} is not a Hugging Face model folder")


def architecture_of(hf: dict[str, Any], file: Path) -> str:
    """The transformers class named in config.json (or implied by model_type), if acornlm supports it."""
    names = hf.get("architectures") or []
    name = names[0] if names else ARCHITECTURE_OF_MODEL_TYPE.get(hf.get("model_type"), hf.get("model_type"))
    if name in NOT_YET:
        raise ConfigError(f"{file}: {name} is not supported yet: acornlm's Transformer has no {NOT_YET[name]}")
    if name not in SUPPORTED:
        raise ConfigError(f"{file}: architecture {name!r} is not supported; acornlm imports "
                          f"{', '.join(SUPPORTED)}")
    return name


def option(hf: dict[str, Any], architecture: str, key: str, default: Any = None) -> Any:
    """A config.json value, else transformers' default for the class, else `default`."""
    value = hf.get(key)
    return value if value is not None else DEFAULTS[architecture].get(key, default)


def rope_theta_and_problems(hf: dict[str, Any]) -> tuple[float, list[str]]:
    """RoPE base from `rope_parameters` (transformers 5) or top-level `rope_theta` (4.x); plain RoPE
    or a scaling acornlm computes (see `rope_scaling_from_hf`)."""
    parameters = hf.get("rope_parameters") or {}
    problems = []
    if parameters and "rope_type" not in parameters and all(isinstance(v, dict) for v in parameters.values()):
        problems.append(f"per-layer RoPE settings (rope_parameters {sorted(parameters)})")
        parameters = {}
    for key, setting in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", parameters)):
        kind = setting.get("rope_type", setting.get("type")) if isinstance(setting, dict) else None
        if kind not in (None, "default", *REQUIRED_ROPE_KEYS):
            problems.append(f"{key} type {kind!r} (acornlm implements plain RoPE and "
                            f"{', '.join(REQUIRED_ROPE_KEYS)} scaling)")
    partial = parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={partial} (acornlm rotates the whole head)")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0))), problems


def rope_scaling_from_hf(hf: dict[str, Any], max_positions: int) -> tuple[dict[str, Any] | None, int, list[str]]:
    """acornlm's (rope_scaling, max_position_embeddings, problems) for a config.json's RoPE scaling.

    transformers reads `rope_scaling` before `rope_parameters`. Its dynamic NTK counts from
    max_position_embeddings (the trained length): acornlm calls that original_max_position_embeddings
    and accepts factor x as many positions, as it does for YaRN, whose original length defaults to
    max_position_embeddings (and factor to their ratio) as in transformers.
    """
    setting = hf.get("rope_scaling") or hf.get("rope_parameters")
    kind = setting.get("rope_type", setting.get("type")) if isinstance(setting, dict) else None
    if kind not in REQUIRED_ROPE_KEYS:
        return None, max_positions, []  # plain RoPE, or refused by rope_theta_and_problems
    scaling = {k: v for k, v in setting.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    scaling["rope_type"] = kind
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = max_positions
    elif kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", max_positions)
        if scaling.get("factor") is None and isinstance(max_positions, int):
            scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    try:
        scaling = normalize_rope_scaling(scaling)
    except ConfigError as exc:
        return None, max_positions, [str(exc)]
    if "original_max_position_embeddings" in scaling and isinstance(max_positions, int):
        max_positions = max(max_positions, int(scaling["original_max_position_embeddings"] * scaling["factor"]))
    return scaling, max_positions, []


def llama_family_config(hf: dict[str, Any], architecture: str) -> tuple[dict[str, Any], list[str]]:
    """ModelConfig fields of a Llama / Mistral / Qwen2 / Qwen3 config.json, and what cannot be represented."""
    rope_theta, problems = rope_theta_and_problems(hf)
    if hf.get("hidden_act", "silu") not in SILU:
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (acornlm's gated feed-forward is SwiGLU: silu)")
    max_positions = option(hf, architecture, "max_position_embeddings")
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window=true (acornlm attends to the whole context)")
    if architecture == MISTRAL:  # an explicit null means no window; a missing key means the class default
        window = hf["sliding_window"] if "sliding_window" in hf else DEFAULTS[MISTRAL]["sliding_window"]
        if window is not None and window < max_positions:
            problems.append(f"sliding_window={window} < max_position_embeddings={max_positions} "
                            "(acornlm attends to the whole context)")
    rope_scaling, max_positions, rope_problems = rope_scaling_from_hf(hf, max_positions)
    problems += rope_problems
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        problems.append(f"layer_types {sorted(layer_types)} (acornlm has full attention in every layer)")
    heads = hf.get("num_attention_heads")
    fields = {
        "vocab_size": hf.get("vocab_size"),
        "hidden_size": hf.get("hidden_size"),
        "intermediate_size": hf.get("intermediate_size"),
        "num_hidden_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or 0,
        "max_position_embeddings": max_positions,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "norm_eps": float(option(hf, architecture, "rms_norm_eps")),
        "tie_word_embeddings": bool(option(hf, architecture, "tie_word_embeddings")),
        "dropout": float(hf.get("attention_dropout") or 0.0),
        "norm": "rmsnorm", "mlp": "swiglu", "position": "rope",
        "qk_norm": architecture in (QWEN3, QWEN3_MOE),
        # Qwen2: q/k/v always have biases and o_proj gets zeros (see the module docstring)
        "attention_bias": True if architecture == QWEN2 else bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)) if architecture == LLAMA else False,
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }
    if architecture in MOE:  # Qwen2-MoE's q/k/v biases: decided from the weights in import_hf
        moe_fields, moe_problems = moe_fields_from_hf(hf, architecture)
        fields.update(moe_fields)
        problems += moe_problems
    return fields, problems


def gpt2_config(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """ModelConfig fields of a GPT-2 config.json, and what cannot be represented."""
    problems = []
    activation = option(hf, GPT2, "activation_function")
    if activation not in TANH_GELU:
        problems.append(f"activation_function={activation!r} (acornlm's GELU is the tanh approximation: gelu_new)")
    if hf.get("scale_attn_weights", True) is not True:
        problems.append("scale_attn_weights=false (acornlm scales attention scores by 1/sqrt(head_dim))")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention"):
        problems.append("add_cross_attention=true (acornlm is decoder-only)")
    hidden = hf.get("n_embd")
    fields = {
        "vocab_size": hf.get("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": hf.get("n_inner") or (4 * hidden if isinstance(hidden, int) else None),
        "num_hidden_layers": hf.get("n_layer"),
        "num_attention_heads": hf.get("n_head"),
        "max_position_embeddings": option(hf, GPT2, "n_positions"),
        "norm_eps": float(option(hf, GPT2, "layer_norm_epsilon")),
        "tie_word_embeddings": bool(option(hf, GPT2, "tie_word_embeddings")),
        "dropout": float(option(hf, GPT2, "resid_pdrop")),
        "norm": "layernorm", "mlp": "gelu", "position": "learned",
        "attention_bias": True, "mlp_bias": True, "norm_bias": True,
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }
    return fields, problems


def model_config_from_hf(hf: dict[str, Any], architecture: str, file: Path) -> ModelConfig:
    """The ModelConfig computing what `architecture` computes, or a ConfigError naming every obstacle."""
    family = "gpt2" if architecture == GPT2 else "llama"
    missing = [key for key in REQUIRED[family] if not isinstance(hf.get(key), int)]
    if missing:
        raise ConfigError(f"{file}: {architecture} config lacks integer {', '.join(missing)}")
    fields, problems = gpt2_config(hf) if family == "gpt2" else llama_family_config(hf, architecture)
    if hf.get("quantization_config"):
        problems.append("quantization_config (quantized weights; import the unquantized model)")
    if problems:
        raise ConfigError(f"{file}: {architecture} with " + "; ".join(problems) + " cannot be imported")
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{file}: acornlm cannot build this shape: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------

def load_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """One safetensors or PyTorch file; PyTorch pickles are read with weights_only=True (no code runs)."""
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{file} is corrupt or unreadable: {exc}") from exc
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{file} cannot be read safely (weights_only=True): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} is not a flat state dict of tensors")
    return state


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: single file or sharded (an index.json naming the shards)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (model_dir / single).is_file():
            return load_weight_file(model_dir / single)
        if (model_dir / index).is_file():
            return read_sharded(model_dir / index)
    raise CheckpointError(f"{model_dir} holds no weights: expected model.safetensors, "
                          "model.safetensors.index.json (shards), pytorch_model.bin or its index")


def read_sharded(index_file: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_file} is corrupt: expected {{\"weight_map\": {{tensor: shard}}}}") from exc
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not (index_file.parent / shard).is_file()]
    if missing:
        raise CheckpointError(f"{index_file} names {len(missing)} missing shard(s): {', '.join(missing)}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_weight_file(index_file.parent / shard))
    return state


def normalized_names(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """Drop derived buffers; give old GPT-2 files (`h.0...`, `wte.weight`) their `transformer.` prefix."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(DERIVED_BUFFERS):
            continue
        if architecture == GPT2 and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = tensor
    return out


def acornlm_state(weights: dict[str, torch.Tensor], config: ModelConfig, architecture: str,
                  source: Path) -> dict[str, torch.Tensor]:
    """HF tensors -> acornlm's parameter names, in float32."""
    weights = normalized_names(weights, architecture)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # tied: transformers ignores a stored copy too
    elif "lm_head.weight" not in weights:
        raise CheckpointError(f"{source}: lm_head.weight is missing although tie_word_embeddings is false")
    try:
        state = weights_from_hf(weights, config, architecture)
    except KeyError as exc:
        raise CheckpointError(f"{source}: tensor {exc.args[0]} is missing") from exc
    if architecture == GPT2:
        state.update({k: v for k, v in weights.items() if k == "lm_head.weight"})
        leftovers = sorted(set(weights) - {"lm_head.weight"} - set(gpt2_names(config)))
        if leftovers:
            raise CheckpointError(f"{source}: unexpected tensors {leftovers[:5]} for {architecture}")
    if architecture == QWEN2 or (architecture == QWEN2_MOE and config.attention_bias):
        for i in range(config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(config.hidden_size)
    return {name: tensor.float() for name, tensor in state.items()}


def gpt2_names(config: ModelConfig) -> list[str]:
    """Every tensor name GPT2LMHeadModel stores (the tied head excluded)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    for i in range(config.num_hidden_layers):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"]
    return names


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> Transformer:
    """A Transformer holding `state`; every parameter must be present and of the right shape."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    model.init_rope()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not match config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source}: the weights do not match config.json: {exc}") from exc
    return model.eval()


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

def tokenizer_info(model_dir: Path, vocab_size: int) -> tuple[dict[str, Any] | None, str | None]:
    """(acornlm's tokenizer record, None) when acornlm can use the folder's tokenizer, else (None, why not)."""
    if not (model_dir / TOKENIZER_FILE).is_file():
        return None, (f"{model_dir} holds no {TOKENIZER_FILE} (a slow tokenizer only?); convert it with "
                      "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        tokenizer = load_tokenizer(model_dir)
    except AcornError as exc:
        return None, f"its tokenizer is not one acornlm can load: {exc}"
    if tokenizer.vocab_size > vocab_size:
        return None, f"its tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}"
    return {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}, None


def stop_ids(model_dir: Path, hf: dict[str, Any]) -> list[int] | None:
    """The model's end-of-generation ids (generation_config.json first), kept for a later re-export."""
    eos = hf.get("eos_token_id")
    file = model_dir / "generation_config.json"
    if file.is_file():
        try:
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id", eos)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # optional file: the config.json value stands
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if isinstance(i, int)] or None


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def import_hf(model_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert a local Hugging Face model folder into an acornlm checkpoint directory.

    Args:
        model_dir: Folder with config.json and the weights (and ideally tokenizer.json).
        out: Checkpoint directory to create (refused if it exists, unless `force`).
        force: Replace `out` if it exists.

    Returns:
        The checkpoint directory. A tokenizer acornlm cannot use is still copied (transformers and
        re-export use it) and reported with a warning.
    """
    model_dir, out = Path(model_dir), Path(out)
    hf = read_hf_config(model_dir)
    check_output_path(out, force, model_dir)
    architecture = architecture_of(hf, model_dir / "config.json")
    config = model_config_from_hf(hf, architecture, model_dir / "config.json")
    weights = read_hf_weights(model_dir)
    if architecture == QWEN2_MOE and qwen2_moe_attention_bias(hf, weights):
        config = dataclasses.replace(config, attention_bias=True)  # q/k/v biases that matter; o_proj gets zeros
    model = build_model(config, acornlm_state(weights, config, architecture, model_dir), model_dir)

    tokenizer, problem = tokenizer_info(model_dir, config.vocab_size)
    if problem:
        warnings.warn(f"imported {model_dir}, but {problem}. transformers and `acornlm export hf` work with "
                      "this checkpoint; acornlm generation and training need an acornlm tokenizer",
                      UserWarning, stacklevel=2)
    info: dict[str, Any] = {
        "stage": "import",
        "source": {"path": str(model_dir.resolve()), "architecture": architecture,
                   "dtype": hf.get("dtype") or hf.get("torch_dtype"), "eos_token_id": stop_ids(model_dir, hf)},
    }
    if tokenizer is not None:
        info["tokenizer"] = tokenizer

    with atomic_path(out, directory=True) as tmp:
        has_tokenizer = (model_dir / TOKENIZER_FILE).is_file()
        write_model_files(tmp, model, info=info, tokenizer_dir=model_dir if has_tokenizer else None)
        for name in EXTRA_TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        shareable(tmp)
    return out
