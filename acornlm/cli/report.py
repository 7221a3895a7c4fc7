"""`acornlm report RUN_DIR... --out DIR`: one report card for the runs of a project."""

from __future__ import annotations

from acornlm.errors import ConfigError


def report(runs: list[str] | None = None, out: str | None = None, x_axis: str = "step") -> None:
    """Write the report card of runs, `acornlm report RUN_DIR... --out DIR`: OUT/report.md and OUT/report.html.

    The page shows the tokenizer's compression (bytes/token of the
    prepared data), the loss and validation curves of every stage on one figure, val loss and bits/byte,
    accuracies before and after each stage (eval.json), tokens/s and MFU, samples (samples.json) and the
    HF export check (export.json), as far as the runs recorded them; the rest says "not recorded".
    report.md refers to OUT/loss_curves.png; report.html has the figure inside it: one file to share.
    The runs are only read.

    Args:
        runs: Run directories written by `acornlm train ...` or `acornlm demo` (e.g. runs/demo/run runs/demo/sft),
            in the order the stages ran; a project directory such as the demo's OUT stands for the runs in it.
        out: Directory for report.md, report.html and loss_curves.png (created; other files in it are kept).
        x_axis: X axis of the loss curves: "step" or "tokens" (tokens seen).
    """
    from acornlm.eval.report import REPORT_MD, build_report

    if not runs:
        raise ConfigError("give one or more run directories: acornlm report RUN_DIR... --out DIR")
    if out is None:
        raise ConfigError("--out is required: the directory to write report.md and report.html to")
    page = build_report(runs, out, x_axis=x_axis)
    print(f"wrote {page.with_name(REPORT_MD)} and {page}", flush=True)
