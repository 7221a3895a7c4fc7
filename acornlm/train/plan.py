"""The run planner: will a training run fit, how fast will it go, and what will it cost? (`acornlm plan`)

Everything here is arithmetic on the configs; nothing is built or allocated, so a plan for an
8-GPU node runs in a second on a laptop. Read top to bottom:

    count_params          exact parameter counts from the ModelConfig (tests: equal to the built model)
    flops_per_token       6N + 12·L·H·Q·T (PaLM appendix B), exactly Transformer.flops_per_token
    activation_bytes      what autograd keeps for the backward pass, tensor by tensor, per token
    plan_memory           peak memory per rank: weights + gradients + optimizer state + activations
                          + transient buffers + framework overhead, for DDP or FSDP, with or without
                          activation checkpointing
    largest_micro_batch   the biggest batch_size whose plan fits the device
    plan_run              all of it for one run: the table `acornlm plan` prints, or its JSON

The memory model (bytes, P parameters, N = batch_size x seq_len tokens per micro-batch):

    weights      4P (float32 masters: autocast lowers the arithmetic, never the weights; see
                 acornlm/train/precision.py) + the RoPE cos/sin tables
    optimizer    AdamW: 8P (exp_avg, exp_avg_sq); Muon: 4 bytes (momentum) per hidden-matrix parameter,
                 8 for the rest, which AdamW trains
    gradients    up to 4P (float32, like the weights); DDP adds its all-reduce buckets, another 4P
    activations  the tensors autograd saves, counted op by op for this code base's kernels (see
                 `block_activation_bytes`; tests/test_plan.py checks them against what torch saves);
                 with bf16/fp16 autocast the matmul inputs and outputs are stored in 16 bits, the
                 residual stream, norms' statistics and the log-softmax in 32, and autocast keeps a
                 16-bit copy of every weight it multiplies until the backward
    transient    short-lived buffers: the [N, vocab] gradients that start the backward pass, a
                 checkpointed block's recomputed activations, the gradients inside a block's backward;
                 with FSDP the unsharded parameters and gradients of the blocks in flight
    overhead     on a GPU, a stated GPU_OVERHEAD_BYTES (CUDA context, cuBLAS workspace, allocator
                 slack); on the CPU none, as the plan is of the memory training adds to the process

Gradients and activations do not all live at once: the backward pass frees each block's activations
as it writes that block's gradients. `peak_of_backward` walks it block by block and reports what is
alive at the peak (memory_detail also gives gradients_all and activations_all); with gradient
accumulation the gradients are alive throughout.

FSDP (FSDP2's fully_shard per block, then the root) divides weights, gradients and optimizer state
by the world size; each rank holds, for a moment, the unsharded parameters of the block it computes
and of the one it prefetches, the root's (embeddings, head), and one block's unsharded gradients
before they are reduce-scattered. fsdp_cpu_offload moves the sharded weights, gradients and optimizer
state to host memory (reported as host_memory_bytes).

Validated against measured peak memory on the CPU by benchmarks/plan_vs_measured.py; the GPU figures
(bf16 layout, overhead) follow the same counting and are not yet measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from acornlm.accel import onednn as onednn_ops
from acornlm.accel import onednn_attention
from acornlm.data.loader import read_meta
from acornlm.errors import ConfigError
from acornlm.model.config import ModelConfig
from acornlm.presets import list_presets, load_preset
from acornlm.train.activation_checkpointing import MODES as AC_MODES
from acornlm.train.activation_checkpointing import checkpointed_blocks
from acornlm.train.config import TrainConfig
from acornlm.train.devices import DeviceSpec, GiB, cpu_spec, this_machine

FP32 = 4
LOW = 2  # bf16 / fp16
INDEX = 8  # int64 token ids and targets

# On a GPU: the CUDA context (~0.3-0.6 GiB on recent drivers), cuBLAS/cuDNN workspaces and the caching
# allocator's rounding. A stated figure, not measured here (no GPU was available when this was written).
GPU_OVERHEAD_BYTES = 1 * GiB
# The share of a device's memory a plan may fill: the rest absorbs fragmentation and what the model
# does not count (evaluation, checkpoint writing, the data loader).
USABLE_FRACTION = 0.95
# On the CPU the process's peak RSS ran 1.12-1.41x the live tensor bytes the plan counts (glibc's heap
# fragments: the Trainer keeps freed memory in the process, acornlm/allocator.py); measured by
# benchmarks/plan_vs_measured.py. A CPU plan "fits" only with that margin.
CPU_RSS_PER_LIVE_BYTE = 1.45
# Typical MFU when none is given: ~35% is what small-model eager bf16 training reaches on A100/H100
# (nanoGPT reports 30-40% for GPT-2 124M); on the CPU acornlm's kernels reach 60-75% of the measured
# fp32 matmul peak (benchmarks/README.md), of which the planner assumes 50%.
DEFAULT_MFU = {"gpu": 0.35, "cpu": 0.5}
DEFAULT_TOKENS_PER_PARAM = 20  # Chinchilla (Hoffmann et al. 2022): ~20 training tokens per parameter
ASSUMED_VOCAB = 6400  # vocab_size 0 and no data to read it from: MiniMind's BPE (the ModelConfig default)

Parallel = Literal["ddp", "fsdp"]
Checkpointing = Literal["none", "full", "selective"]


# --- parameters and FLOPs ---


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a ModelConfig, as the Transformer it builds has them.

    total: distinct parameters (a tied embedding/head matrix once), = Transformer.num_params().
    per_block: parameters of one transformer block (all blocks have the same shape).
    root: parameters outside the blocks: embeddings, final norm, an untied head.
    multiplied: weights used in a matrix product (every block matrix, the router and experts, the
        head, tied or not): what autocast copies to 16 bits.
    active: parameters one token uses (MoE: k routed experts instead of all), = Transformer.active_params().
    muon: the blocks' 2-D hidden matrices that --train.optimizer muon trains with Muon (attention and
        dense or shared-expert MLP projections; see acornlm/train/muon.py); the rest (embeddings, head,
        norms, biases, a MoE router and gate, the stacked 3-D experts) stays with AdamW.
    """

    total: int
    per_block: int
    root: int
    multiplied: int
    active: int
    muon: int


def attention_params(c: ModelConfig) -> tuple[int, int]:
    """(all, matrices) of one attention layer: W_q [nh·D, H], W_k and W_v [kv·D, H], W_o [H, nh·D],
    their biases and the QK-norm weights."""
    q, kv, h = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size
    matrices = h * q + 2 * h * kv + q * h
    vectors = (q + 2 * kv + h if c.attention_bias else 0) + (2 * c.head_dim if c.qk_norm else 0)
    return matrices + vectors, matrices


def feed_forward_params(c: ModelConfig) -> tuple[int, int, int, int]:
    """(all, matrices, active, Muon's) of one feed-forward: SwiGLU 3·H·I, GELU 2·H·I, or the MoE's
    router E·H, E experts of 3·H·I_e each (k of them active) and an optional gated shared expert."""
    h = c.hidden_size
    if c.is_moe:
        expert = 3 * h * c.moe_intermediate_size
        shared_matrices = 3 * h * c.shared_expert_intermediate_size if c.num_shared_experts else 0
        shared = shared_matrices + (h if c.num_shared_experts else 0)
        router = c.num_experts * h
        total = router + c.num_experts * expert + shared
        return total, total, router + c.num_experts_per_tok * expert + shared, shared_matrices
    i = c.intermediate_size
    gated = c.mlp == "swiglu"
    matrices = (3 if gated else 2) * h * i
    bias = ((2 * i if gated else i) + h) if c.mlp_bias else 0
    return matrices + bias, matrices, matrices + bias, matrices


def norm_params(c: ModelConfig) -> int:
    """RMSNorm: a gain per channel; LayerNorm: gain and (with norm_bias) bias."""
    with_bias = c.norm == "layernorm" and c.norm_bias
    return c.hidden_size * (2 if with_bias else 1)


def count_params(c: ModelConfig) -> ParamCounts:
    """Exact counts from the config (no model is built); see ParamCounts."""
    _check_vocab(c)
    h, v = c.hidden_size, c.vocab_size
    attn, attn_matrices = attention_params(c)
    ffn, ffn_matrices, ffn_active, ffn_muon = feed_forward_params(c)
    per_block = attn + ffn + 2 * norm_params(c)
    embeddings = v * h + (c.max_position_embeddings * h if c.position == "learned" else 0)
    head = 0 if c.tie_word_embeddings else v * h
    root = embeddings + head + norm_params(c)
    layers = c.num_hidden_layers
    block_matrices = attn_matrices + ffn_matrices
    return ParamCounts(
        total=layers * per_block + root,
        per_block=per_block,
        root=root,
        multiplied=layers * block_matrices + v * h,
        active=layers * (per_block - ffn + ffn_active) + root,
        muon=layers * (attn_matrices + ffn_muon),
    )


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM appendix B; Transformer.flops_per_token):
    N the active parameters that multiply (the head included, embedding lookups excluded),
    L layers, H heads, Q head dim, T sequence length. Forward 2N, backward 4N."""
    counts = count_params(c)
    n = counts.active
    if c.position == "learned":
        n -= c.max_position_embeddings * c.hidden_size
    if not c.tie_word_embeddings:
        n -= c.vocab_size * c.hidden_size
    return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def recompute_flops_per_token(c: ModelConfig, seq_len: int, checkpointing: Checkpointing) -> float:
    """Extra FLOPs activation checkpointing spends: one more forward pass (2N_block + 4·H·Q·T per
    layer, a third of the block's 6N + 12·H·Q·T) for every recomputed block."""
    recomputed = len(checkpointed_blocks(checkpointing, c.num_hidden_layers))
    if not recomputed:
        return 0.0
    _, attn_matrices = attention_params(c)
    _, _, ffn_active, _ = feed_forward_params(c)
    block_forward = 2 * (attn_matrices + ffn_active) + 4 * c.num_attention_heads * c.head_dim * seq_len
    return recomputed * block_forward


# --- activations ---


def uses_cpu_attention_kernel(c: ModelConfig, batch: int, seq_len: int, on_cpu: bool, low_precision: bool) -> bool:
    """Whether CPU training takes acornlm's oneDNN attention (acornlm/accel/onednn_attention.py), which
    keeps the [B, heads, T, T] probabilities for the backward pass instead of SDPA's log-sum-exp."""
    if not on_cpu or low_precision or c.dropout > 0:
        return False
    if not (onednn_attention.ENABLED and onednn_ops.USE_ONEDNN and onednn_ops.ONEDNN_AVAILABLE):
        return False
    group = c.num_attention_heads // c.num_key_value_heads
    kept = batch * c.num_attention_heads * seq_len * seq_len * FP32
    return (seq_len <= onednn_attention.MAX_LEN and seq_len * group >= onednn_attention.MIN_ROWS
            and kept <= onednn_attention.MAX_KEPT_BYTES)


def block_activation_bytes(c: ModelConfig, seq_len: int, low_precision: bool, probs_kept: bool,
                           low_residual: bool = False) -> float:
    """Bytes one transformer block saves for the backward pass, per token.

    With s = 4 bytes for float32, or 2 for a 16-bit autocast (the matmul inputs and outputs), the
    tensors autograd keeps are (H hidden, I intermediate, nh/kv query/KV heads of width Q):

        2 norms          input (residual stream, float32) + 1 (RMSNorm) or 2 (LayerNorm) statistics
        matmul inputs    float32: each norm's output once; autocast casts it once per projection
                         (q, k, v; gate, up), each cast a saved 16-bit copy
        attention        q, k, v and the output: s·(2·nh·Q + 2·kv·Q), + the log-sum-exp (4·nh),
                         or, in acornlm's CPU kernel, the probabilities (4·nh·T)
        QK-norm          its inputs q and k and their statistics (in 16 bits also an upcast and a copy)
        SwiGLU           gate, silu(gate), up, their product: 4·s·I;  GELU: up and gelu(up): 2·s·I
        MoE              router probabilities, the k gathered token copies, k experts' SwiGLU (4·s·I_e
                         each), their outputs, and the shared expert's SwiGLU and gate (exact in
                         float32; under autocast within a few % of what torch saves)

    low_residual: FSDP's bf16/fp16 MixedPrecisionPolicy gathers the embedding in 16 bits, so the
    residual stream and the norms' outputs are 16-bit too, and the projections share one input
    (acornlm/train/parallel.py).

    tests/test_plan.py checks the float32 count against the tensors torch actually saves.
    """
    h, q, nh, kv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    s = LOW if low_precision else FP32
    stats = 1 if c.norm == "rmsnorm" else 2
    residual = LOW if low_residual else FP32
    norms = 2 * (residual * h + FP32 * stats)
    ffn_inputs = 2 if c.mlp == "swiglu" else 1  # gate and up, or up
    if c.is_moe:
        ffn_inputs = 1 + (3 if c.num_shared_experts else 0)  # the router; the shared expert's gate, up and gate
    if low_precision and not low_residual:  # autocast casts the float32 norm output once per projection
        matmul_inputs = 3 * s * h + ffn_inputs * s * h
    else:
        matmul_inputs = 2 * residual * h
    attention = s * (2 * nh * q + 2 * kv * q) + (FP32 * nh * seq_len if probs_kept else FP32 * nh)
    qk_norm = (s * q + FP32) * (nh + kv) if c.qk_norm else 0
    if c.qk_norm and low_precision:  # a 16-bit input with a float32 weight takes rms_norm's unfused path,
        qk_norm += (FP32 + LOW) * q * (nh + kv)  # which also keeps the float32 upcast and the normalised copy
    return norms + matmul_inputs + attention + qk_norm + feed_forward_activation_bytes(c, s)


def feed_forward_activation_bytes(c: ModelConfig, s: int) -> float:
    """Per token, the feed-forward's saved tensors (see block_activation_bytes)."""
    h = c.hidden_size
    if not c.is_moe:
        return (4 if c.mlp == "swiglu" else 2) * s * c.intermediate_size
    k = c.num_experts_per_tok
    router = FP32 * c.num_experts + (FP32 + INDEX) * k + FP32  # softmax output, top-k weights and ids, their sum
    dispatch = k * (2 * INDEX + FP32)  # per (token, slot): the sort order, the token index, the weight
    # per slot: the expert's input (gathered; under autocast its 16-bit cast), SwiGLU, its output, and the
    # output times the routing weight (float32: the weights are)
    routed = k * (2 * s * h + FP32 * h + 4 * s * c.moe_intermediate_size)
    shared = (4 * s * c.shared_expert_intermediate_size + s * h + FP32) if c.num_shared_experts else 0  # SwiGLU, output, gate
    return router + dispatch + routed + shared


def root_activation_bytes(c: ModelConfig, low_precision: bool, low_residual: bool = False) -> float:
    """Per token, outside the blocks: the token ids and targets, the final norm, the head's input,
    and the float32 log-softmax over the vocabulary that the cross-entropy keeps (4·V)."""
    stats = 1 if c.norm == "rmsnorm" else 2
    residual = LOW if low_residual else FP32
    head_input = (LOW if low_precision else FP32) * c.hidden_size
    return 2 * INDEX + residual * c.hidden_size + FP32 * stats + head_input + FP32 * c.vocab_size


# --- memory ---


@dataclass(frozen=True)
class MemoryPlan:
    """Peak memory of one rank, in bytes, broken down; `total` is their sum."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    overhead: int
    host: int = 0  # with fsdp_cpu_offload: weights, gradients and optimizer state in host memory
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient + self.overhead

    def breakdown(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "transient": self.transient, "overhead": self.overhead}


def is_low_precision(train: TrainConfig, device: DeviceSpec) -> bool:
    """dtype "auto" is bf16 autocast on a GPU and float32 on the CPU (acornlm/train/precision.py)."""
    if train.dtype == "auto":
        return device.kind == "gpu"
    return train.dtype in ("bfloat16", "float16")


def optimizer_bytes(c: ModelConfig, optimizer: str) -> int:
    """AdamW keeps two float32 moments per parameter (8P); Muon one momentum buffer for its hidden
    matrices (4 bytes each) and AdamW's two moments for the rest."""
    counts = count_params(c)
    if optimizer == "muon":
        return FP32 * counts.muon + 2 * FP32 * (counts.total - counts.muon)
    return 2 * FP32 * counts.total


def rope_table_bytes(c: ModelConfig) -> int:
    """The float32 cos/sin tables, [max_positions, head_dim] each (buffers, on every rank)."""
    return 2 * FP32 * c.max_position_embeddings * c.head_dim if c.position == "rope" else 0


def plan_memory(c: ModelConfig, train: TrainConfig, device: DeviceSpec, world_size: int = 1, *,
                batch_size: int | None = None, parallel: Parallel | None = None,
                checkpointing: Checkpointing | None = None) -> MemoryPlan:
    """Peak memory per rank of one training step of `c` with `train` on `device` (see the module doc).

    batch_size, parallel and checkpointing default to the TrainConfig's own.
    """
    batch = train.batch_size if batch_size is None else batch_size
    parallel = parallel or train.parallel
    checkpointing = checkpointing or train.activation_checkpointing
    if checkpointing not in AC_MODES:
        raise ConfigError(f"activation checkpointing must be one of {', '.join(AC_MODES)}; got {checkpointing!r}")
    counts = count_params(c)
    low = is_low_precision(train, device)
    on_cpu = device.kind == "cpu"
    tokens = batch * train.seq_len
    fsdp = parallel == "fsdp" and world_size > 1  # one process trains the plain model, whatever `parallel` says
    shards = world_size if fsdp else 1
    low_residual = low and fsdp

    weights = math.ceil(FP32 * counts.total / shards) + rope_table_bytes(c)
    all_gradients = math.ceil(FP32 * counts.total / shards)
    optimizer = math.ceil(optimizer_bytes(c, train.optimizer) / shards)
    detail: dict[str, int] = {"gradients_all": all_gradients}

    # Activations, block by block: a checkpointed block keeps only its input; under autocast (not FSDP)
    # each block also keeps 16-bit copies of its weights until its backward.
    probs_kept = uses_cpu_attention_kernel(c, batch, train.seq_len, on_cpu, low)
    per_block = block_activation_bytes(c, train.seq_len, low, probs_kept, low_residual) * tokens
    chosen = set(checkpointed_blocks(checkpointing, c.num_hidden_layers))
    kept_input = (LOW if low_residual else FP32) * c.hidden_size * tokens
    copies = LOW * (counts.multiplied - c.vocab_size * c.hidden_size) // c.num_hidden_layers if low and not fsdp else 0
    kept = [(kept_input if i in chosen else per_block) + copies for i in range(c.num_hidden_layers)]
    root = root_activation_bytes(c, low, low_residual) * tokens
    if low and not fsdp:
        root += LOW * c.vocab_size * c.hidden_size  # the head's 16-bit copy
        detail["autocast_weight_copies"] = LOW * counts.multiplied
    detail["activations_per_block"] = int(per_block)
    detail["activations_all"] = int(sum(kept) + root)

    # The peak of a step, found by walking the backward pass (see peak_of_backward).
    logits_grads = 2 * FP32 * c.vocab_size * tokens  # two float32 [N, vocab] gradients start the backward pass
    block_gradients = math.ceil(FP32 * counts.per_block / shards)
    if train.global_batch_size:  # grad_accum_steps is derived: global / (batch x world)
        accumulating = train.global_batch_size > batch * world_size
    else:
        accumulating = train.grad_accum_steps > 1
    # Inside one block's backward: the gradients of its widest tensors (one per tensor the feed-forward
    # kept) and the block's own weight gradients appear before its activations are all freed.
    backward_temporaries = feed_forward_activation_bytes(c, LOW if low else FP32) * tokens + block_gradients
    recompute = [per_block - kept_input if i in chosen else 0 for i in range(len(kept))]
    activations, gradients, transient = peak_of_backward(
        kept, root, logits_grads, recompute, backward_temporaries, all_gradients, block_gradients,
        gradients_kept=accumulating)
    if fsdp:
        param_bytes = LOW if low else FP32
        gathered = param_bytes * (2 * counts.per_block + counts.root)  # block in use + prefetched + root
        unsharded_grads = FP32 * counts.per_block
        detail["fsdp_unsharded_params"] = gathered
        detail["fsdp_unsharded_grads"] = unsharded_grads
        transient += gathered + unsharded_grads
    if parallel == "ddp" and world_size > 1:
        detail["ddp_buckets"] = FP32 * counts.total  # DDP copies gradients into flat all-reduce buckets
        gradients += FP32 * counts.total

    host = 0
    if fsdp and train.fsdp_cpu_offload and not on_cpu:
        host = weights - rope_table_bytes(c) + all_gradients + optimizer
        weights, gradients, optimizer = rope_table_bytes(c), 0, 0
    overhead = 0 if on_cpu else GPU_OVERHEAD_BYTES
    return MemoryPlan(int(weights), int(gradients), int(optimizer), int(activations), int(transient),
                      int(overhead), int(host), detail)


def peak_of_backward(kept: list[float], root: float, logits_grads: float, recompute: list[float],
                     backward_temporaries: float, all_gradients: int, block_gradients: int,
                     gradients_kept: bool) -> tuple[int, int, int]:
    """(activations, gradients, transient) alive at the step's peak.

    The forward pass ends with every block's kept activations (`kept`, block by block) and the root's
    (`root`: the log-softmax, the final norm, the head's input). The backward pass then goes:

        start       all activations + the two [N, vocab] gradients of the loss
        block i     (last to first) its own and the earlier blocks' activations, + its recomputed
                    activations if checkpointed, + the gradients written so far: the root's (head,
                    embeddings, final norm) and those of the blocks after i, + `backward_temporaries`
                    (the gradients of its activations and its weights, being computed)
        end         all gradients

    each block freeing its activations as its gradients appear. With gradient accumulation (or a
    global batch) the gradients of the previous micro-batch are there all along.
    """
    root_gradients = all_gradients - block_gradients * len(kept)
    remaining = sum(kept)  # the blocks' activations not yet freed
    events = [(remaining + root, all_gradients if gradients_kept else 0, logits_grads)]
    written = root_gradients
    for i in reversed(range(len(kept))):
        events.append((remaining, all_gradients if gradients_kept else written,
                       recompute[i] + backward_temporaries))
        remaining -= kept[i]
        written += block_gradients
    events.append((0, all_gradients, 0))
    activations, gradients, transient = max(events, key=sum)
    return int(activations), int(gradients), int(transient)


def usable_bytes(device: DeviceSpec) -> int:
    """The memory a plan may fill: USABLE_FRACTION of the device's, and on the CPU also divided by
    CPU_RSS_PER_LIVE_BYTE (the plan counts live tensor bytes; the process's RSS is higher)."""
    usable = device.memory_bytes * USABLE_FRACTION
    return int(usable / CPU_RSS_PER_LIVE_BYTE if device.kind == "cpu" else usable)


def largest_micro_batch(c: ModelConfig, train: TrainConfig, device: DeviceSpec, world_size: int = 1, *,
                        parallel: Parallel | None = None, checkpointing: Checkpointing | None = None,
                        limit: int = 1 << 16) -> int:
    """The largest batch_size whose planned peak fits the device's usable memory; 0 if not even 1.

    Memory grows with the batch, so a binary search finds it.
    """
    def fits(batch: int) -> bool:
        plan = plan_memory(c, train, device, world_size, batch_size=batch, parallel=parallel,
                           checkpointing=checkpointing)
        return plan.total <= usable_bytes(device)

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def global_batch(train: TrainConfig, world_size: int) -> int:
    """Sequences per optimizer step: global_batch_size, or batch_size x grad_accum_steps x world size."""
    return train.global_batch_size or train.batch_size * train.grad_accum_steps * world_size


def accumulation_for(global_sequences: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, grad accumulation steps) that give exactly `global_sequences` per step with a
    micro-batch of at most `micro_batch`: the largest divisor of global/world that fits."""
    per_rank = global_sequences // world_size
    if per_rank < 1 or global_sequences % world_size:
        raise ConfigError(f"the global batch of {global_sequences} sequences does not split over "
                          f"{world_size} ranks; choose a multiple of {world_size}")
    for batch in range(min(micro_batch, per_rank), 0, -1):
        if per_rank % batch == 0:
            return batch, per_rank // batch
    return 1, per_rank


# --- speed, time and cost ---


def tokens_per_second(c: ModelConfig, train: TrainConfig, device: DeviceSpec, world_size: int, mfu: float,
                      checkpointing: Checkpointing | None = None) -> float:
    """Throughput of all ranks: MFU x peak x ranks / model FLOPs per token. Recomputation by activation
    checkpointing costs time at the same hardware utilisation, so it divides by model + recompute FLOPs."""
    checkpointing = checkpointing or train.activation_checkpointing
    model_flops = flops_per_token(c, train.seq_len)
    hardware_flops = model_flops + recompute_flops_per_token(c, train.seq_len, checkpointing)
    return mfu * device.bf16_flops * world_size / hardware_flops


@dataclass
class RunPlan:
    """Everything `acornlm plan` reports; `to_json()` is its --json object."""

    model: ModelConfig
    train: TrainConfig
    device: DeviceSpec
    world_size: int
    mfu: float
    mfu_source: str
    tokens: int
    price_per_hour: float
    vocab_note: str = ""
    options: list[dict[str, Any]] = field(default_factory=list)

    @property
    def chosen(self) -> dict[str, Any]:
        return next(o for o in self.options if o["chosen"])

    def to_json(self) -> dict[str, Any]:
        chosen = self.chosen
        counts = count_params(self.model)
        return {
            "params": counts.total,
            "active_params": counts.active,
            "flops_per_token": flops_per_token(self.model, self.train.seq_len),
            "device": dataclasses.asdict(self.device),
            "world_size": self.world_size,
            "parallel": chosen["parallel"],
            "activation_checkpointing": chosen["activation_checkpointing"],
            "dtype": "bfloat16 autocast" if is_low_precision(self.train, self.device) else "float32",
            "optimizer": self.train.optimizer,
            "batch_size": self.train.batch_size,
            "seq_len": self.train.seq_len,
            "peak_memory_bytes": chosen["peak_memory_bytes"],
            "memory_breakdown": chosen["memory_breakdown"],
            "memory_detail": chosen["memory_detail"],
            "host_memory_bytes": chosen["host_memory_bytes"],
            "device_memory_bytes": self.device.memory_bytes,
            "usable_memory_bytes": usable_bytes(self.device),
            "fits": chosen["fits"],
            "largest_micro_batch": chosen["largest_micro_batch"],
            "global_batch": chosen["global_batch"],
            "suggested_batch_size": chosen["suggested_batch_size"],
            "suggested_grad_accum_steps": chosen["suggested_grad_accum_steps"],
            "mfu": self.mfu,
            "mfu_source": self.mfu_source,
            "tokens_per_s": chosen["tokens_per_s"],
            "tokens": self.tokens,
            "time_s": chosen["time_s"],
            "price_per_hour": self.price_per_hour,
            "cost": chosen["cost"],
            "vocab_note": self.vocab_note,
            "advice": advice(self) if not chosen["fits"] else [],
            "options": self.options,
        }


def _option(c: ModelConfig, train: TrainConfig, device: DeviceSpec, world_size: int, parallel: Parallel,
            checkpointing: Checkpointing, mfu: float, tokens: int, price: float) -> dict[str, Any]:
    memory = plan_memory(c, train, device, world_size, parallel=parallel, checkpointing=checkpointing)
    largest = largest_micro_batch(c, train, device, world_size, parallel=parallel, checkpointing=checkpointing)
    sequences = global_batch(train, world_size)
    try:
        suggested = accumulation_for(sequences, largest, world_size) if largest else (0, 0)
    except ConfigError:
        suggested = (0, 0)
    speed = tokens_per_second(c, train, device, world_size, mfu, checkpointing)
    seconds = tokens / speed
    return {
        "parallel": parallel, "activation_checkpointing": checkpointing,
        "chosen": parallel == train.parallel and checkpointing == train.activation_checkpointing,
        "peak_memory_bytes": memory.total, "memory_breakdown": memory.breakdown(),
        "memory_detail": memory.detail, "host_memory_bytes": memory.host,
        "fits": memory.total <= usable_bytes(device), "largest_micro_batch": largest,
        "global_batch": sequences, "suggested_batch_size": suggested[0],
        "suggested_grad_accum_steps": suggested[1],
        "tokens_per_s": speed, "time_s": seconds, "cost": seconds / 3600 * price * world_size,
    }


def plan_run(c: ModelConfig, train: TrainConfig, device: DeviceSpec, world_size: int = 1, *,
             mfu: float | None = None, tokens: int | None = None,
             tokens_per_param: float = DEFAULT_TOKENS_PER_PARAM, price_per_hour: float | None = None,
             vocab_note: str = "") -> RunPlan:
    """The plan of a run: every DDP/FSDP x checkpointing option, the configured one marked `chosen`.

    mfu: measured or expected model FLOPs utilisation (default DEFAULT_MFU for the device kind);
    tokens: the token budget (default tokens_per_param x parameters); price_per_hour: per device
    (default: the device table's).
    """
    if world_size < 1:
        raise ConfigError(f"--world_size must be >= 1, got {world_size}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    if device.count > 1 and world_size > device.count:
        raise ConfigError(f"--world_size {world_size} is more than the {device.count} devices of --device "
                          f"{device.name}; use --device {world_size}x... or a smaller --world_size")
    if train.seq_len > c.max_position_embeddings:
        raise ConfigError(f"train.seq_len={train.seq_len} is longer than model.max_position_embeddings="
                          f"{c.max_position_embeddings}; lower train.seq_len")
    mfu_source = "given by --mfu" if mfu is not None else f"typical for a {device.kind}; --mfu to change"
    mfu = DEFAULT_MFU[device.kind] if mfu is None else mfu
    counts = count_params(c)
    tokens = int(tokens if tokens is not None else tokens_per_param * counts.total)
    price = device.price_per_hour if price_per_hour is None else price_per_hour
    plan = RunPlan(c, train, device, world_size, mfu, mfu_source, tokens, price, vocab_note)
    for parallel in ("ddp", "fsdp"):
        for checkpointing in AC_MODES:
            plan.options.append(_option(c, train, device, world_size, parallel, checkpointing, mfu, tokens, price))
    return plan


def resolve_vocab(model: ModelConfig, data: str | Path | None) -> tuple[ModelConfig, str]:
    """vocab_size 0 means the tokenizer's: read it from DATA's meta.json, else assume ASSUMED_VOCAB.
    Returns the model and a note saying where the vocabulary came from ("" when it was set)."""
    if model.vocab_size:
        return model, ""
    if data is not None:
        vocab = (read_meta(data).get("tokenizer") or {}).get("vocab_size")
        if not isinstance(vocab, int) or vocab <= 0:
            raise ConfigError(f"{Path(data) / 'meta.json'} holds no tokenizer vocab_size; "
                              "run `acornlm data prepare` again or set --model.vocab_size")
        return dataclasses.replace(model, vocab_size=vocab), f"{vocab:,} tokens (the tokenizer of {data})"
    return (dataclasses.replace(model, vocab_size=ASSUMED_VOCAB),
            f"model.vocab_size is 0 (the tokenizer's size): assumed {ASSUMED_VOCAB:,} tokens; "
            "pass --data DIR or --model.vocab_size N for yours")


def plan_for_data(data: str | Path | None, model: ModelConfig, train: TrainConfig, device: DeviceSpec,
                  world_size: int = 1, **options: Any) -> RunPlan:
    """plan_run with the vocabulary resolved from DATA (see resolve_vocab)."""
    model, note = resolve_vocab(model, data)
    return plan_run(model, train, device, world_size, vocab_note=note, **options)


def dry_run_plan(data: str | Path, model: ModelConfig, train: TrainConfig) -> RunPlan:
    """The plan `train pretrain --dry-run` prints: the device the run would take (--train.device; "auto"
    is the first GPU if there is one, else the CPU) and, under torchrun, WORLD_SIZE ranks."""
    device = cpu_spec() if train.device == "cpu" else this_machine()
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    return plan_for_data(data, model, train, device, world_size)


# --- when it does not fit ---


def fsdp_ranks_needed(c: ModelConfig, train: TrainConfig, device: DeviceSpec, checkpointing: Checkpointing,
                      limit: int = 1024) -> int:
    """The fewest FSDP ranks at which batch 1 fits (0 if none up to `limit`): sharding only divides
    weights, gradients and optimizer state, never activations."""
    ranks = 2
    while ranks <= limit:
        if largest_micro_batch(c, train, device, ranks, parallel="fsdp", checkpointing=checkpointing) >= 1:
            return ranks
        ranks *= 2
    return 0


def smaller_presets_that_fit(train: TrainConfig, device: DeviceSpec, world_size: int, vocab_size: int) -> list[str]:
    """Presets (acornlm/presets) whose model fits at this run's batch size and sequence length."""
    fitting = []
    for name in list_presets():
        fields = dict(load_preset(name).get("model") or {})
        fields["vocab_size"] = fields.get("vocab_size") or vocab_size
        try:
            model = ModelConfig.from_dict(fields)
        except ConfigError:
            continue
        if train.seq_len > model.max_position_embeddings:
            continue
        if plan_memory(model, train, device, world_size).total <= usable_bytes(device):
            fitting.append((count_params(model).total, name))
    return [name for _, name in sorted(fitting, reverse=True)]


def advice(plan: RunPlan) -> list[str]:
    """What to change when the chosen option does not fit: by how much it is over, and what would fit."""
    c, train, device, world = plan.model, plan.train, plan.device, plan.world_size
    chosen = plan.chosen
    over = chosen["peak_memory_bytes"] - usable_bytes(device)
    lines = [f"needs {format_bytes(chosen['peak_memory_bytes'])} per rank at batch_size {train.batch_size}: "
             f"{format_bytes(over)} more than the {format_bytes(usable_bytes(device))} usable on {device.name}"]
    if chosen["largest_micro_batch"] >= 1:
        lines.append(f"batch_size {chosen['suggested_batch_size']} with grad_accum_steps "
                     f"{chosen['suggested_grad_accum_steps']} fits and keeps the global batch of "
                     f"{chosen['global_batch']} sequences "
                     f"(--train.batch_size {chosen['suggested_batch_size']} "
                     f"--train.grad_accum_steps {chosen['suggested_grad_accum_steps']})")
        return lines
    if train.batch_size > 1:
        single = plan_memory(c, train, device, world, batch_size=1).total
        lines[0] = (f"needs {format_bytes(chosen['peak_memory_bytes'])} per rank at batch_size {train.batch_size}, "
                    f"and {format_bytes(single)} even at batch_size 1: {format_bytes(single - usable_bytes(device))} "
                    f"more than the {format_bytes(usable_bytes(device))} usable on {device.name}")
    for option in plan.options:
        # on one rank the fsdp rows equal the ddp rows (nothing to shard): suggest only the latter
        same_as_ddp = world == 1 and option["parallel"] == "fsdp"
        if option["largest_micro_batch"] >= 1 and not option["chosen"] and not same_as_ddp:
            lines.append(f"fits with --train.parallel {option['parallel']} --train.activation_checkpointing "
                         f"{option['activation_checkpointing']} (largest batch_size {option['largest_micro_batch']})")
    ranks = {mode: fsdp_ranks_needed(c, train, device, mode) for mode in ("none", "full")}
    if ranks["none"] > world:
        also = (f" (or {ranks['full']} with --train.activation_checkpointing full)"
                if 0 < ranks["full"] < ranks["none"] else "")
        lines.append(f"fits with FSDP over {ranks['none']} ranks (--train.parallel fsdp, torchrun --nproc_per_node "
                     f"{ranks['none']}){also}")
    elif ranks["full"] > world:
        lines.append(f"fits with FSDP over {ranks['full']} ranks (--train.parallel fsdp, torchrun --nproc_per_node "
                     f"{ranks['full']}) and --train.activation_checkpointing full")
    presets = smaller_presets_that_fit(dataclasses.replace(train, batch_size=1), device, world, c.vocab_size)
    if presets:
        lines.append(f"smaller presets that fit (at batch_size 1, vocabulary {c.vocab_size:,}): {', '.join(presets[:4])}")
    if train.seq_len > 128:
        lines.append(f"or a shorter --train.seq_len (activations grow with it; now {train.seq_len})")
    return lines


# --- printing ---


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def format_count(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:.0f}"


def format_duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def format_plan(plan: RunPlan) -> str:
    """The human-readable plan: the run, its options as a table (the configured one marked *),
    the chosen option's breakdown, time and cost, and advice when it does not fit."""
    c, train, device, data = plan.model, plan.train, plan.device, plan.to_json()
    counts = count_params(c)
    kind = "bf16 autocast" if is_low_precision(train, device) else "float32"
    devices = f"{device.name} x {plan.world_size} rank(s)" if device.count == 1 else f"{device.name}, {plan.world_size} rank(s)"
    lines = [
        f"model     {format_count(counts.total)} parameters ({counts.total:,})"
        + (f", {format_count(counts.active)} active per token" if c.is_moe else "")
        + f", {format_count(data['flops_per_token'])} FLOPs per token at seq_len {train.seq_len}",
        f"device    {devices}: {format_bytes(device.memory_bytes)} each "
        f"({format_bytes(usable_bytes(device))} usable), peak {device.bf16_flops / 1e12:.1f} TFLOP/s"
        + (" (measured fp32 matmul)" if device.kind == "cpu" else " (dense bf16)"),
        f"run       batch_size {train.batch_size} x seq_len {train.seq_len} per rank, global batch "
        f"{data['global_batch']} sequences, {kind}, {train.optimizer}",
    ]
    if plan.vocab_note:
        lines.append(f"vocab     {plan.vocab_note}")
    lines += ["", "  parallel  checkpointing  peak/rank   fits  max batch  tokens/s", "  " + "-" * 62]
    for option in plan.options:
        mark = "*" if option["chosen"] else " "
        lines.append(f"{mark} {option['parallel']:<8}  {option['activation_checkpointing']:<13}  "
                     f"{format_bytes(option['peak_memory_bytes']):>10}  {'yes' if option['fits'] else 'NO':>4}  "
                     f"{option['largest_micro_batch']:>9}  {format_count(option['tokens_per_s']):>8}")
    if plan.world_size == 1:
        lines.append("  (one rank: fsdp trains the plain model, as ddp does; give --world_size to shard)")
    whole = {"gradients": data["memory_detail"].get("gradients_all", 0) + data["memory_detail"].get("ddp_buckets", 0),
             "activations": data["memory_detail"].get("activations_all", 0)}
    breakdown = ", ".join(f"{name} {format_bytes(value)}" + (f" (of {format_bytes(whole[name])})"
                                                              if whole.get(name, value) > value else "")
                          for name, value in data["memory_breakdown"].items())
    lines += ["", f"peak memory per rank (*): {format_bytes(data['peak_memory_bytes'])} = {breakdown}"]
    if data["host_memory_bytes"]:
        lines.append(f"host memory per rank (CPU offload): {format_bytes(data['host_memory_bytes'])}")
    lines.append(f"throughput: {format_count(data['tokens_per_s'])} tokens/s at MFU {plan.mfu:.0%} "
                 f"({plan.mfu_source})")
    cost = f", ${data['cost']:,.2f} at ${plan.price_per_hour:.2f}/device-hour" if plan.price_per_hour else ""
    lines.append(f"budget: {format_count(plan.tokens)} tokens ({plan.tokens / counts.total:.0f} per parameter) "
                 f"in {format_duration(data['time_s'])}{cost}")
    if data["fits"]:
        line = f"largest batch_size that fits: {data['largest_micro_batch']}"
        if data["suggested_batch_size"] > train.batch_size:
            line += (f"; --train.batch_size {data['suggested_batch_size']} --train.grad_accum_steps "
                     f"{data['suggested_grad_accum_steps']} keeps the global batch of {data['global_batch']} sequences")
        lines.append(line)
    else:
        lines += ["", "DOES NOT FIT:"] + [f"  - {line}" for line in data["advice"]]
    return "\n".join(lines)


def _check_vocab(c: ModelConfig) -> None:
    if c.vocab_size <= 0:
        raise ConfigError("model.vocab_size is 0 (the tokenizer's size): pass --data DIR (a prepared data "
                          "directory) or set --model.vocab_size")
