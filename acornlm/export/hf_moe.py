"""Mixture-of-experts models in Hugging Face format: which class, config.json fields, weight names.

    shared expert (gated)           -> Qwen2MoeForCausalLM   (no QK-norm; zero q/k/v biases written)
    no shared expert, QK-norm       -> Qwen3MoeForCausalLM
    no shared expert, no QK-norm    -> MixtralForCausalLM    (only with norm_topk_prob: Mixtral always
                                                              renormalises the top-k weights)

acornlm stores each layer's experts stacked (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I], transformers 5.x's in-memory layout). The files use the
per-expert layout of the hub checkpoints, which transformers 4.x reads as it is, transformers 5.x
fuses on load (its conversion mapping), and vLLM's and llama.cpp's converters read:

    Qwen2/3-MoE  model.layers.N.mlp.gate.weight, mlp.experts.E.{gate,up,down}_proj.weight,
                 mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight
    Mixtral      model.layers.N.block_sparse_moe.gate.weight, block_sparse_moe.experts.E.w{1,3,2}.weight
                 (w1 = gate, w3 = up, w2 = down)
"""

from __future__ import annotations

import re
from typing import Any

import torch

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig

QWEN3_MOE, QWEN2_MOE, MIXTRAL = "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"
MOE_MODEL_TYPES = {QWEN3_MOE: "qwen3_moe", QWEN2_MOE: "qwen2_moe", MIXTRAL: "mixtral"}
EXPERT_NAMES = {  # acornlm's projection -> the per-expert file name, per class
    QWEN3_MOE: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    QWEN2_MOE: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    MIXTRAL: {"gate": "w1", "up": "w3", "down": "w2"},
}
MOE_BLOCK = {QWEN3_MOE: "mlp", QWEN2_MOE: "mlp", MIXTRAL: "block_sparse_moe"}


def moe_architecture_problems(config: ModelConfig) -> dict[str, list[str]]:
    """For each MoE class, why it cannot hold this MoE model exactly (an empty list = it can)."""
    c = config
    base = []
    if c.position != "rope" or c.norm != "rmsnorm":
        base.append("MoE classes use rotary positions and RMSNorm")
    qwen2 = list(base)
    if not c.num_shared_experts:
        qwen2.append("Qwen2-MoE always has a gated shared expert (num_shared_experts=1)")
    if c.qk_norm:
        qwen2.append("qk_norm=true, but Qwen2-MoE has no QK-norm")
    if c.attention_bias:
        qwen2.append("attention_bias=true, but Qwen2-MoE's o_proj has no bias")
    qwen3 = list(base)
    if c.num_shared_experts:
        qwen3.append("Qwen3-MoE has no shared expert")
    if not c.qk_norm:
        qwen3.append("qk_norm=false, but Qwen3-MoE always normalises q and k")
    if c.attention_bias:
        qwen3.append("attention_bias=true: transformers' Qwen3-MoE would also give o_proj a bias")
    mixtral = list(base)
    if c.num_shared_experts:
        mixtral.append("Mixtral has no shared expert")
    if c.qk_norm:
        mixtral.append("qk_norm=true, but Mixtral has no QK-norm")
    if not c.norm_topk_prob:
        mixtral.append("norm_topk_prob=false, but Mixtral always renormalises the top-k weights")
    if c.attention_bias:
        mixtral.append("attention_bias=true, but Mixtral's attention has no biases")
    return {QWEN2_MOE: qwen2, QWEN3_MOE: qwen3, MIXTRAL: mixtral}


def choose_moe_architecture(config: ModelConfig) -> str:
    """The transformers class for an MoE model, or a ConfigError with every class's reason."""
    problems = moe_architecture_problems(config)
    for architecture in (QWEN2_MOE, QWEN3_MOE, MIXTRAL):
        if not problems[architecture]:
            return architecture
    reasons = "; ".join(f"{arch}: {', '.join(why)}" for arch, why in problems.items())
    raise ConfigError(f"this mixture-of-experts model cannot be exported exactly to a standard class ({reasons}). "
                      "A gated shared expert needs Qwen2-MoE (no qk_norm); without one, qk_norm=true gives "
                      "Qwen3-MoE and qk_norm=false with norm_topk_prob=true gives Mixtral")


def moe_config_fields(config: ModelConfig, architecture: str) -> dict[str, Any]:
    """config.json fields of the MoE class, on top of the Llama-style fields (every layer sparse)."""
    c = config
    layers = c.num_hidden_layers
    if architecture == MIXTRAL:
        return {
            "intermediate_size": c.moe_intermediate_size,  # Mixtral's experts use intermediate_size
            "num_local_experts": c.num_experts,
            "num_experts_per_tok": c.num_experts_per_tok,
            "router_aux_loss_coef": c.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "sliding_window": None,
        }
    fields: dict[str, Any] = {
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "moe_intermediate_size": c.moe_intermediate_size,
        "norm_topk_prob": c.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "router_aux_loss_coef": c.router_aux_loss_coef,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "layer_types": ["full_attention"] * layers,
    }
    if architecture == QWEN2_MOE:
        fields["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
        fields["qkv_bias"] = True  # transformers 4.x always has q/k/v biases: written as zeros when unused
    return fields


def moe_weights_to_hf(state: dict[str, torch.Tensor], config: ModelConfig,
                      architecture: str) -> dict[str, torch.Tensor]:
    """Stacked experts -> one tensor per expert and projection; Mixtral's block and expert names;
    zero q/k/v biases for Qwen2-MoE when the model has none."""
    names, block = EXPERT_NAMES[architecture], MOE_BLOCK[architecture]
    size = config.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix, sep, rest = name.partition(".mlp.")
        if not sep:
            out[name] = tensor
        elif rest == "experts.gate_up_proj":
            for e in range(config.num_experts):
                out[f"{prefix}.{block}.experts.{e}.{names['gate']}.weight"] = tensor[e, :size].contiguous()
                out[f"{prefix}.{block}.experts.{e}.{names['up']}.weight"] = tensor[e, size:].contiguous()
        elif rest == "experts.down_proj":
            for e in range(config.num_experts):
                out[f"{prefix}.{block}.experts.{e}.{names['down']}.weight"] = tensor[e].contiguous()
        else:
            out[f"{prefix}.{block}.{rest}"] = tensor
    if architecture == QWEN2_MOE and not config.attention_bias:
        dtype = state["model.embed_tokens.weight"].dtype
        for i in range(config.num_hidden_layers):
            for proj, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads),
                                ("v", config.num_key_value_heads)):
                out[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.zeros(heads * config.head_dim,
                                                                                  dtype=dtype)
    return out


QKV_BIAS = re.compile(r"self_attn\.[qkv]_proj\.bias$")


def qwen2_moe_attention_bias(hf: dict[str, Any], weights: dict[str, torch.Tensor]) -> bool:
    """Whether an imported Qwen2-MoE needs acornlm's attention_bias: only for q/k/v biases that are
    not all zero (acornlm's own exports write zeros, since transformers 4.x always has the biases)."""
    biases = [tensor for name, tensor in weights.items() if QKV_BIAS.search(name)]
    return bool(hf.get("qkv_bias", True)) and any(bool(tensor.any()) for tensor in biases)


def moe_fields_from_hf(hf: dict[str, Any], architecture: str) -> tuple[dict[str, Any], list[str]]:
    """ModelConfig MoE fields of a Qwen2-MoE / Qwen3-MoE / Mixtral config.json, and what acornlm cannot
    represent (dense layers between sparse ones, routing options acornlm does not compute)."""
    problems = []
    if hf.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step={hf['decoder_sparse_step']} (acornlm makes every layer sparse)")
    if hf.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={hf['mlp_only_layers']} (acornlm makes every layer sparse)")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (acornlm's experts are SwiGLU: silu)")
    if architecture == MIXTRAL:
        window, length = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096 * 32)
        if window is not None and window < length:
            problems.append(f"sliding_window={window} < max_position_embeddings={length} "
                            "(acornlm attends to the whole context)")
        return {
            "num_experts": hf.get("num_local_experts", 8),
            "num_experts_per_tok": hf.get("num_experts_per_tok", 2),
            "moe_intermediate_size": hf.get("intermediate_size"),
            "norm_topk_prob": True,
            "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
        }, problems
    defaults = {QWEN3_MOE: (128, 8, 768), QWEN2_MOE: (60, 4, 1408)}[architecture]
    fields = {
        # transformers 5 writes Qwen3-MoE's count as num_local_experts (num_experts is an alias)
        "num_experts": hf.get("num_experts") or hf.get("num_local_experts") or defaults[0],
        "num_experts_per_tok": hf.get("num_experts_per_tok", defaults[1]),
        "moe_intermediate_size": hf.get("moe_intermediate_size", defaults[2]),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
    }
    if architecture == QWEN2_MOE:
        fields["num_shared_experts"] = 1
        fields["shared_expert_intermediate_size"] = hf.get("shared_expert_intermediate_size", 5632)
        if not fields["shared_expert_intermediate_size"]:
            problems.append("shared_expert_intermediate_size=0")
    return fields, problems


EXPERT_KEY = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")


def moe_weights_from_hf(state: dict[str, torch.Tensor], config: ModelConfig,
                        architecture: str) -> dict[str, torch.Tensor]:
    """The inverse of `moe_weights_to_hf`: per-expert tensors (or transformers 5's fused ones) -> stacked.

    Qwen2-MoE's q/k/v biases are dropped when the config says the model has none (they are all zero).
    """
    names = {file: ours for ours, file in EXPERT_NAMES[architecture].items()}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = EXPERT_KEY.match(name)
        if match:
            layer, index, proj = match.groups()
            if proj not in names:
                raise ConfigError(f"unexpected expert weight {name} in a {architecture} checkpoint")
            experts.setdefault(layer, {})[(int(index), names[proj])] = tensor
            continue
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if architecture == QWEN2_MOE and not config.attention_bias and QKV_BIAS.search(name):
            continue  # all zero (see qwen2_moe_attention_bias): the zeros an acornlm export writes
        out[name] = tensor
    for layer, parts in experts.items():
        count = config.num_experts
        missing = [(e, p) for e in range(count) for p in ("gate", "up", "down") if (e, p) not in parts]
        if missing:
            raise ConfigError(f"{layer}: expert weights missing for (expert, projection) {missing[:4]}")
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(count)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([parts[(e, "down")] for e in range(count)])
    return out
