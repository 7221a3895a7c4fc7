"""`acornlm report`: one report card for a project's runs, in markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import json
import re
import statistics

import pytest

from acornlm.cli import main, normalize_argv
from acornlm.cli.finetune_pipeline import PipelineSettings, run_pipeline
from acornlm.errors import ConfigError
from acornlm.eval.report import (
    EVAL_FILE,
    LOSS_FIGURE,
    REPORT_HTML,
    REPORT_MD,
    build_report,
    collect_runs,
    write_export,
    write_samples,
    x_offsets,
)
from acornlm.train.config import TrainConfig
from acornlm.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

PRETRAIN_STEPS = 4


@pytest.fixture(scope="module")
def project(tmp_path_factory, prepared_data):
    """A real, tiny project: 4 pretraining steps (the CLI), then SFT through the fine-tuning pipeline
    (which writes eval.json), plus the samples and export records the demo writes."""
    root = tmp_path_factory.mktemp("project")
    run = root / "run"
    main(["train", "pretrain", "--config", "tiny", "--data", str(prepared_data), "--out", str(run),
          "--train.max_steps", str(PRETRAIN_STEPS), "--train.eval_interval", "2", "--train.save_interval", "2",
          "--train.progress", "false", "--train.device", "cpu"])
    sft = TrainConfig(max_steps=3, batch_size=2, seq_len=64, warmup_steps=1, eval_interval=0, eval_batches=1,
                      save_interval=0, log_interval=1, progress=False, device="cpu")
    settings = PipelineSettings(sft_train=sft, grpo_train=sft, dpo_train=sft, sft_tasks="arithmetic,reverse",
                                sft_examples=8, eval_examples=2)
    run_pipeline(root, run, settings, stages=("sft",), log=lambda message: None)
    write_samples(run, [{"prompt": "The king", "before training": " <b>x</b> & y", "after training": " speaks"}],
                  "temperature 0.8, top-k 50")
    write_export(run, {"out": str(root / "hf"), "architecture": "LlamaForCausalLM", "dtype": "float32",
                       "parameters": 123456, "verification": {"transformers_version": "4.99", "prompt_tokens": 9,
                                                              "logits_max_abs_diff": 2e-6, "greedy_tokens": 32,
                                                              "greedy": "identical"}})
    return root


def test_normalize_argv_turns_positional_runs_into_the_runs_option():
    assert normalize_argv(["report", "runs/a", "runs/b", "--out", "o"]) == [
        "report", "--runs", json.dumps(["runs/a", "runs/b"]), "--out", "o"]
    assert normalize_argv(["report", "--help"]) == ["report", "--help"]


def test_report_shows_every_stage_with_the_numbers_it_logged(project, prepared_data, tmp_path, capsys):
    out = tmp_path / "card"
    main(["report", str(project / "run"), str(project / "sft"), "--out", str(out)])
    assert str(out / REPORT_HTML) in capsys.readouterr().out
    md = (out / REPORT_MD).read_text(encoding="utf-8")
    for heading in ("## Runs", "## Tokenizer", "## Loss and validation", "## Accuracy before and after each stage",
                    "## Throughput", "## Samples: run (pretrain)", "## Export"):
        assert heading in md
    assert f"![training and validation loss of every stage]({LOSS_FIGURE})" in md
    assert (out / LOSS_FIGURE).read_bytes().startswith(b"\x89PNG")

    # tokenizer compression, from the data directory the pretraining run recorded
    meta = json.loads((prepared_data / "meta.json").read_text())
    for split in ("train", "val"):
        counts = meta[split]
        assert f"| {split} | {counts['documents']:,} | {counts['bytes']:,} | {counts['tokens']:,} | " \
               f"{counts['bytes'] / (counts['tokens'] - counts['documents']):.2f} |" in md

    # the final validation numbers are the last ones in metrics.jsonl
    records = read_metrics(project / "run" / "metrics.jsonl")
    last_val = [r for r in records if "val_loss" in r][-1]
    row = next(line for line in md.splitlines() if line.startswith("| run | pretrain | 4 |"))
    assert f"{last_val['val_loss']:.4f}" in row and f"{last_val['val_bpb']:.4f}" in row
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    assert f"{statistics.median(speeds):,.0f}" in md

    # accuracies before and after SFT, as the pipeline recorded them in eval.json
    evaluation = json.loads((project / "sft" / EVAL_FILE).read_text())["evaluations"][0]
    assert set(evaluation["before"]) == {"arithmetic", "reverse"}
    assert "| task | before sft | after sft |" in md
    for task in ("arithmetic", "reverse"):
        assert f"| {task} | {evaluation['before'][task]:.3f} | {evaluation['after'][task]:.3f} |" in md

    assert "verified with transformers 4.99" in md and "LlamaForCausalLM" in md
    assert "## Benchmarks" in md and "eval bench --out RUN/bench/NAME.json" in md  # none saved yet


def test_benchmark_scores_saved_in_runs_sit_side_by_side(project, tmp_path):
    for run, accuracy in (("run", 0.25), ("sft", 0.375)):
        (project / run / "bench").mkdir(exist_ok=True)
        (project / run / "bench" / "ceval.json").write_text(json.dumps(
            {"accuracy": accuracy, "stderr": 0.125, "n": 8, "method": "letter", "shots": 5}))
    (project / "sft" / "bench" / "broken.json").write_text("{not json")
    try:
        with pytest.warns(UserWarning, match="broken.json: skipped"):
            build_report([project / "run", project / "sft"], tmp_path / "card")
        md = (tmp_path / "card" / REPORT_MD).read_text(encoding="utf-8")
        assert "| benchmark | method | run | sft |" in md
        assert "| ceval | letter, 5-shot | 0.250 ± 0.125 (n=8) | 0.375 ± 0.125 (n=8) |" in md
        assert "broken" not in md.split("## Benchmarks")[1].split("##")[0]
    finally:
        for run in ("run", "sft"):
            for file in (project / run / "bench").iterdir():
                file.unlink()
            (project / run / "bench").rmdir()
    assert "The king <b>x</b> & y" in md


def test_html_is_self_contained_and_escapes_every_text(project, tmp_path):
    page = build_report([project / "run", project / "sft"], tmp_path)
    text = page.read_text(encoding="utf-8")
    assert 'src="http' not in text and "<script" not in text and "<link" not in text
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert embedded and base64.b64decode(embedded.group(1)) == (tmp_path / LOSS_FIGURE).read_bytes()
    assert "The king &lt;b&gt;x&lt;/b&gt; &amp; y" in text and "<b>x</b>" not in text


def test_a_stage_continues_on_the_shared_axis_from_the_checkpoint_it_started_from(project):
    runs = collect_runs([project / "run", project / "sft"])
    assert x_offsets(runs, "step") == [0.0, float(PRETRAIN_STEPS)]
    tokens = [r["tokens_seen"] for r in runs[0].records if r["step"] == PRETRAIN_STEPS][0]
    assert x_offsets(runs, "tokens") == [0.0, float(tokens)]
    assert x_offsets(runs[1:], "step") == [0.0]  # without its parent in the report, a stage starts at 0


def test_a_project_directory_stands_for_its_runs_in_the_order_they_ran(project, tmp_path):
    assert [run.label for run in collect_runs([project])] == ["run", "sft"]
    md = build_report([project], tmp_path, x_axis="tokens").with_name(REPORT_MD).read_text(encoding="utf-8")
    assert md.index("| run | pretrain |") < md.index("| sft | sft |")


def test_a_partial_run_still_gets_a_report_and_malformed_lines_are_named(tmp_path):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    lines = [json.dumps({"step": 1, "loss": 5.0, "tokens_seen": 64}), '{"step": 2, "loss": 4.', "[1, 2]",
             json.dumps({"step": 3, "loss": 4.5, "val_loss": 4.75, "tokens_seen": 192, "tokens_per_s": None})]
    (crashed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.warns(UserWarning) as caught:
        page = build_report([crashed, empty], tmp_path / "card")
    messages = [str(warning.message) for warning in caught]
    assert any(f"{crashed / 'metrics.jsonl'}:2: skipped a malformed metrics line" in m for m in messages)
    assert any(f"{crashed / 'metrics.jsonl'}:3: skipped a metrics line that is not a JSON object" in m
               for m in messages)
    md = page.with_name(REPORT_MD).read_text(encoding="utf-8")
    assert "4.7500" in md and "not recorded" in md
    assert "| crashed | not recorded | 3 | 4.5000 | 4.7500 |" in md

    page = build_report([empty], tmp_path / "empty-card")  # no metrics at all: no figure, still a page
    assert "Loss curves: not recorded" in page.with_name(REPORT_MD).read_text(encoding="utf-8")
    assert "<img" not in page.read_text(encoding="utf-8")


def test_bad_paths_are_config_errors_naming_the_path(tmp_path, capsys):
    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, words in ((tmp_path / "missing", "does not exist"), (tmp_path / "file.txt", "is not a directory"),
                        (not_a_run, "holds no acornlm run")):
        with pytest.raises(ConfigError, match=words) as error:
            build_report([path], tmp_path / "out")
        assert str(path) in str(error.value)
    with pytest.raises(SystemExit) as exit_code:
        main(["report", str(not_a_run), "--out", str(tmp_path / "out")])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.startswith(f"acornlm: error: {not_a_run} holds no acornlm run")
    with pytest.raises(SystemExit):
        main(["report", "--out", str(tmp_path / "out")])
    assert "give one or more run directories" in capsys.readouterr().err
