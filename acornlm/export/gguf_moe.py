"""Mixture-of-experts models in GGUF: llama.cpp's `qwen2moe` and `qwen3moe` architectures.

llama.cpp builds both with softmax routing over all experts and then the top-k, but it fixes the
renormalisation per architecture (as the models it was written for): `qwen2moe` (Qwen1.5/2-MoE)
never renormalises the top-k weights and has a sigmoid-gated shared expert; `qwen3moe` always
renormalises and has QK-norm and no shared expert. A model matching neither is refused with the
reason. Both use the rotate_half (NeoX) RoPE layout, so q/k rows are written as they are.

Tensors of layer N (numpy shapes; GGUF lists dimensions in the reverse order):

    blk.N.ffn_gate_inp.weight        [E, H]      router (kept in f32, as llama.cpp's converter does)
    blk.N.ffn_gate_exps.weight       [E, I, H]   the experts' gate projections, stacked
    blk.N.ffn_up_exps.weight         [E, I, H]
    blk.N.ffn_down_exps.weight       [E, H, I]
    blk.N.ffn_{gate,up,down}_shexp.weight        the shared expert (qwen2moe)
    blk.N.ffn_gate_inp_shexp.weight  [1, H]      its sigmoid gate (f32)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig


def moe_gguf_problems(config: ModelConfig) -> dict[str, list[str]]:
    """For each llama.cpp MoE architecture, why it cannot compute this model exactly ([] = it can)."""
    c = config
    qwen2moe, qwen3moe = [], []
    if not c.num_shared_experts:
        qwen2moe.append("qwen2moe always has a gated shared expert")
    if c.qk_norm:
        qwen2moe.append("qwen2moe has no QK-norm")
    if c.norm_topk_prob:
        qwen2moe.append("qwen2moe never renormalises the top-k weights (norm_topk_prob=false)")
    if c.num_shared_experts:
        qwen3moe.append("qwen3moe has no shared expert")
    if not c.qk_norm:
        qwen3moe.append("qwen3moe always has QK-norm")
    if not c.norm_topk_prob:
        qwen3moe.append("qwen3moe always renormalises the top-k weights (norm_topk_prob=true)")
    for problems in (qwen2moe, qwen3moe):
        if c.attention_bias:
            problems.append("attention_bias=true (no bias on attn_output)")
        if c.norm != "rmsnorm" or c.position != "rope":
            problems.append("needs norm=rmsnorm and position=rope")
    return {"qwen2moe": qwen2moe, "qwen3moe": qwen3moe}


def choose_moe_gguf_architecture(config: ModelConfig) -> str:
    problems = moe_gguf_problems(config)
    for arch, why in problems.items():
        if not why:
            return arch
    reasons = "; ".join(f"{arch}: {', '.join(why)}" for arch, why in problems.items())
    raise ConfigError(f"cannot export this mixture-of-experts model to GGUF exactly ({reasons}). "
                      "Export it to Hugging Face format instead (acornlm export hf)")


def write_moe_hyperparameters(writer: Any, config: ModelConfig) -> None:
    """`{arch}.expert_count`, `expert_used_count`, `expert_feed_forward_length` and, with a shared
    expert, `expert_shared_feed_forward_length`."""
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.num_shared_experts:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def moe_layer_tensors(config: ModelConfig, state: dict[str, np.ndarray], layer: int) -> Iterator[Any]:
    """The MoE tensors of one layer as (name, data, follows_type) triples; q/k/v zero biases for
    qwen2moe (whose Qwen1.5 originals have them)."""
    src, dst = f"model.layers.{layer}.", f"blk.{layer}."
    size = config.moe_intermediate_size
    gate_up = state[src + "mlp.experts.gate_up_proj"]
    yield dst + "ffn_gate_inp.weight", state[src + "mlp.gate.weight"], False
    yield dst + "ffn_gate_exps.weight", gate_up[:, :size], True
    yield dst + "ffn_up_exps.weight", gate_up[:, size:], True
    yield dst + "ffn_down_exps.weight", state[src + "mlp.experts.down_proj"], True
    if config.num_shared_experts:
        for proj in ("gate", "up", "down"):
            yield f"{dst}ffn_{proj}_shexp.weight", state[f"{src}mlp.shared_expert.{proj}_proj.weight"], True
        yield dst + "ffn_gate_inp_shexp.weight", state[src + "mlp.shared_expert_gate.weight"], False
        for name, heads in (("attn_q", config.num_attention_heads), ("attn_k", config.num_key_value_heads),
                            ("attn_v", config.num_key_value_heads)):
            yield f"{dst}{name}.bias", np.zeros(heads * config.head_dim, dtype=np.float32), False
