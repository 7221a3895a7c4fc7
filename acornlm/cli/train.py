"""`acornlm train ...`: training stages (pretraining now; fine-tuning stages join later)."""

from __future__ import annotations

import dataclasses
import sys

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig
from acornlm.train.config import TrainConfig


def _unvalidated(cls: type, **overrides):
    """A dataclass instance holding the field defaults *without* running __post_init__.

    jsonargparse takes the defaults of `--model.*` from this instance. A validated ModelConfig()
    would already have derived num_key_value_heads=8 and head_dim=64 from the default 8 heads,
    so `--model.num_attention_heads 6` (or a preset without num_key_value_heads) would keep the
    stale 8 and fail. Left at 0, they are derived from the user's values when jsonargparse
    builds the real, validated ModelConfig.
    """
    instance = cls.__new__(cls)
    for field in dataclasses.fields(cls):
        setattr(instance, field.name, overrides.get(field.name, field.default))
    return instance


DEFAULT_MODEL = _unvalidated(ModelConfig, vocab_size=0)
DEFAULT_TRAIN = TrainConfig()


def pretrain(data: str | None = None, out: str | None = None, model: ModelConfig = DEFAULT_MODEL,
             train: TrainConfig = DEFAULT_TRAIN, resume: bool = False, init: str | None = None) -> None:
    """Pretrain a language model from zero on prepared data (next-token prediction).

    Writes OUT/checkpoints/step-NNNNNNN/ (+ `latest` and `best` pointers), OUT/metrics.jsonl and
    OUT/loss_curve.png. Start with a preset: `--config tiny` (seconds), `--config cpu-demo`
    (minutes on a CPU); any field can then be overridden, e.g. `--train.max_steps 500`.
    Data-parallel on several GPUs or processes: `torchrun --nproc_per_node N -m acornlm train pretrain ...`.
    On Linux the process reuses the memory a step frees instead of returning it to the OS (faster CPU
    steps, peak memory held until exit); ACORNLM_KEEP_FREED_MEMORY=0 turns that off.

    Args:
        data: Prepared data directory from `acornlm data prepare` (train.bin, val.bin, meta.json, tokenizer/).
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        model: Model shape and family (see `--model PRESET` or the `model:` section of --config).
        train: Optimisation, schedule, evaluation, checkpointing and logging.
        resume: Continue the run in OUT from checkpoints/latest (weights, optimizer, data position, RNG);
            the model comes from the checkpoint. Starts fresh when OUT has no checkpoint yet.
        init: Start from this checkpoint's weights instead of random ones (continued pretraining, e.g. of a
            model from `acornlm import hf`); DATA must be prepared with its tokenizer
            (`acornlm data prepare --tokenizer CKPT`). The model options then come from the checkpoint.
    """
    from acornlm.train.pretrain import run_pretrain

    if data is None:
        raise ConfigError("--data is required: a directory made by `acornlm data prepare`")
    if out is None:
        raise ConfigError("--out is required: the run directory for checkpoints and metrics")
    model = dataclasses.replace(model)  # validated, with derived fields filled in
    summary = run_pretrain(data, out, model, train, resume=resume, init=init)
    if summary["rank"] != 0:
        return
    print(format_summary(summary), file=sys.stderr)


def format_summary(summary: dict) -> str:
    """A few human-readable lines about a finished run."""
    def number(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"params {summary['params']:,} | steps {summary['steps']:,} | tokens seen {summary['tokens_seen']:,}",
        f"val loss {number(summary['val_loss'], '.4f')} | val ppl {number(summary['val_ppl'], '.2f')} | "
        f"val bits/byte {number(summary['val_bpb'], '.4f')}",
        f"{number(summary['tokens_per_s'], ',.0f')} tokens/s | MFU {number(summary['mfu'], '.1%')} | "
        f"wall time {summary['wall_time_s']:.1f} s | skipped steps {summary['skipped_steps']}",
    ]
    if summary.get("stopped_early"):
        lines.append("stopped early: the train.max_minutes budget was reached")
    if summary.get("checkpoint"):
        lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
