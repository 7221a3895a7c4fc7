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

This module also holds the pieces the GRPO and distillation stages share with it: sequence
log-probs, step-pure example indices, per-step stage metrics (`MeanMetrics`) and the start of a
fine-tuning run from a checkpoint (`resolve_start`, `build_policy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from acornlm.accel import accelerate
from acornlm.data.preferences import (
    EncodedPair,
    PreferencePair,
    encode_pair,
    fit_pair,
    load_preference_pairs,
    synthetic_preference_pairs,
)
from acornlm.data.tasks import make_dataset
from acornlm.errors import CheckpointError, ConfigError, DataError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint, write_model_files
from acornlm.model.lora import (
    LoraConfig,
    apply_lora,
    base_model_view,
    enable_adapter_training,
    load_adapter,
    load_model_with_adapter,
    merge_lora,
    parameter_counts,
    write_lora_checkpoint,
)
from acornlm.paths import as_path_list
from acornlm.tokenizer import Tokenizer, load_tokenizer
from acornlm.train import distributed
from acornlm.train.checkpointing import remove_abandoned
from acornlm.train.config import TrainConfig
from acornlm.train.metrics import METRICS_FILE, read_metrics
from acornlm.train.precision import select_precision
from acornlm.train.pretrain import check_context_length, find_resume_checkpoint
from acornlm.train.sft import resolve_lora, split_conversations
from acornlm.train.trainer import Trainer, seed_everything

DPO_LOSS_TYPES = ("sigmoid", "ipo")


# --- log-probabilities of token sequences ---

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | tokens before t) for every position: log_softmax(logits)[target], [B, T].

    Computed in float32 (log-probs of long answers are sums of many small numbers). Targets
    that are negative (padding) get log-prob 0; callers mask them out anyway.
    """
    logits = logits.float()
    safe_targets = targets.clamp(min=0)
    picked = torch.gather(logits, -1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """log pi(answer | prompt) = sum over answer tokens of log p(token), one number per row [B].

    `mask` is 1 on the answer tokens (the loss mask). With `average`, the sum is divided by the
    number of answer tokens (the length-normalised log-prob IPO uses).
    """
    mask = mask.to(torch.float32)
    total = (token_logprobs(logits, targets) * mask).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


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


def check_dpo_settings(beta: float, label_smoothing: float, loss_type: str) -> None:
    """Reject settings that cannot work before anything is loaded."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"--loss_type {loss_type!r} is unknown; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ConfigError(f"--beta must be > 0 (typical: 0.1), got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"--label_smoothing must be in [0, 0.5) (0 = plain DPO), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ConfigError("--label_smoothing applies to the sigmoid (DPO) loss only; drop it for --loss_type ipo")




# --- pieces every fine-tuning stage of this module family uses ---

def example_indices(num_examples: int, seed: int, step: int, micro_step: int, batch_size: int,
                    rank: int = 0, world_size: int = 1, grad_accum_steps: int = 1) -> list[int]:
    """The examples of this rank's micro-batch, as a pure function of (seed, step, micro_step).

    The data is read in epochs, each in the order of a permutation seeded by (seed, epoch).
    Global position p = step * global batch + (micro_step * world_size + rank) * batch_size + i
    falls in epoch p // N at offset p % N, so a resumed run continues exactly where it stopped
    and one process with accumulation 2 sees the global batch two processes with 1 see.
    """
    global_batch = batch_size * grad_accum_steps * world_size
    first = step * global_batch + (micro_step * world_size + rank) * batch_size
    indices = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, num_examples)
        indices.append(int(epoch_order(num_examples, seed, epoch)[offset]))
    return indices


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_examples)


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Rows of different lengths as one [rows, longest] tensor, right-padded with `value`."""
    longest = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (longest - len(row)) for row in rows], dtype=torch.long)


class MeanMetrics:
    """Running means of a stage's extra numbers (rewards, accuracies) over one step or one evaluation.

    Training and evaluation are kept apart (the loss function sees `model.training`); the
    Trainer collects them through the loss function's `pop_metrics(training)`, evaluation
    numbers prefixed with "val_". They are this rank's numbers (rank 0 logs).
    """

    def __init__(self) -> None:
        self._sums: dict[bool, dict[str, float]] = {True: {}, False: {}}
        self._counts: dict[bool, dict[str, int]] = {True: {}, False: {}}
        self._totals: dict[bool, dict[str, float]] = {True: {}, False: {}}

    def add(self, training: bool, values: dict[str, float | torch.Tensor]) -> None:
        sums, counts = self._sums[training], self._counts[training]
        for name, value in values.items():
            number = value.item() if isinstance(value, torch.Tensor) else float(value)
            sums[name] = sums.get(name, 0.0) + number
            counts[name] = counts.get(name, 0) + 1

    def add_total(self, training: bool, values: dict[str, float | torch.Tensor]) -> None:
        """Numbers that add up instead of averaging (counts of errors)."""
        totals = self._totals[training]
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + (value.item() if isinstance(value, torch.Tensor) else value)

    def pop(self, training: bool) -> dict[str, float]:
        prefix = "" if training else "val_"
        sums, counts, totals = self._sums[training], self._counts[training], self._totals[training]
        result = {prefix + name: sums[name] / counts[name] for name in sums}
        result.update({prefix + name: value for name, value in totals.items()})
        sums.clear()
        counts.clear()
        totals.clear()
        return result


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


def collate_sequences(sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
                      pad_id: int) -> dict[str, torch.Tensor]:
    """Next-token inputs and targets of token sequences: input_ids = seq[:-1], targets = seq[1:],
    mask = loss_mask[1:] (whether each target counts), right-padded (targets with -1)."""
    return {
        "input_ids": pad_rows([s[:-1] for s in sequences], pad_id),
        "targets": pad_rows([s[1:] for s in sequences], -1),
        "mask": pad_rows([m[1:] for m in masks], 0),
    }


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
                 reference: nn.Module | None = None) -> None:
        check_dpo_settings(beta, label_smoothing, loss_type)
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
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
        return out.losses.mean()

    def pop_metrics(self, training: bool) -> dict[str, float]:
        return self.metrics.pop(training)


# --- starting a fine-tuning stage from a checkpoint (shared by DPO, GRPO and distillation) ---

@dataclass
class StageStart:
    """Where a fine-tuning run starts: resolved before any process group or model exists.

    `init` is the starting checkpoint (also the DPO/GRPO reference); `source` is where the
    weights come from now: `init` for a fresh run, the run's latest checkpoint on --resume.
    """

    out_dir: Path
    init: Path
    source: Path
    checkpoint: Path | None  # the checkpoint to resume from
    info: dict[str, Any]     # config.json of `source`
    lora: LoraConfig
    tokenizer: Tokenizer
    model_config: ModelConfig

    @property
    def write_model(self) -> Callable[..., None]:
        return write_lora_checkpoint if self.lora.enabled else write_model_files

    def checkpoint_info(self, stage: str, **extra: Any) -> dict[str, Any]:
        """What config.json records about the run next to the model."""
        tokenizer = self.tokenizer
        return {"stage": stage, "init": str(self.init), "lora": self.lora.to_dict() if self.lora.enabled else None,
                "tokenizer": {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind,
                              "vocab_size": tokenizer.vocab_size}, **extra}


def resolve_start(init: str | Path | None, out: str | Path, resume: bool, lora: LoraConfig | None,
                  train_config: TrainConfig) -> StageStart:
    """The run's starting point, checked (as `run_sft` does): --init or a run to resume, LoRA
    settings that agree with the resumed run's, a context the model has."""
    out_dir = Path(out)
    lora = lora or LoraConfig()
    checkpoint = find_resume_checkpoint(out_dir, resume)
    resumed_info = read_checkpoint_config(checkpoint) if checkpoint is not None else None
    if checkpoint is None:
        if init is None:
            raise ConfigError("--init is required: the checkpoint (or run directory) to fine-tune, e.g. an SFT run")
        init_ckpt = resolve_checkpoint(init)
    else:
        init_ckpt = Path(resumed_info.get("init") or checkpoint)
    source = checkpoint or init_ckpt
    info = resumed_info or read_checkpoint_config(init_ckpt)
    lora = resolve_lora(lora, resumed_info, checkpoint)
    try:
        model_config = ModelConfig.from_dict(info["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source / 'config.json'}: invalid model section: {exc}") from exc
    check_context_length(model_config, train_config)
    return StageStart(out_dir, init_ckpt, source, checkpoint, info, lora, load_tokenizer(source), model_config)


def build_policy(start: StageStart, train_config: TrainConfig, context: distributed.DistributedContext,
                 stage: str) -> Transformer:
    """The model to train: the source weights, with new or resumed LoRA adapters when asked."""
    if start.checkpoint is not None:
        distributed.log(f"resuming from {start.checkpoint}", context)
        if context.is_main and isinstance(start.info.get("step"), int):
            remove_abandoned(start.out_dir, start.info["step"])
        distributed.barrier()
    # a fresh run starts from --init with its adapter merged; a resumed run's adapter is loaded below
    model = load_model(start.source, device="cpu")[0] if start.checkpoint is not None else load_merged(start.init)
    if start.lora.enabled:
        if start.checkpoint is not None:
            load_adapter(model, start.checkpoint)
            enable_adapter_training(model)
        else:
            seed_everything(train_config.seed)  # the same adapter initialisation on every rank and rerun
            apply_lora(model, start.lora)
    trainable, total = parameter_counts(model)
    distributed.log(f"{stage}: training {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
                    + (f" with LoRA rank {start.lora.rank}" if start.lora.enabled else ""), context)
    return model


def load_reference(start: StageStart) -> Transformer:
    """A frozen copy of the starting model (the reference pi_ref), loaded from --init."""
    return accelerate(load_merged(start.init).eval().requires_grad_(False))


def load_merged(path: Path) -> Transformer:
    """A checkpoint's model with its LoRA adapter (if it has one) merged in, every weight trainable:
    a stage after a LoRA SFT run starts from what SFT learned, not from the base under the adapter."""
    model, _ = load_model_with_adapter(path, device="cpu")
    return merge_lora(model).requires_grad_(True)


def final_metrics(run_dir: Path, names: Sequence[str]) -> dict[str, float]:
    """The last logged value of each metric in `names` (for the summary a stage prints)."""
    found: dict[str, float] = {}
    for record in read_metrics(run_dir / METRICS_FILE):
        found.update({name: record[name] for name in names if record.get(name) is not None})
    return found


# --- the DPO stage ---

@dataclass
class PairStats:
    """What encoding did to the preference pairs (never silent)."""

    pairs: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0

    def summary(self) -> str:
        return (f"{self.kept:,} of {self.pairs:,} pairs kept; {self.truncated:,} answers truncated and "
                f"{self.dropped_too_long:,} pairs dropped (prompt longer than the context)")


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[PreferencePair], max_tokens: int,
                 stats: PairStats | None = None) -> list[EncodedPair]:
    """Token ids and answer masks of every pair, answers cut to `max_tokens`, too-long prompts dropped."""
    stats = stats if stats is not None else PairStats()
    encoded = []
    for pair in pairs:
        stats.pairs += 1
        full = encode_pair(tokenizer, pair)
        fitted = fit_pair(full, max_tokens)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += fitted is not full
        stats.kept += 1
        encoded.append(fitted)
    return encoded


def dpo_pairs(data: str | Path | Sequence[str | Path] | None, tasks: str | None, num_pairs: int,
              val_data: str | Path | Sequence[str | Path] | None, val_fraction: float, data_format: str,
              on_identical: str, seed: int) -> tuple[list[PreferencePair], list[PreferencePair], str]:
    """(train pairs, validation pairs, a line describing them) from files or synthetic tasks."""
    if data is not None:
        pairs, stats = load_preference_pairs(as_path_list(data), data_format, on_identical)
        description = stats.summary()
        if val_data is not None:
            return pairs, load_preference_pairs(as_path_list(val_data), data_format, on_identical)[0], description
        train, val = split_conversations(pairs, val_fraction, seed)  # any sequence splits the same way
        return train, val or train, description
    if tasks is None:
        raise ConfigError("--data is required (preference pairs as .jsonl), or --tasks for synthetic pairs "
                          "(the correct answer of acornlm's synthetic tasks beats a wrong one)")
    train = synthetic_preference_pairs(make_dataset(tasks, num_pairs, seed, "train"), seed)
    val = synthetic_preference_pairs(make_dataset(tasks, max(num_pairs // 10, 8), seed, "heldout"), seed + 1)
    return train, val, f"{len(train):,} synthetic pairs from tasks {tasks} (+{len(val):,} held out)"


def run_dpo(data: str | Path | Sequence[str | Path] | None, init: str | Path | None, out: str | Path,
            train_config: TrainConfig, lora: LoraConfig | None = None, *, beta: float = 0.1,
            label_smoothing: float = 0.0, loss_type: str = "sigmoid", precompute_reference: bool = True,
            tasks: str | None = None, num_pairs: int = 1000, data_format: str = "auto",
            val_data: str | Path | Sequence[str | Path] | None = None, val_fraction: float = 0.05,
            on_identical: str = "skip", resume: bool = False) -> dict[str, Any]:
    """Preference-tune the checkpoint `init` with DPO on `data` (or synthetic pairs of `tasks`).

    Returns the Trainer's summary plus the final preference metrics ("val_preference_accuracy",
    "val_reward_margin", ...) and what happened to the data. The reference is the starting
    model; with `precompute_reference` its log-probs are computed once, before training.
    """
    check_dpo_settings(beta, label_smoothing, loss_type)
    start = resolve_start(init, out, resume, lora, train_config)
    train_pairs, val_pairs, description = dpo_pairs(data, tasks, num_pairs, val_data, val_fraction, data_format,
                                                    on_identical, train_config.seed)
    max_tokens = train_config.seq_len + 1  # a row's last token is only a target
    stats = PairStats()
    train_encoded = encode_pairs(start.tokenizer, train_pairs, max_tokens, stats)
    val_encoded = encode_pairs(start.tokenizer, val_pairs, max_tokens)
    if not train_encoded or not val_encoded:
        raise DataError(f"no preference pair fits train.seq_len={train_config.seq_len} ({stats.summary()}); "
                        "raise train.seq_len or use shorter prompts")
    average = loss_type == "ipo"

    context, device = distributed.setup(train_config.device)
    try:
        distributed.log(f"dpo data: {description}", context)
        distributed.log(f"dpo data: {stats.summary()}; {len(val_encoded):,} held out for validation", context)
        reference: nn.Module | None = None
        train_reference = val_reference = None
        if precompute_reference:
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
        loss = DPOLoss(beta, label_smoothing, loss_type, reference)
        trainer = Trainer(
            model, train_config, start.out_dir, batches, loss, context=context, device=device,
            tokenizer_dir=start.source, resume_from=start.checkpoint, write_model=start.write_model,
            checkpoint_info=start.checkpoint_info(
                "dpo", data=[str(p) for p in as_path_list(data)] if data is not None else f"tasks:{tasks}",
                dpo={"beta": beta, "label_smoothing": label_smoothing, "loss_type": loss_type}),
        )
        if not precompute_reference and start.lora.enabled:
            # LoRA leaves the base weights untouched: they are the reference, shared, not copied
            loss.reference = base_model_view(trainer.raw_model).eval().requires_grad_(False)
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary.update(final_metrics(start.out_dir, ("val_preference_accuracy", "val_reward_margin",
                                                 "val_chosen_reward", "val_rejected_reward")))
    summary["data"] = {**dataclasses.asdict(stats), "val_pairs": len(val_encoded), "description": description}
    return summary
