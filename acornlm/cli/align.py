"""`acornlm train dpo`, `acornlm train grpo` and `acornlm train distill`: the stages after SFT.

Each mirrors `acornlm train sft` (--init, --out, --train.*, --lora.*, --resume) and adds the
options of its method.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from acornlm.errors import ConfigError
from acornlm.model.lora import LoraConfig
from acornlm.train.config import TrainConfig

# The defaults are the settings of benchmarks/finetune_figures.py, tuned on the small CPU models.
# Preference tuning moves a trained model a little: few steps, a cosine-decayed learning rate.
DEFAULT_DPO_TRAIN = TrainConfig(max_steps=300, batch_size=16, seq_len=128, learning_rate=3e-4, min_lr=3e-5,
                                warmup_steps=10, weight_decay=0.0, eval_interval=100, eval_batches=4,
                                save_interval=100, log_interval=10)
# train.batch_size counts prompts per micro-batch, each bringing group_size sampled completions. A
# reward that is right on few samples is a noisy signal: many prompts per step and a low, constant
# learning rate keep Adam from turning it into a random walk.
DEFAULT_GRPO_TRAIN = TrainConfig(max_steps=60, batch_size=32, seq_len=128, learning_rate=3e-5, min_lr=3e-5,
                                 warmup_steps=5, weight_decay=0.0, eval_interval=20, eval_batches=4,
                                 save_interval=20, log_interval=5)
DEFAULT_DISTILL_TRAIN = TrainConfig(max_steps=300, batch_size=16, seq_len=128, learning_rate=1e-3, min_lr=1e-4,
                                    warmup_steps=20, weight_decay=0.0, eval_interval=100, eval_batches=4,
                                    save_interval=100, log_interval=10)
DEFAULT_LORA = LoraConfig()


def _print_summary(summary: dict[str, Any], extra: dict[str, str]) -> None:
    from acornlm.cli.train import format_summary

    if summary["rank"] != 0:
        return
    lines = [format_summary(summary)]
    lines += [f"{label} {summary[key]:.4f}" for key, label in extra.items() if summary.get(key) is not None]
    print("\n".join(lines), file=sys.stderr)


def _require_out(out: str | None) -> None:
    if out is None:
        raise ConfigError("--out is required: the run directory for checkpoints and metrics")


def dpo(data: str | None = None, init: str | None = None, out: str | None = None,
        train: TrainConfig = DEFAULT_DPO_TRAIN, lora: LoraConfig = DEFAULT_LORA, beta: float = 0.1,
        label_smoothing: float = 0.0, loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        precompute_reference: bool = True, tasks: str | None = None, num_pairs: int = 1000, data_format: str = "auto",
        val_data: str | None = None, val_fraction: float = 0.05, on_identical: Literal["skip", "error"] = "skip",
        resume: bool = False) -> None:
    """Direct Preference Optimization: prefer the chosen answers over the rejected ones.

    The loss raises the implicit reward beta * log(pi / pi_ref) of each chosen answer above the
    rejected one's, pi_ref being the starting model (--init, usually an SFT run). Logs reward
    margins and preference accuracy (share of pairs ranked right). Offline demo without a dataset:
    `--tasks arithmetic,reverse` makes pairs where the correct answer beats a wrong one.

    Args:
        data: Preference pairs: a .jsonl/.json file, a folder of them, or several separated by commas. Formats: trl {prompt, chosen, rejected}, minimind {chosen: [msgs], rejected: [msgs]}, alpaca and sharegpt (LLaMA-Factory), auto-detected.
        init: The checkpoint or run directory to start from, also the frozen reference (not needed with --resume).
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        train: Optimisation, schedule, evaluation and checkpointing; train.batch_size counts pairs, train.seq_len is the longest prompt + answer (answers beyond are cut, pairs whose prompt does not fit are dropped; both counted).
        lora: LoRA adapters instead of full fine-tuning (lora.rank > 0).
        beta: Strength of the pull towards the reference (higher = stay closer); typical 0.1.
        label_smoothing: Conservative DPO: the probability that a pair's labels are flipped (0 = plain DPO).
        loss_type: "sigmoid" (DPO) or "ipo" (squared loss on length-averaged log-probs, Azar et al.).
        precompute_reference: Compute the reference log-probs once before training, so no frozen copy of the model stays in memory.
        tasks: Without --data: synthetic pairs from these tasks (comma-separated: arithmetic, reverse, count, sort), validated on held-out questions.
        num_pairs: Synthetic pairs per task (with --tasks).
        data_format: auto, trl, minimind, alpaca or sharegpt.
        val_data: Held-out preference pairs; default: a val_fraction of --data.
        val_fraction: Share of --data held out for validation when --val_data is not given.
        on_identical: Pairs whose chosen and rejected answers are identical: "skip" (and count) or "error".
        resume: Continue the run in OUT from checkpoints/latest.
    """
    from acornlm.train.dpo import run_dpo

    _require_out(out)
    summary = run_dpo(data, init, out, train, lora, beta=beta, label_smoothing=label_smoothing,
                      loss_type=loss_type, precompute_reference=precompute_reference, tasks=tasks,
                      num_pairs=num_pairs, data_format=data_format, val_data=val_data, val_fraction=val_fraction,
                      on_identical=on_identical, resume=resume)
    _print_summary(summary, {"val_preference_accuracy": "held-out preference accuracy",
                             "val_reward_margin": "held-out reward margin"})


def grpo(data: str | None = None, init: str | None = None, out: str | None = None,
         train: TrainConfig = DEFAULT_GRPO_TRAIN, lora: LoraConfig = DEFAULT_LORA, reward: str = "task",
         tasks: str | None = None, num_prompts: int = 1000, val_data: str | None = None, val_fraction: float = 0.05,
         group_size: int = 8, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0, clip_eps: float = 0.2, kl_beta: float = 0.0, resume: bool = False) -> None:
    """Group Relative Policy Optimization on rewards a program can check (DeepSeekMath).

    Each step samples --group_size completions per prompt from the model being trained, scores
    them with the reward functions, and reinforces the ones better than their group's average.
    Rewards are plain Python functions `score(completion: str, record: dict) -> float`; one that
    raises scores 0 (counted, reported once). Offline demo: `--tasks arithmetic` after SFT.
    Validation: mean reward of greedy answers to held-out prompts (val_reward; val_loss is minus it).

    Args:
        data: Prompts: .jsonl/.json records {"prompt": text or messages, ...fields the rewards read, e.g. "answer", "task"}, or chat data {"messages": [...]} whose last assistant message becomes "answer".
        init: The checkpoint or run directory to start from (usually an SFT run; not needed with --resume).
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        train: Optimisation, schedule, evaluation and checkpointing; train.batch_size counts prompts per micro-batch (each brings group_size completions); prompt + completion must fit in train.seq_len + 1 tokens (longer prompts are dropped and counted).
        lora: LoRA adapters instead of full fine-tuning (lora.rank > 0).
        reward: Comma-separated reward functions, summed: "task" (the checkers of the synthetic tasks: needs "task" and "answer" in each record), "module:function" or "path/to/file.py:function".
        tasks: Without --data: synthetic prompts from these tasks (comma-separated: arithmetic, reverse, count, sort).
        num_prompts: Synthetic prompts per task (with --tasks).
        val_data: Held-out prompts for validation; default: a val_fraction of --data (or held-out task questions).
        val_fraction: Share of --data held out when --val_data is not given.
        group_size: Completions sampled per prompt (G); advantages compare them within the group.
        max_new_tokens: Longest completion sampled.
        temperature: Sampling temperature of the completions (exploration).
        top_k: Sample among the k most likely tokens only; 0 = off.
        top_p: Nucleus sampling threshold; 1 = off.
        clip_eps: PPO clip range of the policy ratio.
        kl_beta: Weight of the KL penalty to the starting model (k3 estimator); 0 = none, and no reference model in memory.
        resume: Continue the run in OUT from checkpoints/latest.
    """
    from acornlm.train.grpo import run_grpo

    _require_out(out)
    summary = run_grpo(data, init, out, train, lora, reward=reward, tasks=tasks, num_prompts=num_prompts,
                       val_data=val_data, val_fraction=val_fraction, group_size=group_size,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       clip_eps=clip_eps, kl_beta=kl_beta, resume=resume)
    _print_summary(summary, {"val_reward": "held-out mean reward"})
    if summary["rank"] == 0 and summary["reward_errors"]:
        counts = ", ".join(f"{name}: {count}" for name, count in summary["reward_errors"].items())
        print(f"reward function errors (scored 0): {counts}", file=sys.stderr)


def distill(data: str | None = None, teacher: str | None = None, init: str | None = None, out: str | None = None,
            train: TrainConfig = DEFAULT_DISTILL_TRAIN, lora: LoraConfig = DEFAULT_LORA, temperature: float = 2.0,
            alpha: float = 0.5, data_format: str = "auto", val_data: str | None = None, val_fraction: float = 0.05,
            packing: bool = False, truncation: Literal["truncate", "drop"] = "truncate", resume: bool = False) -> None:
    """Knowledge distillation: a student learns a teacher's output distribution on chat data.

    loss = alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy on
    the assistant tokens (as in MiniMind's train_distillation). Teacher and student need the same
    tokenizer; their sizes may differ.

    Args:
        data: Chat data as for `acornlm train sft`: .jsonl/.json, folders, or several separated by commas.
        teacher: The teacher checkpoint or run directory (frozen; a LoRA checkpoint is used with its adapter).
        init: The student checkpoint to start from (not needed with --resume).
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        train: Optimisation, schedule, evaluation and checkpointing; train.seq_len is the longest example.
        lora: LoRA adapters on the student instead of full fine-tuning (lora.rank > 0).
        temperature: Softens both distributions (T > 1 shows more of the teacher's ranking of wrong tokens).
        alpha: Weight of the teacher term; 1 - alpha weighs the hard-label cross-entropy.
        data_format: auto, messages, minimind, sharegpt or alpaca.
        val_data: Held-out chat data for the validation loss; default: a val_fraction of --data.
        val_fraction: Share of --data held out for validation when --val_data is not given.
        packing: Pack several whole examples into each row of train.seq_len tokens.
        truncation: "truncate" or "drop" examples longer than train.seq_len (counted and reported).
        resume: Continue the run in OUT from checkpoints/latest.
    """
    from acornlm.train.distill import run_distill

    _require_out(out)
    if data is None:
        raise ConfigError("--data is required: chat data as .jsonl (try `acornlm data synth --out tasks.jsonl`)")
    summary = run_distill(data, teacher, init, out, train, lora, temperature=temperature, alpha=alpha,
                          data_format=data_format, val_data=val_data, val_fraction=val_fraction, packing=packing,
                          truncation=truncation, resume=resume)
    _print_summary(summary, {"val_kl": "held-out KL to the teacher", "val_hard_loss": "held-out cross-entropy"})
