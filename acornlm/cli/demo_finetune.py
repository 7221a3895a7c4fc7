"""The fine-tuning half of `acornlm demo`: SFT (full or LoRA) -> GRPO -> DPO on the synthetic tasks.

The pipeline is `acornlm.cli.finetune_pipeline` (the same stage functions as `acornlm train sft|grpo|dpo`);
this file sizes it to the demo's wall-clock budget and reports its figures. The settings are those
of benchmarks/finetune_figures.py, re-tuned for the pretrained cpu-demo model (4 x 192, BPE 4096
trained on Shakespeare: digits are single tokens) on 2 CPU cores shared with other work (load 0.5-6):

- SFT, batch 32 x 64 packed tokens, lr 3e-3, weight decay 0.1: 0.2-0.25 s a step on quiet cores
  (0.5-1.5 s under load); 1,300-2,500 steps fit its 8.4 minutes (capped at SFT_MAX_STEPS below).
  Arithmetic is learned in a sudden jump once the units digit is (a - b, a + b below 100: before it,
  the answer's size is right and its last digit at chance, ~0.1 exact match).
  1467 steps on 2 quiet cores, 2,000 chats per task:
      weight decay 0,   +5,000 arithmetic:  arithmetic 0.115 (no jump; 2,500 arithmetic-only steps: 0.48)
      weight decay 0.1, +5,000 arithmetic:  arithmetic 0.14, reverse 0.58 (no jump)
      weight decay 0.1, +10,000 arithmetic: arithmetic 0.885, reverse 0.25 (0.19 in a demo run of 1406 steps)
      weight decay 0.1, +15,000 arithmetic: arithmetic 0.995, reverse 0.17 (nothing left for GRPO)
  Weight decay is what lets the jump happen within the budget (as in "grokking", Power et al. 2022).
  +12,500 is used: demo-pipeline runs reached arithmetic 0.755 (reverse 0.535) in 1597 steps and
  0.85 (reverse 0.145) in 1500; the extra arithmetic costs reverse accuracy.
- GRPO (32 prompts x 8 samples, 4 new tokens, lr 3e-5): 1.2 s a step on quiet cores, 6 s at load 4.
  It sharpens what SFT taught, so it helps once the units digit is being learned. 60 steps, held-out
  arithmetic: 0.764 -> 0.902 and 0.856 -> 0.924 (the 12,500 runs above, 500 questions), 0.885 -> 0.929
  and 0.48 -> 0.545 (1,000 questions; lr 1e-4: 0.925, 0.523), 0.174 -> 0.236 (the 1406-step run),
  0.144 -> 0.196 (a fresh-clone `make demo` whose SFT stopped at 1342 steps, at the start of the jump). From SFT models
  still before the jump (0.10-0.16), seven runs ended between -0.03 and +0.03 and the training
  reward stayed flat: on a busy machine SFT gets fewer steps and may stop before it.
- DPO (lr 3e-4, beta 0.1): 0.15 s a step quiet, 1 s at load 4. From the 600-step SFT base, 100 steps
  reach 0.88 held-out preference accuracy (reverse 0.95, sort 0.93, arithmetic 0.75; 200 steps at
  lr 6e-4: 0.89); from the 1467-step base, 80 steps reach 0.92.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from acornlm.cli.demo import estimate_steps, say
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
# Shares of the fine-tuning budget; the rest goes to the before/after evaluations.
# SFT gets most: arithmetic must pass its jump (see above), and the step estimate is conservative
# (a fresh-clone demo used 266 s of a 360 s share and stopped at 1342 steps, just before the jump).
SFT_SHARE, GRPO_SHARE, DPO_SHARE = 0.7, 0.12, 0.08
# GRPO and DPO steps per budget minute: the 12-minute default gives 72 and 360 steps, which fit
# their shares on 2 quiet CPU cores (about 1.1 s and 0.13 s a step). On
# a busier machine max_minutes stops them cleanly at their share (GRPO's learning rate is constant
# and DPO's gently decayed, so a run cut short still ends well).
GRPO_STEPS_PER_MINUTE, DPO_STEPS_PER_MINUTE = 6.0, 30.0

SFT_TRAIN = TrainConfig(batch_size=32, seq_len=64, learning_rate=3e-3, min_lr=3e-4, warmup_steps=20,
                        weight_decay=0.1, eval_interval=0, eval_batches=2, save_interval=0, log_interval=20,
                        progress=False)
# LoRA trains few parameters from small updates: a higher learning rate than full fine-tuning.
LORA_LEARNING_RATE = 1e-2
GRPO_TRAIN = TrainConfig(batch_size=32, seq_len=64, learning_rate=3e-5, min_lr=3e-5, warmup_steps=5,
                         weight_decay=0.0, eval_interval=0, eval_batches=2, save_interval=0, log_interval=5,
                         progress=False)
DPO_TRAIN = TrainConfig(batch_size=16, seq_len=64, learning_rate=3e-4, min_lr=3e-5, warmup_steps=10,
                        weight_decay=0.0, eval_interval=0, eval_batches=4, save_interval=0, log_interval=10,
                        progress=False)
SFT_EXAMPLES = 2000            # per task
SFT_EXTRA_ARITHMETIC = 12500   # arithmetic must pass its jump in SFT for GRPO to have something to sharpen
# At most this many SFT steps, however fast the machine. Where the jump happens varies from run to
# run: with +12,500 arithmetic, 1,342 steps gave 0.13, 1,597 gave 0.755, and 1,700 and 2,488 (a
# quiet machine's 8.4 minutes) solved arithmetic outright (1.0 and 0.995), leaving GRPO nothing to
# raise. Stopping early in the jump leaves GRPO the most to sharpen.
SFT_MAX_STEPS = 1500
GRPO_MAX_NEW_TOKENS = 4        # an answer below 200 is at most 3 digit tokens, then <|im_end|>
DPO_PAIRS = 400                # per task: more than the steps see in a budget, fewer reference log-probs to compute


def check_finetune_options(finetune: str, minutes: float, eval_examples: int, lora_rank: int) -> None:
    if finetune not in FINETUNE_MODES:
        raise ConfigError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
    if finetune != "none" and minutes <= 0:
        raise ConfigError(f"--finetune_minutes must be > 0, got {minutes} (or pass --finetune none)")
    if eval_examples < 1:
        raise ConfigError(f"--eval_examples must be a positive number of held-out questions, got {eval_examples}")
    if lora_rank < 1:
        raise ConfigError(f"--lora_rank must be a positive integer, got {lora_rank}")


def finetune_settings(model_config: ModelConfig, finetune: str, minutes: float, eval_examples: int,
                      lora_rank: int, seed: int, device: str) -> PipelineSettings:
    """The pipeline's settings for a budget of `minutes`: SFT's steps from timing real steps (its
    cosine schedule must end when its share of the time does), GRPO's and DPO's from measured rates."""
    smoke = minutes < 1  # too short for the tuned batches and data: a smoke test of every stage instead
    common = {"seed": seed, "device": device}
    sft = dataclasses.replace(SFT_TRAIN, **common, max_minutes=minutes * SFT_SHARE * 1.2)
    steps = estimate_steps(model_config, sft, minutes * SFT_SHARE, device)
    sft = dataclasses.replace(sft, max_steps=min(SFT_MAX_STEPS, steps))
    lora = LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank) if finetune == "lora" else LoraConfig()
    if lora.enabled:
        sft = dataclasses.replace(sft, learning_rate=LORA_LEARNING_RATE, min_lr=LORA_LEARNING_RATE / 10)
    grpo = dataclasses.replace(GRPO_TRAIN, **common, max_minutes=minutes * GRPO_SHARE,
                               max_steps=max(2, round(GRPO_STEPS_PER_MINUTE * minutes)))
    dpo = dataclasses.replace(DPO_TRAIN, **common, max_minutes=minutes * DPO_SHARE,
                              max_steps=max(2, round(DPO_STEPS_PER_MINUTE * minutes)))
    grpo_task = {**default_grpo(), "max_new_tokens": GRPO_MAX_NEW_TOKENS}
    dpo_tasks = {**default_dpo(), "num_pairs": DPO_PAIRS}
    if smoke:
        grpo = dataclasses.replace(grpo, batch_size=2, eval_batches=1)
        dpo = dataclasses.replace(dpo, batch_size=4, eval_batches=1)
        grpo_task["num_prompts"], dpo_tasks["num_pairs"] = 40, 20
    return PipelineSettings(sft_train=sft, grpo_train=grpo, dpo_train=dpo,
                            sft_examples=50 if smoke else SFT_EXAMPLES,
                            sft_extra_arithmetic=0 if smoke else SFT_EXTRA_ARITHMETIC, sft_lora=lora,
                            grpo=grpo_task, dpo=dpo_tasks, eval_examples=eval_examples,
                            grpo_eval_examples=round(2.5 * eval_examples), dpo_eval_pairs=max(1, eval_examples // 2))


def run_finetune(out_dir: Path, init: Path, model_config: ModelConfig, finetune: str, minutes: float,
                 eval_examples: int, lora_rank: int, seed: int, device: str) -> dict[str, Any]:
    """SFT -> GRPO -> DPO from the pretrained run `init`; stage runs go to OUT/sft, OUT/grpo, OUT/dpo."""
    settings = finetune_settings(model_config, finetune, minutes, eval_examples, lora_rank, seed, device)
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
