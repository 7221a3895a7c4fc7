"""The GRPO stage: reinforcement learning on rewards that a program can check.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) needs no value network:

    1. for each prompt, sample a group of G completions from the current model;
    2. score each with reward functions (plain Python: "is the answer right?") and/or a reward
       model (--reward_model, trained by `acornlm train reward`);
    3. advantage of completion i = (r_i - mean(r)) / (std(r) + eps) within its group, so the
       model learns which of *its own* answers were better than its average;
    4. maximise the PPO-style clipped objective min(rho A, clip(rho, 1-e, 1+e) A) per token,
       rho = pi(token) / pi_old(token), optionally minus beta * KL(pi || pi_ref).

The stage reuses the one Trainer. Sampling is online (acornlm/train/rollouts.py, shared with PPO):
`GRPOBatches` holds a handle to the model being trained and generates inside
`batch(step, micro_step)` with acornlm's inference path, seeded from (seed, step, micro_step, rank),
so the samples, and therefore a resumed run, are a pure function of the step and the weights. Each group is used for one optimizer step (the
usual setting, "mu = 1"), so pi_old is the policy itself: rho = 1 with the gradient of
log pi, and the clip only bites if the same samples were reused for several updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acornlm.errors import ConfigError
from acornlm.infer.sampling import SamplingParams
from acornlm.model import Transformer
from acornlm.model.lora import LoraConfig, base_model_view
from acornlm.tokenizer import Tokenizer
from acornlm.train import distributed
from acornlm.train.config import TrainConfig
from acornlm.train.losses import kl_k3, token_logprobs
from acornlm.train.reward_model import RewardModel
from acornlm.train.rewards import RewardRunner
from acornlm.train.rollouts import (
    Rollouts,
    ToolEnvironment,
    data_label,
    reference_logprobs,
    reward_runner,
    reward_spec,
    rl_prompts,
    rollout_metrics,
    stage_reward_model,
    tool_environment,
    tool_totals,
    validation_loss,
)
from acornlm.train.stage import (
    MeanMetrics,
    ResumeMode,
    build_policy,
    final_metrics,
    load_reference,
    resolve_start,
)
from acornlm.train.trainer import Trainer

# --- the pure pieces: advantages and the clipped loss (the KL estimate is losses.kl_k3) ---

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantage (Shao et al. 2024, eq. 3 outcome supervision):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    `rewards` is [num_prompts * group_size], the G completions of a prompt next to each other.
    The standard deviation is the unbiased one (as torch.std and TRL). A group where every
    completion scored the same gets advantage 0: it carries no signal about what was better.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1)


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor            # scalar
    kl: torch.Tensor              # mean per-token KL to the reference (0 without one), detached
    clipped_fraction: torch.Tensor  # share of tokens where the clip was active, detached


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, reference_logprobs: torch.Tensor | None = None,
              kl_beta: float = 0.0) -> GRPOLossOutput:
    """The GRPO objective (DeepSeekMath eq. 3), negated to be minimised:

        loss = -1/G sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1-e, 1+e) A_i) - beta KL_t ]

    rho_t = exp(log pi - log pi_old) per token; `logprobs`, `old_logprobs`, `reference_logprobs`
    and `mask` (1 on completion tokens) are [N, T], `advantages` is [N]. Each completion's
    token terms are averaged first, then the completions (the paper's 1/|o_i| then 1/G).
    """
    mask = mask.to(torch.float32)
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.unsqueeze(-1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantage
    per_token = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if reference_logprobs is not None and kl_beta:
        kl = kl_k3(logprobs, reference_logprobs)
        per_token = per_token - kl_beta * kl
    lengths = mask.sum(-1).clamp(min=1)
    per_completion = (per_token * mask).sum(-1) / lengths
    tokens = mask.sum().clamp(min=1)
    clipped_fraction = ((clipped < unclipped).float() * mask).sum() / tokens  # the min took the clip
    return GRPOLossOutput(-per_completion.mean(), ((kl * mask).sum() / tokens).detach(),
                          clipped_fraction.detach())


# --- sampling groups and the loss ---

class GRPOBatches(Rollouts):
    """The Trainer's batch source for GRPO: samples groups with the current policy, then scores them.

    `batch(step, micro_step)` picks `batch_size` prompts (a pure function of the step), samples
    `group_size` completions of each from `model` (the very object the Trainer trains) with a
    seed derived from (seed, step, micro_step, rank, slot), rewards them and returns input_ids /
    targets / mask [prompts x G, longest - 1] with the group-normalised advantages.
    `eval_batch(i)` answers held-out prompts greedily and returns their rewards.
    The sampling and scoring are shared with PPO (acornlm/train/rollouts.py).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, train: Sequence[dict[str, Any]],
                 val: Sequence[dict[str, Any]], rewards: RewardRunner | None, *, group_size: int, batch_size: int,
                 max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 seq_len: int | None = None, rank: int = 0, world_size: int = 1, grad_accum_steps: int = 1,
                 reward_model: RewardModel | None = None, environment: ToolEnvironment | None = None) -> None:
        super().__init__(model, tokenizer, train, val, rewards, num_samples=group_size, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, seq_len=seq_len, rank=rank, world_size=world_size,
                         grad_accum_steps=grad_accum_steps, reward_model=reward_model, stage="grpo",
                         environment=environment)
        self.group_size = group_size

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        batch = self.rollout(step, micro_step)
        batch["advantages"] = group_advantages(batch["rewards"], self.group_size)
        return batch


class GRPOLoss:
    """The Trainer's loss function for GRPO (see `grpo_loss`); logs rewards, KL and clipping.

    In evaluation the batch holds only the rewards of greedy answers to held-out prompts, and the
    "loss" is minus their mean (lower is better, as for a loss): `val_reward` is the mean itself.
    """

    def __init__(self, clip_eps: float = 0.2, kl_beta: float = 0.0, reference: nn.Module | None = None) -> None:
        if not 0 < clip_eps < 1:
            raise ConfigError(f"--clip_eps must be in (0, 1) (typical: 0.2), got {clip_eps}")
        if kl_beta < 0:
            raise ConfigError(f"--kl_beta must be >= 0 (0 = no KL term), got {kl_beta}")
        self.clip_eps, self.kl_beta = clip_eps, kl_beta
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        self.metrics = MeanMetrics()

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log pi_ref of every target token, from the frozen reference (moved to the batch's device once)."""
        if self.reference is None:
            raise ConfigError("a KL term (--kl_beta > 0) needs the reference model")
        return reference_logprobs(self.reference, batch)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "eval_rewards" in batch:
            return validation_loss(self.metrics, batch)
        logprobs = token_logprobs(model(batch["input_ids"]), batch["targets"])
        reference = self.reference_logprobs(batch) if self.kl_beta > 0 else None
        # one update per sampled group: pi_old is the current policy, without gradient
        out = grpo_loss(logprobs, logprobs.detach(), batch["advantages"], batch["mask"], self.clip_eps,
                        reference, self.kl_beta)
        self.metrics.add(model.training, {**rollout_metrics(batch), "kl": out.kl,
                                          "clipped_fraction": out.clipped_fraction})
        self.metrics.add_total(model.training, {"reward_errors": batch["reward_errors"], **tool_totals(batch)})
        return out.loss

    def pop_metrics(self, training: bool) -> dict[str, float]:
        return self.metrics.pop(training)


# --- the stage ---

@dataclass
class GRPOConfig:
    """GRPO's own settings (`--grpo.group_size 16`; the stage's defaults: acornlm/train/defaults/grpo.yaml).

    Args:
        reward: Comma-separated reward functions, summed: "task" (the checkers of the synthetic tasks:
            needs "task" and "answer" in each record), "module:function" or "path/to/file.py:function".
            Unset: "task", or none when a reward model (--reward_model) scores the completions.
        group_size: Completions sampled per prompt (G); advantages compare them within the group.
        max_new_tokens: Longest completion sampled.
        temperature: Sampling temperature of the completions (exploration), in (0, 2].
        top_k: Sample among the k most likely tokens only; 0 = off.
        top_p: Nucleus sampling threshold; 1 = off.
        clip_eps: PPO clip range of the policy ratio.
        max_turns: With tools (agentic rollouts): most assistant turns per trajectory.
        tool_timeout: With tools: seconds a tool call may run before it counts as timed out.
        kl_beta: Weight of the KL penalty to the starting model (k3 estimator); 0 = none, and no
            reference model in memory.
    """

    reward: str | None = None
    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    max_turns: int = 3
    tool_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError("--grpo.group_size must be >= 2: advantages compare completions within a group, "
                              f"got {self.group_size}")
        if not self.clip_eps > 0:
            raise ConfigError(f"--grpo.clip_eps must be > 0, got {self.clip_eps}")
        if not self.kl_beta >= 0:
            raise ConfigError(f"--grpo.kl_beta must be >= 0 (0 = no KL penalty), got {self.kl_beta}")
        if not self.temperature > 0:
            raise ConfigError(f"--grpo.temperature must be > 0: GRPO needs different samples, got {self.temperature}")
        SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p)  # the sampler's own ranges, named


def run_grpo(data: str | Path | Sequence[str | Path] | None, init: str | Path | None, out: str | Path,
             train_config: TrainConfig, lora: LoraConfig | None = None, *, grpo: GRPOConfig | None = None,
             tasks: str | None = None, num_prompts: int = 1000, val_data: str | Path | Sequence[str | Path] | None = None,
             val_fraction: float = 0.05, resume: ResumeMode = False,
             reward_model: str | Path | None = None, tools: str | Path | None = None) -> dict[str, Any]:
    """Improve the checkpoint `init` by GRPO on the rewards of its own sampled completions.

    A completion's reward is the sum of the reward functions (grpo.reward) and, with `reward_model`
    (a directory of `acornlm train reward`), the reward model's score of prompt + completion.
    Returns the Trainer's summary plus "val_reward" (mean reward of greedy answers to held-out
    prompts at the last evaluation) and the reward functions' error counts. Prompts that carry
    `tools` are played out with the functions of `tools` (a Python file) and of the agent tasks
    (acornlm.data.agent_tasks), the final answer rewarded (agentic RL; see rollouts.py).
    """
    grpo = grpo or GRPOConfig()
    environment = tool_environment(tools, tasks, grpo.max_turns, grpo.tool_timeout)
    grpo = dataclasses.replace(grpo, reward=reward_spec(grpo.reward, reward_model))  # what runs, as recorded
    runner, names = reward_runner(grpo.reward)
    start = resolve_start(init, out, resume, lora, train_config, stage="grpo")
    train_records, val_records, description = rl_prompts(data, tasks, num_prompts, val_data, val_fraction,
                                                         train_config.seed)
    context, device = distributed.setup(train_config.device)
    try:
        scorer = stage_reward_model("grpo", reward_model, start.tokenizer, device, names, description, context)
        model = build_policy(start, train_config, context, "grpo")
        batches = GRPOBatches(model, start.tokenizer, train_records, val_records, runner, group_size=grpo.group_size,
                              batch_size=train_config.batch_size, max_new_tokens=grpo.max_new_tokens,
                              temperature=grpo.temperature, top_k=grpo.top_k, top_p=grpo.top_p, seed=train_config.seed,
                              seq_len=train_config.seq_len, rank=context.rank, world_size=context.world_size,
                              grad_accum_steps=train_config.grad_accum_steps, reward_model=scorer,
                              environment=environment)
        reference = load_reference(start) if grpo.kl_beta > 0 and not start.lora.enabled else None
        loss = GRPOLoss(grpo.clip_eps, grpo.kl_beta, reference)
        trainer = Trainer(
            model, train_config, start.out_dir, batches, loss, context=context, device=device,
            tokenizer_dir=start.source, resume_from=start.checkpoint, write_model=start.write_model,
            checkpoint_info=start.checkpoint_info(
                "grpo", data=data_label(data, tasks),
                grpo=dataclasses.asdict(grpo), reward_model=str(reward_model) if reward_model else None),
        )
        if grpo.kl_beta > 0 and start.lora.enabled:
            # LoRA leaves the base weights untouched: they are the reference, shared, not copied
            loss.reference = base_model_view(trainer.raw_model).eval().requires_grad_(False)
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary.update(final_metrics(start.out_dir, ("val_reward", "val_task_accuracy")))
    summary["reward_errors"] = dict(runner.errors_by_function) if runner is not None else {}
    return summary
