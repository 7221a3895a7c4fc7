"""The distillation stage: a student learns from a teacher's full output distribution.

Knowledge distillation (Hinton et al. 2015): besides the one right token (the hard label),
the teacher's probabilities say which other tokens were plausible. Both models' logits are
softened by a temperature T, and the student minimises

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross-entropy(student, hard labels)

on the assistant tokens of chat data (the same batches and loss mask as SFT). The T^2 keeps
the soft term's gradients on the same scale whatever the temperature. The teacher is any
acornlm checkpoint with the same tokenizer; it stays frozen, in evaluation mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acornlm.accel import accelerate
from acornlm.data.conversations import load_conversations, split_conversations
from acornlm.data.sft import IGNORE_INDEX, SFTBatches, encode_conversations
from acornlm.errors import ConfigError
from acornlm.model import Transformer
from acornlm.model.checkpoint import resolve_checkpoint
from acornlm.model.lora import LoraConfig, load_model_with_adapter
from acornlm.paths import as_path_list
from acornlm.tokenizer import Tokenizer, load_tokenizer
from acornlm.train import distributed
from acornlm.train.config import TrainConfig
from acornlm.train.losses import distillation_kl, masked_cross_entropy
from acornlm.train.stage import MeanMetrics, ResumeMode, build_policy, final_metrics, resolve_start
from acornlm.train.trainer import Trainer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      mask: torch.Tensor, temperature: float = 1.0, alpha: float = 0.5) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * hard-label cross-entropy (Hinton et al. 2015)."""
    soft = distillation_kl(student_logits, teacher_logits, mask, temperature)
    if alpha == 1.0:
        return soft
    return alpha * soft + (1 - alpha) * masked_cross_entropy(student_logits, targets, mask)


def check_distill_settings(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"--distill.temperature must be > 0 (typical: 1 to 4), got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"--distill.alpha must be in [0, 1] (1 = teacher only, 0 = labels only), got {alpha}")


@dataclass
class DistillConfig:
    """Distillation's own settings (`--distill.alpha 0.7`; defaults: acornlm/train/defaults/distill.yaml).

    Args:
        temperature: Softens both distributions (T > 1 shows more of the teacher's ranking of wrong tokens).
        alpha: Weight of the teacher term; 1 - alpha weighs the hard-label cross-entropy.
    """

    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_distill_settings(self.temperature, self.alpha)


# --- the stage: SFT's batches, this loss ---

class DistillationLoss:
    """The Trainer's loss function for distillation; the teacher runs here, without gradients.

    Batches are SFT's (inputs, targets with IGNORE_INDEX off the assistant tokens). Logits are
    compared over the tokenizer's ids only, so a model whose vocabulary is padded still fits.
    Logs the two terms (kl, hard_loss) besides the mixed loss.
    """

    def __init__(self, teacher: nn.Module, vocab_size: int, temperature: float = 2.0, alpha: float = 0.5) -> None:
        check_distill_settings(temperature, alpha)
        self.teacher = teacher.eval().requires_grad_(False)
        self.vocab_size, self.temperature, self.alpha = vocab_size, temperature, alpha
        self.metrics = MeanMetrics()

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        if self.teacher.lm_head.weight.device != inputs.device:
            self.teacher.to(inputs.device)
        mask = targets != IGNORE_INDEX
        student_logits = model(inputs)[..., :self.vocab_size]
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)[..., :self.vocab_size]
        soft = distillation_kl(student_logits, teacher_logits, mask, self.temperature)
        hard = masked_cross_entropy(student_logits, targets, mask)
        self.metrics.add(model.training, {"kl": soft.detach(), "hard_loss": hard.detach()})
        return self.alpha * soft + (1 - self.alpha) * hard

    def pop_metrics(self, training: bool) -> dict[str, float]:
        return self.metrics.pop(training)


def load_teacher(teacher: str | Path, tokenizer: Tokenizer) -> tuple[Transformer, Path]:
    """The teacher model (with its LoRA adapter if it has one), checked to share the student's tokenizer."""
    path = resolve_checkpoint(teacher)
    teacher_tokenizer = load_tokenizer(path)
    if teacher_tokenizer.fingerprint != tokenizer.fingerprint:
        raise ConfigError(f"the teacher {path} uses another tokenizer ({teacher_tokenizer.fingerprint[:16]}) than "
                          f"the student ({tokenizer.fingerprint[:16]}): their logits are over different tokens. "
                          "Distil into a student built with the teacher's tokenizer")
    model, _ = load_model_with_adapter(path, device="cpu")
    return accelerate(model), path


def run_distill(data: str | Path | Sequence[str | Path], teacher: str | Path | None, init: str | Path | None,
                out: str | Path, train_config: TrainConfig, lora: LoraConfig | None = None, *,
                distill: DistillConfig | None = None, data_format: str = "auto",
                val_data: str | Path | Sequence[str | Path] | None = None, val_fraction: float = 0.05,
                packing: bool = False, truncation: str = "truncate", resume: ResumeMode = False) -> dict[str, Any]:
    """Distil the checkpoint `teacher` into the student `init` on the chat data in `data`.

    Returns the Trainer's summary plus the final "val_kl" and "val_hard_loss". On --resume the
    teacher recorded in the run is used unless another one is given.
    """
    distill = distill or DistillConfig()
    start = resolve_start(init, out, resume, lora, train_config)
    teacher = teacher or start.info.get("teacher")
    if teacher is None:
        raise ConfigError("--teacher is required: the checkpoint whose outputs the student learns")
    teacher_model, teacher_path = load_teacher(teacher, start.tokenizer)

    conversations, load_stats = load_conversations(as_path_list(data), data_format)
    if val_data is not None:
        train_chats, (val_chats, _) = conversations, load_conversations(as_path_list(val_data), data_format)
    else:
        train_chats, val_chats = split_conversations(conversations, val_fraction, train_config.seed)
    max_tokens = train_config.seq_len + 1  # a row's last token is only a target
    train_examples, encode_stats = encode_conversations(start.tokenizer, train_chats, max_tokens, truncation)
    val_examples, _ = encode_conversations(start.tokenizer, val_chats, max_tokens, truncation)

    context, device = distributed.setup(train_config.device)
    try:
        distributed.log(f"distill data: {load_stats.summary()}", context)
        distributed.log(f"distill data: {encode_stats.summary()}; {len(val_examples):,} held out", context)
        distributed.log(f"distill: teacher {teacher_path} ({teacher_model.num_params():,} parameters)", context)
        model = build_policy(start, train_config, context, "distill")
        batches = SFTBatches(train_examples, val_examples, batch_size=train_config.batch_size,
                             seed=train_config.seed, row_tokens=max_tokens, packing=packing,
                             pad_id=start.tokenizer.eot_id, grad_accum_steps=train_config.grad_accum_steps,
                             rank=context.rank, world_size=context.world_size)
        loss = DistillationLoss(teacher_model, start.tokenizer.vocab_size, distill.temperature, distill.alpha)
        trainer = Trainer(
            model, train_config, start.out_dir, batches, loss, context=context, device=device,
            tokenizer_dir=start.source, resume_from=start.checkpoint, write_model=start.write_model,
            checkpoint_info=start.checkpoint_info(
                "distill", data=[str(p) for p in as_path_list(data)], teacher=str(teacher_path),
                distill=dataclasses.asdict(distill)),
        )
        summary = trainer.fit()
    finally:
        distributed.teardown()
    summary.update(final_metrics(start.out_dir, ("val_kl", "val_hard_loss")))
    summary["data"] = {"load": dataclasses.asdict(load_stats), "encode": dataclasses.asdict(encode_stats),
                       "val_examples": len(val_examples)}
    return summary
