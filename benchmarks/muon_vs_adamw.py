"""Muon vs AdamW on Shakespeare at an equal compute budget: validation bits per byte.

The same model (the `cpu-demo` preset, 4 x 192, with a 4096-token byte-level BPE as `acornlm demo`
trains it), the same data, seed and schedule shape (warmup, cosine to lr/10), the same budget per
contender; only the optimizer differs:

  adamw         AdamW for every weight at the preset's tuned peak lr (2e-3), as `acornlm demo` trains
  muon_lrX      --train.optimizer muon: torch.optim.Muon at peak lr X for the blocks' matrices
                (nanochat: 0.02), AdamW at the same 2e-3 for the embeddings/head/norms

Equal wall clock on a shared machine: a contender's wall time depends on what else runs, so the
budget is CPU time on one torch thread (what a dedicated core gives in that wall time). Each
contender's step cost is measured first (CPU seconds per optimizer step of the real Trainer with
that optimizer, from an 8- and a 24-step run on random tokens, so Muon's Newton-Schulz iterations
count), max_steps = budget / step cost, and the cosine schedule ends with the budget, as
`acornlm demo` sizes its runs. Scores: the Trainer's `val_bpb` every `--eval-interval` steps, and
`val_bpb_full`, the final checkpoint on the whole held-out split (Julius Caesar, The Tempest,
Twelfth Night) in consecutive windows (benchmarks/quality_per_minute.py's scorer).

Usage: flock /tmp/acornlm-bench.lock python benchmarks/muon_vs_adamw.py [--cpu-minutes 3] [--muon-lrs 0.02,0.01]
           [--threads 1] [--work-dir runs/muon_vs_adamw] [--quick]
Prints one JSON object (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch
from quality_per_minute import acornlm_configs, evaluate_full_split, prepared_data, say

from acornlm.cli.demo_budget import RandomBatches
from acornlm.data.shakespeare import fetch_shakespeare
from acornlm.model import ModelConfig, Transformer
from acornlm.train.config import TrainConfig
from acornlm.train.losses import next_token_loss
from acornlm.train.metrics import METRICS_FILE, read_metrics
from acornlm.train.pretrain import run_pretrain
from acornlm.train.trainer import Trainer

VOCAB_SIZE = 4096  # the cpu-demo preset's BPE vocabulary (acornlm/presets/cpu-demo.yaml)


def step_cpu_seconds(model: ModelConfig, train: TrainConfig) -> float:
    """CPU seconds of one optimizer step: (CPU time of a 24-step run - that of an 8-step run) / 16 on
    random tokens, so start-up costs cancel (demo_budget's timing, in CPU time instead of wall time)."""
    spent = []
    for steps in (8, 24):
        config = dataclasses.replace(train, max_steps=steps, max_minutes=0.0, warmup_steps=1, eval_interval=0,
                                     eval_batches=1, save_interval=0, log_interval=1, progress=False)
        batches = RandomBatches(model.vocab_size, config.batch_size, config.seq_len)
        with tempfile.TemporaryDirectory(prefix="acornlm-timing-") as run_dir, \
                contextlib.redirect_stderr(io.StringIO()):
            trainer = Trainer(Transformer(dataclasses.replace(model)), config, run_dir, batches, next_token_loss)
            started = time.process_time()
            trainer.fit()
            spent.append(time.process_time() - started)
    return (spent[1] - spent[0]) / 16


def contender(name: str, data_dir: Path, work: Path, model: ModelConfig, train: TrainConfig,
              cpu_minutes: float) -> dict[str, Any]:
    """Size the run to the CPU-time budget, train it in a fresh directory, score it."""
    step_s = step_cpu_seconds(model, train)
    steps = max(10, int(cpu_minutes * 60 / step_s))
    train = dataclasses.replace(train, max_steps=steps, warmup_steps=min(train.warmup_steps, max(1, steps // 10)))
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    load = os.getloadavg()[0]
    say(f"[{name}] {step_s * 1000:.0f} CPU ms/step: {steps} steps in {cpu_minutes:g} CPU minutes "
        f"(load average {load:.2f})")
    started = time.process_time()
    summary = run_pretrain(data_dir, run_dir, model, train)
    cpu_s = time.process_time() - started
    curve = [{"step": r["step"], "elapsed_s": round(r["elapsed_s"], 1), "val_bpb": round(r["val_bpb"], 4)}
             for r in read_metrics(run_dir / METRICS_FILE) if "val_bpb" in r]
    full = evaluate_full_split(run_dir, data_dir, train.seq_len)
    result = {
        "optimizer": train.optimizer, "learning_rate": train.learning_rate,
        "muon_lr": train.muon_lr if train.optimizer == "muon" else None,
        "step_cpu_ms": round(step_s * 1000, 1), "steps": summary["steps"], "run_cpu_s": round(cpu_s, 1),
        "wall_s": round(summary["wall_time_s"], 1), "tokens_seen": summary["tokens_seen"],
        "tokens_per_s_wall": round(summary["tokens_per_s"], 1),
        "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "val_bpb": round(summary["val_bpb"], 4), "val_bpb_full": round(full["val_bpb_full"], 4),
        "curve": curve,
    }
    say(f"[{name}] {json.dumps({k: v for k, v in result.items() if k != 'curve'})}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-minutes", type=float, default=3.0, help="CPU-time budget per contender")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = a dedicated core's)")
    parser.add_argument("--muon-lrs", default="0.02", help="comma-separated Muon peak lrs to try")
    parser.add_argument("--adamw-lr", type=float, default=0.0, help="AdamW peak lr (default: the preset's)")
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--work-dir", default="runs/muon_vs_adamw")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.2 CPU minutes per contender")
    args = parser.parse_args()
    minutes = 0.2 if args.quick else args.cpu_minutes
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
        corpus = fetch_shakespeare(work / "corpus")
    data_dir, tokenizer = prepared_data(work, corpus, "bpe", VOCAB_SIZE)
    model, train = acornlm_configs(tokenizer.vocab_size)
    train = dataclasses.replace(train, seed=args.seed, eval_interval=args.eval_interval, save_interval=0,
                                learning_rate=args.adamw_lr or train.learning_rate)
    train = dataclasses.replace(train, min_lr=train.learning_rate / 10)
    runs = {"adamw": train}
    for lr in (float(value) for value in args.muon_lrs.split(",")):
        runs[f"muon_lr{lr:g}"] = dataclasses.replace(train, optimizer="muon", muon_lr=lr)
    results = {name: contender(name, data_dir, work, model, config, minutes) for name, config in runs.items()}
    best = min(results, key=lambda name: results[name]["val_bpb_full"])
    print(json.dumps({
        "benchmark": "muon_vs_adamw", "cpu_minutes_per_contender": minutes, "threads": args.threads, "preset": "cpu-demo",
        "vocab_size": tokenizer.vocab_size, "seq_len": train.seq_len, "batch_size": train.batch_size,
        "results": results, "best_val_bpb_full": best,
        "muon_over_adamw_val_bpb_full": {name: round(r["val_bpb_full"] / results["adamw"]["val_bpb_full"], 4)
                                         for name, r in results.items() if name != "adamw"},
        "environment": common.environment(),
    }, indent=2))


if __name__ == "__main__":
    main()
