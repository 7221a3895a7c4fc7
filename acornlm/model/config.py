"""ModelConfig: one dataclass describes every architecture acornlm builds.

Field names follow Hugging Face (`hidden_size`, `num_key_value_heads`, ...) so a config
maps onto a transformers `config.json` without renaming. The last group of fields picks
the family: GPT-2 is `norm=layernorm, mlp=gelu, position=learned, bias=True`; the
Llama / Qwen3 / MiniMind family is `norm=rmsnorm, mlp=swiglu, position=rope`, with
`qk_norm=True` for Qwen3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from acornlm.errors import ConfigError
from acornlm.model.rope import normalize_rope_scaling

# Sanity bounds, far above any real model (Llama 3.1 405B: hidden 16384, 126 layers; the longest
# contexts ~1M tokens; the largest vocabularies ~262k). They exist because a config.json is input:
# RoPE tables, masks and the model itself are sized from these numbers before any weight is read,
# so 10**12 positions would ask for terabytes and a million layers would never finish building.
MAX_WIDTH = 2**20          # vocab_size, hidden_size, intermediate sizes, head_dim
MAX_POSITIONS = 2**20      # max_position_embeddings (RoPE cos/sin tables hold positions x head_dim)
MAX_COUNT = 1024           # num_hidden_layers, heads, experts (each one is a module to build)
SIZE_BOUNDS = {"vocab_size": MAX_WIDTH, "hidden_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
               "head_dim": MAX_WIDTH, "moe_intermediate_size": MAX_WIDTH,
               "shared_expert_intermediate_size": MAX_WIDTH, "max_position_embeddings": MAX_POSITIONS,
               "num_hidden_layers": MAX_COUNT, "num_attention_heads": MAX_COUNT,
               "num_key_value_heads": MAX_COUNT, "num_experts": MAX_COUNT}


@dataclass
class ModelConfig:
    """Shape and family of the Transformer.

    Args:
        vocab_size: Number of token ids (must cover the tokenizer's vocabulary); 0 = the tokenizer's size.
        hidden_size: Width of the residual stream (d_model).
        intermediate_size: Width of the feed-forward hidden layer.
        num_hidden_layers: Number of Transformer blocks.
        num_attention_heads: Query heads per attention layer.
        num_key_value_heads: Key/value heads; fewer than query heads means grouped-query attention (GQA).
            0 means "same as num_attention_heads".
        head_dim: Width of one head; 0 means hidden_size // num_attention_heads.
        max_position_embeddings: Longest sequence the model accepts (context length).
        rope_theta: RoPE base frequency (10000 for Llama 2, 1e6 for Qwen3/MiniMind).
        rope_scaling: RoPE scaling to run beyond the trained length, as the Hugging Face dict:
            {"rope_type": "yarn" | "linear" | "dynamic", "factor": s, "original_max_position_embeddings": L}
            (L = trained length; YaRN also takes beta_fast, beta_slow, attention_factor, mscale,
            mscale_all_dim, truncate). null = plain RoPE. See acornlm/model/rope.py.
        norm_eps: Epsilon inside LayerNorm / RMSNorm.
        tie_word_embeddings: Share the input embedding matrix with the output head.
        dropout: Dropout on attention weights and residual branches (0 for pretraining small data-rich runs).
        norm: "rmsnorm" (Llama family) or "layernorm" (GPT-2 family).
        mlp: "swiglu" (gate/up/down, Llama family) or "gelu" (up/down, GPT-2 family).
        position: "rope" (rotary, rotate_half convention) or "learned" (absolute embeddings, GPT-2).
        qk_norm: RMSNorm on each query and key head before RoPE (Qwen3).
        attention_bias: Bias on the q/k/v/o projections (GPT-2: true; Llama: false).
        mlp_bias: Bias on the feed-forward projections (GPT-2: true; Llama: false).
        norm_bias: Bias in LayerNorm (ignored for RMSNorm).
        initializer_range: Standard deviation of the normal weight initialisation.
        num_experts: Routed experts of a mixture-of-experts (MoE) feed-forward in every layer; 0 = dense.
        num_experts_per_tok: Experts each token is routed to (top-k).
        moe_intermediate_size: Hidden width of one routed expert; 0 = intermediate_size.
        norm_topk_prob: Renormalise the top-k router probabilities to sum to 1 (Qwen3-MoE, MiniMind).
        num_shared_experts: 0 or 1: an always-on shared expert with a learned sigmoid gate (Qwen2-MoE).
        shared_expert_intermediate_size: Hidden width of the shared expert; 0 = moe_intermediate_size.
        router_aux_loss_coef: Weight of the load-balancing loss added to the training loss (0 = off).
        aux_loss_type: "token" (Switch/Qwen: over all tokens of the batch) or "sequence" (DeepSeek/MiniMind
            seq_aux: per sequence, averaged).
    """

    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 0
    head_dim: int = 0
    max_position_embeddings: int = 2048
    rope_theta: float = 1e6
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    position: Literal["rope", "learned"] = "rope"
    qk_norm: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True
    initializer_range: float = 0.02
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.01
    aux_loss_type: Literal["token", "sequence"] = "token"

    def __post_init__(self) -> None:
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if not self.head_dim and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.num_experts, int) and self.num_experts > 0:  # MoE sizes: 0 = inherit
            self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
            if self.num_shared_experts:
                self.shared_expert_intermediate_size = (self.shared_expert_intermediate_size
                                                        or self.moe_intermediate_size)
        self.validate()

    def validate(self) -> None:
        """Reject shapes that cannot work, with the reason, before any tensor is allocated."""
        if not is_int(self.vocab_size) or self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 0 (0 = the tokenizer's size), got {self.vocab_size!r}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        self.validate_bounds()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; pick sizes where "
                "hidden_size % num_attention_heads == 0"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_key_value_heads={self.num_key_value_heads} does not divide "
                f"model.num_attention_heads={self.num_attention_heads}; each KV head must serve "
                "a whole group of query heads"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got model.head_dim={self.head_dim}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        if self.rope_scaling and self.position != "rope":
            raise ConfigError(f"model.rope_scaling needs position=rope, got position={self.position!r}")
        choices = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"), "position": ("rope", "learned")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.validate_moe()

    def validate_bounds(self) -> None:
        """Upper bounds and finite numbers: a config.json comes from anywhere, and memory is
        allocated from these values (RoPE tables, the model) before the weights can disagree."""
        for name, bound in SIZE_BOUNDS.items():
            value = getattr(self, name)
            if is_int(value) and value > bound:
                raise ConfigError(f"model.{name}={value} is beyond the sanity bound {bound}; "
                                  "no real model is that large (a corrupt or hostile config?)")
        checks = (("rope_theta", "a finite number > 0", lambda v: v > 0),
                  ("norm_eps", "a finite number >= 0", lambda v: v >= 0),
                  ("initializer_range", "a finite number >= 0", lambda v: v >= 0),
                  ("dropout", "a finite number in [0, 1)", lambda v: 0 <= v < 1),
                  ("router_aux_loss_coef", "a finite number >= 0", lambda v: v >= 0))
        for name, wanted, accept in checks:
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value) or not accept(value):
                raise ConfigError(f"model.{name} must be {wanted}, got {value!r}")

    def validate_moe(self) -> None:
        """Mixture-of-experts settings: checked only when num_experts > 0 (0 = a dense model)."""
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ConfigError(f"model.num_experts must be an integer >= 0 (0 = dense), got {self.num_experts!r}")
        if self.num_experts == 0:
            return
        k = self.num_experts_per_tok
        if not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ConfigError(f"model.num_experts_per_tok (top-k) must be between 1 and "
                              f"model.num_experts={self.num_experts}, got {k!r}")
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"model.{name} must be a positive integer (0 = inherit), got {value!r}")
        if self.num_shared_experts not in (0, 1):
            raise ConfigError(f"model.num_shared_experts must be 0 or 1 (one gated shared expert, as Qwen2-MoE), "
                              f"got {self.num_shared_experts!r}; widen shared_expert_intermediate_size instead")
        if self.aux_loss_type not in ("token", "sequence"):
            raise ConfigError(f"model.aux_loss_type must be 'token' or 'sequence', got {self.aux_loss_type!r}")
        if self.mlp != "swiglu":
            raise ConfigError(f"model.num_experts={self.num_experts} needs model.mlp=swiglu (experts are SwiGLU), "
                              f"got {self.mlp!r}")
        if self.mlp_bias:
            raise ConfigError("model.mlp_bias=true is not supported with model.num_experts > 0 "
                              "(experts have no biases, as in Qwen-MoE and Mixtral)")

    @property
    def is_moe(self) -> bool:
        """True when the feed-forward is a mixture of experts."""
        return self.num_experts > 0

    @property
    def family(self) -> str:
        """"gpt2" for learned-position LayerNorm models, "qwen3" with QK-norm, else "llama"."""
        if self.position == "learned":
            return "gpt2"
        return "qwen3" if self.qk_norm else "llama"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def is_int(value: Any) -> bool:
    """An integer, but not a bool (JSON `true` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
