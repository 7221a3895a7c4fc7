"""LoRA vs full fine-tuning on the same model: trainable parameters, peak memory, step time.

Each configuration trains a few steps in a fresh process (peak RSS only ever grows, so sharing a
process would hide the smaller peak). Both use what `acornlm train sft` uses: the Trainer's AdamW
(`build_optimizer`, which only takes trainable parameters) and the masked SFT loss. Reported:

    trainable / total parameters and their share
    training_state_mb   weights + gradients + AdamW moments, counted from the tensors (exact)
    peak_rss_mb         the process's peak resident memory (ru_maxrss), all included
    peak_over_model_mb  peak RSS minus RSS right after the model was built: what training adds
    step_s              median seconds per optimizer step (forward + backward + AdamW)

Usage: python benchmarks/lora_memory.py [--preset cpu-demo] [--vocab-size 4096] [--rank 8]
                                        [--targets all] [--batch-size 16] [--seq-len 128] [--steps 6]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory_probe import peak_rss_mb, rss_mb  # noqa: E402


def measure(settings: dict) -> dict:
    """Train `settings["steps"]` steps of one configuration; runs in its own process."""
    import torch

    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.lora import LoraConfig, apply_lora, parameter_counts
    from acornlm.presets import load_preset
    from acornlm.train.config import TrainConfig
    from acornlm.train.losses import assistant_token_loss
    from acornlm.train.optim import build_optimizer

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    fields = load_preset(settings["preset"])["model"] | {"vocab_size": settings["vocab_size"]}
    model = Transformer(ModelConfig(**fields))
    if settings["rank"]:
        apply_lora(model, LoraConfig(rank=settings["rank"], alpha=2 * settings["rank"], targets=settings["targets"]))
    model_rss = rss_mb()
    optimizer = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    batch, seq = settings["batch_size"], settings["seq_len"]
    inputs = torch.randint(0, settings["vocab_size"], (batch, seq))
    targets = torch.randint(0, settings["vocab_size"], (batch, seq))
    targets[:, : seq // 2] = -100  # a prompt half without loss, as in SFT
    times = []
    for _ in range(settings["steps"]):
        started = time.perf_counter()
        assistant_token_loss(model, (inputs, targets)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradients allocated: the steady-state footprint
        times.append(time.perf_counter() - started)
    trainable, total = parameter_counts(model)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state_bytes += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                       if torch.is_tensor(t) and t.dim() > 0)
    return {
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "training_state_mb": round(state_bytes / 2**20, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_over_model_mb": round(peak_rss_mb() - model_rss, 1),
        "step_s": round(statistics.median(times[1:] or times), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="all")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    common = {"preset": args.preset, "vocab_size": args.vocab_size, "targets": args.targets,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "threads": args.threads}
    context = multiprocessing.get_context("spawn")
    results = {}
    for name, rank in (("full", 0), (f"lora_r{args.rank}", args.rank)):
        with context.Pool(1) as pool:
            results[name] = pool.apply(measure, ({**common, "rank": rank},))
    full, lora = results["full"], results[f"lora_r{args.rank}"]
    print(json.dumps({
        "settings": common | {"rank": args.rank},
        **results,
        "lora_vs_full": {
            "trainable_params": round(lora["trainable_params"] / full["trainable_params"], 4),
            "training_state_mb": round(lora["training_state_mb"] / full["training_state_mb"], 3),
            "peak_over_model_mb": round(lora["peak_over_model_mb"] / max(full["peak_over_model_mb"], 1e-9), 3),
            "step_s": round(lora["step_s"] / full["step_s"], 3),
        },
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }, indent=2))


if __name__ == "__main__":
    main()
