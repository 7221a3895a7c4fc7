"""RoPE frequencies, plain and scaled for inference beyond the trained length.

RoPE (Su et al. 2021) rotates each pair of dimensions i of a query/key at position p by the
angle p·θ^(-2i/d). A model only ever saw positions below its trained length L; the scalings
change the frequencies so that longer sequences land on angles the model knows:

    linear   position interpolation (Chen et al. 2023): every frequency / s, so s·L positions span
             the angles L used to. Changes every position, short ones included.
    dynamic  dynamic NTK-aware scaling (bloc97/emozilla 2023): the base grows with the current
             length T, θ' = θ·(s·T/L − (s − 1))^(d/(d−2)); exactly plain RoPE while T <= L.
    yarn     YaRN (Peng et al. 2023): NTK-by-parts interpolation; dimensions that turn more than
             beta_fast times within L keep their frequency, those turning fewer than beta_slow
             times are interpolated by s, with a linear ramp between; cos and sin (hence the
             attention logits, squared) are multiplied by the attention factor 0.1·ln(s) + 1.

`rope_scaling` is the Hugging Face dict (`{"rope_type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 2048, ...}`), and the numbers match transformers'
`ROPE_INIT_FUNCTIONS`, so an exported model computes the same logits in transformers.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from acornlm.errors import ConfigError

# For each type: the keys it needs and the keys it may have (besides rope_type).
REQUIRED_KEYS = {
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings"},
}
OPTIONAL_KEYS = {
    "linear": {"original_max_position_embeddings"},
    "dynamic": set(),
    "yarn": {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
}
PLAIN = (None, "", "none", "default")


MAX_FACTOR = 1024.0  # beyond any real context extension; inf or 1e300 would make the frequencies 0 or nan


def normalize_rope_scaling(scaling: Any) -> dict[str, Any] | None:
    """The validated scaling dict (None for plain RoPE), or a ConfigError naming the bad field.

    Accepts transformers' older spelling `"type"` for `"rope_type"`.
    """
    if scaling is None or (isinstance(scaling, str) and scaling.lower() in PLAIN):
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"model.rope_scaling must be a dict like {{'rope_type': 'yarn', 'factor': 4.0, "
                          f"'original_max_position_embeddings': 2048}} or null, got {scaling!r}")
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if kind in PLAIN:
        return None
    if kind not in REQUIRED_KEYS:
        raise ConfigError(f"model.rope_scaling.rope_type={kind!r} is not supported; "
                          f"use one of {sorted(REQUIRED_KEYS)} (or null for plain RoPE)")
    missing = sorted(REQUIRED_KEYS[kind] - set(scaling))
    if missing:
        hint = " (the context length the model was trained with)" if "original_max_position_embeddings" in missing else ""
        raise ConfigError(f"model.rope_scaling ({kind}) needs {', '.join(missing)}{hint}")
    unknown = sorted(set(scaling) - REQUIRED_KEYS[kind] - OPTIONAL_KEYS[kind])
    if unknown:
        raise ConfigError(f"model.rope_scaling ({kind}) has unknown keys {unknown}; it takes "
                          f"{sorted(REQUIRED_KEYS[kind] | OPTIONAL_KEYS[kind])}")
    out: dict[str, Any] = {"rope_type": kind}
    factor = scaling["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 <= factor <= MAX_FACTOR:
        raise ConfigError(f"model.rope_scaling.factor must be a number in [1, {MAX_FACTOR:g}] (the context extension), "
                          f"got {factor!r}")
    out["factor"] = float(factor)
    if "original_max_position_embeddings" in scaling:
        original = scaling["original_max_position_embeddings"]
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise ConfigError("model.rope_scaling.original_max_position_embeddings must be a positive integer "
                              f"(the trained context length), got {original!r}")
        out["original_max_position_embeddings"] = original
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            value = scaling[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"model.rope_scaling.{key} must be a positive finite number, got {value!r}")
            out[key] = float(value)
    if out.get("beta_fast", 32.0) < out.get("beta_slow", 1.0):
        raise ConfigError(f"model.rope_scaling.beta_fast={out.get('beta_fast', 32.0)} must be >= "
                          f"beta_slow={out.get('beta_slow', 1.0)} (rotations at which the ramp starts and ends)")
    if "truncate" in scaling:
        if not isinstance(scaling["truncate"], bool):
            raise ConfigError(f"model.rope_scaling.truncate must be true or false, got {scaling['truncate']!r}")
        out["truncate"] = scaling["truncate"]
    return out


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE inverse frequencies θ^(-2i/d), i = 0 .. d/2 − 1, in float64 on the CPU
    (explicitly: models are built under `torch.device("meta")` when loaded, see checkpoint.py)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, original: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK: plain RoPE with base θ·(s·T/L − (s − 1))^(d/(d−2)), T = max(seq_len, L)."""
    length = max(seq_len, original)
    base = theta * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, base)


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """YaRN's cos/sin multiplier: the given attention_factor, else mscale(s) = 0.1·ln(s) + 1
    (DeepSeek's variant: mscale(s, mscale) / mscale(s, mscale_all_dim) when both are set)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    factor = scaling["factor"]
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN NTK-by-parts: inv_freq_i = θ_i/s·ramp_i + θ_i·(1 − ramp_i).

    Dimension i turns L·θ_i/(2π) times over the original length L; solving for i gives the
    correction dimension d·ln(L/(2π·r)) / (2·ln θ) for r = beta_fast (ramp start) and beta_slow
    (ramp end), rounded outwards unless truncate=false, as transformers does.
    """
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as transformers does
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(head_dim, theta)
    return extrapolated / factor * ramp + extrapolated * (1 - ramp)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                  seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [d/2] in float64, attention factor) for plain or scaled RoPE.

    `seq_len` is the current sequence length; only dynamic NTK uses it (None = the original length).
    """
    kind = scaling["rope_type"] if scaling else None
    if kind is None:
        return default_inv_freq(head_dim, theta), 1.0
    if kind == "linear":
        return default_inv_freq(head_dim, theta) / scaling["factor"], 1.0
    if kind == "dynamic":
        original = scaling["original_max_position_embeddings"]
        return dynamic_ntk_inv_freq(head_dim, theta, scaling["factor"], original, seq_len or original), 1.0
    return yarn_inv_freq(head_dim, theta, scaling), yarn_attention_factor(scaling)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles p·inv_freq, repeated for both halves (rotate_half layout) and
    multiplied by the attention factor: shape [*positions.shape, d], in float32."""
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def rope_tables(head_dim: int, max_positions: int, theta: float,
                scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim] (float32), computed in float64 on the CPU.

    Dynamic NTK's table is plain RoPE (its value up to the original length); longer sequences
    get their frequencies from `dynamic_cos_sin` at run time.
    """
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
    return rope_cos_sin(inv_freq, torch.arange(max_positions, dtype=torch.float64, device="cpu"), attention_factor)


def is_dynamic_beyond(scaling: dict[str, Any] | None, seq_len: int) -> bool:
    """True when dynamic NTK must recompute the frequencies for a sequence of `seq_len` tokens."""
    return bool(scaling) and scaling["rope_type"] == "dynamic" and seq_len > scaling["original_max_position_embeddings"]


def dynamic_cos_sin(head_dim: int, theta: float, scaling: dict[str, Any], positions: torch.Tensor,
                    seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic NTK cos/sin for `positions` in a sequence of `seq_len` tokens, on positions' device.

    The angles are computed in float32 on the device (as transformers does), since float64 is
    not available everywhere (MPS).
    """
    inv_freq = dynamic_ntk_inv_freq(head_dim, theta, scaling["factor"], scaling["original_max_position_embeddings"],
                                    seq_len)
    return rope_cos_sin(inv_freq.float().to(positions.device), positions)


def extended_scaling(scaling: Any, trained_length: int) -> dict[str, Any] | None:
    """A user's scaling for inference on a model trained at `trained_length` tokens, with
    original_max_position_embeddings filled in from it when missing (validated)."""
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) not in PLAIN:
        scaling = {"original_max_position_embeddings": trained_length, **scaling}
    return normalize_rope_scaling(scaling)


def extend_context(model: Any, scaling: Any = None, max_position_embeddings: int | None = None) -> None:
    """Let a loaded `Transformer` run on longer sequences than it was trained on, in place.

    `scaling` (a rope_scaling dict; original_max_position_embeddings defaults to the trained
    length) replaces the model's RoPE scaling; max_position_embeddings defaults to
    trained length × factor. Without scaling, a larger max_position_embeddings is plain RoPE
    extrapolation (the baseline that scaling improves on). Nothing to do when both are None.
    """
    if scaling is None and max_position_embeddings is None:
        return
    config = model.config
    current = config.rope_scaling or {}
    trained = current.get("original_max_position_embeddings", config.max_position_embeddings)
    new_scaling = config.rope_scaling if scaling is None else extended_scaling(scaling, trained)
    if max_position_embeddings is None:
        factor = new_scaling["factor"] if new_scaling else 1.0
        max_position_embeddings = max(config.max_position_embeddings, int(trained * factor))
    if config.position != "rope" and max_position_embeddings > config.max_position_embeddings:
        raise ConfigError(f"this model has learned position embeddings for {config.max_position_embeddings} "
                          "positions and cannot run on longer sequences (RoPE scaling needs position=rope)")
    model.config = replace(config, rope_scaling=new_scaling, max_position_embeddings=max_position_embeddings)
    model.init_rope()
