"""The fine-tuning half of `acornlm demo`: SFT (full or LoRA) -> GRPO -> DPO on the synthetic tasks.

The pipeline is `acornlm.cli.finetune_pipeline` (the same stage functions as `acornlm train sft|grpo|dpo`);
this file sizes it to the demo's wall-clock budget and reports its figures. The settings are data:
acornlm/cli/recipes/demo-finetune.yaml; benchmarks/README.md tells how they were tuned.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from acornlm.cli.demo_budget import estimate_steps, say
from acornlm.cli.finetune_pipeline import (
    PipelineSettings,
    default_dpo,
    default_grpo,
    format_accuracy,
    run_pipeline,
)
from acornlm.errors import ConfigError
from acornlm.model import ModelConfig
from acornlm.model.lora import LoraConfig
from acornlm.train.config import TrainConfig

FINETUNE_MODES = ("full", "lora", "none")
RECIPE_FILE = Path(__file__).parent / "recipes" / "demo-finetune.yaml"


def load_recipe(path: Path = RECIPE_FILE) -> dict[str, Any]:
    """The demo's fine-tuning recipe: per stage its TrainConfig fields and budget figures."""
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the fine-tuning recipe: {exc}") from exc
    for stage in ("sft", "grpo", "dpo"):
        TrainConfig(**recipe[stage]["train"])  # an unknown or bad field fails here, naming itself
    return recipe


RECIPE = load_recipe()
SFT_MAX_STEPS = RECIPE["sft"]["max_steps"]


def check_finetune_options(finetune: str, minutes: float, eval_examples: int, lora_rank: int) -> None:
    if finetune not in FINETUNE_MODES:
        raise ConfigError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
    if finetune != "none" and minutes <= 0:
        raise ConfigError(f"--finetune_minutes must be > 0, got {minutes} (or pass --finetune none)")
    if eval_examples < 1:
        raise ConfigError(f"--eval_examples must be a positive number of held-out questions, got {eval_examples}")
    if lora_rank < 1:
        raise ConfigError(f"--lora_rank must be a positive integer, got {lora_rank}")


# The Chinese demo's tasks (acornlm.data.tasks, group zh), the longer rows a poem needs, and its DPO: the
# English recipe (3e-4, plain DPO, arithmetic pairs only) made the Chinese model forget (zh_poem 0.75 -> 0.12,
# a broken 你是谁 answer); a gentler rate with the chosen answers' NLL added (RPO) and poem pairs kept every
# task: identity 1.00, arithmetic 0.12 -> 0.12, poem 0.75 -> 0.84 from the same GRPO checkpoint.
CHINESE = {"sft_tasks": "zh", "grpo_task": "zh_arithmetic", "dpo_tasks": "zh_arithmetic,zh_poem", "seq_len": 128,
           "grpo_max_new_tokens": 8, "dpo_learning_rate": 5.0e-5, "dpo_sft_weight": 1.0}


def finetune_settings(model_config: ModelConfig, finetune: str, minutes: float, eval_examples: int,
                      lora_rank: int, seed: int, device: str, language: str = "en") -> PipelineSettings:
    """The pipeline's settings for a budget of `minutes`: SFT's steps from timing real steps (its
    cosine schedule must end when its share of the time does), GRPO's and DPO's from measured rates.
    language "zh" trains the Chinese tasks (你是谁？, arithmetic in Chinese numerals, a poem of the
    asked form) instead of the English ones."""
    smoke = minutes < 1  # too short for the tuned batches and data: a smoke test of every stage instead
    recipe, shares = RECIPE, RECIPE["shares"]
    common = {"seed": seed, "device": device}
    zh = language == "zh"
    if zh:
        common["seq_len"] = CHINESE["seq_len"]
    sft = TrainConfig(**{**recipe["sft"]["train"], **common}, max_minutes=minutes * shares["sft"] * 1.2)
    steps = estimate_steps(model_config, sft, minutes * shares["sft"], device)
    sft = dataclasses.replace(sft, max_steps=min(recipe["sft"]["max_steps"], steps))
    lora = LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank) if finetune == "lora" else LoraConfig()
    if lora.enabled:
        rate = recipe["sft"]["lora_learning_rate"]
        sft = dataclasses.replace(sft, learning_rate=rate, min_lr=rate / 10)
    grpo = TrainConfig(**{**recipe["grpo"]["train"], **common}, max_minutes=minutes * shares["grpo"],
                       max_steps=max(2, round(recipe["grpo"]["steps_per_minute"] * minutes)))
    dpo = TrainConfig(**{**recipe["dpo"]["train"], **common}, max_minutes=minutes * shares["dpo"],
                      max_steps=max(2, round(recipe["dpo"]["steps_per_minute"] * minutes)))
    grpo_task = default_grpo()
    grpo_task["grpo"] = dataclasses.replace(grpo_task["grpo"], max_new_tokens=CHINESE["grpo_max_new_tokens"] if zh
                                            else recipe["grpo"]["max_new_tokens"])
    dpo_tasks = {**default_dpo(), "num_pairs": recipe["dpo"]["pairs_per_task"]}
    if zh:
        grpo_task["tasks"], dpo_tasks["tasks"] = CHINESE["grpo_task"], CHINESE["dpo_tasks"]
        dpo_tasks["dpo"] = dataclasses.replace(dpo_tasks["dpo"], sft_weight=CHINESE["dpo_sft_weight"])
        dpo = dataclasses.replace(dpo, learning_rate=CHINESE["dpo_learning_rate"],
                                  min_lr=CHINESE["dpo_learning_rate"] / 10)
    if smoke:
        grpo = dataclasses.replace(grpo, batch_size=2, eval_batches=1)
        dpo = dataclasses.replace(dpo, batch_size=4, eval_batches=1)
        grpo_task["num_prompts"], dpo_tasks["num_pairs"] = 40, 20
    return PipelineSettings(sft_train=sft, grpo_train=grpo, dpo_train=dpo,
                            sft_tasks=CHINESE["sft_tasks"] if zh else "all",
                            sft_extra_task=CHINESE["grpo_task"] if zh else "arithmetic",
                            sft_examples=50 if smoke else recipe["sft"]["examples_per_task"],
                            sft_extra_arithmetic=0 if smoke else recipe["sft"]["extra_arithmetic"], sft_lora=lora,
                            grpo=grpo_task, dpo=dpo_tasks, eval_examples=eval_examples,
                            grpo_eval_examples=round(2.5 * eval_examples), dpo_eval_pairs=max(1, eval_examples // 2))


def run_finetune(out_dir: Path, init: Path, model_config: ModelConfig, finetune: str, minutes: float,
                 eval_examples: int, lora_rank: int, seed: int, device: str, language: str = "en") -> dict[str, Any]:
    """SFT -> GRPO -> DPO from the pretrained run `init`; stage runs go to OUT/sft, OUT/grpo, OUT/dpo."""
    settings = finetune_settings(model_config, finetune, minutes, eval_examples, lora_rank, seed, device, language)
    say(f"      SFT {settings.sft_train.max_steps} steps ({'LoRA rank ' + str(lora_rank) if finetune == 'lora' else 'full'}"
        f"), GRPO {settings.grpo_train.max_steps} steps, DPO {settings.dpo_train.max_steps} steps "
        f"in about {minutes:g} minutes")
    figures = run_pipeline(out_dir, init, settings, log=lambda message: say(f"      {message}"))
    figures["mode"] = finetune
    return figures


def figure_lines(figures: dict[str, Any]) -> list[str]:
    """The before/after figures as plain lines (printed at the end of the demo)."""
    sft, grpo, dpo = figures["sft"], figures["grpo"], figures["dpo"]
    how = f"LoRA rank {sft['lora_rank']}" if sft["lora_rank"] else "full fine-tuning"
    return [
        f"SFT ({how}, {sft['steps']} steps, {sft['train_s']:.0f} s): held-out exact match per task",
        f"  before: {format_accuracy(sft['accuracy_before'])}",
        f"  after:  {format_accuracy(sft['accuracy_after'])}",
        f"GRPO on {grpo['task']} ({grpo['steps']} steps, {grpo['train_s']:.0f} s): held-out accuracy "
        f"{grpo['accuracy_before']:.3f} -> {grpo['accuracy_after']:.3f} ({grpo['eval_examples']} questions)",
        f"DPO ({dpo['steps']} steps, {dpo['train_s']:.0f} s) on {dpo['pairs']} held-out pairs: preference accuracy "
        f"{dpo['preference_accuracy']:.3f}; the model prefers the right answer "
        f"{dpo['reference_prefers_correct']:.3f} -> {dpo['policy_prefers_correct']:.3f}",
    ]


def summary_section(figures: dict[str, Any], out_dir: Path) -> list[str]:
    """The fine-tuning section of summary.md: a before/after table per stage."""
    sft, grpo, dpo = figures["sft"], figures["grpo"], figures["dpo"]
    how = f"LoRA adapters, rank {sft['lora_rank']}" if sft["lora_rank"] else "full fine-tuning"
    lines = ["## Fine-tuning", "",
             f"SFT ({how}: {sft['trainable_params']:,} of {sft['params']:,} parameters trained, {sft['steps']} steps, "
             f"{sft['train_s']:.0f} s) on {sft['examples']:,} synthetic chats; exact match on held-out questions "
             "(greedy):", "", "| task | before SFT | after SFT |", "|---|---|---|"]
    lines += [f"| {task} | {before:.3f} | {sft['accuracy_after'][task]:.3f} |"
              for task, before in sft["accuracy_before"].items()]
    lines += ["", f"GRPO on {grpo['task']} ({grpo['steps']} steps, {grpo['train_s']:.0f} s), "
              f"{grpo['eval_examples']} held-out questions:", "",
              "| | before GRPO | after GRPO |", "|---|---|---|",
              f"| {grpo['task']} accuracy | {grpo['accuracy_before']:.3f} | {grpo['accuracy_after']:.3f} |", "",
              f"DPO on synthetic pairs (the right answer beats another question's answer; {dpo['steps']} steps, "
              f"{dpo['train_s']:.0f} s), {dpo['pairs']} held-out pairs:", "",
              "| | before DPO | after DPO |", "|---|---|---|",
              f"| preference accuracy (implicit reward; 0 margin before) | - | {dpo['preference_accuracy']:.3f} |",
              f"| the model prefers the right answer | {dpo['reference_prefers_correct']:.3f} | "
              f"{dpo['policy_prefers_correct']:.3f} |", "",
              "Per task preference accuracy: " + format_accuracy(dpo["preference_accuracy_per_task"]), "",
              f"Talk to the result: `acornlm chat --ckpt {out_dir / 'dpo'}` (or its `sft`, `grpo` siblings).", ""]
    return lines
