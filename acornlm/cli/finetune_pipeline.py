"""The fine-tuning pipeline after pretraining, with the figures that show each stage helped.

    sft   every synthetic task (acornlm.data.tasks)     -> held-out exact-match accuracy per task, before/after
    grpo  arithmetic, rewarded by the task's checker     -> held-out arithmetic accuracy (greedy), before/after
    dpo   synthetic pairs: the right answer beats another -> held-out preference accuracy of the implicit
          question's answer                                 reward beta*log(pi/pi_ref), and how often the
                                                            model itself prefers the right answer, before/after

Each stage starts from the previous stage's checkpoint and calls the function its command calls
(`run_sft`, `run_grpo`, `run_dpo`), so a figure measures what `acornlm train ...` produces.
`acornlm demo` runs the pipeline on the pretrained demo model; benchmarks/finetune_figures.py
on a small model with a task tokenizer. Held-out questions never occur in training data.

Interface:

    settings = PipelineSettings(sft_train=TrainConfig(...), grpo_train=..., dpo_train=...)
    figures = run_pipeline(work_dir, init_checkpoint, settings)   # {"sft": {...}, "grpo": {...}, "dpo": {...}}
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acornlm.data.preferences import synthetic_preference_pairs
from acornlm.data.tasks import make_dataset, write_jsonl
from acornlm.errors import ConfigError
from acornlm.eval.report import write_eval
from acornlm.eval.tasks import evaluate_tasks
from acornlm.model.checkpoint import resolve_checkpoint
from acornlm.model.lora import LoraConfig
from acornlm.train.config import TrainConfig
from acornlm.train.dpo import DPOConfig
from acornlm.train.grpo import GRPOConfig

STAGES = ("sft", "grpo", "dpo")
Log = Callable[[str], None]


def default_grpo() -> dict[str, Any]:
    return dict(tasks="arithmetic", num_prompts=2000,
                grpo=GRPOConfig(reward="task", group_size=8, max_new_tokens=8, temperature=1.0))


def default_dpo() -> dict[str, Any]:
    # Tasks whose right answer a small model learns to recognise; count needs letter counting inside
    # BPE tokens, about chance for these models, so it is left out.
    return dict(tasks="arithmetic,reverse,sort", num_pairs=1000, dpo=DPOConfig(beta=0.1))


@dataclass
class PipelineSettings:
    """What each stage trains on and for how long, and how many held-out examples each figure uses.

    grpo and dpo hold the keyword arguments of `run_grpo` and `run_dpo`; grpo["tasks"] names the
    task whose accuracy the GRPO figure reports, dpo["tasks"] the tasks of the held-out pairs.
    """

    sft_train: TrainConfig
    grpo_train: TrainConfig
    dpo_train: TrainConfig
    sft_tasks: str = "all"
    sft_examples: int = 2000          # per task
    sft_extra_arithmetic: int = 0     # GRPO can only sharpen what SFT taught: a base that answers some arithmetic
    sft_extra_task: str = "arithmetic"  # the task of those extra examples (zh_arithmetic for the Chinese demo)
    sft_lora: LoraConfig = field(default_factory=LoraConfig)   # rank > 0: SFT trains LoRA adapters only
    grpo: dict[str, Any] = field(default_factory=default_grpo)
    dpo: dict[str, Any] = field(default_factory=default_dpo)
    eval_examples: int = 200          # held-out questions per task for the SFT figure
    grpo_eval_examples: int = 500     # held-out questions for the GRPO figure (+-2 points of noise at 500)
    dpo_eval_pairs: int = 100         # held-out pairs per task for the DPO figure

    def __post_init__(self) -> None:
        for name in ("eval_examples", "grpo_eval_examples", "dpo_eval_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive number of held-out examples, got {getattr(self, name)}")


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine slows every stage down), when the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def task_accuracy(checkpoint: str | Path, tasks: str, n: int, seed: int = 0) -> dict[str, float]:
    """Held-out exact-match accuracy per task of a checkpoint (with its LoRA adapter, if any), as
    `acornlm eval tasks` measures it."""
    from acornlm.infer.api import LanguageModel
    from acornlm.model.lora import load_model_with_adapter
    from acornlm.tokenizer import load_tokenizer

    checkpoint = resolve_checkpoint(checkpoint)
    model, info = load_model_with_adapter(checkpoint)
    return evaluate_tasks(LanguageModel(model, load_tokenizer(checkpoint), info), tasks, n=n, seed=seed)


def preference_ranking(policy: str | Path, reference: str | Path, tasks: str, n: int, seed: int,
                       max_tokens: int) -> dict[str, Any]:
    """On `n` held-out synthetic pairs per task: how often DPO's implicit reward
    beta*log(pi/pi_ref) is higher for the right answer (the preference accuracy; the sign does not
    depend on beta), and how often each model's own log-prob favours the right answer."""
    from acornlm.data.preferences import encode_pairs
    from acornlm.model.lora import load_model_with_adapter
    from acornlm.tokenizer import load_tokenizer
    from acornlm.train.dpo import precompute_reference_logps

    policy, reference = resolve_checkpoint(policy), resolve_checkpoint(reference)
    tokenizer = load_tokenizer(reference)
    pairs = synthetic_preference_pairs(make_dataset(tasks, n, seed, "heldout"), seed)
    encoded = encode_pairs(tokenizer, pairs, max_tokens)
    if len(encoded) != len(pairs):
        raise ConfigError(f"held-out pairs are longer than {max_tokens} tokens: raise the DPO train.seq_len")
    logps = {}
    for name, path in (("policy", policy), ("reference", reference)):
        model, _ = load_model_with_adapter(path)
        logps[name] = precompute_reference_logps(model, encoded, 64, tokenizer.eot_id, torch.device("cpu"))
    margin = (logps["policy"][:, 0] - logps["reference"][:, 0]) - (logps["policy"][:, 1] - logps["reference"][:, 1])
    right = margin > 0
    tasks_of_pairs = [pair.source.removeprefix("synthetic:") for pair in pairs]
    per_task = {task: right[[t == task for t in tasks_of_pairs]].float().mean().item()
                for task in dict.fromkeys(tasks_of_pairs)}
    return {
        "pairs": len(encoded),
        "preference_accuracy": right.float().mean().item(),
        "preference_accuracy_per_task": per_task,
        "reference_prefers_correct": (logps["reference"][:, 0] > logps["reference"][:, 1]).float().mean().item(),
        "policy_prefers_correct": (logps["policy"][:, 0] > logps["policy"][:, 1]).float().mean().item(),
    }


def timed(log: Log, label: str, function: Callable[..., dict[str, Any]], *args: Any,
          **kwargs: Any) -> tuple[dict[str, Any], float]:
    log(f"{label} (load average {load_average()})")
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def stage_sft(work: Path, init: Path, settings: PipelineSettings, log: Log) -> tuple[Path, dict[str, Any]]:
    """SFT on every task (packed rows), accuracy per task before and after."""
    from acornlm.train.sft import run_sft

    examples = make_dataset(settings.sft_tasks, settings.sft_examples, seed=0)
    examples += make_dataset(settings.sft_extra_task, settings.sft_extra_arithmetic, seed=1)
    data = write_jsonl(examples, work / "sft.jsonl")
    before = task_accuracy(init, settings.sft_tasks, settings.eval_examples)
    log(f"accuracy before SFT: {format_accuracy(before)}")
    summary, seconds = timed(log, "sft" + (f" with LoRA rank {settings.sft_lora.rank}" if settings.sft_lora.enabled
                                           else ""), run_sft, data, init, work / "sft", settings.sft_train,
                             settings.sft_lora, packing=True)
    after = task_accuracy(work / "sft", settings.sft_tasks, settings.eval_examples)
    log(f"accuracy after SFT:  {format_accuracy(after)}")
    figures = {"steps": summary["steps"], "train_s": round(seconds, 1), "examples": len(examples),
               "trainable_params": summary["trainable_params"], "params": summary["params"],
               "lora_rank": settings.sft_lora.rank, "accuracy_before": before, "accuracy_after": after}
    write_eval(work / "sft", [{"name": f"held-out exact match per task ({settings.eval_examples} questions each, "
                                       "greedy)", "before": before, "after": after}], **figures)
    return resolve_checkpoint(work / "sft"), figures


def stage_grpo(work: Path, init: Path, settings: PipelineSettings, log: Log) -> tuple[Path, dict[str, Any]]:
    """GRPO on prompts rewarded by the task's checker; held-out accuracy on that task before and after."""
    from acornlm.train.grpo import run_grpo

    task, n = settings.grpo["tasks"], settings.grpo_eval_examples
    before = task_accuracy(init, task, n)[task]
    summary, seconds = timed(log, f"grpo on {task}", run_grpo, None, init, work / "grpo", settings.grpo_train,
                             **settings.grpo)
    after = task_accuracy(work / "grpo", task, n)[task]
    log(f"{task} accuracy ({n} held-out questions): {before:.3f} before GRPO -> {after:.3f} after")
    rewards = [record["reward"] for record in read_metrics(work / "grpo") if "reward" in record]
    figures = {"steps": summary["steps"], "train_s": round(seconds, 1), "task": task, "eval_examples": n,
               "accuracy_before": before, "accuracy_after": after,
               "train_reward_first_logged": rewards[0] if rewards else None,
               "train_reward_last_logged": rewards[-1] if rewards else None}
    write_eval(work / "grpo", [{"name": f"held-out {task} accuracy ({n} questions, greedy)",
                                "before": {task: before}, "after": {task: after}}], **figures)
    return resolve_checkpoint(work / "grpo"), figures


def stage_dpo(work: Path, init: Path, settings: PipelineSettings, log: Log) -> tuple[Path, dict[str, Any]]:
    """DPO on synthetic pairs; preference figures on held-out pairs (a seed the training never used)."""
    from acornlm.train.dpo import run_dpo

    summary, seconds = timed(log, f"dpo on pairs of {settings.dpo['tasks']}", run_dpo, None, init, work / "dpo",
                             settings.dpo_train, **settings.dpo)
    held_out = preference_ranking(work / "dpo", init, settings.dpo["tasks"], settings.dpo_eval_pairs, seed=1,
                                  max_tokens=settings.dpo_train.seq_len + 1)
    log(f"held-out preference accuracy ({held_out['pairs']} pairs): {held_out['preference_accuracy']:.3f}; the model "
        f"prefers the right answer {held_out['reference_prefers_correct']:.3f} before DPO -> "
        f"{held_out['policy_prefers_correct']:.3f} after")
    figures = {"steps": summary["steps"], "train_s": round(seconds, 1), **held_out}
    pairs = f"{held_out['pairs']} held-out pairs"
    write_eval(work / "dpo", [
        {"name": f"the model's own log-probability prefers the right answer ({pairs})",
         "before": {"all tasks": held_out["reference_prefers_correct"]},
         "after": {"all tasks": held_out["policy_prefers_correct"]}},
        {"name": f"preference accuracy of the implicit reward beta*log(pi/pi_ref) ({pairs}; its margin is 0 "
                 "before DPO)", "before": {},
         "after": {"all tasks": held_out["preference_accuracy"], **held_out["preference_accuracy_per_task"]}},
    ], **figures)
    return resolve_checkpoint(work / "dpo"), figures


def run_pipeline(work: str | Path, init: str | Path, settings: PipelineSettings,
                 stages: tuple[str, ...] = STAGES, log: Log = print) -> dict[str, Any]:
    """Run `stages` in order from the checkpoint `init`, each from the previous one's result.

    Stage runs go to WORK/sft, WORK/grpo and WORK/dpo (replaced when present). Returns the figures
    of each stage plus "total_s".
    """
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(STAGES)}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        shutil.rmtree(work / stage, ignore_errors=True)
    functions = {"sft": stage_sft, "grpo": stage_grpo, "dpo": stage_dpo}
    checkpoint = resolve_checkpoint(init)
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    for stage in stages:
        checkpoint, figures[stage] = functions[stage](work, checkpoint, settings, log)
    figures["total_s"] = round(time.perf_counter() - started, 1)
    return figures


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def format_accuracy(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{task} {value:.3f}" for task, value in accuracy.items())
