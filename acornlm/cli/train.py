"""`acornlm train ...`: training stages (pretraining now; fine-tuning stages join later)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig
from acornlm.train.config import TrainConfig
from acornlm.train.signals import StopOnSignal, exit_status, signal_named


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
             train: TrainConfig = DEFAULT_TRAIN, resume: bool | Literal["auto"] = False, init: str | None = None,
             dry_run: bool = False) -> None:
    """Pretrain a language model from zero on prepared data (next-token prediction).

    Writes OUT/checkpoints/step-NNNNNNN/ (+ `latest` and `best` pointers), OUT/metrics.jsonl and
    OUT/loss_curve.png. Start with a preset: `--config tiny` (seconds), `--config cpu-demo`
    (minutes on a CPU); any field can then be overridden, e.g. `--train.max_steps 500`.
    Data-parallel on several GPUs or processes: `torchrun --nproc_per_node N -m acornlm train pretrain ...`.
    On Linux the process reuses the memory a step frees instead of returning it to the OS (faster CPU
    steps, peak memory held until exit); ACORNLM_KEEP_FREED_MEMORY=0 turns that off.
    Ctrl-C or SIGTERM (a reclaimed spot instance, `docker stop`, a scheduler) finishes the current
    step, saves a checkpoint and exits with status 130 (SIGINT) or 143 (SIGTERM); rerun the same
    command with `--resume auto` to continue. A second Ctrl-C aborts at once, without saving.

    Args:
        data: Prepared data directory from `acornlm data prepare` (train-*.bin and val-*.bin shards, meta.json, tokenizer/).
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        model: Model shape and family (see `--model PRESET` or the `model:` section of --config).
        train: Optimisation, schedule, evaluation, checkpointing and logging.
        resume: true or auto: continue the run in OUT from checkpoints/latest (weights, optimizer, data
            position, RNG; the model comes from the checkpoint), or start fresh when OUT has no checkpoint
            yet, so one command line serves the first start and every restart. false: refuse an OUT
            that already holds a run. A bare `--resume` means true.
            Ctrl-C or SIGTERM stops a run after the current step with a checkpoint (exit status 130 / 143).
        init: Start from this checkpoint's weights instead of random ones (continued pretraining, e.g. of a
            model from `acornlm import hf`); DATA must be prepared with its tokenizer
            (`acornlm data prepare --tokenizer CKPT`). The model options then come from the checkpoint.
        dry_run: Print the plan of this run (memory per rank and its breakdown, the largest batch that fits,
            tokens/s, time and cost; see `acornlm plan`) for the device it would use, and exit without
            building anything or touching OUT.
    """
    from acornlm.train.pretrain import run_pretrain

    if data is None:
        raise ConfigError("--data is required: a directory made by `acornlm data prepare`")
    if dry_run:
        from acornlm.train.plan import dry_run_plan, format_plan

        print(format_plan(dry_run_plan(data, dataclasses.replace(model), train)))
        return
    if out is None:
        raise ConfigError("--out is required: the run directory for checkpoints and metrics")
    model = dataclasses.replace(model)  # validated, with derived fields filled in
    with StopOnSignal():  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        summary = run_pretrain(data, out, model, train, resume=resume, init=init)
    if summary["rank"] == 0:
        print(format_summary(summary), file=sys.stderr)
    exit_if_stopped(summary)


def exit_if_stopped(summary: dict) -> None:
    """Exit with 128 + the signal's number (130 Ctrl-C, 143 SIGTERM) when a signal stopped the run.

    That is what a shell reports for a process a signal ended, so a retry loop or a scheduler
    sees "not finished, rerun with --resume auto" (a run that reached train.max_steps exits 0),
    and every rank of a torchrun job exits alike.
    """
    name = summary.get("stopped_by_signal")
    if name:
        sys.exit(exit_status(signal_named(name)))


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
    if summary.get("stopped_by_signal"):
        lines.append(f"stopped by {summary['stopped_by_signal']} at step {summary['steps']:,}: "
                     "rerun the same command with --resume auto to continue")
    if summary.get("checkpoint"):
        lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
