"""Where training numbers go: metrics.jsonl (always), TensorBoard, wandb and SwanLab (optional),
and a loss-curve PNG at the end. Only rank 0 creates a MetricsLog.

metrics.jsonl holds one JSON object per logged step. Every field except the timing ones is a
deterministic function of the run, so a resumed run's file matches an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from acornlm.errors import CheckpointError, ConfigError, DiskFullError
from acornlm.files import atomic_write_text, is_out_of_space
from acornlm.train.gpu_stats import GPU_MEMORY_FIELDS

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
SWANLAB_DIR = "swanlog"
# Fields that depend on the machine's speed (and, on a GPU, its allocator), not on the run's arithmetic.
TIMING_FIELDS = ("tokens_per_s", "mfu", "elapsed_s", *GPU_MEMORY_FIELDS)


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """Appends records to metrics.jsonl and mirrors them to TensorBoard / wandb / SwanLab when asked."""

    def __init__(self, run_dir: str | Path, resume_step: int | None, tensorboard: bool = False,
                 wandb: bool = False, config: dict[str, Any] | None = None, swanlab: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._start_file(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(config or {}) if wandb else None
        self._swanlab = self._open_swanlab(config or {}) if swanlab else None

    def _start_file(self, resume_step: int | None) -> None:
        """A fresh run starts an empty file; a resumed run keeps only lines up to its checkpoint,
        because the steps after it are about to be recomputed."""
        if resume_step is None:
            atomic_write_text(self.path, "")
            return
        kept = [r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "train.tensorboard needs the tensorboard package: pip install 'acornlm[tensorboard]' "
                "(or drop --train.tensorboard)") from exc
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _open_wandb(self, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(
                "train.wandb needs the wandb package: pip install 'acornlm[wandb]' (or drop --train.wandb)"
            ) from exc
        return wandb.init(mode="offline", dir=str(self.run_dir), project="acornlm", config=config)

    def _open_swanlab(self, config: dict[str, Any]):
        """A SwanLab run in offline mode under RUN/swanlog: written locally, uploaded later (if ever)
        with `swanlab sync RUN/swanlog/run-*`. Offline, not "local": since swanlab 0.10 local mode needs
        the separate dashboard package (swanlab[dashboard]), offline needs nothing more. `logdir` and
        `experiment_name` are the older API's names, which swanlab 0.10 still accepts."""
        try:
            import swanlab
        except ImportError as exc:
            raise ConfigError(
                "train.swanlab needs the swanlab package: pip install 'acornlm[swanlab]' (or drop --train.swanlab)"
            ) from exc
        return swanlab.init(mode="offline", logdir=str(self.run_dir / SWANLAB_DIR), project="acornlm",
                            experiment_name=self.run_dir.name, config=config)

    def write(self, record: dict[str, Any]) -> None:
        record = {key: _clean(value) for key, value in record.items()}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # a killed run keeps every line it logged
        except OSError as exc:  # a full disk between checkpoints: one clear line, not a traceback
            error = DiskFullError if is_out_of_space(exc) else CheckpointError
            raise error(f"could not append to {self.path} ({exc.strerror or exc}); the checkpoints written so far "
                        "are intact: free space (or fix permissions), then rerun with --resume") from exc
        step = record["step"]
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._swanlab is not None:
            self._swanlab.log(numbers, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._swanlab is not None:
            self._swanlab.finish()


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Train and validation loss against step, as a PNG (matplotlib's file-only Agg canvas,
    without pyplot, so no global backend is switched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="val loss", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
