"""Perplexity vs context length with and without RoPE scaling, on a model trained at a short context.

A small Llama-family model (RoPE) is trained for a few CPU minutes on Shakespeare (char-level, so the
corpus is the only download and tokenization takes seconds) at `--seq-len` tokens, or taken from
`--ckpt`. Its validation perplexity is then measured at 1x, 2x, 4x and 8x that length:

  none       plain RoPE past the trained length (extrapolation: positions the model never saw)
  linear     position interpolation, factor = length / trained length
  dynamic    dynamic NTK, factor = length / trained length (plain RoPE within the trained length)
  yarn       YaRN, factor = length / trained length
  yarn_x8    YaRN configured once for the longest length (factor 8), as a deployed config would be:
             shows what static scaling costs at short lengths

Scoring: the same first `--eval-tokens` tokens of the held-out works (Julius Caesar, The Tempest,
Twelfth Night) are cut into consecutive windows of each length; `ppl` is exp(mean next-token loss)
over every position of every window, `ppl_beyond` over the positions at or past the trained length
only (where the methods differ most). Prints one JSON object (progress goes to stderr).

Usage: python benchmarks/rope_scaling_ppl.py [--minutes 3] [--seq-len 64] [--ckpt RUN_OR_CKPT]
       [--eval-tokens 32768] [--work-dir runs/rope_scaling_ppl]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from acornlm.data.corpus import iter_documents
from acornlm.data.loader import open_tokens, read_meta
from acornlm.data.prepare import prepare_data
from acornlm.data.shakespeare import fetch_shakespeare
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model
from acornlm.model.rope import extend_context
from acornlm.tokenizer import train_tokenizer
from acornlm.train.config import TrainConfig
from acornlm.train.pretrain import run_pretrain

MULTIPLES = (1, 2, 4, 8)
CALIBRATION_MINUTES = 0.25


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def char_data(work: Path) -> Path:
    """Shakespeare tokenized char-level (reused when already prepared)."""
    data_dir = work / "data-char"
    if not (data_dir / "meta.json").is_file():
        corpus = fetch_shakespeare(work / "corpus")
        say("training the char tokenizer and tokenizing the corpus")
        tokenizer = train_tokenizer((d.text for d in iter_documents([corpus / "train"])), "char", 256)
        tokenizer.save(work / "tokenizer-char")
        prepare_data(inputs=[corpus / "train"], tokenizer_dir=work / "tokenizer-char", out=data_dir,
                     val_inputs=[corpus / "val"])
    return data_dir


def train_model(work: Path, data_dir: Path, seq_len: int, minutes: float) -> Path:
    """A 4-layer, 128-wide Llama-family model trained at seq_len for `minutes` (cosine schedule fitted
    to the budget by a short calibration run); returns its run directory."""
    vocab = read_meta(data_dir)["tokenizer"]["vocab_size"]
    model = ModelConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, max_position_embeddings=seq_len, rope_theta=10000.0)
    train = TrainConfig(batch_size=32, seq_len=seq_len, learning_rate=2e-3, min_lr=2e-4, warmup_steps=50,
                        eval_interval=0, eval_batches=10, save_interval=0, log_interval=50, device="cpu",
                        progress=False, max_minutes=minutes)
    probe_dir = work / "calibration"
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe = run_pretrain(data_dir, probe_dir, model, dataclasses.replace(train, max_steps=10**6,
                                                                         max_minutes=CALIBRATION_MINUTES))
    shutil.rmtree(probe_dir, ignore_errors=True)
    step_seconds = train.batch_size * seq_len / probe["tokens_per_s"]
    train = dataclasses.replace(train, max_steps=max(20, int(minutes * 60 * 0.95 / step_seconds)))
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    say(f"training for {minutes:g} minutes ({train.max_steps} steps) at {seq_len} tokens")
    summary = run_pretrain(data_dir, run_dir, model, train)
    say(f"trained {summary['steps']} steps, val loss {summary['val_loss']:.3f}")
    return run_dir


def methods(trained: int, multiple: int) -> dict[str, dict]:
    """The RoPE settings compared at `multiple` x the trained length."""
    factor = float(multiple)
    return {
        "none": {"rope_type": "default"},
        "linear": {"rope_type": "linear", "factor": factor, "original_max_position_embeddings": trained},
        "dynamic": {"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": trained},
        "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained},
        "yarn_x8": {"rope_type": "yarn", "factor": float(max(MULTIPLES)), "original_max_position_embeddings": trained},
    }


@torch.no_grad()
def perplexity(model: Transformer, tokens: torch.Tensor, length: int, trained: int,
               batch_size: int = 16) -> dict[str, float]:
    """exp(mean next-token loss) over consecutive windows of `length` tokens, overall and past `trained`."""
    windows = (len(tokens) - 1) // length
    inputs = tokens[:windows * length].view(windows, length)
    targets = tokens[1:windows * length + 1].view(windows, length)
    total = beyond = 0.0
    for start in range(0, windows, batch_size):
        logits = model(inputs[start:start + batch_size]).float()
        losses = F.cross_entropy(logits.transpose(1, 2), targets[start:start + batch_size], reduction="none")
        total += losses.sum().item()
        beyond += losses[:, trained:].sum().item()
    out = {"ppl": math.exp(total / (windows * length))}
    if length > trained:
        out["ppl_beyond"] = math.exp(beyond / (windows * (length - trained)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget (ignored with --ckpt)")
    parser.add_argument("--seq-len", type=int, default=64, help="trained context length (ignored with --ckpt)")
    parser.add_argument("--ckpt", help="evaluate this run or checkpoint instead of training one "
                                       "(its data: --data, default the char data prepared here)")
    parser.add_argument("--data", help="prepared data directory whose val split scores the model")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="val tokens scored at every length")
    parser.add_argument("--work-dir", default="runs/rope_scaling_ppl")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # fetch/prepare report on stdout; keep it pure JSON
        data_dir = Path(args.data) if args.data else char_data(work)
    started = time.perf_counter()
    run = Path(args.ckpt) if args.ckpt else train_model(work, data_dir, args.seq_len, args.minutes)
    train_s = time.perf_counter() - started

    model, _ = load_model(run, device="cpu")
    trained = model.config.max_position_embeddings
    if model.config.position != "rope" or model.config.rope_scaling:
        raise SystemExit("--ckpt must be a RoPE model trained without rope_scaling")
    meta = read_meta(data_dir)
    span = max(MULTIPLES) * trained
    n = min(len(open_tokens(data_dir, meta, "val")) - 1, args.eval_tokens) // span * span + 1
    tokens = torch.from_numpy(open_tokens(data_dir, meta, "val")[:n].astype("int64"))
    results: dict[str, dict] = {}
    for multiple in MULTIPLES:
        length = multiple * trained
        row = {}
        for name, scaling in methods(trained, multiple).items():
            extend_context(model, scaling, max_position_embeddings=length)
            row[name] = {k: round(v, 3) for k, v in perplexity(model, tokens, length, trained).items()}
        results[f"{multiple}x ({length} tokens)"] = row
        say(f"{length:5d} tokens: " + "  ".join(f"{k} {v['ppl']:.2f}" for k, v in row.items()))
    print(json.dumps({
        "benchmark": "rope_scaling_ppl",
        "trained_length": trained,
        "checkpoint": str(run),
        "train_minutes": None if args.ckpt else args.minutes,
        "train_wall_s": round(train_s, 1),
        "params": model.num_params(),
        "val_tokens_scored": n - 1,
        "ppl_by_length": results,
        "environment": common.environment(),
    }, indent=2))


if __name__ == "__main__":
    main()
