"""Activation checkpointing: peak memory and tokens/s of none / full / selective on this CPU.

Each mode trains a few steps in a fresh process (peak RSS only ever grows, so sharing a process
would hide the smaller peak), the way the Trainer does: fp32 weights, `accelerate(model, "train")`,
then `apply_activation_checkpointing(model, mode)`, AdamW (`build_optimizer`), next-token loss.
Reported per mode:

    peak_rss_mb          the process's peak resident memory (ru_maxrss), everything included
    peak_over_model_mb   peak RSS minus the RSS right after the model and optimizer were built:
                         what training adds (activations, gradients, AdamW moments, allocator slack).
                         Gradients and moments are the same in every mode, so the difference between
                         two modes is the difference in activation memory.
    tokens_per_s         batch x seq_len / median step seconds (forward + backward + AdamW), steps
                         after the first (allocator warm-up)

`--candidates` can add "selective_op": torchtitan's per-op selective checkpointing (save the
outputs of matrix products and attention, recompute element-wise ops) via
torch.utils.checkpoint.create_selective_checkpoint_contexts, written here only to compare it with
the every-second-block flavour that `--train.activation_checkpointing selective` uses.

Usage: flock /tmp/acornlm-bench.lock python benchmarks/activation_checkpointing.py
           [--preset minimind2-small] [--shapes 8x512,16x512] [--steps 4] [--threads 2]
           [--candidates none,full,selective]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory_probe import peak_rss_mb, rss_mb  # noqa: E402


def op_level_policy():
    """Per-op selective checkpointing (torchtitan's "op" SAC): keep what matrix products and
    attention kernels return, recompute every other op in the backward pass."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    saved = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_efficient_attention.default,
             torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary}
    if hasattr(torch.ops, "acornlm") and hasattr(torch.ops.acornlm, "onednn_linear"):
        saved.add(torch.ops.acornlm.onednn_linear.default)

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_op_level(model) -> None:
    """Wrap every block's forward in checkpoint(..., context_fn=selective contexts) (benchmark only)."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context_fn = functools.partial(create_selective_checkpoint_contexts, op_level_policy())
    for block in model.model.layers:
        plain = block.forward

        def forward(x, rope, cache=None, attention_mask=None, plain=plain):
            return checkpoint(plain, x, rope, cache, attention_mask, use_reentrant=False, context_fn=context_fn)

        block.forward = forward


def measure(settings: dict) -> dict:
    """Train `settings["steps"]` steps of one mode; runs in its own process."""
    import torch

    from acornlm.accel import accelerate
    from acornlm.allocator import keep_freed_memory
    from acornlm.model import ModelConfig, Transformer
    from acornlm.presets import load_preset
    from acornlm.train.activation_checkpointing import apply_activation_checkpointing
    from acornlm.train.config import TrainConfig
    from acornlm.train.losses import next_token_loss
    from acornlm.train.optim import build_optimizer

    keep_freed_memory()  # as the Trainer does
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    fields = load_preset(settings["preset"])["model"] | {"vocab_size": settings["vocab_size"]}
    model = accelerate(Transformer(ModelConfig(**fields)), mode="train")
    mode = settings["mode"]
    if mode == "selective_op":
        apply_op_level(model)
    else:
        apply_activation_checkpointing(model, mode)
    optimizer = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    for param in model.parameters():  # gradients and AdamW moments exist from the start: the baseline
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    base_rss = rss_mb()
    batch, seq = settings["batch_size"], settings["seq_len"]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, settings["vocab_size"], (batch, seq + 1), generator=generator)
    times, losses = [], []
    for _ in range(settings["steps"]):
        started = time.perf_counter()
        loss = next_token_loss(model, (tokens[:, :-1], tokens[:, 1:]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradients allocated: the steady-state footprint
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    step_s = statistics.median(times[1:] or times)
    return {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_over_model_mb": round(peak_rss_mb() - base_rss, 1),
        "tokens_per_s": round(batch * seq / step_s, 1),
        "step_s": round(step_s, 3),
        "losses": [round(value, 6) for value in losses],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--shapes", default="8x512,16x512", help="comma-separated BATCHxSEQ_LEN")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--candidates", default="none,full,selective")
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds; numbers are meaningless")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.vocab_size, args.shapes, args.steps = "tiny", 300, "4x64", 2
    context = multiprocessing.get_context("spawn")
    results: dict[str, dict] = {}
    for shape in args.shapes.split(","):
        batch, seq = (int(part) for part in shape.split("x"))
        rows = {}
        for mode in args.candidates.split(","):
            settings = {"preset": args.preset, "vocab_size": args.vocab_size, "batch_size": batch, "seq_len": seq,
                        "steps": args.steps, "threads": args.threads, "mode": mode}
            with context.Pool(1) as pool:
                rows[mode] = pool.apply(measure, (settings,))
        none = rows.get("none")
        if none:
            for row in rows.values():
                row["activation_mb_saved_vs_none"] = round(none["peak_over_model_mb"] - row["peak_over_model_mb"], 1)
                row["tokens_per_s_vs_none"] = round(row["tokens_per_s"] / none["tokens_per_s"], 3)
        results[shape] = rows
    print(json.dumps({
        "settings": {"preset": args.preset, "vocab_size": args.vocab_size, "steps": args.steps,
                     "threads": args.threads, "memory": "peak RSS of a fresh process per mode (ru_maxrss)"},
        "results": results,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }, indent=2))


if __name__ == "__main__":
    main()
