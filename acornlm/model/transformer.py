"""One configurable decoder-only Transformer for the GPT-2 and the Llama/Qwen3/MiniMind families.

Read top to bottom: norms, rotary positions, attention, feed-forward, a block, the model.
Parameter names are Hugging Face Llama/Qwen3's (`model.layers.0.self_attn.q_proj.weight`,
`model.layers.0.mlp.gate_proj.weight`, `model.norm.weight`, `lm_head.weight`), so a
checkpoint of the Llama family is a transformers checkpoint without renaming.

This file is the reference: plain `nn.Linear` layers and every formula written out. Speed is
applied from outside by `acornlm.accel.accelerate(model, ...)` (the Trainer, the Engine and
`acornlm.load` call it), which swaps in CPU kernels with the same results and registers faster
attention functions in `ATTENTION_FUNCTIONS`; tests/test_accel.py checks that logits and
gradients agree with this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from acornlm.errors import ConfigError
from acornlm.model.config import ModelConfig
from acornlm.model.kv_cache import KVCache
from acornlm.model.moe import MoEFeedForward
from acornlm.model.rope import dynamic_cos_sin, is_dynamic_beyond, rope_tables


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim]. The mean square is taken in float32 even for bf16/fp16 inputs
        (as F.rms_norm and transformers do), then cast back before the per-channel scale."""
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # [..., 1]
        return (x32 * inv_rms).to(x.dtype) * self.weight


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)


def rope_frequencies(head_dim: int, max_positions: int, theta: float,
                     scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al. 2021) angles: angle[p, i] = p * theta^(-2i/d), repeated for both halves,
    optionally scaled (linear, dynamic NTK, YaRN: see acornlm/model/rope.py).

    Returns cos and sin of shape [max_positions, head_dim] in float32.
    """
    return rope_tables(head_dim, max_positions, theta, scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the two halves of the last dim (the HF / NeoX convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x * cos(p·θ) + rotate_half(x) * sin(p·θ)."""
    return x * cos + rotate_half(x) * sin


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool, dropout: float) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017), written out: softmax(Q K^T / sqrt(d) + M) V.

    q [B, heads, T, D]; k, v [B, kv_heads, S, D] (S >= T: cached positions come first); mask None
    or boolean, broadcastable to [B, heads, T, S] (True = may attend); is_causal: query t sees keys
    <= S - T + t. Grouped-query attention (GQA, Ainslie et al. 2023): each of the kv_heads serves
    heads / kv_heads query heads. Returns [B, T, heads * D].
    """
    batch, heads, seq, head_dim = q.shape
    keys = k.shape[2]
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [B, heads, S, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)  # [B, heads, T, S]
    if is_causal:
        mask = torch.ones(seq, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - seq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)  # each row sums to 1 over the keys it may see
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs, v)  # [B, heads, T, D]
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool, dropout: float) -> torch.Tensor:
    """The same as `eager_attention`, through PyTorch's fused kernel (flash / memory-efficient
    attention where the device has one): no [T, S] score matrix is kept."""
    batch, heads, seq, head_dim = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                         enable_gqa=k.shape[1] != heads)  # [B, heads, T, D]
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


# Attention implementations by name, as transformers' ALL_ATTENTION_FUNCTIONS. `register_attention`
# adds more (acornlm.accel registers its CPU kernels); `Transformer.set_attention` picks one.
ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}


def register_attention(name: str, function) -> None:
    """Make `function` (with eager_attention's signature and results) selectable as `name`."""
    ATTENTION_FUNCTIONS[name] = function


class CausalSelfAttention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V with a causal mask, grouped-query KV heads,
    optional QK-norm and RoPE, and an optional KV cache for generation.

    The attention itself is `ATTENTION_FUNCTIONS[self.attn_implementation]` ("sdpa" by default).
    """

    attn_implementation = "sdpa"

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> queries [B, T, heads * D], keys and values [B, T, kv_heads * D]."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on the queries and keys [B, heads, T, D]."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; with a cache, the new tokens see the cached ones too."""
        batch, seq, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if rope is not None:
            q, k = self.rotate(q, k, *rope)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)
        if attention_mask is not None:  # rows of different lengths (continuous batching): the caller's mask
            mask, is_causal = attention_mask, False
        elif past == 0:
            mask, is_causal = None, seq > 1  # plain causal attention over the new tokens
        elif seq == 1:
            mask, is_causal = None, False  # one new token sees every cached position
        else:  # several new tokens after a cached prefix: token i sees positions <= past + i
            total = past + seq
            mask = torch.ones(seq, total, dtype=torch.bool, device=x.device).tril(diagonal=past)
            is_causal = False
        dropout = self.dropout if self.training else 0.0
        attention = ATTENTION_FUNCTIONS[self.attn_implementation]
        out = attention(q, k, v, mask, is_causal, dropout)  # [B, T, heads * D]
        return self.o_proj(out)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020), or GELU MLP: down(gelu(up(x))) (GPT-2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> gate(x), up(x), each [B, T, intermediate]."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]."""
        if self.gated:
            gate, up = self.project_gate_up(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = CausalSelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = MoEFeedForward(config) if config.num_experts else FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, cache, attention_mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class DecoderStack(nn.Module):
    """Embeddings, the blocks and the final norm: HF's `model.` prefix."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)


class Transformer(nn.Module):
    """The language model: token ids [B, T] -> next-token logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        if config.vocab_size == 0:
            raise ConfigError("model.vocab_size is 0 (auto); set it to the tokenizer's size before building")
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()
        self.reset_parameters()

    def init_rope(self) -> None:
        """(Re)compute the RoPE cos/sin tables; they are derived, so checkpoints do not store them."""
        c = self.config
        if c.position == "rope":
            device = self.lm_head.weight.device
            device = "cpu" if device.type == "meta" else device
            cos, sin = rope_frequencies(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, residual output projections scaled by
        1/sqrt(2·layers) so the residual stream's variance does not grow with depth; zero biases."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, MoEFeedForward):  # stacked expert weights and the router
                module.reset_parameters(std, residual_std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def rope_for(self, start: int, seq: int, positions: torch.Tensor | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the new tokens: [seq, D] at start..start+seq, or [B, 1, T, D] for `positions`.

        Rows of the precomputed tables, except dynamic NTK past the original length, whose
        frequencies depend on the current length (the largest position + 1, as in transformers):
        they are recomputed here for the new tokens only, so with a KV cache the cached keys keep
        the frequencies of the length at which they were computed (transformers' generate does the same).
        """
        c = self.config
        dynamic = bool(c.rope_scaling) and c.rope_scaling["rope_type"] == "dynamic"
        length = start + seq
        if dynamic and positions is not None:  # (a device sync, so only for dynamic NTK)
            length = int(positions.max()) + 1 if positions.numel() else 0
        if dynamic and is_dynamic_beyond(c.rope_scaling, length):
            index = positions if positions is not None else torch.arange(start, start + seq,
                                                                          device=self.rope_cos.device)
            cos, sin = dynamic_cos_sin(c.head_dim, c.rope_theta, c.rope_scaling, index, length)
        elif positions is None:
            cos, sin = self.rope_cos[start:start + seq], self.rope_sin[start:start + seq]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if positions is not None:  # one row of angles per sequence, shared by its heads
            cos, sin = cos[:, None], sin[:, None]
        return cos.to(dtype), sin.to(dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position [B, T, vocab]; with a cache, the new tokens continue the cached ones.

        For a batch of sequences of different lengths (continuous batching, see acornlm.infer.engine),
        the caller passes each row's `positions` [B, T] and a boolean `attention_mask` [B, 1, T, S]
        (True = may attend), and a cache that stores each row at its own position.
        `logits_at` [B] picks one position per row and returns its logits only, [B, 1, vocab]:
        prefilling a prompt needs the next-token logits of its last token, and skipping the
        others skips most of a [T, hidden] x [hidden, vocab] product.
        """
        hidden = self.hidden_states(input_ids, cache, positions, attention_mask)
        if logits_at is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_at][:, None]
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final (normed) hidden states [B, T, hidden]: `forward` without the output head."""
        _, seq = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        rope = None
        if positions is None:  # every row continues at the cache's shared length
            start = cache.length if cache is not None else 0
            if start + seq > self.config.max_position_embeddings:
                raise ConfigError(
                    f"sequence of {start + seq} tokens is longer than "
                    f"model.max_position_embeddings={self.config.max_position_embeddings}"
                )
            if self.config.position == "learned":
                x = x + self.model.embed_positions(torch.arange(start, start + seq, device=input_ids.device))
            else:
                rope = self.rope_for(start, seq, None, x.dtype)
        elif self.config.position == "learned":
            x = x + self.model.embed_positions(positions)
        else:  # one row of angles per sequence, shared by its heads: [B, 1, T, D]
            rope = self.rope_for(0, seq, positions, x.dtype)
        x = self.model.dropout(x)
        for layer in self.model.layers:
            x = layer(x, rope, cache, attention_mask)
        if cache is not None:
            cache.advance(seq)
        return self.model.norm(x)

    def set_attention(self, name: str) -> Transformer:
        """Compute attention with ATTENTION_FUNCTIONS[name] in every layer ("eager", "sdpa", or one
        registered by acornlm.accel); returns self."""
        if name not in ATTENTION_FUNCTIONS:
            raise ConfigError(f"unknown attention implementation {name!r}; known: {sorted(ATTENTION_FUNCTIONS)}")
        for layer in self.model.layers:
            layer.self_attn.attn_implementation = name
        return self

    def num_params(self, trainable_only: bool = False) -> int:
        """Distinct parameters (a tied embedding/head matrix counts once; int8-quantized weights count too)."""
        count = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        if not trainable_only:
            tied_head = "lm_head.qweight" if self.config.tie_word_embeddings else None  # a copy of the embedding
            count += sum(b.numel() for name, b in self.named_buffers() if name.endswith("qweight") and name != tied_head)
        return count

    def moe_layers(self) -> list[MoEFeedForward]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEFeedForward)]

    def active_params(self) -> int:
        """Parameters one token uses: all of a dense model; for MoE, the router, the top-k routed
        experts and the shared expert of each layer instead of every expert."""
        inactive = sum(moe.total_params() - moe.active_params() for moe in self.moe_layers())
        return self.num_params() - inactive

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE load-balancing loss of the latest training forward pass, summed over the layers
        (unweighted: the Trainer multiplies by model.router_aux_loss_coef); None for a dense model."""
        losses = [moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def clear_aux_loss(self) -> None:
        """Drop the stored load-balancing losses (and the autograd graph they hold)."""
        for moe in self.moe_layers():
            moe.aux_loss = None

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu): 6N + 12·L·H·Q·T.

        N counts the matrices that multiply (the output head included, the embedding lookups
        excluded; for MoE only the active experts, see active_params), L layers, H heads,
        Q head dim, T sequence length.
        """
        n = self.active_params()
        stack = self.model
        if hasattr(stack, "embed_positions"):
            n -= stack.embed_positions.weight.numel()
        if not self.config.tie_word_embeddings:
            n -= stack.embed_tokens.weight.numel()
        c = self.config
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding's: linear layers may hold int8 weights, see infer.quantize)."""
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, max_length: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated KV cache for `batch_size` sequences of up to `max_length` tokens."""
        c = self.config
        return KVCache(
            num_layers=c.num_hidden_layers, batch_size=batch_size, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, max_length=max_length or c.max_position_embeddings,
            dtype=dtype or self.dtype, device=self.device,
        )
