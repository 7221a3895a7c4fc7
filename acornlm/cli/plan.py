"""`acornlm plan`: predict a run's memory, speed, time and cost before starting it."""

from __future__ import annotations

import dataclasses
import json as json_module

from acornlm.cli.train import DEFAULT_MODEL, DEFAULT_TRAIN
from acornlm.model import ModelConfig
from acornlm.train.config import TrainConfig
from acornlm.train.devices import device_spec
from acornlm.train.plan import DEFAULT_TOKENS_PER_PARAM, format_plan, plan_for_data


def plan(data: str | None = None, model: ModelConfig = DEFAULT_MODEL, train: TrainConfig = DEFAULT_TRAIN,
         device: str = "this", world_size: int = 1, mfu: float | None = None, tokens: int | None = None,
         tokens_per_param: float = DEFAULT_TOKENS_PER_PARAM, price_per_hour: float | None = None,
         json: bool = False) -> None:
    """Predict a training run before starting it: parameters, FLOPs per token, peak memory per rank
    (weights, gradients, optimizer state, activations) for DDP and FSDP with each activation
    checkpointing mode, the largest micro-batch that fits and the gradient accumulation that keeps
    the global batch, tokens/s, and the time and cost of a token budget. Nothing is built or allocated.

    Takes the same --config, --model and --train.* options as `acornlm train pretrain`, e.g.
    `acornlm plan --config minimind2-small --device cuda:24GB` or
    `acornlm plan --config gpt2-124m --device 8xH100 --world_size 8 --train.parallel fsdp`.
    The configured option is marked * in the table. When it does not fit, the plan says by how much and
    what would (a smaller batch with more accumulation, activation checkpointing, FSDP over N ranks, a
    smaller preset). The memory model is explained in acornlm/train/plan.py and checked against
    measured peaks by benchmarks/plan_vs_measured.py.

    Args:
        data: A prepared data directory: its tokenizer gives the vocabulary when model.vocab_size is 0.
            Without it, a vocabulary of 6,400 tokens is assumed (and said).
        model: Model shape and family (see `--model PRESET` or the `model:` section of --config).
        train: The run's settings: batch_size, seq_len, grad_accum_steps or global_batch_size, dtype,
            parallel, activation_checkpointing, optimizer, fsdp_cpu_offload.
        device: The device of each rank: "this" (this machine: its first GPU, else its CPU, RAM and measured
            matmul peak), "cpu", a known GPU (rtx3090, rtx4090, a100-40gb, a100-80gb, h100, h100-pcie, h200,
            l4, l40s, a10g, ...), "cuda:24GB" (a GPU with that memory and a 100 TFLOP/s bf16 peak), or
            "8xH100" (a node of 8).
        world_size: Number of ranks (processes, one per GPU) the run uses; default 1, or the node's count
            when --device names one (8xH100).
        mfu: Expected model FLOPs utilisation in (0, 1]; default 0.35 on a GPU, 0.5 on the CPU.
        tokens: Token budget to price; default tokens_per_param x parameters.
        tokens_per_param: Tokens per parameter when --tokens is not given (Chinchilla: 20).
        price_per_hour: USD per device-hour; default the device table's indicative price (0 for this machine).
        json: Print one JSON object (params, peak_memory_bytes, tokens_per_s, the breakdown and every option)
            instead of the table.
    """
    spec = device_spec(device)
    if world_size == 1 and spec.count > 1:
        world_size = spec.count
    run_plan = plan_for_data(data, dataclasses.replace(model), train, spec, world_size, mfu=mfu, tokens=tokens,
                             tokens_per_param=tokens_per_param, price_per_hour=price_per_hour)
    print(json_module.dumps(run_plan.to_json(), indent=2) if json else format_plan(run_plan))
