"""`acornlm train dpo`, `acornlm train grpo`, `acornlm train ppo`, `acornlm train distill` and
`acornlm train reward`: the stages after SFT.

Each mirrors `acornlm train sft` (--init, --out, --train.*, --lora.*, --resume) and adds the
options of its method. Like every `acornlm train` command, Ctrl-C or SIGTERM finishes the current
step, saves a checkpoint and exits with status 130 / 143; `--resume auto` continues the run.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from acornlm.cli.train import exit_if_stopped
from acornlm.errors import ConfigError
from acornlm.model.lora import LoraConfig
from acornlm.train.config import TrainConfig, stage_defaults
from acornlm.train.distill import DistillConfig
from acornlm.train.dpo import DPOConfig
from acornlm.train.grpo import GRPOConfig
from acornlm.train.ppo import PPOConfig
from acornlm.train.reward import RewardConfig
from acornlm.train.signals import StopOnSignal

# Each stage's defaults are data: acornlm/train/defaults/{dpo,grpo,distill}.yaml.
DPO_DEFAULTS, GRPO_DEFAULTS, DISTILL_DEFAULTS = (stage_defaults(stage) for stage in ("dpo", "grpo", "distill"))
DEFAULT_DPO_TRAIN = TrainConfig(**DPO_DEFAULTS["train"])
DEFAULT_GRPO_TRAIN = TrainConfig(**GRPO_DEFAULTS["train"])
DEFAULT_DISTILL_TRAIN = TrainConfig(**DISTILL_DEFAULTS["train"])
DEFAULT_DPO = DPOConfig(**DPO_DEFAULTS["dpo"])
DEFAULT_GRPO = GRPOConfig(**GRPO_DEFAULTS["grpo"])
DEFAULT_DISTILL = DistillConfig(**DISTILL_DEFAULTS["distill"])
DEFAULT_LORA = LoraConfig()
PPO_DEFAULTS = stage_defaults("ppo")  # acornlm/train/defaults/ppo.yaml
DEFAULT_PPO_TRAIN = TrainConfig(**PPO_DEFAULTS["train"])
DEFAULT_PPO = PPOConfig(**PPO_DEFAULTS["ppo"])
REWARD_DEFAULTS = stage_defaults("reward")  # acornlm/train/defaults/reward.yaml
DEFAULT_REWARD_TRAIN = TrainConfig(**REWARD_DEFAULTS["train"])
DEFAULT_REWARD = RewardConfig(**REWARD_DEFAULTS["reward"])


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
        train: TrainConfig = DEFAULT_DPO_TRAIN, lora: LoraConfig = DEFAULT_LORA, dpo: DPOConfig = DEFAULT_DPO,
        tasks: str | None = None, num_pairs: int = 1000, data_format: str = "auto",
        val_data: str | None = None, val_fraction: float = 0.05, on_identical: Literal["skip", "error"] = "skip",
        resume: bool | Literal["auto"] = False) -> None:
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
        dpo: DPO's own settings: dpo.beta, dpo.label_smoothing, dpo.loss_type, dpo.precompute_reference.
        tasks: Without --data: synthetic pairs from these tasks (comma-separated: arithmetic, reverse, count, sort), validated on held-out questions.
        num_pairs: Synthetic pairs per task (with --tasks).
        data_format: auto, trl, minimind, alpaca or sharegpt.
        val_data: Held-out preference pairs; default: a val_fraction of --data.
        val_fraction: Share of --data held out for validation when --val_data is not given.
        on_identical: Pairs whose chosen and rejected answers are identical: "skip" (and count) or "error".
        resume: true or auto: continue the run in OUT from checkpoints/latest, or start fresh
            when OUT has no checkpoint yet (one command line for the first start and every restart);
            false: refuse an OUT that already holds a run. A bare `--resume` means true.
            Ctrl-C or SIGTERM stops a run after the current step with a checkpoint (exit status 130 / 143).
    """
    from acornlm.train.dpo import run_dpo

    _require_out(out)
    with StopOnSignal():  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        summary = run_dpo(data, init, out, train, lora, dpo=dpo, tasks=tasks,
                          num_pairs=num_pairs, data_format=data_format, val_data=val_data, val_fraction=val_fraction,
                          on_identical=on_identical, resume=resume)
    _print_summary(summary, {"val_preference_accuracy": "held-out preference accuracy",
                             "val_reward_margin": "held-out reward margin"})
    exit_if_stopped(summary)


def grpo(data: str | None = None, init: str | None = None, out: str | None = None,
         train: TrainConfig = DEFAULT_GRPO_TRAIN, lora: LoraConfig = DEFAULT_LORA, grpo: GRPOConfig = DEFAULT_GRPO,
         tasks: str | None = None, num_prompts: int = 1000, val_data: str | None = None, val_fraction: float = 0.05,
         reward_model: str | None = None, tools: str | None = None, resume: bool | Literal["auto"] = False) -> None:
    """Group Relative Policy Optimization on rewards a program can check (DeepSeekMath).

    Each step samples --grpo.group_size completions per prompt from the model being trained, scores
    them with the reward functions, and reinforces the ones better than their group's average.
    Rewards are plain Python functions `score(completion: str, record: dict) -> float`; one that
    raises scores 0 (counted, reported once). With --reward_model, a reward model's score of prompt +
    completion is added (or is the only reward when grpo.reward is not set). Offline demo:
    `--tasks arithmetic` after SFT. Agentic RL: prompts that carry "tools" are played out over
    several turns, the model calling tools that acornlm runs (--tools FILE.py, and the built-in
    `price` task's tool), the final answer rewarded.
    Validation: mean reward of greedy answers to held-out prompts (val_reward; val_loss is minus it).

    Args:
        data: Prompts: .jsonl/.json records {"prompt": text or messages, ...fields the rewards read, e.g. "answer", "task"}, or chat data {"messages": [...]} whose last assistant message becomes "answer".
        init: The checkpoint or run directory to start from (usually an SFT run; not needed with --resume).
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        train: Optimisation, schedule, evaluation and checkpointing; train.batch_size counts prompts per micro-batch (each brings group_size completions); prompt + completion must fit in train.seq_len + 1 tokens (longer prompts are dropped and counted).
        lora: LoRA adapters instead of full fine-tuning (lora.rank > 0).
        grpo: GRPO's own settings: grpo.reward (comma-separated reward functions, summed: "task",
            "module:function" or "path/to/file.py:function"; unset: "task", or none with --reward_model),
            grpo.group_size, grpo.max_new_tokens, grpo.temperature, grpo.top_k, grpo.top_p, grpo.clip_eps,
            grpo.kl_beta, grpo.max_turns and grpo.tool_timeout (agentic rollouts).
        tasks: Without --data: synthetic prompts from these tasks (comma-separated: arithmetic, reverse, count, sort; price (a tool call) and add (thinking)).
        num_prompts: Synthetic prompts per task (with --tasks).
        val_data: Held-out prompts for validation; default: a val_fraction of --data (or held-out task questions).
        val_fraction: Share of --data held out when --val_data is not given.
        reward_model: A reward model (run directory of `acornlm train reward`) whose score of prompt + completion is added to the reward; it must share the policy's tokenizer.
        tools: A Python file whose functions are the tools of the prompts' "tools" lists (agentic RL); a function with a keyword parameter `example` receives the prompt record. The `price` task's tool is built in.
        resume: true or auto: continue the run in OUT from checkpoints/latest, or start fresh
            when OUT has no checkpoint yet (one command line for the first start and every restart);
            false: refuse an OUT that already holds a run. A bare `--resume` means true.
            Ctrl-C or SIGTERM stops a run after the current step with a checkpoint (exit status 130 / 143).
    """
    from acornlm.train.grpo import run_grpo

    _require_out(out)
    with StopOnSignal():  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        summary = run_grpo(data, init, out, train, lora, grpo=grpo, tasks=tasks, num_prompts=num_prompts,
                           val_data=val_data, val_fraction=val_fraction, resume=resume, reward_model=reward_model,
                           tools=tools)
    _print_summary(summary, {"val_reward": "held-out mean reward", "val_task_accuracy": "held-out task accuracy"})
    _print_reward_errors(summary)
    exit_if_stopped(summary)


def ppo(data: str | None = None, init: str | None = None, out: str | None = None,
        train: TrainConfig = DEFAULT_PPO_TRAIN, lora: LoraConfig = DEFAULT_LORA, ppo: PPOConfig = DEFAULT_PPO,
        rewards: str | None = None, reward_model: str | None = None, tasks: str | None = None,
        num_prompts: int = 1000, val_data: str | None = None, val_fraction: float = 0.05,
        tools: str | None = None, resume: bool | Literal["auto"] = False) -> None:
    """Proximal Policy Optimization with a value head (InstructGPT-style RLHF).

    Each step samples --ppo.num_samples completions per prompt from the model being trained and scores
    each whole completion with a reward model (--reward_model, from `acornlm train reward`) and/or
    reward functions (--rewards, as GRPO's). Per-token reward: -kl_coef * (log pi - log pi_ref) on
    every completion token, plus the completion's score on its last one. A value head on the
    policy's hidden states, trained jointly, gives GAE advantages; the loss is PPO's clipped policy
    surrogate plus vf_coef times the clipped value loss. Logs reward, kl, policy_loss, value_loss,
    clipped_fraction and explained_variance. Offline demo: `--tasks arithmetic` after SFT.
    Validation: mean reward of greedy answers to held-out prompts (val_reward; val_loss is minus it)
    and, with --tasks, val_task_accuracy.

    Args:
        data: Prompts: .jsonl/.json records {"prompt": text or messages, ...fields the rewards read, e.g. "answer", "task"}, or chat data {"messages": [...]} whose last assistant message becomes "answer".
        init: The checkpoint or run directory to start from (usually an SFT run; also the KL reference; not needed with --resume).
        out: Run directory for checkpoints (with the value head), metrics.jsonl and loss_curve.png.
        train: Optimisation, schedule, evaluation and checkpointing; train.batch_size counts prompts per micro-batch (each brings num_samples completions); prompt + completion must fit in train.seq_len + 1 tokens (longer prompts are dropped and counted).
        lora: LoRA adapters instead of full fine-tuning (lora.rank > 0); the value head trains in full.
        ppo: PPO's own settings: ppo.num_samples, ppo.max_new_tokens, ppo.temperature, ppo.top_k,
            ppo.top_p, ppo.kl_coef, ppo.gamma, ppo.lam (GAE), ppo.clip, ppo.value_clip, ppo.vf_coef,
            ppo.max_turns and ppo.tool_timeout (agentic rollouts, as GRPO's).
        rewards: Comma-separated reward functions, summed: "task" (the synthetic tasks' checkers), "module:function" or "path/to/file.py:function"; default "task", or none when --reward_model is given.
        reward_model: A reward model (run directory of `acornlm train reward`) whose score of prompt + completion is added to the reward; it must share the policy's tokenizer.
        tasks: Without --data: synthetic prompts from these tasks (comma-separated: arithmetic, reverse, count, sort; price (a tool call) and add (thinking)).
        num_prompts: Synthetic prompts per task (with --tasks).
        val_data: Held-out prompts for validation; default: a val_fraction of --data (or held-out task questions).
        val_fraction: Share of --data held out when --val_data is not given.
        tools: A Python file whose functions are the tools of the prompts' "tools" lists (agentic RL); a function with a keyword parameter `example` receives the prompt record. The `price` task's tool is built in.
        resume: true or auto: continue the run in OUT from checkpoints/latest (the value head included), or start fresh
            when OUT has no checkpoint yet (one command line for the first start and every restart);
            false: refuse an OUT that already holds a run. A bare `--resume` means true.
            Ctrl-C or SIGTERM stops a run after the current step with a checkpoint (exit status 130 / 143).
    """
    from acornlm.train.ppo import run_ppo

    _require_out(out)
    with StopOnSignal():  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        summary = run_ppo(data, init, out, train, lora, ppo=ppo, rewards=rewards, reward_model=reward_model,
                          tasks=tasks, num_prompts=num_prompts, val_data=val_data, val_fraction=val_fraction,
                          resume=resume, tools=tools)
    _print_summary(summary, {"val_reward": "held-out mean reward", "val_task_accuracy": "held-out task accuracy"})
    _print_reward_errors(summary)
    exit_if_stopped(summary)


def _print_reward_errors(summary: dict[str, Any]) -> None:
    if summary["rank"] == 0 and summary["reward_errors"]:
        counts = ", ".join(f"{name}: {count}" for name, count in summary["reward_errors"].items())
        print(f"reward function errors (scored 0): {counts}", file=sys.stderr)


def distill(data: str | None = None, teacher: str | None = None, init: str | None = None, out: str | None = None,
            train: TrainConfig = DEFAULT_DISTILL_TRAIN, lora: LoraConfig = DEFAULT_LORA,
            distill: DistillConfig = DEFAULT_DISTILL, data_format: str = "auto", val_data: str | None = None, val_fraction: float = 0.05,
            packing: bool = False, truncation: Literal["truncate", "drop"] = "truncate", resume: bool | Literal["auto"] = False) -> None:
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
        distill: Distillation's own settings: distill.temperature (softens both distributions) and
            distill.alpha (weight of the teacher term; 1 - alpha weighs the hard-label cross-entropy).
        data_format: auto, messages, minimind, sharegpt or alpaca.
        val_data: Held-out chat data for the validation loss; default: a val_fraction of --data.
        val_fraction: Share of --data held out for validation when --val_data is not given.
        packing: Pack several whole examples into each row of train.seq_len tokens.
        truncation: "truncate" or "drop" examples longer than train.seq_len (counted and reported).
        resume: true or auto: continue the run in OUT from checkpoints/latest, or start fresh
            when OUT has no checkpoint yet (one command line for the first start and every restart);
            false: refuse an OUT that already holds a run. A bare `--resume` means true.
            Ctrl-C or SIGTERM stops a run after the current step with a checkpoint (exit status 130 / 143).
    """
    from acornlm.train.distill import run_distill

    _require_out(out)
    if data is None:
        raise ConfigError("--data is required: chat data as .jsonl (try `acornlm data synth --out tasks.jsonl`)")
    with StopOnSignal():  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        summary = run_distill(data, teacher, init, out, train, lora, distill=distill,
                              data_format=data_format, val_data=val_data, val_fraction=val_fraction, packing=packing,
                              truncation=truncation, resume=resume)
    _print_summary(summary, {"val_kl": "held-out KL to the teacher", "val_hard_loss": "held-out cross-entropy"})
    exit_if_stopped(summary)


def reward(data: str | None = None, init: str | None = None, out: str | None = None,
           train: TrainConfig = DEFAULT_REWARD_TRAIN, lora: LoraConfig = DEFAULT_LORA,
           reward: RewardConfig = DEFAULT_REWARD, tasks: str | None = None, num_pairs: int = 1000,
           data_format: str = "auto", val_data: str | None = None, val_fraction: float = 0.05,
           on_identical: Literal["skip", "error"] = "skip", resume: bool | Literal["auto"] = False) -> None:
    """Train a reward model: a score r(x, y) that ranks each chosen answer above the rejected one.

    The starting checkpoint (--init, usually an SFT run) keeps its decoder and gets a new head, one
    number per sequence read at the last token, trained with the Bradley-Terry loss
    -log sigmoid(r(chosen) - r(rejected)) on the same preference pairs as `acornlm train dpo`.
    Logs reward accuracy (share of pairs ranked right) and margin; prints the held-out pair
    accuracy at the end. PPO/GRPO can then score answers with it; `acornlm export hf` writes it as a
    transformers sequence classifier. Offline demo: `--tasks arithmetic` (the correct answer beats a wrong one).

    Args:
        data: Preference pairs: a .jsonl/.json file, a folder of them, or several separated by commas. Formats: trl {prompt, chosen, rejected}, minimind {chosen: [msgs], rejected: [msgs]}, alpaca and sharegpt (LLaMA-Factory), auto-detected.
        init: The checkpoint or run directory to start from: a language model (its head is replaced) or a reward model (trained further); not needed with --resume.
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        train: Optimisation, schedule, evaluation and checkpointing; train.batch_size counts pairs, train.seq_len is the longest prompt + answer (answers beyond are cut, pairs whose prompt does not fit are dropped; both counted).
        lora: Not supported for reward models (every weight trains); lora.rank > 0 is refused.
        reward: The stage's own settings: reward.center_rewards_coefficient (c * mean((r_chosen + r_rejected)^2) keeps rewards near 0; 0 = off).
        tasks: Without --data: synthetic pairs from these tasks (comma-separated: arithmetic, reverse, count, sort), validated on held-out questions.
        num_pairs: Synthetic pairs per task (with --tasks).
        data_format: auto, trl, minimind, alpaca or sharegpt.
        val_data: Held-out preference pairs; default: a val_fraction of --data.
        val_fraction: Share of --data held out for validation when --val_data is not given.
        on_identical: Pairs whose chosen and rejected answers are identical: "skip" (and count) or "error".
        resume: true or auto: continue the run in OUT from checkpoints/latest, or start fresh
            when OUT has no checkpoint yet (one command line for the first start and every restart);
            false: refuse an OUT that already holds a run. A bare `--resume` means true.
            Ctrl-C or SIGTERM stops a run after the current step with a checkpoint (exit status 130 / 143).
    """
    from acornlm.train.reward import run_reward

    _require_out(out)
    with StopOnSignal():  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        summary = run_reward(data, init, out, train, reward=reward, lora=lora, tasks=tasks, num_pairs=num_pairs,
                             data_format=data_format, val_data=val_data, val_fraction=val_fraction,
                             on_identical=on_identical, resume=resume)
    _print_summary(summary, {"val_reward_accuracy": "held-out pair accuracy",
                             "val_reward_margin": "held-out reward margin"})
    exit_if_stopped(summary)
