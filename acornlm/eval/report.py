"""The report card of a project: every stage's numbers on one page, report.md and a self-contained report.html.

    html = build_report(["runs/demo/run", "runs/demo/sft", "runs/demo/grpo"], "runs/demo/report")

A report only reads run directories, never changes them. From each run it takes what training wrote:

    metrics.jsonl                       loss, val loss, val bits/byte, tokens/s and MFU per logged step
    checkpoints/<latest>/config.json    the stage, the checkpoint it started from (init), the data directory
    DATA/meta.json                      bytes and tokens per split: the tokenizer's compression (bytes/token)

and three small files that nothing else records in a machine-readable form, written by the fine-tuning
pipeline and `acornlm demo` with the writers below:

    eval.json      accuracies before and after the stage          write_eval
    samples.json   samples from fixed prompts, before and after   write_samples
    export.json    the summary of an HF export and its check      write_export
    bench/*.json   benchmark scores: `acornlm eval bench --out RUN/bench/NAME.json`

A partial or old run (no checkpoint yet, no eval.json, a metrics line cut short by a crash) still gets a
report: what is missing says "not recorded". The page is built once as a list of sections (text, tables,
figures, code) and rendered twice, to markdown and to HTML, so the two always say the same.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acornlm.data.loader import META_FILE
from acornlm.errors import CheckpointError, ConfigError
from acornlm.files import atomic_path, atomic_write_json, atomic_write_text
from acornlm.model.checkpoint import CONFIG_FILE
from acornlm.train.checkpointing import (
    CHECKPOINTS_DIR,
    STEP_DIR,
    checkpoints_root,
    list_checkpoints,
    read_pointer,
)
from acornlm.train.metrics import METRICS_FILE
from acornlm.version import __version__

EVAL_FILE = "eval.json"
BENCH_DIR = "bench"  # `acornlm eval bench --out RUN/bench/NAME.json` puts a benchmark score on the card
SAMPLES_FILE = "samples.json"
EXPORT_FILE = "export.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LOSS_FIGURE = "loss_curves.png"
X_AXES = ("step", "tokens")
NOT_RECORDED = "not recorded"
TITLE = "acornlm report card"


# ---------------------------------------------------------------------------------------------
# the files a stage writes for the report
# ---------------------------------------------------------------------------------------------

def write_eval(run_dir: str | Path, evaluations: list[dict[str, Any]], **figures: Any) -> Path:
    """Record a stage's evaluations as RUN/eval.json (atomically), so the report can show them.

    Each evaluation is {"name": what was measured, "before": {item: value}, "after": {item: value}};
    an item may be missing on one side (a figure that only exists after the stage). `figures` keeps
    the stage's raw numbers next to them.
    """
    path = Path(run_dir) / EVAL_FILE
    atomic_write_json(path, {"evaluations": evaluations, **({"figures": figures} if figures else {})})
    return path


def write_samples(run_dir: str | Path, samples: list[dict[str, str]], settings: str = "") -> Path:
    """Record samples as RUN/samples.json: [{"prompt": ..., "before": ..., "after": ...}], with how they
    were drawn (temperature, top-k, ...). Keys other than "prompt" are shown in their order."""
    path = Path(run_dir) / SAMPLES_FILE
    atomic_write_json(path, {"settings": settings, "samples": samples})
    return path


def write_export(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Record the summary of `acornlm.export.hf.export_hf` (and its verification) as RUN/export.json."""
    path = Path(run_dir) / EXPORT_FILE
    atomic_write_json(path, summary)
    return path


# ---------------------------------------------------------------------------------------------
# reading runs: tolerant of anything a crash, an old version or a hand edit can leave behind
# ---------------------------------------------------------------------------------------------

def number(value: Any) -> float | None:
    """A finite int or float, else None (metrics.jsonl writes NaN/inf as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_json(path: Path) -> Any:
    """A JSON file's content; None when it is missing, and a warning when it cannot be read."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"{path}: skipped, not readable JSON ({exc})", UserWarning, stacklevel=2)
        return None


def read_metrics_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. Like the trainer's reader it skips a malformed line (a crash
    can cut the last one short), but it says so, naming the file and line."""
    if not path.is_file():
        return []
    records = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            warnings.warn(f"{path}:{line_number}: skipped a malformed metrics line ({exc.msg})", UserWarning,
                          stacklevel=2)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"{path}:{line_number}: skipped a metrics line that is not a JSON object", UserWarning,
                          stacklevel=2)
            continue
        records.append(record)
    return records


def checkpoint_info(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, or of a run's latest checkpoint when `path` is a run
    (or a pruned checkpoint of one); {} when there is none."""
    if (path / CONFIG_FILE).is_file():
        info = read_json(path / CONFIG_FILE)
        return info if isinstance(info, dict) else {}
    if path.parent.name == CHECKPOINTS_DIR:  # RUN/checkpoints/step-N, pruned since
        path = path.parent.parent
    try:
        latest = read_pointer(path)
    except (CheckpointError, OSError, ValueError):  # a pointer to a deleted checkpoint, or garbled: the newest one
        latest = None
    if latest is None:
        found = list_checkpoints(path)
        latest = found[-1][1] if found else None
    return checkpoint_info(latest) if latest is not None and (latest / CONFIG_FILE).is_file() else {}


@dataclass
class Run:
    """What one run directory recorded. Every field may be empty on a partial or old run."""

    path: Path
    label: str
    info: dict[str, Any] = field(default_factory=dict)           # config.json of the latest checkpoint
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    evaluation: dict[str, Any] | None = None                     # eval.json
    samples: dict[str, Any] | None = None                        # samples.json
    export: dict[str, Any] | None = None                         # export.json
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)  # bench/*.json by file stem

    @property
    def stage(self) -> str:
        stage = self.info.get("stage")
        return stage if isinstance(stage, str) and stage else NOT_RECORDED

    @property
    def title(self) -> str:
        """The run's name on the page, with its stage when the directory name does not say it."""
        return self.label if self.label == self.stage else f"{self.label} ({self.stage})"

    def last(self, key: str) -> float | None:
        """The last logged finite value of a metric."""
        values = self.values(key)
        return values[-1] if values else None

    def values(self, key: str) -> list[float]:
        return [value for record in self.records if (value := number(record.get(key))) is not None]


def is_run_dir(path: Path) -> bool:
    """A directory that training wrote into: metrics.jsonl or checkpoints/."""
    return (path / METRICS_FILE).is_file() or checkpoints_root(path).is_dir()


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories to report on, in the order given. A directory that is not a run itself but
    holds runs (a project such as the demo's OUT) stands for them, oldest metrics first, which is the
    order its stages ran. ConfigError for a path that is neither."""
    if not paths:
        raise ConfigError("give at least one run directory: acornlm report RUN_DIR... --out DIR")
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            hint = "does not exist" if not path.exists() else "is not a directory"
            raise ConfigError(f"{path} {hint}: pass run directories written by `acornlm train ...` or `acornlm demo`")
        if is_run_dir(path):
            runs = [path]
        else:
            runs = sorted((child for child in path.iterdir() if child.is_dir() and is_run_dir(child)),
                          key=lambda child: ((child / METRICS_FILE).stat().st_mtime
                                             if (child / METRICS_FILE).is_file() else 0.0, child.name))
        if not runs:
            raise ConfigError(f"{path} holds no acornlm run (no {METRICS_FILE} and no checkpoints/, nor any "
                              "subdirectory with them): pass a directory written by `acornlm train ...` or "
                              "`acornlm demo`")
        found += [run for run in runs if run.resolve() not in {f.resolve() for f in found}]
    return found


def read_run(path: Path, label: str) -> Run:
    """Everything a run directory recorded that the report shows."""
    def record(name: str) -> dict[str, Any] | None:
        content = read_json(path / name)
        return content if isinstance(content, dict) else None

    benchmarks = {}
    for file in sorted((path / BENCH_DIR).glob("*.json")) if (path / BENCH_DIR).is_dir() else []:
        content = read_json(file)
        if isinstance(content, dict) and number(content.get("accuracy")) is not None and "n" in content:
            benchmarks[file.stem] = content
    return Run(path=path, label=label, info=checkpoint_info(path), records=read_metrics_lines(path / METRICS_FILE),
               evaluation=record(EVAL_FILE), samples=record(SAMPLES_FILE), export=record(EXPORT_FILE),
               benchmarks=benchmarks)


def collect_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read every run; each is labelled by its directory name, or by its path when two names collide."""
    dirs = find_runs(paths)
    names = [d.name for d in dirs]
    return [read_run(d, d.name if names.count(d.name) == 1 else str(d)) for d in dirs]


# ---------------------------------------------------------------------------------------------
# how the runs relate: which run started from which, and where the tokenizer's data is
# ---------------------------------------------------------------------------------------------

def started_from(run: Run, runs: Sequence[Run]) -> tuple[int, int] | None:
    """(index in `runs`, step) of the checkpoint this run was initialised from, when it belongs to a
    run of the report: RUN/checkpoints/step-N names its step."""
    init = run.info.get("init")
    if not isinstance(init, str):
        return None
    init_path = Path(init).resolve()
    for index, other in enumerate(runs):
        if other is not run and init_path.is_relative_to(other.path.resolve()):
            match = STEP_DIR.match(init_path.name)
            return index, int(match.group(1)) if match else int(other.last("step") or 0)
    return None


def position(run: Run, step: int, axis: str) -> float:
    """A step of `run` on the x axis: the step itself, or the tokens seen by then."""
    if axis == "step":
        return float(step)
    seen = [number(r.get("tokens_seen")) for r in run.records if (number(r.get("step")) or 0) <= step]
    seen = [value for value in seen if value is not None]
    return seen[-1] if seen else 0.0


def x_offsets(runs: Sequence[Run], axis: str) -> list[float]:
    """Where each run starts on the shared x axis. A stage that started from a checkpoint of another
    run in the report continues from that checkpoint's position (SFT after pretraining, GRPO after SFT);
    any other run starts at 0, so unrelated runs overlay each other for comparison."""
    offsets: dict[int, float] = {}

    def offset(index: int, depth: int) -> float:
        if index not in offsets:
            parent = started_from(runs[index], runs) if depth < len(runs) else None  # depth: no cycle loops
            offsets[index] = 0.0 if parent is None else offset(parent[0], depth + 1) + position(
                runs[parent[0]], parent[1], axis)
        return offsets[index]

    return [offset(index, 0) for index in range(len(runs))]


def find_data_dir(run: Run) -> Path | None:
    """The prepared data directory (with meta.json) this run, or the run it started from, trained on.

    Pretraining records it in config.json as "data"; a fine-tuning stage records its "init" checkpoint,
    whose own config.json leads further back. A recorded relative path is tried as it is (relative to
    where training ran) and next to the run (the demo's layout: OUT/data beside OUT/run).
    """
    info, base = run.info, run.path
    for _ in range(16):  # a chain of stages; a loop in hand-edited files must not hang
        data = info.get("data")
        if isinstance(data, str) and data:
            for candidate in (Path(data), base.parent / Path(data).name):
                if (candidate / META_FILE).is_file():
                    return candidate
        init = info.get("init")
        if not isinstance(init, str) or not init:
            return None
        base = Path(init).parent.parent if Path(init).parent.name == CHECKPOINTS_DIR else Path(init)
        info = checkpoint_info(Path(init))
    return None


def compression(meta: dict[str, Any]) -> list[tuple[str, dict[str, Any], float]]:
    """(split, its meta, bytes per token) for each split with counts. As `acornlm data prepare` prints
    it: UTF-8 bytes / text tokens, the one <|endoftext|> per document not counted."""
    rows = []
    for split in ("train", "val"):
        counts = meta.get(split)
        if not isinstance(counts, dict):
            continue
        tokens, documents, size = (number(counts.get(key)) for key in ("tokens", "documents", "bytes"))
        if tokens and size:
            rows.append((split, counts, size / max(tokens - (documents or 0), 1)))
    return rows


# ---------------------------------------------------------------------------------------------
# the figure
# ---------------------------------------------------------------------------------------------

def plot_losses(runs: Sequence[Run], path: Path, axis: str = "step") -> Path | None:
    """Training loss (lines) and validation loss (markers) of every run on one pair of axes, one colour
    per run, each stage placed after the checkpoint it started from (see `x_offsets`). None, and no
    file, when no run logged a loss. Matplotlib's file-only Agg canvas: no pyplot, no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = "step" if axis == "step" else "tokens_seen"
    fig = Figure(figsize=(9, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for index, (run, offset) in enumerate(zip(runs, x_offsets(runs, axis))):
        colour = f"C{index % 10}"
        for metric, style in (("loss", {"linewidth": 1}), ("val_loss", {"marker": "o", "linestyle": "none"})):
            points = [(offset + x, y) for r in run.records
                      if (x := number(r.get(key))) is not None and (y := number(r.get(metric))) is not None]
            if points:
                name = "train loss" if metric == "loss" else "val loss"
                ax.plot(*zip(*points), color=colour, label=f"{run.title} {name}", **style)
                drawn = True
        if offset > 0:
            ax.axvline(offset, color=colour, linestyle=":", alpha=0.6)
    if not drawn:
        return None
    ax.set_xlabel("optimizer step" if axis == "step" else "tokens seen")
    ax.set_ylabel("loss (each stage's own objective)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ---------------------------------------------------------------------------------------------
# the page: sections of blocks, rendered to markdown and to HTML
# ---------------------------------------------------------------------------------------------

@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    file: str  # next to report.md; embedded in report.html
    alt: str


@dataclass
class Code:
    text: str


Block = Text | Table | Image | Code


@dataclass
class Section:
    title: str
    blocks: list[Block]
    level: int = 2


def fmt(value: Any, spec: str = ".4f") -> str:
    """A number for the page, or "not recorded"."""
    value = number(value)
    return NOT_RECORDED if value is None else format(value, spec)


def runs_section(runs: Sequence[Run]) -> Section:
    rows = []
    for run in runs:
        init = run.info.get("init")
        start = init if isinstance(init, str) else ("random weights" if run.stage == "pretrain" else NOT_RECORDED)
        model = run.info.get("model") if isinstance(run.info.get("model"), dict) else {}
        shape = (f"{model['num_hidden_layers']} layers, hidden {model['hidden_size']}, vocab {model['vocab_size']}"
                 if all(key in model for key in ("num_hidden_layers", "hidden_size", "vocab_size")) else NOT_RECORDED)
        rows.append([run.label, run.stage, str(run.path), start, shape])
    return Section("Runs", [Table(["run", "stage", "directory", "started from", "model"], rows)])


def tokenizer_section(runs: Sequence[Run]) -> Section:
    rows, seen = [], set()
    for run in runs:
        data = find_data_dir(run)
        if data is None or data.resolve() in seen:
            continue
        seen.add(data.resolve())
        meta = read_json(data / META_FILE)
        if not isinstance(meta, dict):
            continue
        tokenizer = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
        for split, counts, ratio in compression(meta):
            rows.append([str(data), str(tokenizer.get("kind", NOT_RECORDED)), fmt(tokenizer.get("vocab_size"), ",.0f"),
                         split, fmt(counts.get("documents"), ",.0f"),
                         fmt(counts.get("bytes"), ",.0f"), fmt(counts.get("tokens"), ",.0f"), f"{ratio:.2f}"])
    if not rows:
        kinds = sorted({f"{t.get('kind')} ({t.get('vocab_size')} tokens)" for run in runs
                        if isinstance(t := run.info.get("tokenizer"), dict)})
        known = f" The runs' tokenizer: {', '.join(kinds)}." if kinds else ""
        return Section("Tokenizer", [Text(f"Compression {NOT_RECORDED}: no run names a prepared data directory "
                                          f"(with {META_FILE}) that still exists.{known}")])
    return Section("Tokenizer", [
        Text("Compression of the prepared data: UTF-8 bytes per token (higher = each token carries more text; "
             "the <|endoftext|> between documents not counted)."),
        Table(["data", "tokenizer", "vocabulary", "split", "documents", "bytes", "tokens", "bytes/token"], rows)])


def loss_section(runs: Sequence[Run], figure: str | None, axis: str) -> Section:
    blocks: list[Block] = []
    if figure is None:
        blocks.append(Text(f"Loss curves: {NOT_RECORDED} (no run logged a loss in {METRICS_FILE})."))
    else:
        where = "optimizer steps" if axis == "step" else "tokens seen"
        blocks += [Image(figure, "training and validation loss of every stage"),
                   Text(f"x: {where}; a stage that started from another run's checkpoint continues from it "
                        "(dotted line). Lines: training loss; markers: validation loss. Each stage plots its own "
                        "objective (next-token cross entropy for pretraining and SFT, the DPO and GRPO losses "
                        "for those), so the levels of different stages are not comparable.")]
    rows = []
    for run in runs:
        val = run.values("val_loss")
        rows.append([run.label, run.stage, fmt(run.last("step"), ",.0f"), fmt(run.last("loss")),
                     fmt(run.last("val_loss")), fmt(min(val) if val else None), fmt(run.last("val_ppl"), ".2f"),
                     fmt(run.last("val_bpb"))])
    blocks.append(Table(["run", "stage", "steps", "final train loss", "final val loss", "best val loss",
                         "val perplexity", "val bits/byte"], rows))
    blocks.append(Text("Bits per byte = val loss / ln 2 x tokens / bytes of the validation text: comparable "
                       "across tokenizers. Only pretraining on prepared data knows the bytes."))
    return Section("Loss and validation", blocks)


def evaluation_sections(runs: Sequence[Run]) -> list[Section]:
    sections = []
    for run in runs:
        evaluations = (run.evaluation or {}).get("evaluations")
        blocks: list[Block] = []
        for evaluation in evaluations if isinstance(evaluations, list) else []:
            if not isinstance(evaluation, dict):
                continue
            before, after = (evaluation.get(side) if isinstance(evaluation.get(side), dict) else {}
                             for side in ("before", "after"))
            items = list(dict.fromkeys([*before, *after]))
            blocks += [Text(str(evaluation.get("name", "evaluation"))),
                       Table(["task", f"before {run.label}", f"after {run.label}"],
                             [[str(item), fmt(before.get(item), ".3f") if item in before else "-",
                               fmt(after.get(item), ".3f") if item in after else "-"] for item in items])]
        if blocks:
            sections.append(Section(run.title, blocks, level=3))
    if not sections:
        return [Section("Accuracy before and after each stage", [Text(f"{NOT_RECORDED} (no run has {EVAL_FILE}).")])]
    return [Section("Accuracy before and after each stage", [
        Text("Held-out evaluations recorded by the stages ('-': not measured on that side).")]), *sections]


def benchmark_section(runs: Sequence[Run]) -> Section:
    """Benchmark accuracy of every run side by side: one row per benchmark report, one column per
    run, so a stage's effect on C-Eval or MMLU reads along the row."""
    names = list(dict.fromkeys(name for run in runs for name in run.benchmarks))
    title = "Benchmarks"
    if not names:
        return Section(title, [Text(f"{NOT_RECORDED}: save `acornlm eval bench --out RUN/{BENCH_DIR}/NAME.json` "
                                    "in a run directory to show its score here.")])

    def cell(report: dict[str, Any] | None) -> str:
        if report is None:
            return "-"
        stderr = number(report.get("stderr"))
        return f"{fmt(report.get('accuracy'), '.3f')}" + (f" ± {stderr:.3f}" if stderr is not None else "") + \
            f" (n={report.get('n')})"

    rows = []
    for name in names:
        setup = next(run.benchmarks[name] for run in runs if name in run.benchmarks)
        how = f"{setup.get('method', '?')}, {setup.get('shots', '?')}-shot"
        rows.append([name, how, *(cell(run.benchmarks.get(name)) for run in runs)])
    return Section(title, [Text("Accuracy ± standard error from `acornlm eval bench` ('-': not run)."),
                           Table(["benchmark", "method", *(run.label for run in runs)], rows)])


def throughput_section(runs: Sequence[Run]) -> Section:
    rows = []
    for run in runs:
        speeds = [v for v in run.values("tokens_per_s") if v > 0]
        mfus = [v for v in run.values("mfu") if v > 0]
        rows.append([run.label, run.stage, fmt(run.last("tokens_seen"), ",.0f"),
                     fmt(statistics.median(speeds) if speeds else None, ",.0f"),
                     fmt(statistics.median(mfus) if mfus else None, ".1%"), fmt(run.last("elapsed_s"), ",.1f")])
    return Section("Throughput", [
        Text("Medians over the logged windows (training steps only, not evaluation or saving). MFU = model "
             "FLOPs per token x tokens/s / the measured matmul peak of the device."),
        Table(["run", "stage", "tokens seen", "tokens/s", "MFU", "wall time (s)"], rows)])


def samples_sections(runs: Sequence[Run]) -> list[Section]:
    sections = []
    for run in runs:
        samples = (run.samples or {}).get("samples")
        blocks: list[Block] = []
        for sample in samples if isinstance(samples, list) else []:
            if not isinstance(sample, dict) or not isinstance(sample.get("prompt"), str):
                continue
            prompt = sample["prompt"]
            blocks.append(Text(f"Prompt {prompt!r}"))
            for key, text in sample.items():
                if key != "prompt" and isinstance(text, str):
                    blocks += [Text(f"{key}:"), Code(prompt + text)]
        settings = (run.samples or {}).get("settings")
        if blocks:
            if isinstance(settings, str) and settings:
                blocks.insert(0, Text(settings))
            sections.append(Section(f"Samples: {run.title}", blocks))
    return sections or [Section("Samples", [Text(f"{NOT_RECORDED} (no run has {SAMPLES_FILE}).")])]


def describe_verification(check: Any) -> str:
    if not isinstance(check, dict):
        return "not verified (transformers was not installed, or verification was turned off)"
    return (f"verified with transformers {check.get('transformers_version', '?')}: logits max |diff| "
            f"{fmt(check.get('logits_max_abs_diff'), '.2g')} on {check.get('prompt_tokens', '?')} prompt tokens; "
            f"greedy {check.get('greedy_tokens', '?')} tokens: {check.get('greedy', '?')}")


def export_section(runs: Sequence[Run]) -> Section:
    rows = []
    for run in runs:
        export = run.export
        if export is None:
            continue
        out = export.get("out")
        present = isinstance(out, str) and (Path(out) / CONFIG_FILE).is_file()
        rows.append([run.label, f"{out} ({'present' if present else 'missing now'})",
                     str(export.get("architecture", NOT_RECORDED)), str(export.get("dtype", NOT_RECORDED)),
                     fmt(export.get("parameters"), ",.0f"), describe_verification(export.get("verification"))])
    if not rows:
        return Section("Export", [Text(f"{NOT_RECORDED} (no run has {EXPORT_FILE}).")])
    return Section("Export", [
        Text("Hugging Face transformers exports; verification loads the folder with transformers and compares "
             "its logits and greedy tokens with acornlm's."),
        Table(["run", "export directory", "architecture", "dtype", "parameters", "check"], rows)])


def report_sections(runs: Sequence[Run], figure: str | None, axis: str = "step") -> list[Section]:
    """The whole page, in the order a reader asks: what ran, the tokenizer, how training went, what the
    stages changed, how fast, what the model says, where it went."""
    return [runs_section(runs), tokenizer_section(runs), loss_section(runs, figure, axis),
            *evaluation_sections(runs), benchmark_section(runs), throughput_section(runs), *samples_sections(runs),
            export_section(runs)]


def fence(text: str) -> str:
    """A markdown code fence longer than any run of backticks in `text`."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", "", f"Written by acornlm {__version__}.", ""]
    for section in sections:
        lines += ["#" * section.level + " " + section.title, ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [block.text, ""]
            elif isinstance(block, Table):
                lines += ["| " + " | ".join(md_cell(h) for h in block.header) + " |",
                          "|" + "---|" * len(block.header)]
                lines += ["| " + " | ".join(md_cell(cell) for cell in row) + " |" for row in block.rows]
                lines.append("")
            elif isinstance(block, Image):
                lines += [f"![{block.alt}]({block.file})", ""]
            elif isinstance(block, Code):
                marks = fence(block.text)
                lines += [marks, block.text, marks, ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; }
"""


def render_html(title: str, sections: Sequence[Section], images: dict[str, bytes]) -> str:
    """One HTML file with nothing outside it: the figures as base64 data URIs, the style inline, and
    every piece of text escaped (samples and paths can hold anything)."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
             f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>",
             f"<p>Written by acornlm {esc(__version__)}.</p>"]
    for section in sections:
        parts.append(f"<h{section.level}>{esc(section.title)}</h{section.level}>")
        for block in section.blocks:
            if isinstance(block, Text):
                parts.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{esc(cell)}</th>" for cell in block.header)
                body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
                               for row in block.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Image) and block.file in images:
                data = base64.b64encode(images[block.file]).decode("ascii")
                parts.append(f'<figure><img alt="{esc(block.alt)}" src="data:image/png;base64,{data}"></figure>')
            elif isinstance(block, Code):
                parts.append(f"<pre><code>{esc(block.text)}</code></pre>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, x_axis: str = "step") -> Path:
    """Write OUT/report.md (with OUT/loss_curves.png next to it) and the self-contained OUT/report.html
    for the runs in `run_dirs` (in the order the stages ran; a project directory stands for the runs in it).

    Each file is published atomically; other files in OUT are left alone, so OUT may be a run directory.
    Returns the path of report.html. ConfigError for a path that holds no run, or a bad x_axis.
    """
    if x_axis not in X_AXES:
        raise ConfigError(f"unknown x axis {x_axis!r}: choose one of {', '.join(X_AXES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the report needs a directory (it writes {REPORT_MD} and "
                          f"{REPORT_HTML} into it)")
    runs = collect_runs(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_losses(runs, out / LOSS_FIGURE, x_axis)
    sections = report_sections(runs, figure.name if figure else None, x_axis)
    atomic_write_text(out / REPORT_MD, render_markdown(TITLE, sections))
    images = {figure.name: figure.read_bytes()} if figure else {}
    atomic_write_text(out / REPORT_HTML, render_html(TITLE, sections, images))
    return out / REPORT_HTML
