"""Causal attention for CPU training as oneDNN products, one per group of heads sharing a KV head.

Why: PyTorch's fused CPU attention (SDPA's flash kernel) does its small products through MKL, which
takes a slow generic path on AMD CPUs (see acornlm/accel/onednn.py). For the shapes of training a small
model, e.g. minimind2-small at batch 8 x 256, doing the same arithmetic as a few large oneDNN
products is faster: forward + backward of one layer's attention took ~17 instead of ~26 ms on the
2-core benchmark machine, about 6% of the training step (benchmarks/README.md).

The queries of the heads that share a KV head (GQA) are stacked row by row, position-major (row
t * group + g is head g at position t), so one product covers the whole group and a row's causal
mask depends only on t. The whole T x T score matrix is computed and masked: it costs the FLOPs
that MFU counts (12 L H Q T per token), and skipping the masked half in blocks made more, smaller
products that were slower. The probabilities are kept for the backward pass, B x H x T x T floats,
which is why this path is used only for moderate sequence lengths (`use_onednn_attention`).
"""

from __future__ import annotations

import functools

import torch

from acornlm.accel import onednn as ops
from acornlm.model.transformer import sdpa_attention

# Used when the stacked rows of one group (T x group) are at least MIN_ROWS, T is at most MAX_LEN,
# and, for training, one layer's kept probabilities fit in MAX_KEPT_BYTES: with fewer rows the
# per-group calls cost more than they save; the kept probabilities grow with B T^2 where SDPA's
# memory grows with B T (minimind2-small at 8 x 256 keeps 16 MiB per layer, 128 MiB in all).
# Measured crossovers are in benchmarks/README.md.
MIN_ROWS = 1024
MAX_LEN = 512
MAX_KEPT_BYTES = 64 * 2**20
ENABLED = True  # False: always SDPA (benchmarks/train_throughput.py's acornlm_sdpa)


def use_onednn_attention(q: torch.Tensor, kv_heads: int, dropout: float) -> bool:
    """Plain causal self-attention of fp32 CPU tensors, no dropout, not traced or compiled, a shape
    where the products beat SDPA, and for training probabilities that fit the budget. q is [B, heads, T, D].
    Not under autocast: there q (fp32 after RoPE) and v (bf16 from its projection) differ in dtype, and
    SDPA, which autocast casts, computes the attention in the lower precision asked for."""
    if not (ENABLED and ops.USE_ONEDNN and ops.ONEDNN_AVAILABLE) or ops.autocast_on_cpu():
        return False
    batch, heads, seq, _ = q.shape
    if not (q.is_cpu and q.dtype == torch.float32 and dropout == 0.0 and seq <= MAX_LEN
            and seq * (heads // kv_heads) >= MIN_ROWS):
        return False
    if torch.is_grad_enabled() and q.requires_grad and batch * heads * seq * seq * 4 > MAX_KEPT_BYTES:
        return False
    return not ops.is_traced_or_compiled()


@functools.lru_cache(maxsize=8)
def causal_bias(seq: int, group: int) -> torch.Tensor:
    """The additive causal mask for position-major stacked rows: [seq * group, seq], 0 where
    key <= query position, -inf elsewhere."""
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    bias = torch.zeros(seq, seq).masked_fill_(~allowed, float("-inf"))
    return bias.repeat_interleave(group, dim=0)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      keep_probs: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The forward pass of `OneDNNCausalAttention`; also returns (scaled q, k, v, P) for the
    backward pass when keep_probs."""
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    rows = seq * group
    # Scaled queries, stacked position-major per KV head: [B, kv_heads, T * group, D].
    scaled_q = torch.empty(batch, kv_heads, seq, group, head_dim)
    torch.mul(q.unflatten(1, (kv_heads, group)).transpose(2, 3), head_dim ** -0.5, out=scaled_q)
    scaled_q = scaled_q.view(batch, kv_heads, rows, head_dim)
    k, v = k.contiguous(), v.contiguous()
    bias = causal_bias(seq, group)
    probs = torch.empty(batch, kv_heads, rows, seq) if keep_probs else None
    out = torch.empty(batch, seq, kv_heads, group, head_dim)
    for b in range(batch):
        for h in range(kv_heads):
            scores = torch.ops.mkldnn._linear_pointwise.binary(scaled_q[b, h], bias, k[b, h], None, "add")
            p = torch.softmax(scores, dim=-1, out=probs[b, h]) if keep_probs else torch.softmax(scores, dim=-1)
            out[b, :, h] = ops.onednn_matmul(p, v[b, h].t()).view(seq, group, head_dim)
    return out.view(batch, seq, heads * head_dim), ((scaled_q, k, v, probs) if keep_probs else ())


class OneDNNCausalAttention(torch.autograd.Function):
    """Scaled dot-product attention (Vaswani et al. 2017) with a causal mask and grouped KV heads:
    S = Q K^T / sqrt(d) + M, P = softmax(S), O = P V.

    Backward (the softmax Jacobian applied row by row): dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d).

    q [B, heads, T, D], k and v [B, kv_heads, T, D], any strides; returns [B, T, heads * D], the
    layout the output projection reads.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, saved = attention_forward(q, k, v, keep_probs=True)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        scaled_q, k, v, probs = ctx.saved_tensors
        batch, kv_heads, rows, head_dim = scaled_q.shape
        seq = k.shape[2]
        group = rows // seq
        grad = grad_out.reshape(batch, seq, kv_heads, group, head_dim)
        grad_q = torch.empty(batch, seq, kv_heads, group, head_dim)
        grad_k_t = torch.empty(batch, kv_heads, head_dim, seq)  # dK^T and dV^T: see below
        grad_v_t = torch.empty(batch, kv_heads, head_dim, seq)
        for b in range(batch):
            for h in range(kv_heads):
                g = grad[b, :, h].reshape(rows, head_dim)
                p = probs[b, h]
                # dV^T = dO^T P and dK^T = Q^T dS: oneDNN then reads P and dS transposed in place
                # and copies only the narrow [D, rows] operand.
                grad_v_t[b, h] = ops.onednn_matmul(g.t(), p.t())
                grad_p = ops.onednn_matmul(g, v[b, h])
                grad_s = torch._softmax_backward_data(grad_p, p, -1, torch.float32)
                grad_q[b, :, h] = ops.onednn_matmul(grad_s, k[b, h].t()).view(seq, group, head_dim)
                grad_k_t[b, h] = ops.onednn_matmul(scaled_q[b, h].t(), grad_s.t())
        grad_q.mul_(head_dim ** -0.5)
        grad_q = grad_q.view(batch, seq, kv_heads * group, head_dim).transpose(1, 2)
        return grad_q, grad_k_t.transpose(2, 3), grad_v_t.transpose(2, 3)


def onednn_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + causal mask) V as oneDNN products; [B, T, heads * D]. Without
    gradients (evaluation, prefill) the probabilities are not kept."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return OneDNNCausalAttention.apply(q, k, v)
    return attention_forward(q, k, v, keep_probs=False)[0]


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(d) + mask) V for one new token per row: a batched decode step.

    q [B, heads, 1, D]; k, v [B, kv_heads, T, D]; mask [B, 1, 1, T] (True = may attend). The query
    heads that share a KV head (GQA) are multiplied together as one [group, D] x [D, T] product. For
    this shape plain matmuls beat the fused SDPA kernel on the CPU: in the engine's 16-row decode step
    of minimind2-small, the 8 layers' attention took 1.7-3.2 ms instead of 2.3-4.1 ms (benchmarks/README.md).
    Returns [B, heads, 1, D].
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * head_dim ** -0.5  # [B, kv_heads, group, T]
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(weights, v).view(batch, heads, 1, head_dim)


def is_batched_decode_step(q: torch.Tensor, mask: torch.Tensor | None, dropout: float) -> bool:
    """One new token in each of several rows with a per-row key mask [B, 1, 1, S] (the engine's
    continuous-batching decode step), on the CPU, without gradients."""
    return (q.shape[2] == 1 and q.shape[0] > 1 and mask is not None and mask.dtype == torch.bool
            and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and dropout == 0.0
            and q.is_cpu and not (torch.is_grad_enabled() and q.requires_grad))


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  is_causal: bool, dropout: float) -> torch.Tensor:
    """The reference `sdpa_attention` (acornlm/model/transformer.py), with the CPU's faster products
    where they apply: oneDNN causal attention for training and scoring, grouped matmuls for the
    engine's batched decode step. Registered as the "acornlm_cpu" attention by `accelerate`."""
    if is_causal and mask is None and use_onednn_attention(q, k.shape[1], dropout):
        return onednn_causal_attention(q, k, v)
    if is_batched_decode_step(q, mask, dropout):
        batch, heads, seq, head_dim = q.shape
        return one_query_attention(q, k, v, mask).transpose(1, 2).reshape(batch, seq, heads * head_dim)
    return sdpa_attention(q, k, v, mask, is_causal, dropout)
