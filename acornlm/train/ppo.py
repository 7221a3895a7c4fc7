"""The PPO stage: reinforcement learning from a reward model and/or reward functions, with a value head.

Proximal Policy Optimization for language models as in InstructGPT (Ouyang et al. 2022) and "The N
implementation details of RLHF with PPO" (Huang et al. 2024). Each step:

    1. sample completions of a batch of prompts from the current policy (acornlm/train/rollouts.py,
       shared with GRPO) and score each whole completion: a reward model (--reward_model) and/or
       Python reward functions (--rewards), summed: the sequence reward s;
    2. one forward pass of the policy gives log pi(token) and, through the value head (a linear layer
       on the final hidden states), V(state) for every completion token;
    3. per-token rewards: r_t = -kl_coef * (log pi_old - log pi_ref), plus s on the last token
       (`kl_penalty_rewards`): the KL penalty keeps the policy near the starting model pi_ref;
    4. advantages by GAE, A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t,
       returns R_t = A_t + V_t (`gae_advantages`); advantages whitened over the batch (`whiten`);
    5. loss = clipped policy surrogate (`ppo_policy_loss`) + vf_coef * clipped value loss (`ppo_value_loss`).

Unlike GRPO, the baseline V is learned, so one sample per prompt is enough and credit is assigned
per token. The value head is trained with the policy (it shares the transformer) and saved next to
the policy in each checkpoint (value_head.safetensors), so a resumed run is bitwise the run that
never stopped; model.safetensors stays a plain acornlm model that chat, eval and export read.

One rollout batch serves one optimizer step (ppo "epochs" mu = 1, as GRPO): pi_old is the policy
itself and V_old its own values, so rho = 1 and both clips are inactive; they would only bite if
the same samples were reused for several updates, which would need the rollout kept across steps
(and in checkpoints) for an exact resume. Gradient accumulation (train.grad_accum_steps) splits a
step into micro-batches, each a rollout of its own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from acornlm.accel import accelerate
from acornlm.errors import CheckpointError, ConfigError
from acornlm.infer.sampling import SamplingParams
from acornlm.model import Transformer
from acornlm.model.lora import LoraConfig, base_model_view
from acornlm.train import distributed
from acornlm.train.config import TrainConfig
from acornlm.train.losses import token_logprobs
from acornlm.train.rollouts import (
    Rollouts,
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
    StageStart,
    build_policy,
    final_metrics,
    load_reference,
    resolve_start,
)
from acornlm.train.trainer import Trainer

VALUE_HEAD_FILE = "value_head.safetensors"

# --- the pure pieces: rewards, advantages, the two clipped losses ---


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask) / sum(mask): the mean over the completion tokens (0 when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance), 0 elsewhere.

    PPO whitens the advantages of a batch so the policy step has the same scale whatever the
    scale of the rewards ("N implementation details", detail 7).
    """
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = (((values - mean) ** 2) * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def kl_penalty_rewards(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, scores: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The per-token rewards of InstructGPT's objective, [N, T]:

        r_t = -kl_coef * (log pi_old(o_t) - log pi_ref(o_t))   on every completion token,
        r_T += s                                                on its last token,

    `s` being the sequence's reward (`scores` [N]). The penalty's sum over a completion estimates
    kl_coef * KL(pi || pi_ref) of that sequence; putting the score on the last token makes GAE carry it
    back to the earlier tokens. `logprobs`, `reference_logprobs` and `mask` (1 on completion tokens)
    are [N, T]; 0 outside the mask.
    """
    mask = mask.to(torch.float32)
    rewards = -kl_coef * (logprobs.float() - reference_logprobs.float()) * mask
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(-1)  # the largest masked position of each row
    has_tokens = mask.any(-1).to(torch.float32)
    return rewards + F.one_hot(last, mask.shape[-1]).to(torch.float32) * (scores.float() * has_tokens).unsqueeze(-1)


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), returns (advantages, returns), each [N, T]:

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = sum_l (gamma lam)^l delta_{t+l}   (computed backwards: A_t = delta_t + gamma lam A_{t+1})
        R_t     = A_t + V_t                          (the value head's regression target)

    Each row's completion (its masked tokens, contiguous) is one episode: V after its last token is 0
    (a completion cut at max_new_tokens is treated as ended, as in TRL). lam = 1 gives the Monte-Carlo
    return minus V, lam = 0 the one-step TD error. Everything is 0 outside the mask.
    """
    mask = mask.to(torch.float32)
    rewards, values = rewards.float() * mask, values.float() * mask
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    columns = []
    for t in reversed(range(values.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        columns.append(next_advantage)
    advantages = torch.stack(columns[::-1], dim=-1)
    return advantages, advantages + values


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), negated and averaged over the completion tokens:

        L_policy = mean_t -min(rho_t A_t, clip(rho_t, 1 - clip, 1 + clip) A_t),  rho_t = pi(o_t) / pi_old(o_t)

    Returns (loss, clipped fraction: the share of tokens where the clipped term was taken). All
    inputs [N, T]; the advantages are per token (GAE), unlike GRPO's per completion.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   value_clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss of PPO for LMs (as in OpenAI's lm-human-preferences and TRL):

        L_value = mean_t 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - e, V_old_t + e) - R_t)^2),  e = value_clip

    so one update cannot move a value much further from the one that computed the advantages.
    Returns (loss, clipped fraction: the share of tokens where the clipped term was larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the completion tokens: 1 = the value head predicts the returns,
    0 = no better than their mean, < 0 worse (0 when the returns do not vary)."""
    mask = mask.to(torch.float32)

    def variance(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    spread = variance(returns)
    explained = 1 - variance(returns - values) / spread.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(spread > 0, explained, torch.zeros_like(explained))  # no device sync


# --- the model: the policy and its value head, trained together ---


class PolicyWithValueHead(nn.Module):
    """The policy (an acornlm Transformer) and a scalar value head on its final hidden states.

    forward(input_ids) -> (logits [B, T, vocab], values [B, T]) in one pass through the transformer,
    so DDP and torch.compile see one module. The rest of the Transformer interface the Trainer uses
    (config, aux_loss, flops_per_token, num_params) is the policy's. Sampling uses `policy` itself.
    """

    def __init__(self, policy: Transformer, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head if value_head is not None else new_value_head(policy.config.hidden_size)

    @property
    def config(self) -> Any:
        return self.policy.config

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy.hidden_states(input_ids)
        return self.policy.lm_head(hidden), self.value_head(hidden).squeeze(-1).float()

    def aux_loss(self) -> torch.Tensor | None:
        return self.policy.aux_loss()

    def clear_aux_loss(self) -> None:
        self.policy.clear_aux_loss()

    def flops_per_token(self, seq_len: int) -> float:
        return self.policy.flops_per_token(seq_len)  # the head's 2 x hidden FLOPs are rounding

    def num_params(self, trainable_only: bool = False) -> int:
        head = sum(p.numel() for p in self.value_head.parameters() if p.requires_grad or not trainable_only)
        return self.policy.num_params(trainable_only) + head


def new_value_head(hidden_size: int) -> nn.Linear:
    """nn.Linear(hidden, 1) starting at zero: every V is 0 at first (the advantages start as the plain
    rewards-to-go), and the value loss sends no gradient into the shared transformer until the head
    has learned something."""
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def load_value_head(start: StageStart) -> nn.Linear:
    """A fresh value head, or on --resume the one saved in the checkpoint being resumed."""
    head = new_value_head(start.model_config.hidden_size)
    if start.checkpoint is None:
        return head
    file = start.checkpoint / VALUE_HEAD_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {start.checkpoint} is not a PPO checkpoint, so --resume cannot "
                              "continue it with `acornlm train ppo`; start a new run with --init and another --out")
    head.load_state_dict(load_file(str(file)))
    return head


def write_ppo_checkpoint(write_policy: Callable[..., None], directory: Path, model: PolicyWithValueHead,
                         info: dict[str, Any] | None = None, tokenizer_dir: str | Path | None = None) -> None:
    """The Trainer's `write_model` for PPO: the policy as any stage writes it (full or LoRA), plus
    value_head.safetensors, which only a resumed PPO run reads."""
    write_policy(directory, model.policy, info=info, tokenizer_dir=tokenizer_dir)
    state = {name: tensor.detach().contiguous() for name, tensor in model.value_head.state_dict().items()}
    save_file(state, str(directory / VALUE_HEAD_FILE), metadata={"format": "pt"})


# --- the loss ---


class PPOLoss:
    """The Trainer's loss function for PPO: rewards -> GAE -> clipped policy + value losses, and their metrics.

    The model it gets returns (logits, values) (`PolicyWithValueHead`). With mu = 1 the logged
    `policy_loss` is 0 by construction (rho = 1 and whitened advantages average 0): its gradient,
    -A_t * grad log pi(o_t), is what moves the policy. In evaluation the batch holds
    only the rewards of greedy answers to held-out prompts, and the "loss" is minus their mean
    (lower is better): `val_reward` is the mean itself, `val_task_accuracy` the share the tasks'
    checkers accept (with --tasks).
    """

    def __init__(self, config: PPOConfig, reference: nn.Module | None = None) -> None:
        self.config = config
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        self.metrics = MeanMetrics()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "eval_rewards" in batch:
            return validation_loss(self.metrics, batch)
        c, mask = self.config, batch["mask"]
        logits, values = model(batch["input_ids"])
        logprobs = token_logprobs(logits, batch["targets"])
        # one update per rollout (mu = 1): pi_old and V_old are this very forward pass, without gradient
        old_logprobs, old_values = logprobs.detach(), values.detach()
        if c.kl_coef > 0:
            if self.reference is None:
                raise ConfigError("a KL penalty (--ppo.kl_coef > 0) needs the reference model")
            ref_logprobs = reference_logprobs(self.reference, batch)
        else:
            ref_logprobs = old_logprobs
        rewards = kl_penalty_rewards(old_logprobs, ref_logprobs, batch["rewards"], mask, c.kl_coef)
        advantages, returns = gae_advantages(rewards, old_values, mask, c.gamma, c.lam)
        policy_loss, clipped = ppo_policy_loss(logprobs, old_logprobs, whiten(advantages, mask), mask, c.clip)
        value_loss, value_clipped = ppo_value_loss(values, old_values, returns, mask, c.value_clip)
        self.metrics.add(model.training, {
            **rollout_metrics(batch), "kl": masked_mean(old_logprobs - ref_logprobs, mask),  # per token, log pi - log pi_ref
            "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
            "clipped_fraction": clipped, "value_clipped_fraction": value_clipped,
            "explained_variance": explained_variance(old_values, returns, mask),
            "value": masked_mean(old_values, mask),
        })
        self.metrics.add_total(model.training, {"reward_errors": batch["reward_errors"], **tool_totals(batch)})
        return policy_loss + c.vf_coef * value_loss

    def pop_metrics(self, training: bool) -> dict[str, float]:
        return self.metrics.pop(training)


# --- the stage ---


@dataclass
class PPOConfig:
    """PPO's own settings (`--ppo.kl_coef 0.02`; the stage's defaults: acornlm/train/defaults/ppo.yaml).

    Args:
        num_samples: Completions sampled per prompt (each is its own episode; the value head is the baseline).
        max_new_tokens: Longest completion sampled.
        temperature: Sampling temperature of the completions (exploration), in (0, 2].
        top_k: Sample among the k most likely tokens only; 0 = off.
        top_p: Nucleus sampling threshold; 1 = off.
        kl_coef: Weight of the per-token KL penalty -kl_coef * (log pi - log pi_ref) in the rewards;
            0 = none, and no reference model in memory.
        gamma: Discount of GAE (1 = none: a completion is short and only its end is scored).
        lam: GAE's lambda: 1 = Monte-Carlo returns (unbiased, noisy), 0 = one-step TD (biased by V).
        clip: Clip range of the policy ratio pi / pi_old.
        value_clip: Clip range of the new values around the old ones in the value loss.
        vf_coef: Weight of the value loss in the total loss.
        max_turns: With tools (agentic rollouts): most assistant turns per trajectory.
        tool_timeout: With tools: seconds a tool call may run before it counts as timed out.
    """

    num_samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    max_turns: int = 3
    tool_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--ppo.num_samples must be >= 1, got {self.num_samples}")
        if not self.kl_coef >= 0:
            raise ConfigError(f"--ppo.kl_coef must be >= 0 (0 = no KL penalty), got {self.kl_coef}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("clip", "value_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--ppo.{name} must be > 0 (typical: 0.2), got {getattr(self, name)}")
        if not self.vf_coef >= 0:
            raise ConfigError(f"--ppo.vf_coef must be >= 0, got {self.vf_coef}")
        if not self.temperature > 0:
            raise ConfigError(f"--ppo.temperature must be > 0: PPO explores by sampling, got {self.temperature}")
        SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, num_samples=self.num_samples)  # the sampler's own ranges, named


def run_ppo(data: str | Path | Sequence[str | Path] | None, init: str | Path | None, out: str | Path,
            train_config: TrainConfig, lora: LoraConfig | None = None, *, ppo: PPOConfig | None = None,
            rewards: str | None = None, reward_model: str | Path | None = None, tasks: str | None = None,
            num_prompts: int = 1000, val_data: str | Path | Sequence[str | Path] | None = None,
            val_fraction: float = 0.05, resume: ResumeMode = False, tools: str | Path | None = None) -> dict[str, Any]:
    """Improve the checkpoint `init` by PPO on the rewards of its own sampled completions.

    `rewards` names reward functions as GRPO's (comma-separated, summed; default "task" unless a
    reward model is given); `reward_model` is a directory of `acornlm train reward`, whose score of
    prompt + completion is added. Returns the Trainer's summary plus "val_reward" (mean reward of
    greedy answers to held-out prompts at the last evaluation), "val_task_accuracy" (with --tasks)
    and the reward functions' error counts. Prompts that carry `tools` are played out as GRPO's
    are (agentic rollouts with the functions of `tools` and of the agent tasks).
    """
    ppo = ppo or PPOConfig()
    spec = reward_spec(rewards, reward_model)
    runner, names = reward_runner(spec)
    start = resolve_start(init, out, resume, lora, train_config, stage="ppo")
    train_records, val_records, description = rl_prompts(data, tasks, num_prompts, val_data, val_fraction,
                                                         train_config.seed)
    context, device = distributed.setup(train_config.device)
    try:
        scorer = stage_reward_model("ppo", reward_model, start.tokenizer, device, names, description, context)
        policy = build_policy(start, train_config, context, "ppo")
        model = PolicyWithValueHead(policy, load_value_head(start))
        batches = Rollouts(policy, start.tokenizer, train_records, val_records, runner, num_samples=ppo.num_samples,
                           batch_size=train_config.batch_size, max_new_tokens=ppo.max_new_tokens,
                           temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p, seed=train_config.seed,
                           seq_len=train_config.seq_len, rank=context.rank, world_size=context.world_size,
                           grad_accum_steps=train_config.grad_accum_steps, reward_model=scorer, stage="ppo",
                           environment=tool_environment(tools, tasks, ppo.max_turns, ppo.tool_timeout))
        reference = load_reference(start) if ppo.kl_coef > 0 and not start.lora.enabled else None
        loss = PPOLoss(ppo, reference)
        trainer = Trainer(
            model, train_config, start.out_dir, batches, loss, context=context, device=device,
            tokenizer_dir=start.source, resume_from=start.checkpoint,
            write_model=functools.partial(write_ppo_checkpoint, start.write_model),
            checkpoint_info=start.checkpoint_info(
                "ppo", data=data_label(data, tasks),
                ppo=dataclasses.asdict(ppo), rewards=spec, reward_model=str(reward_model) if reward_model else None),
        )
        # the Trainer accelerates the module it gets; the policy's attention kernel is a Transformer's own setting
        accelerate(trainer.raw_model.policy, trainer.device, mode="train")
        if ppo.kl_coef > 0 and start.lora.enabled:
            # LoRA leaves the base weights untouched: they are the reference, shared, not copied
            loss.reference = base_model_view(trainer.raw_model.policy).eval().requires_grad_(False)
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary.update(final_metrics(start.out_dir, ("val_reward", "val_task_accuracy")))
    summary["reward_errors"] = dict(runner.errors_by_function) if runner is not None else {}
    return summary
