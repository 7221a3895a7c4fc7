"""The DPO stage: learn from pairs of a preferred and a rejected answer, without a reward model.

Direct Preference Optimization (Rafailov et al. 2023) turns "answer A is better than B" into a
classification loss on the *implicit reward* r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)):

    loss = -log sigmoid(r(x, chosen) - r(x, rejected))

pi is the model being trained and pi_ref a frozen copy of the starting model, so the policy
is pulled towards the chosen answers only as far as beta lets it drift from where it started.
Variants: conservative DPO (label smoothing eps: the labels may be wrong with probability eps)
and IPO (Azar et al. 2023: a squared loss that does not push the margin to infinity).

The stage reuses the one Trainer: `PreferenceBatches` supplies (chosen, rejected) token batches
as a pure function of the step, and `DPOLoss` is the loss function. The reference log-probs
can be computed once before training (`precompute_reference`), so the reference model never
sits in memory next to the policy during training.

Interface:

    from acornlm.train.dpo import run_dpo, dpo_loss
    summary = run_dpo("pairs.jsonl", init="runs/sft", out="runs/dpo", train_config=TrainConfig(...))
    summary["val_preference_accuracy"]   # share of held-out pairs ranked right by the implicit reward

It stands on the shared stage layer (acornlm/train/stage.py) and losses (acornlm/train/losses.py,
`sequence_logprobs`); encoding the pairs is data code (acornlm/data/preferences.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from acornlm.data.preferences import (
    EncodedPair,
    collate_sequences,
    dpo_pairs,
    encode_pair_splits,
)
from acornlm.errors import ConfigError
from acornlm.model.lora import (
    LoraConfig,
    base_model_view,
)
from acornlm.paths import as_path_list
from acornlm.train import distributed
from acornlm.train.config import TrainConfig
from acornlm.train.losses import sequence_logprobs
from acornlm.train.precision import select_precision
from acornlm.train.stage import (
    MeanMetrics,
    ResumeMode,
    build_policy,
    example_indices,
    final_metrics,
    load_reference,
    resolve_start,
)
from acornlm.train.trainer import Trainer

DPO_LOSS_TYPES = ("sigmoid", "ipo")


# --- the loss ---

@dataclass
class DPOOutput:
    """Per-pair losses and implicit rewards r = beta * (log pi - log pi_ref) of one batch."""

    losses: torch.Tensor            # [B]
    chosen_rewards: torch.Tensor    # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Share of pairs whose chosen answer has the higher implicit reward (ties count as wrong)."""
        return (self.margins > 0).float().mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: Literal["sigmoid", "ipo"] = "sigmoid") -> DPOOutput:
    """The DPO loss of Rafailov et al. 2023, eq. 7, with the cDPO and IPO variants.

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), the log-ratio
    margin between the chosen y_w and the rejected y_l:

        sigmoid (DPO / cDPO):  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        ipo     (Azar et al.): loss = (h - 1 / (2 beta))^2

    eps is `label_smoothing` (0 = plain DPO). All inputs are per-pair sequence log-probs [B].
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown DPO loss type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    return DPOOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def check_dpo_settings(beta: float, label_smoothing: float, loss_type: str, sft_weight: float = 0.0) -> None:
    """Reject settings that cannot work before anything is loaded."""
    if not 0 <= sft_weight < float("inf"):
        raise ConfigError(f"--dpo.sft_weight must be a finite number >= 0 (0 = plain DPO, 1 = RPO), got {sft_weight}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"--dpo.loss_type {loss_type!r} is unknown; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ConfigError(f"--dpo.beta must be > 0 (typical: 0.1), got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"--dpo.label_smoothing must be in [0, 0.5) (0 = plain DPO), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ConfigError("--dpo.label_smoothing applies to the sigmoid (DPO) loss only; drop it for "
                          "--dpo.loss_type ipo")


@dataclass
class DPOConfig:
    """DPO's own settings (`--dpo.beta 0.2`; the stage's defaults are acornlm/train/defaults/dpo.yaml).

    Args:
        beta: Strength of the pull towards the reference (higher = stay closer); typical 0.1.
        label_smoothing: Conservative DPO: the probability that a pair's labels are flipped (0 = plain DPO).
        loss_type: "sigmoid" (DPO) or "ipo" (squared loss on length-averaged log-probs, Azar et al.).
        precompute_reference: Compute the reference log-probs once before training, so no frozen copy
            of the model stays in memory.
        sft_weight: Adds sft_weight x the chosen answers' negative log-likelihood per token (RPO, Pang et
            al. 2024). DPO only widens the margin, and can do so by making both answers less likely when
            they share most tokens (八十二 vs 八十三); this term keeps the chosen answer likely. 0 = plain DPO.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    precompute_reference: bool = True
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        check_dpo_settings(self.beta, self.label_smoothing, self.loss_type, self.sft_weight)


# --- the DPO stage: batches, reference log-probs, loss ---

class PreferenceBatches:
    """The Trainer's batch source for DPO: `batch_size` pairs per micro-batch.

    A batch is a dict: input_ids / targets / mask of shape [2 x pairs, longest - 1] holding the
    chosen sequences first and the rejected ones after them (one forward pass for both), and,
    when the reference was precomputed, reference_logps [2 x pairs] in the same order.
    """

    def __init__(self, train: Sequence[EncodedPair], val: Sequence[EncodedPair], batch_size: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1, grad_accum_steps: int = 1,
                 train_reference: torch.Tensor | None = None, val_reference: torch.Tensor | None = None) -> None:
        if not train or not val:
            raise ConfigError("DPO needs at least one training and one validation pair")
        self.train, self.val = list(train), list(val)
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.train_reference, self.val_reference = train_reference, val_reference
        mean_length = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in self.train) / len(self.train)
        self.tokens_per_step = round(mean_length * batch_size * grad_accum_steps * world_size)

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        indices = example_indices(len(self.train), self.seed, step, micro_step, self.batch_size, self.rank,
                                  self.world_size, self.grad_accum_steps)
        return self._collate(self.train, indices, self.train_reference)

    def eval_batch(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.batch_size
        indices = [(start + i) % len(self.val) for i in range(self.batch_size)]
        return self._collate(self.val, indices, self.val_reference)

    def _collate(self, pairs: Sequence[EncodedPair], indices: Sequence[int],
                 reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
        chosen = [pairs[i] for i in indices]
        sequences = [p.chosen_ids for p in chosen] + [p.rejected_ids for p in chosen]
        masks = [p.chosen_mask for p in chosen] + [p.rejected_mask for p in chosen]
        batch = collate_sequences(sequences, masks, self.pad_id)
        if reference is not None:
            rows = torch.tensor(list(indices), dtype=torch.long)
            batch["reference_logps"] = torch.cat([reference[rows, 0], reference[rows, 1]])
        return batch


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int,
                               device: torch.device, average: bool = False,
                               autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """log pi_ref(chosen) and log pi_ref(rejected) of every pair, [N, 2], with `model` as the reference.

    Run once before training with the starting model, so no frozen copy has to stay in memory.
    """
    was_training = model.training
    model.eval()
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate_sequences([p.chosen_ids for p in chunk] + [p.rejected_ids for p in chunk],
                                  [p.chosen_mask for p in chunk] + [p.rejected_mask for p in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            logits = model(batch["input_ids"])
        logps = sequence_logprobs(logits, batch["targets"], batch["mask"], average).float().cpu()
        results.append(torch.stack([logps[:len(chunk)], logps[len(chunk):]], dim=1))
    model.train(was_training)
    return torch.cat(results)


class DPOLoss:
    """The Trainer's loss function for DPO; keeps reward margins and preference accuracy as metrics.

    The reference log-probs come with the batch (precomputed) or from `reference`, a frozen
    copy of the starting model run here without gradients.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 reference: nn.Module | None = None, sft_weight: float = 0.0) -> None:
        check_dpo_settings(beta, label_smoothing, loss_type, sft_weight)
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.sft_weight = sft_weight
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.metrics = MeanMetrics()

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        if self.reference is None:
            raise ConfigError("DPO needs reference log-probs: precompute them or pass a reference model")
        device = batch["input_ids"].device
        if self.reference.lm_head.weight.device != device:
            self.reference.to(device)
        with torch.no_grad():
            logits = self.reference(batch["input_ids"])
            return sequence_logprobs(logits, batch["targets"], batch["mask"], self.loss_type == "ipo")

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"])
        logps = sequence_logprobs(logits, batch["targets"], batch["mask"], average=self.loss_type == "ipo")
        reference = self.reference_logps(batch)
        pairs = logps.shape[0] // 2
        out = dpo_loss(logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:], self.beta,
                       self.label_smoothing, self.loss_type)  # type: ignore[arg-type]
        self.metrics.add(model.training, {
            "reward_margin": out.margins.mean(), "preference_accuracy": out.accuracy,
            "chosen_reward": out.chosen_rewards.mean(), "rejected_reward": out.rejected_rewards.mean(),
        })
        if not self.sft_weight:
            return out.losses.mean()
        # RPO: + sft_weight x (-log pi(chosen) per token), the SFT loss on the chosen answers
        chosen_nll = -sequence_logprobs(logits[:pairs], batch["targets"][:pairs], batch["mask"][:pairs],
                                        average=True)
        return out.losses.mean() + self.sft_weight * chosen_nll.mean()

    def pop_metrics(self, training: bool) -> dict[str, float]:
        return self.metrics.pop(training)


# --- the DPO stage ---


def run_dpo(data: str | Path | Sequence[str | Path] | None, init: str | Path | None, out: str | Path,
            train_config: TrainConfig, lora: LoraConfig | None = None, *, dpo: DPOConfig | None = None,
            tasks: str | None = None, num_pairs: int = 1000, data_format: str = "auto",
            val_data: str | Path | Sequence[str | Path] | None = None, val_fraction: float = 0.05,
            on_identical: str = "skip", resume: ResumeMode = False) -> dict[str, Any]:
    """Preference-tune the checkpoint `init` with DPO on `data` (or synthetic pairs of `tasks`).

    Returns the Trainer's summary plus the final preference metrics ("val_preference_accuracy",
    "val_reward_margin", ...) and what happened to the data. The reference is the starting
    model; with `dpo.precompute_reference` its log-probs are computed once, before training.
    """
    dpo = dpo or DPOConfig()
    start = resolve_start(init, out, resume, lora, train_config)
    train_pairs, val_pairs, description = dpo_pairs(data, tasks, num_pairs, val_data, val_fraction, data_format,
                                                    on_identical, train_config.seed)
    max_tokens = train_config.seq_len + 1  # a row's last token is only a target
    train_encoded, val_encoded, stats = encode_pair_splits(start.tokenizer, train_pairs, val_pairs, max_tokens,
                                                           train_config.seq_len)
    average = dpo.loss_type == "ipo"

    context, device = distributed.setup(train_config.device)
    try:
        distributed.log(f"dpo data: {description}", context)
        distributed.log(f"dpo data: {stats.summary()}; {len(val_encoded):,} held out for validation", context)
        reference: nn.Module | None = None
        train_reference = val_reference = None
        if dpo.precompute_reference:
            reference = load_reference(start).to(device)
            autocast = select_precision(device, train_config.dtype).autocast()
            pad = start.tokenizer.eot_id
            train_reference = precompute_reference_logps(reference, train_encoded, train_config.batch_size, pad,
                                                         device, average, autocast)
            val_reference = precompute_reference_logps(reference, val_encoded, train_config.batch_size, pad,
                                                       device, average, autocast)
            reference = None  # freed: the policy alone is in memory from here on
        elif not start.lora.enabled:
            reference = load_reference(start)
        model = build_policy(start, train_config, context, "dpo")
        batches = PreferenceBatches(train_encoded, val_encoded, train_config.batch_size, train_config.seed,
                                    start.tokenizer.eot_id, context.rank, context.world_size,
                                    train_config.grad_accum_steps, train_reference, val_reference)
        loss = DPOLoss(dpo.beta, dpo.label_smoothing, dpo.loss_type, reference, dpo.sft_weight)
        trainer = Trainer(
            model, train_config, start.out_dir, batches, loss, context=context, device=device,
            tokenizer_dir=start.source, resume_from=start.checkpoint, write_model=start.write_model,
            checkpoint_info=start.checkpoint_info(
                "dpo", data=[str(p) for p in as_path_list(data)] if data is not None else f"tasks:{tasks}",
                dpo=dataclasses.asdict(dpo)),
        )
        if not dpo.precompute_reference and start.lora.enabled:
            # LoRA leaves the base weights untouched: they are the reference, shared, not copied
            loss.reference = base_model_view(trainer.raw_model).eval().requires_grad_(False)
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary.update(final_metrics(start.out_dir, ("val_preference_accuracy", "val_reward_margin",
                                                 "val_chosen_reward", "val_rejected_reward")))
    summary["data"] = {**dataclasses.asdict(stats), "val_pairs": len(val_encoded), "description": description}
    return summary
