"""The reward-model stage: learn a score r(x, y) that ranks the chosen answer above the rejected one.

A reward model (Ouyang et al. 2022) is the starting checkpoint with its next-token head replaced
by one number per sequence (acornlm/train/reward_model.py). It learns from the same preference
pairs as DPO, by the Bradley-Terry model: P(chosen beats rejected) = sigmoid(r_c - r_r), so

    loss = -log sigmoid(r(x, chosen) - r(x, rejected))          (losses.bradley_terry_loss)

plus, optionally, TRL's centering term c * mean((r_c + r_r)^2), which pins the rewards' free
offset near 0 (Eisenstein et al. 2023). Where DPO's reward is implicit in the policy, this one is
a separate model that PPO or GRPO can ask to score new answers.

The stage reuses the one Trainer and DPO's data path: `RewardBatches` (DPO's batch source,
collated into whole sequences and their lengths) and `RewardLoss`, which logs reward_accuracy
(share of pairs ranked right), reward_margin and, on validation, val_reward_accuracy.

Interface:

    from acornlm.train.reward import run_reward
    summary = run_reward(None, init="runs/sft", out="runs/reward", train_config=TrainConfig(...),
                         tasks="arithmetic")
    summary["val_reward_accuracy"]      # share of held-out pairs the reward model ranks right
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acornlm.data.preferences import EncodedPair, dpo_pairs, encode_pair_splits, pad_rows
from acornlm.errors import ConfigError
from acornlm.model.checkpoint import write_model_files
from acornlm.model.lora import LoraConfig, parameter_counts
from acornlm.paths import as_path_list
from acornlm.train import distributed
from acornlm.train.checkpointing import remove_abandoned
from acornlm.train.config import TrainConfig
from acornlm.train.dpo import PreferenceBatches
from acornlm.train.losses import bradley_terry_loss
from acornlm.train.reward_model import (
    REWARD_HEAD,
    REWARD_STAGE,
    RewardModel,
    is_reward_checkpoint,
    load_reward_model,
)
from acornlm.train.stage import MeanMetrics, ResumeMode, StageStart, final_metrics, load_merged, resolve_start
from acornlm.train.trainer import Trainer

REWARD_METRICS = ("val_reward_accuracy", "val_reward_margin", "val_chosen_reward", "val_rejected_reward")


@dataclass
class RewardConfig:
    """The reward stage's own settings (`--reward.center_rewards_coefficient 0.01`; defaults in
    acornlm/train/defaults/reward.yaml).

    Args:
        center_rewards_coefficient: Weight c of the term c * mean((r_chosen + r_rejected)^2) (as TRL's
            RewardTrainer; 0 = off, TRL suggests 0.01). The Bradley-Terry loss only sees differences,
            so the rewards may drift to any offset; this keeps them near 0, which an RL stage that
            reads raw rewards likes.
    """

    center_rewards_coefficient: float = 0.0

    def __post_init__(self) -> None:
        value = self.center_rewards_coefficient
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"--reward.center_rewards_coefficient must be a finite number >= 0 "
                              f"(0 = off; TRL suggests 0.01), got {value!r}")


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The numbers a reward run logs for one batch of pairs (rewards [N] each, detached).

    reward_accuracy is the share of pairs with r_chosen > r_rejected (a tie counts as wrong: the
    model did not tell the answers apart); reward_margin the mean of r_chosen - r_rejected.
    """
    return {"reward_accuracy": (chosen > rejected).float().mean(), "reward_margin": (chosen - rejected).mean(),
            "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}


class RewardBatches(PreferenceBatches):
    """The Trainer's batch source: DPO's pairs and batch schedule (a pure function of the step),
    collated for a reward model instead of for next-token log-probs.

    A batch is {"input_ids": [2 x pairs, longest] with the chosen sequences first and the rejected
    ones after them (one forward pass for both), right-padded; "lengths": [2 x pairs] real tokens}.
    """

    def _collate(self, pairs: Sequence[EncodedPair], indices: Sequence[int],
                 reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        picked = [pairs[i] for i in indices]
        sequences = [p.chosen_ids for p in picked] + [p.rejected_ids for p in picked]
        return {"input_ids": pad_rows(sequences, self.pad_id),
                "lengths": torch.tensor([len(s) for s in sequences], dtype=torch.long)}


class RewardLoss:
    """The Trainer's loss function: Bradley-Terry on the rewards of (chosen, rejected) pairs, plus
    the optional centering term; keeps reward accuracy and margin as metrics."""

    def __init__(self, center_rewards_coefficient: float = 0.0) -> None:
        self.center_rewards_coefficient = center_rewards_coefficient
        self.metrics = MeanMetrics()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rewards = model(batch["input_ids"], batch["lengths"]).float()
        pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        loss = bradley_terry_loss(chosen, rejected)
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        self.metrics.add(model.training, reward_metrics(chosen.detach(), rejected.detach()))
        return loss

    def pop_metrics(self, training: bool) -> dict[str, float]:
        return self.metrics.pop(training)


def build_reward_model(start: StageStart, train_config: TrainConfig,
                       context: distributed.DistributedContext) -> RewardModel:
    """The model to train: a resumed reward checkpoint; a reward model given as --init (more training);
    or, usually, the --init policy's decoder stack with a new score head seeded by train.seed."""
    if start.checkpoint is not None:
        distributed.log(f"resuming from {start.checkpoint}", context)
        if context.is_main and isinstance(start.info.get("step"), int):
            remove_abandoned(start.out_dir, start.info["step"])
        distributed.barrier()
        model = load_reward_model(start.checkpoint)
    elif is_reward_checkpoint(start.info):
        model = load_reward_model(start.init)
    else:  # a policy's LoRA adapter, if it has one, is merged first: the reward model reads what SFT learned
        model = RewardModel.from_policy(load_merged(start.init), seed=train_config.seed)
    model.train().requires_grad_(True)
    trainable, total = parameter_counts(model)
    distributed.log(f"reward: training {trainable:,} of {total:,} parameters (decoder + score head)", context)
    return model


def run_reward(data: str | Path | Sequence[str | Path] | None, init: str | Path | None, out: str | Path,
               train_config: TrainConfig, *, reward: RewardConfig | None = None, lora: LoraConfig | None = None,
               tasks: str | None = None, num_pairs: int = 1000, data_format: str = "auto",
               val_data: str | Path | Sequence[str | Path] | None = None, val_fraction: float = 0.05,
               on_identical: str = "skip", resume: ResumeMode = False) -> dict[str, Any]:
    """Train a reward model from the checkpoint `init` on preference pairs in `data` (or synthetic pairs
    of `tasks`), the same data DPO reads.

    Returns the Trainer's summary plus the final reward metrics ("val_reward_accuracy": the share of
    held-out pairs ranked right, "val_reward_margin", ...) and what happened to the data. LoRA is
    refused: the score head must train in full, and a reward model of a small model is cheap to
    train whole.
    """
    reward = reward or RewardConfig()
    if lora is not None and lora.enabled:
        raise ConfigError("acornlm train reward trains every weight: LoRA (--lora.rank > 0) is not supported "
                          "for reward models; drop the --lora options")
    start = resolve_start(init, out, resume, None, train_config)
    train_pairs, val_pairs, description = dpo_pairs(data, tasks, num_pairs, val_data, val_fraction, data_format,
                                                    on_identical, train_config.seed)
    max_tokens = train_config.seq_len  # whole sequences: no token is only a target here
    train_encoded, val_encoded, stats = encode_pair_splits(start.tokenizer, train_pairs, val_pairs, max_tokens,
                                                           train_config.seq_len)

    context, device = distributed.setup(train_config.device)
    try:
        distributed.log(f"reward data: {description}", context)
        distributed.log(f"reward data: {stats.summary()}; {len(val_encoded):,} held out for validation", context)
        model = build_reward_model(start, train_config, context)
        batches = RewardBatches(train_encoded, val_encoded, train_config.batch_size, train_config.seed,
                                start.tokenizer.eot_id, context.rank, context.world_size,
                                train_config.grad_accum_steps)
        trainer = Trainer(
            model, train_config, start.out_dir, batches, RewardLoss(reward.center_rewards_coefficient),
            context=context, device=device, tokenizer_dir=start.source, resume_from=start.checkpoint,
            write_model=write_model_files,
            checkpoint_info=start.checkpoint_info(
                REWARD_STAGE, head=REWARD_HEAD,
                data=[str(p) for p in as_path_list(data)] if data is not None else f"tasks:{tasks}",
                reward=dataclasses.asdict(reward)),
        )
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary.update(final_metrics(start.out_dir, REWARD_METRICS))
    summary["data"] = {**dataclasses.asdict(stats), "val_pairs": len(val_encoded), "description": description}
    return summary
