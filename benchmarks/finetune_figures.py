"""Fine-tuning figures: SFT -> GRPO -> DPO on a small model, offline, on a CPU, in minutes.

The pipeline `make demo` runs after pretraining, with the settings written down here:

  start  a BPE tokenizer (512 tokens) trained on the synthetic tasks' chats and a random 4-layer,
         128-wide model, or --init CKPT (e.g. the demo's pretrained model, same tokenizer needed
         for the tasks to tokenize well; any acornlm checkpoint works).
  sft    full fine-tuning on every synthetic task (acornlm.eval.tasks), packed rows.
         Figure: held-out exact-match accuracy per task before -> after.
  grpo   from the SFT model, on arithmetic prompts rewarded by the task's checker (1 if the
         answer is exactly right). Figure: held-out arithmetic accuracy (greedy) before -> after.
  dpo    from the GRPO model, on synthetic pairs: the correct answer beats another question's
         answer. Figure: held-out preference accuracy (share of held-out pairs whose implicit
         reward beta*log(pi/pi_ref) is higher for the correct answer), and how often the models
         themselves rank the correct answer as more likely, before -> after.

Accuracies use `evaluate_tasks` (greedy, held-out questions that never occur in training). The
load average is printed with each stage: other work on the machine slows everything down.
Prints one JSON object (progress goes to stderr).

Usage: python benchmarks/finetune_figures.py [--work-dir runs/finetune_figures] [--init CKPT]
                                             [--sft CKPT] [--stages sft,grpo,dpo] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acornlm.checkpoint import resolve_checkpoint, write_model_files  # noqa: E402
from acornlm.data.chat import chat_text  # noqa: E402
from acornlm.data.preferences import synthetic_preference_pairs  # noqa: E402
from acornlm.eval.tasks import evaluate_tasks, make_dataset, write_jsonl  # noqa: E402
from acornlm.infer.api import LanguageModel  # noqa: E402
from acornlm.model import ModelConfig, Transformer  # noqa: E402
from acornlm.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from acornlm.train.config import TrainConfig  # noqa: E402
from acornlm.train.dpo import encode_pairs, precompute_reference_logps, run_dpo  # noqa: E402
from acornlm.train.grpo import run_grpo  # noqa: E402
from acornlm.train.lora import load_model_with_adapter  # noqa: E402
from acornlm.train.sft import run_sft  # noqa: E402

SFT_TASKS = "all"
EVAL_EXAMPLES = 200          # held-out questions per task for the SFT figure
GRPO_EVAL_EXAMPLES = 500     # held-out arithmetic questions for the GRPO figure (+-2 points of noise)
DPO_EVAL_PAIRS = 100         # held-out pairs per task for the DPO figure

# The settings of each stage (the figures in the module docstring come from these).
START_MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                   max_position_embeddings=128, rope_theta=10000.0)
# GRPO can only sharpen what SFT taught: it needs a base that answers some arithmetic right
# (about 18% here), so SFT sees extra arithmetic on top of every task.
SFT_EXAMPLES = 2000              # per task
SFT_EXTRA_ARITHMETIC = 15000
SFT_TRAIN = TrainConfig(max_steps=1300, batch_size=32, seq_len=64, learning_rate=3e-3, min_lr=3e-4,
                        warmup_steps=20, weight_decay=0.0, eval_interval=500, eval_batches=2, save_interval=500,
                        log_interval=50, progress=False)
# 32 prompts x 8 samples per step: a low learning rate and a big group batch (smaller batches or
# a learning rate of 1e-4 made arithmetic *worse*: Adam turns a noisy reward signal into a random walk).
GRPO = dict(tasks="arithmetic", num_prompts=2000, reward="task", group_size=8, max_new_tokens=8, temperature=1.0)
GRPO_TRAIN = TrainConfig(max_steps=60, batch_size=32, seq_len=64, learning_rate=3e-5, min_lr=3e-5, warmup_steps=5,
                         weight_decay=0.0, eval_interval=0, eval_batches=2, save_interval=0, log_interval=5,
                         progress=False)
# Pairs of tasks whose right answer a small model can learn to recognise (count needs letter
# counting inside BPE tokens: about chance for this model, so it is left out).
DPO = dict(tasks="arithmetic,reverse,sort", num_pairs=1000, beta=0.1)
DPO_TRAIN = TrainConfig(max_steps=300, batch_size=16, seq_len=64, learning_rate=3e-4, min_lr=3e-5, warmup_steps=10,
                        weight_decay=0.0, eval_interval=0, eval_batches=4, save_interval=0, log_interval=10,
                        progress=False)


def say(message: str) -> None:
    print(f"[finetune_figures] {message}", file=sys.stderr, flush=True)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def accuracy(checkpoint: Path, tasks: str, n: int) -> dict[str, float]:
    checkpoint = resolve_checkpoint(checkpoint)
    model, info = load_model_with_adapter(checkpoint)
    return evaluate_tasks(LanguageModel(model, load_tokenizer(checkpoint), info), tasks, n=n, seed=0)


def fresh_start(work: Path) -> Path:
    """A tokenizer trained on the tasks' chats and a random model: what SFT starts from without --init."""
    examples = make_dataset("all", 600, seed=0)
    tokenizer = train_tokenizer([chat_text(e.messages()) for e in examples], kind="bpe", vocab_size=512)
    tokenizer.save(work / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **START_MODEL))
    init = work / "init"
    init.mkdir()
    write_model_files(init, model, info={"stage": "random"}, tokenizer_dir=work / "tokenizer")
    return init


def timed(label: str, function, *args, **kwargs):
    say(f"{label} (load average {load_average()})")
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def stage_sft(work: Path, init: Path, quick: bool) -> tuple[Path, dict]:
    examples = make_dataset(SFT_TASKS, 200 if quick else SFT_EXAMPLES, seed=0)
    examples += make_dataset("arithmetic", 200 if quick else SFT_EXTRA_ARITHMETIC, seed=1)
    data = write_jsonl(examples, work / "sft.jsonl")
    train = TrainConfig(**{**SFT_TRAIN.__dict__, "max_steps": 20 if quick else SFT_TRAIN.max_steps})
    before = accuracy(init, SFT_TASKS, 10 if quick else EVAL_EXAMPLES)
    summary, seconds = timed("sft", run_sft, data, init, work / "sft", train, packing=True)
    after = accuracy(work / "sft", SFT_TASKS, 10 if quick else EVAL_EXAMPLES)
    return resolve_checkpoint(work / "sft"), {"steps": summary["steps"], "train_s": round(seconds, 1),
                                              "accuracy_before": before, "accuracy_after": after}


def stage_grpo(work: Path, init: Path, quick: bool) -> tuple[Path, dict]:
    n = 10 if quick else GRPO_EVAL_EXAMPLES
    train = TrainConfig(**{**GRPO_TRAIN.__dict__, "max_steps": 4 if quick else GRPO_TRAIN.max_steps,
                           "batch_size": 4 if quick else GRPO_TRAIN.batch_size})
    before = accuracy(init, GRPO["tasks"], n)["arithmetic"]
    summary, seconds = timed("grpo", run_grpo, None, init, work / "grpo", train, **GRPO)
    after = accuracy(work / "grpo", GRPO["tasks"], n)["arithmetic"]
    rewards = [json.loads(line).get("reward") for line in (work / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return resolve_checkpoint(work / "grpo"), {
        "steps": summary["steps"], "train_s": round(seconds, 1), "arithmetic_accuracy_before": before,
        "arithmetic_accuracy_after": after, "train_reward_first_logged": rewards[0], "train_reward_last_logged": rewards[-1]}


def ranking(policy: Path, reference: Path, tasks: str, n: int, seed: int) -> dict[str, float]:
    """On held-out pairs: how often the implicit reward, and each model's own log-prob, favours the right answer."""
    policy, reference = resolve_checkpoint(policy), resolve_checkpoint(reference)
    tokenizer = load_tokenizer(reference)
    pairs = synthetic_preference_pairs(make_dataset(tasks, n, seed, "heldout"), seed)
    encoded = encode_pairs(tokenizer, pairs, DPO_TRAIN.seq_len + 1)
    if len(encoded) != len(pairs):
        raise SystemExit("held-out pairs longer than train.seq_len: raise DPO_TRAIN.seq_len")
    logps = {}
    for name, path in (("policy", policy), ("reference", reference)):
        model, _ = load_model_with_adapter(path)
        logps[name] = precompute_reference_logps(model, encoded, 64, tokenizer.eot_id, torch.device("cpu"))
    margin = (logps["policy"][:, 0] - logps["reference"][:, 0]) - (logps["policy"][:, 1] - logps["reference"][:, 1])
    right = margin > 0
    tasks_of_pairs = [pair.source.removeprefix("synthetic:") for pair in pairs]  # encode_pairs kept them all
    per_task = {task: right[[t == task for t in tasks_of_pairs]].float().mean().item()
                for task in dict.fromkeys(tasks_of_pairs)}
    return {
        "pairs": len(encoded),
        "preference_accuracy": right.float().mean().item(),
        "preference_accuracy_per_task": per_task,
        "reference_prefers_correct": (logps["reference"][:, 0] > logps["reference"][:, 1]).float().mean().item(),
        "policy_prefers_correct": (logps["policy"][:, 0] > logps["policy"][:, 1]).float().mean().item(),
    }


def stage_dpo(work: Path, init: Path, quick: bool) -> tuple[Path, dict]:
    train = TrainConfig(**{**DPO_TRAIN.__dict__, "max_steps": 4 if quick else DPO_TRAIN.max_steps})
    settings = {**DPO, "num_pairs": 50 if quick else DPO["num_pairs"]}
    summary, seconds = timed("dpo", run_dpo, None, init, work / "dpo", train, **settings)
    held_out = ranking(work / "dpo", init, DPO["tasks"], 25 if quick else DPO_EVAL_PAIRS, seed=1)
    return resolve_checkpoint(work / "dpo"), {"steps": summary["steps"], "train_s": round(seconds, 1), **held_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/finetune_figures")
    parser.add_argument("--init", help="start SFT from this checkpoint instead of a random model")
    parser.add_argument("--sft", help="skip SFT: start GRPO from this (SFT) checkpoint")
    parser.add_argument("--stages", default="sft,grpo,dpo")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    work = Path(args.work_dir)
    stages = [s.strip() for s in args.stages.split(",")]
    for stage in stages:
        shutil.rmtree(work / stage, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    def schedule(train: TrainConfig) -> dict:
        return {key: getattr(train, key) for key in ("max_steps", "batch_size", "learning_rate", "min_lr")}

    result: dict = {"settings": {"model": START_MODEL, "sft": schedule(SFT_TRAIN), "grpo": {**GRPO, **schedule(GRPO_TRAIN)},
                                 "dpo": {**DPO, **schedule(DPO_TRAIN)}}}
    started = time.perf_counter()
    checkpoint = Path(args.sft) if args.sft else None
    if "sft" in stages and checkpoint is None:
        if args.init:
            init = resolve_checkpoint(args.init)
        else:
            shutil.rmtree(work / "init", ignore_errors=True)
            shutil.rmtree(work / "tokenizer", ignore_errors=True)
            init = fresh_start(work)
        checkpoint, result["sft"] = stage_sft(work, init, args.quick)
    if checkpoint is None:
        raise SystemExit("give --sft CKPT or include the sft stage")
    for name, stage in (("grpo", stage_grpo), ("dpo", stage_dpo)):
        if name in stages:
            checkpoint, result[name] = stage(work, resolve_checkpoint(checkpoint), args.quick)
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["load_average_end"] = load_average()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
