"""Data parallelism, applied to a built model from outside (the torchtitan pattern).

    model = accelerate(Transformer(config))                 # the reference model, CPU kernels swapped in
    apply_activation_checkpointing(model, mode)             # optional, before any wrapper
    train_model, eval_model = parallelize(model, train_config, context, device, precision)

`train.parallel` chooses how several processes (torchrun) share the work:

    ddp    every rank holds the whole model, its gradients and the optimizer state; DistributedDataParallel
           averages the gradients (all-reduce). Memory per rank: 16 bytes per parameter with AdamW.
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank keeps 1/N of every weight, gradient
           and optimizer moment (as DTensors). Before a block runs, its weights are all-gathered; after
           its backward its gradients are reduce-scattered and the gathered weights freed. Memory per
           rank: ~16/N bytes per parameter plus one or two blocks' full weights.

`fully_shard` goes on every Transformer block first, then on the root (embeddings, final norm,
output head): one all-gather per block, so communication overlaps the previous block's compute.

Mixed precision under FSDP is FSDP's own MixedPrecisionPolicy: the float32 shards stay the masters
the optimizer updates; weights are all-gathered in `param_dtype` (bf16 or fp16 when train.dtype asks
for it; half the bytes on the wire) and gradients are reduce-scattered in float32. The Trainer keeps
its autocast around the forward too. For the sharded model it changes nothing (measured: bitwise the
same losses with and without it, since every weight already arrives in bf16 and the model upcasts
where it must: RMSNorm's mean square, the loss's logits), but it is what gives the same precision
to the parts of a stage that are not sharded: DPO's reference model, a distillation teacher (float32
modules that autocast runs in bf16, exactly as under DDP).
Numerically FSDP-bf16 differs from DDP-bf16 in one way: the residual stream. Under autocast alone
the embedding is float32, so the residual sum stays float32; under the policy the embedding is
gathered in bf16, so the stream is bf16 (torchtitan's choice too; both track float32 within ~1e-2
in loss over the first steps of a tiny model, tests/test_fsdp.py).

The oneDNN modules of acornlm.accel work under FSDP2 unchanged: FSDP hands each module its
gathered, ordinary tensors during forward and backward (tests/test_fsdp.py compares against the
single-process run).

This module also holds the checks that run before anything is built (`check_parallel_config`) and
the derivation of the gradient accumulation from train.global_batch_size (`apply_global_batch_size`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from acornlm.errors import ConfigError
from acornlm.train.activation_checkpointing import blocks_of
from acornlm.train.config import TrainConfig
from acornlm.train.distributed import DistributedContext, launched_by_torchrun, log
from acornlm.train.precision import Precision
from acornlm.train.sharded_checkpoint import check_sharded_checkpoint

LAUNCH_HINT = ("launch it with torchrun and at least 2 processes, e.g. `torchrun --standalone --nproc_per_node 2 "
               "-m acornlm train pretrain ...` (one node) or see docs/scale-out.md (several nodes)")


# --- checks before anything is built ---

def torchrun_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun); read before any process group exists."""
    if not launched_by_torchrun():
        return 1
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError as exc:
        raise ConfigError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer "
                          "(set by torchrun)") from exc


def check_parallel_config(config: TrainConfig, *, stage: str = "pretrain", lora: bool = False) -> None:
    """Refuse, before any model is built, what FSDP or async checkpoints cannot do (one line each, with the fix).

    `stage` names the training stage; `lora` says whether it trains LoRA adapters.
    """
    if config.async_checkpoint and config.parallel != "fsdp":
        raise ConfigError("train.async_checkpoint writes sharded checkpoints in the background and needs "
                          "--train.parallel fsdp; drop it for DDP or single-process runs")
    if config.fsdp_cpu_offload and config.parallel != "fsdp":
        raise ConfigError("train.fsdp_cpu_offload needs --train.parallel fsdp")
    if config.parallel != "fsdp":
        return
    world_size = torchrun_world_size()
    if world_size < 2:
        raise ConfigError(f"train.parallel=fsdp shards the model over several processes, but this is "
                          f"{'one process' if not launched_by_torchrun() else 'a torchrun job of 1 process'}: "
                          f"{LAUNCH_HINT}; or use --train.parallel ddp for one process")
    if config.dtype == "float16":
        raise ConfigError("train.parallel=fsdp with train.dtype=float16 is not supported (torch's ShardedGradScaler "
                          "fails with the fused AdamW step); use --train.dtype bfloat16 (Ampere GPUs and newer, and "
                          "CPUs) or --train.parallel ddp for float16")
    if lora:
        raise ConfigError("LoRA trains a few small adapters on a frozen model: sharding them with FSDP saves "
                          "nothing and the adapter checkpoints are not written for sharded models; use "
                          "--train.parallel ddp with --lora.rank")
    if stage in ("grpo", "ppo"):
        raise ConfigError(f"{stage} generates rollouts with the policy, and under FSDP every forward pass is a "
                          "collective that all ranks must make together, which generation of different lengths "
                          "per rank breaks; use --train.parallel ddp for this stage")
    if config.compile:
        # torch.compile of the whole FSDP2 model runs, but graph-breaks at every block's hooks; torchtitan
        # compiles each block before sharding. Not tested here (CPU only), so it is refused rather than slow.
        raise ConfigError("train.compile with train.parallel=fsdp is not supported yet; drop --train.compile "
                          "or use --train.parallel ddp")


def check_parallel_run(config: TrainConfig, checkpoint: Path | None, *, stage: str, lora: bool = False) -> None:
    """Everything a stage checks about parallelism before any process group or model exists.

    Refuses what FSDP cannot do, derives grad_accum_steps from train.global_batch_size (and logs the
    global batch), and checks that a sharded checkpoint to resume from has all its shard files.
    """
    check_parallel_config(config, stage=stage, lora=lora)
    world_size = torchrun_world_size()
    apply_global_batch_size(config, world_size)
    if checkpoint is not None:
        check_sharded_checkpoint(checkpoint)
    if config.global_batch_size:
        rank = int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
        log(global_batch_message(config, world_size), DistributedContext(rank=rank, world_size=world_size))


def apply_global_batch_size(config: TrainConfig, world_size: int) -> int | None:
    """Set config.grad_accum_steps from config.global_batch_size (in place) and return it; None when unset.

    global batch = batch_size x world_size x grad_accum_steps, so the same run keeps its global batch
    (and so its loss curve) on any number of processes. A global batch the per-step batch of all
    processes does not divide is refused with the numbers that would work.
    """
    target = config.global_batch_size
    if target <= 0:
        return None
    per_step = config.batch_size * world_size
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    if target % per_step:
        lower = target // per_step * per_step
        nearest = [n for n in (lower, lower + per_step) if n > 0]
        batch_sizes = [b for b in range(1, target // world_size + 1) if target % (b * world_size) == 0]
        worlds = [w for w in range(1, target // config.batch_size + 1) if target % (config.batch_size * w) == 0]
        options = [f"train.global_batch_size {' or '.join(map(str, nearest))}"]
        if batch_sizes:
            options.append(f"train.batch_size {_short_list(batch_sizes)}")
        if worlds:
            options.append(f"{_short_list(worlds)} processes (torchrun --nproc_per_node x --nnodes)")
        raise ConfigError(
            f"train.global_batch_size={target} is not a multiple of train.batch_size={config.batch_size} x "
            f"{processes} = {per_step}; use {'; or '.join(options)}")
    accum = target // per_step
    if config.grad_accum_steps not in (1, accum):
        raise ConfigError(
            f"train.grad_accum_steps={config.grad_accum_steps} contradicts train.global_batch_size={target} "
            f"(= batch_size {config.batch_size} x {processes} x {accum}); set only one of them")
    config.grad_accum_steps = accum
    return accum


def _short_list(values: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (", ..." if len(values) > limit else "")


def global_batch_message(config: TrainConfig, world_size: int) -> str:
    """One log line: how the global batch is made."""
    return (f"global batch {config.batch_size * world_size * config.grad_accum_steps} sequences = batch_size "
            f"{config.batch_size} x {world_size} process{'es' if world_size > 1 else ''} x grad_accum_steps "
            f"{config.grad_accum_steps}"
            + (" (derived from train.global_batch_size)" if config.global_batch_size else ""))


# --- wrapping a built model ---

def mixed_precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    """Gather weights in the run's compute dtype (float32 when there is none), reduce gradients in float32."""
    return MixedPrecisionPolicy(param_dtype=precision.compute_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, precision: Precision, cpu_offload: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2: fully_shard on each Transformer block, then on the root.

    The root's group holds what is left: the embeddings, the final norm and the (tied) output head.
    Parameter names and state-dict keys are unchanged; the parameters become DTensors whose
    `.shape` and `.numel()` are the global ones, so num_params and flops_per_token stay right.
    """
    options: dict = {"mp_policy": mixed_precision_policy(precision)}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    blocks = blocks_of(model)
    if not blocks:
        raise ConfigError(f"train.parallel=fsdp: {type(model).__name__} has no acornlm Transformer blocks to shard; "
                          "use --train.parallel ddp")
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    # The root returns the logits as a view (acornlm.accel's oneDNN product reshapes its 2-D result), and
    # FSDP2 warns on every rank that an in-place op on a view would skip its pre-backward hook. No loss of
    # acornlm's stages changes the logits in place (they upcast with .float() first), so the warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    return model


def parallelize(model: nn.Module, config: TrainConfig, context: DistributedContext, device: torch.device,
                precision: Precision) -> tuple[nn.Module, nn.Module]:
    """(train_model, eval_model) for `model`: sharded (FSDP, in place) or replicated (DDP), then compiled.

    `model` stays the module whose parameters the optimizer steps (under FSDP, the sharded one).
    Evaluation uses the unwrapped (but sharded, and compiled) model: DDP's wrapper only matters for
    backward.
    """
    if config.parallel == "fsdp" and context.is_distributed:
        apply_fsdp(model, precision, config.fsdp_cpu_offload)
    eval_model: nn.Module = torch.compile(model) if config.compile else model
    train_model = eval_model
    if config.parallel == "ddp" and context.is_distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(eval_model, device_ids=device_ids)
    return train_model, eval_model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by FSDP2."""
    return isinstance(model, FSDPModule)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` and return the norm before clipping.

    Under FSDP the gradients are DTensor shards: torch's clip_grad_norm_ then returns the norm as a
    replicated DTensor (each rank's sum of squares all-reduced), and scales every shard by the same
    coefficient; `full_tensor()` reads it as a plain number.
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()
