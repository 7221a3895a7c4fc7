"""Quality per CPU minute: acornlm's `cpu-demo` vs nanoGPT's CPU recipe, at equal wall clock.

Both contenders train on the same text (Shakespeare's works, `acornlm data fetch shakespeare`) for the
same wall-clock budget, one after the other in this process, and are scored on the same held-out works
(Julius Caesar, The Tempest, Twelfth Night) in bits per byte, which does not depend on the tokenizer.

  nanogpt_cpu   nanoGPT's README CPU recipe built with acornlm's GPT-2 family config: char-level,
                4 layers, 4 heads, 128 wide, block 64, batch 12, LayerNorm, GELU MLP 4x, learned
                positions, tied embeddings, no biases, dropout 0; AdamW lr 1e-3 -> 1e-4 (cosine),
                warmup 100, weight decay 0.1, beta2 0.99, grad clip 1.0 (config/train_shakespeare_char.py).
                Schedule: the recipe's max_iters = lr_decay_iters = 2000 is a count of steps, not a time.
                A nanoGPT user with a fixed budget reads ms/iter from a short run and sets max_iters so the
                cosine decay ends with the budget; we do the same (a calibration run of the real training
                loop, then max_iters = lr_decay_iters = the steps that fit). On a 2-core CPU the recipe's
                2000 iterations take about a minute, so in 10 minutes this gives nanoGPT several times
                its recipe's training, never less.
  acornlm       the `cpu-demo` preset with a byte-level BPE tokenizer, exactly as `acornlm demo` runs it
                (the demo's vocabulary size, and its step estimate that ends the cosine schedule with the time).

Scores: `val_bpb` is the Trainer's own end-of-run evaluation (random windows of the val split);
`val_bpb_full` evaluates the final checkpoint on the whole val split in consecutive windows of the
contender's training context, so both models are scored on exactly the same bytes. The ratio uses it.

Other work on the machine slows a contender down and so lowers its score: the 1-minute load average is
printed before each run. Prints one JSON object (progress goes to stderr).

Usage: python benchmarks/quality_per_minute.py [--minutes 10] [--quick] [--work-dir runs/quality_per_minute]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F

from acornlm.cli.demo import demo as demo_command
from acornlm.cli.demo_budget import estimate_steps
from acornlm.data.corpus import iter_documents
from acornlm.data.loader import open_tokens, read_meta
from acornlm.data.prepare import prepare_data
from acornlm.data.shakespeare import fetch_shakespeare
from acornlm.model import ModelConfig
from acornlm.model.checkpoint import load_model
from acornlm.presets import load_preset
from acornlm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from acornlm.train.config import TrainConfig
from acornlm.train.pretrain import run_pretrain

DEMO_VOCAB_SIZE: int = inspect.signature(demo_command).parameters["vocab_size"].default
NANOGPT_RECIPE_ITERS = 2000
CALIBRATION_SECONDS = 20.0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# --- data: the corpus, one tokenizer per contender, and the prepared token files ---

def prepared_data(work: Path, corpus: Path, kind: str, vocab_size: int) -> tuple[Path, Tokenizer]:
    """Train a `kind` tokenizer on the train split and tokenize both splits (reused when unchanged)."""
    name = f"{kind}{vocab_size}" if kind == "bpe" else kind
    tok_dir, data_dir = work / f"tokenizer-{name}", work / f"data-{name}"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_dir)
    else:
        say(f"training the {name} tokenizer")
        tokenizer = train_tokenizer((d.text for d in iter_documents([corpus / "train"])), kind, vocab_size)
        tokenizer.save(tok_dir)
    meta_file = data_dir / "meta.json"
    if not (meta_file.is_file()
            and json.loads(meta_file.read_text())["tokenizer"]["fingerprint"] == tokenizer.fingerprint):
        say(f"tokenizing the corpus with {name}")
        prepare_data(inputs=[corpus / "train"], tokenizer_dir=tok_dir, out=data_dir, val_inputs=[corpus / "val"])
    return data_dir, tokenizer


# --- the two contenders ---

def nanogpt_configs(vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
    """nanoGPT's README CPU recipe (max_steps is set later, to fit the budget)."""
    model = ModelConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=4 * 128, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=64, norm="layernorm", mlp="gelu", position="learned",
        norm_eps=1e-5, norm_bias=False, attention_bias=False, mlp_bias=False, dropout=0.0,
        tie_word_embeddings=True)
    train = TrainConfig(
        max_steps=NANOGPT_RECIPE_ITERS, batch_size=12, seq_len=64, learning_rate=1e-3, min_lr=1e-4,
        warmup_steps=100, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
        eval_interval=250, eval_batches=20,  # nanoGPT: eval_interval 250, --eval_iters=20
        save_interval=0, log_interval=10, device="cpu", progress=False)
    return model, train


def acornlm_configs(vocab_size: int, preset: str = "cpu-demo") -> tuple[ModelConfig, TrainConfig]:
    """The preset as `acornlm demo` builds it (max_steps is set later, by the demo's estimate)."""
    data = load_preset(preset)
    model = ModelConfig(**{**data.get("model", {}), "vocab_size": vocab_size})
    train = TrainConfig(**{**data.get("train", {}), "device": "cpu", "progress": False})
    return model, train


def calibrated_steps(data_dir: Path, work: Path, model: ModelConfig, train: TrainConfig, minutes: float) -> dict:
    """Steps that fit in `minutes`, from a short run of the real training loop (what a nanoGPT user does).

    The step time is the calibration run's training time per step (its tokens/s); the real run also
    evaluates 20 batches every 250 steps (about 3% of its time), hence the 0.95.
    """
    run_dir = work / "calibration"
    shutil.rmtree(run_dir, ignore_errors=True)
    probe = dataclasses.replace(train, max_steps=10**6, max_minutes=CALIBRATION_SECONDS / 60, eval_interval=0,
                                eval_batches=1)
    summary = run_pretrain(data_dir, run_dir, model, probe)
    shutil.rmtree(run_dir, ignore_errors=True)
    step_seconds = train.batch_size * train.seq_len * train.grad_accum_steps / summary["tokens_per_s"]
    steps = max(10, int(minutes * 60 * 0.95 / step_seconds))
    return {"max_steps": steps, "calibration_steps": summary["steps"], "step_seconds": step_seconds}


def train_contender(name: str, data_dir: Path, work: Path, model: ModelConfig, train: TrainConfig) -> dict:
    """Train one contender in a fresh run directory and describe the result."""
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    load = load_average()
    say(f"[{name}] training for {train.max_minutes:g} minutes, {train.max_steps} steps planned "
        f"(load average {load})")
    summary = run_pretrain(data_dir, run_dir, model, train)
    full = evaluate_full_split(run_dir, data_dir, train.seq_len)
    return {
        "load_average_before": load,
        "steps": summary["steps"],
        "steps_planned": train.max_steps,
        "stopped_early": summary["stopped_early"],
        "tokens_seen": summary["tokens_seen"],
        "tokens_per_s": round(summary["tokens_per_s"], 1),
        "wall_s": round(summary["wall_time_s"], 1),
        "params": summary["params"],
        "mfu": round(summary["mfu"], 4),
        "val_loss": summary["val_loss"],
        "val_bpb": summary["val_bpb"],
        **full,
        "run_dir": str(run_dir),
    }


@torch.no_grad()
def evaluate_full_split(run_dir: Path, data_dir: Path, seq_len: int, batch_size: int = 32) -> dict:
    """Bits per byte of the final checkpoint on the whole val split.

    bpb = (sum of next-token losses in nats) / ln 2 / (UTF-8 bytes the predicted tokens stand for),
    over consecutive windows of seq_len + 1 tokens; the bytes are the split's bytes scaled by the
    share of its tokens that were predicted (all but a remainder shorter than one window).
    """
    model, _ = load_model(run_dir, device="cpu")
    model.eval()
    meta = read_meta(data_dir)
    tokens = torch.from_numpy(open_tokens(data_dir, meta, "val")[:].astype("int64"))
    windows = (len(tokens) - 1) // seq_len
    inputs = tokens[:windows * seq_len].view(windows, seq_len)
    targets = tokens[1:windows * seq_len + 1].view(windows, seq_len)
    total_nats = 0.0
    for start in range(0, windows, batch_size):
        logits = model(inputs[start:start + batch_size])
        total_nats += F.cross_entropy(logits.float().flatten(0, 1), targets[start:start + batch_size].flatten(),
                                      reduction="sum").item()
    predicted = windows * seq_len
    loss = total_nats / predicted
    bytes_predicted = meta["val"]["bytes"] * predicted / meta["val"]["tokens"]
    return {"val_loss_full": loss, "val_bpb_full": total_nats / math.log(2) / bytes_predicted,
            "val_tokens_scored": predicted}


def nanogpt_contender(work: Path, data_dir: Path, tokenizer: Tokenizer, minutes: float, seed: int) -> dict:
    """(a) nanoGPT's CPU recipe, its schedule stretched (or shrunk) to the budget."""
    model, train = nanogpt_configs(tokenizer.vocab_size)
    train = dataclasses.replace(train, seed=seed, max_minutes=minutes)
    say(f"[nanogpt_cpu] calibrating for {CALIBRATION_SECONDS:g} s (load average {load_average()})")
    sizing = calibrated_steps(data_dir, work, model, train, minutes)
    train = dataclasses.replace(train, max_steps=sizing["max_steps"])
    return {
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "schedule": (f"nanoGPT recipe with max_iters = lr_decay_iters scaled from {NANOGPT_RECIPE_ITERS} to "
                     f"{sizing['max_steps']}, the steps that fit in {minutes:g} minutes at the "
                     f"{sizing['step_seconds'] * 1000:.1f} ms/step of a {CALIBRATION_SECONDS:g} s calibration run"),
        "recipe_iters": NANOGPT_RECIPE_ITERS,
        **train_contender("nanogpt_cpu", data_dir, work, model, train),
        "model": model.to_dict(), "train": dataclasses.asdict(train),
    }


def acornlm_contender(work: Path, data_dir: Path, tokenizer: Tokenizer, minutes: float, seed: int,
                      preset: str) -> dict:
    """(b) acornlm's preset, sized the way `acornlm demo` sizes it."""
    model, train = acornlm_configs(tokenizer.vocab_size, preset)
    train = dataclasses.replace(train, seed=seed, max_minutes=minutes)
    steps = estimate_steps(model, train, minutes, "cpu")
    train = dataclasses.replace(train, max_steps=steps, warmup_steps=min(train.warmup_steps, max(1, steps // 10)))
    return {
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "schedule": f"`acornlm demo`: {steps} steps from its estimate of what fits in {minutes:g} minutes",
        **train_contender("acornlm", data_dir, work, model, train),
        "model": model.to_dict(), "train": dataclasses.asdict(train),
    }


def guarded(name: str, run: Callable[[], dict]) -> dict:
    """A contender's result, or its error: the benchmark always prints its JSON."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - reported in the JSON instead of ending the benchmark
        say(f"[{name}] failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def ratios(ours: dict, theirs: dict) -> dict:
    """acornlm / nanoGPT for the scores and the speed; below 1 in bits per byte means acornlm wins."""
    def ratio(key: str) -> float | None:
        a, b = ours.get(key), theirs.get(key)
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    full = ratio("val_bpb_full")
    return {
        "val_bpb_full_acornlm_over_nanogpt": full,
        "val_bpb_acornlm_over_nanogpt": ratio("val_bpb"),
        "tokens_per_s_acornlm_over_nanogpt": ratio("tokens_per_s"),
        "acornlm_wins": None if full is None else full < 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per contender")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 minute per contender")
    parser.add_argument("--work-dir", default="runs/quality_per_minute",
                        help="corpus, tokenizers, prepared data and runs (reused between invocations)")
    parser.add_argument("--preset", default="cpu-demo", help="acornlm's contender")
    parser.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE, help="acornlm's BPE vocabulary")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    minutes = 1.0 if args.quick else args.minutes
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "quality_per_minute", "minutes_per_contender": minutes}
    try:
        corpus = fetch_shakespeare(work / "corpus")
        char_data, char_tok = prepared_data(work, corpus, "char", 256)
        bpe_data, bpe_tok = prepared_data(work, corpus, "bpe", args.vocab_size)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        report["error"] = f"preparing the data failed: {type(exc).__name__}: {exc}"
        report["environment"] = common.environment()
        print(json.dumps(report, indent=2))
        return
    meta = read_meta(bpe_data)
    report["corpus"] = {"train_bytes": meta["train"]["bytes"], "val_bytes": meta["val"]["bytes"],
                        "val_works": sorted(p.name for p in (corpus / "val").iterdir())}
    results = {
        "nanogpt_cpu": guarded("nanogpt_cpu", lambda: nanogpt_contender(work, char_data, char_tok, minutes, args.seed)),
        "acornlm": guarded("acornlm", lambda: acornlm_contender(work, bpe_data, bpe_tok, minutes, args.seed,
                                                                args.preset)),
    }
    report["environment"] = common.environment()
    report["results"] = results
    report["ratio"] = ratios(results["acornlm"], results["nanogpt_cpu"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
