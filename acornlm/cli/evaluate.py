"""`acornlm eval bench|harness|ppl|contamination`: how good is the model, on standard benchmarks
and on your own text, and can the score be trusted (was the test in the training data)?"""

from __future__ import annotations

import difflib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from acornlm.data.corpus import iter_documents
from acornlm.errors import ConfigError
from acornlm.eval.agent import evaluate_agent
from acornlm.eval.bench import evaluate_benchmark, markdown_table
from acornlm.eval.benchmarks import Benchmark, hub_items, load_items
from acornlm.eval.contamination import check_contamination, contaminated_items
from acornlm.eval.perplexity import perplexity
from acornlm.export.hf_import import import_hf
from acornlm.files import atomic_write_json, atomic_write_text
from acornlm.infer.api import LanguageModel
from acornlm.model.checkpoint import load_model, read_json_config, resolve_checkpoint
from acornlm.tokenizer import load_tokenizer


def load_for_eval(ckpt: str, device: str = "auto", dtype: str | None = None) -> LanguageModel:
    """An acornlm checkpoint or run directory, or a Hugging Face model folder (e.g. `acornlm export hf`
    output, or a downloaded Llama/Qwen/GPT-2), which is imported into a temporary checkpoint first."""
    path = Path(ckpt)
    config = path / "config.json"
    if config.is_file():
        info = read_json_config(config)
        if not isinstance(info.get("model"), dict) and ("architectures" in info or "model_type" in info):
            with tempfile.TemporaryDirectory(prefix="acornlm-eval-") as tmp:
                imported = import_hf(path, Path(tmp) / "checkpoint")
                return LanguageModel.from_checkpoint(imported, device=device, dtype=dtype)
    return LanguageModel.from_checkpoint(path, device=device, dtype=dtype)


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def save_json(out: str | None, report: dict[str, Any]) -> None:
    """Write a command's report to --out (strict JSON, atomically) and say where."""
    if out:
        atomic_write_json(Path(out), json_safe(report))
        print(f"wrote {out}")


def read_benchmark(data: list[str] | None, format: str, split: str, dev: list[str] | None,
                   from_hub: str | None, subjects: list[str] | None, shots: int) -> Benchmark:
    if from_hub:
        if data:
            raise ConfigError("give either --data (local files) or --from_hub NAME, not both")
        return hub_items(from_hub, subjects or (), max(shots, 1))
    if not data:
        raise ConfigError("--data is required: benchmark files or folders (or --from_hub NAME when online)")
    benchmark = load_items(data, format, split, dev or ())
    if subjects:
        benchmark.items = [item for item in benchmark.items if item.subject in subjects]
        if not benchmark.items:
            raise ConfigError(f"no questions of subjects {subjects} in {', '.join(data)}")
    return benchmark


def bench(ckpt: str, data: list[str] | None = None, format: str = "auto", split: str = "auto",
          dev: list[str] | None = None, shots: int = 0, method: str = "likelihood", chat: bool = False,
          limit: int | None = None, subjects: list[str] | None = None, from_hub: str | None = None,
          exclude_contaminated: bool = False, train: list[str] | None = None, ngram: int = 13,
          threshold: float = 0.5, batch_size: int = 16, out: str | None = None, device: str = "auto",
          dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Score a model on multiple-choice benchmarks: C-Eval, CMMLU, MMLU, ARC, HellaSwag, PIQA, Winogrande.

    Prints a per-subject table (accuracy ± standard error) and writes the JSON report (`accuracy`,
    `n`, `subjects`, per-item predictions) to --out, with the table as a .md file beside it.

    Example: acornlm eval bench --ckpt runs/demo --data ceval-exam --shots 5 --method letter --out ceval.json

    Args:
        ckpt: acornlm checkpoint or run directory, or a Hugging Face model folder (e.g. an `acornlm export hf` output).
        data: Benchmark files or folders: C-Eval/CMMLU/MMLU csv folders (dev/val/test) or jsonl/json/parquet exports.
        format: auto (from the csv header or the records' keys), ceval, cmmlu, mmlu, arc, hellaswag, piqa or winogrande.
        split: In a folder with dev/val/test subfolders, the one to score; auto = test, or val when test has no answers.
        dev: Few-shot example files or folders, matched by subject (default: the dev/ folder beside each split).
        shots: Examples before each question (k-shot), the first k of its subject's dev split.
        method: likelihood (log p of each option's text; reports acc and acc_norm) or letter (log p of " A", " B", ... after the listed options).
        chat: Ask the question with the chat template (examples as earlier turns), for chat-tuned models.
        limit: Score only the first N questions of each subject (a quick look).
        subjects: Score only these subjects.
        from_hub: Download a benchmark with `datasets` (online): mmlu, arc, arc_easy, hellaswag, piqa, winogrande, ceval, cmmlu.
        exclude_contaminated: Also report the score without the questions found in --train (see `acornlm eval contamination`).
        train: Training corpus for --exclude_contaminated: text/jsonl/parquet files, folders, or a prepared data folder.
        ngram: n-gram length of the contamination check.
        threshold: An item whose n-grams are at least this fraction in the corpus counts as contaminated.
        batch_size: Inputs per forward pass.
        out: JSON report file (a .md table is written beside it).
        device: auto, cpu, cuda or mps.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's).
        progress: Show a progress bar.
    """
    if exclude_contaminated and not train:
        raise ConfigError("--exclude_contaminated needs --train: the training corpus to look in")
    benchmark = read_benchmark(data, format, split, dev, from_hub, subjects, shots)
    for note in benchmark.notes:
        print(note, file=sys.stderr)
    lm = load_for_eval(ckpt, device, dtype)
    run = evaluate_benchmark(lm, benchmark, shots=shots, method=method, chat=chat, batch_size=batch_size,
                             limit=limit, progress=progress)
    excluded = None
    contamination = None
    if exclude_contaminated:
        contamination = check_contamination([r.item for r in run.results], train or [], ngram, threshold)
        excluded = contaminated_items(contamination)
    report = json_safe({"checkpoint": str(ckpt), **run.report(excluded),
                        **({"contamination": {k: v for k, v in contamination.items() if k != "items"}}
                           if contamination else {})})
    table = markdown_table(report)
    print(table)
    print(f"{report['n']} questions in {report['seconds']:.1f} s ({report['questions_per_second']} questions/s)")
    if out:
        atomic_write_json(Path(out), report)
        atomic_write_text(Path(out).with_suffix(".md"), table)
        print(f"wrote {out} and {Path(out).with_suffix('.md')}")
    return report


def harness(ckpt: str, tasks: str, include_path: str | None = None, num_fewshot: int | None = None,
            limit: float | None = None, apply_chat_template: bool = False, batch_size: int = 16,
            seed: int = 0, out: str | None = None, device: str = "auto", dtype: str | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on an acornlm checkpoint (needs: pip install 'acornlm[eval]').

    Any lm-eval task works (hellaswag, arc_easy, ceval-valid, cmmlu, mmlu, wikitext, gsm8k, ...);
    the model answers through acornlm's own code (acornlm/eval/harness.py). Prints lm-eval's
    table and writes its results to --out.

    Example: acornlm eval harness --ckpt runs/demo --tasks arc_easy,hellaswag --limit 200 --out lm_eval.json

    Args:
        ckpt: acornlm checkpoint or run directory, or a Hugging Face model folder.
        tasks: Comma-separated lm-eval task or group names.
        include_path: A folder of extra lm-eval task YAMLs (your own tasks, local data), as lm-eval's --include_path.
        num_fewshot: Examples before each question (default: each task's own setting).
        limit: At most this many documents per task (a fraction when < 1).
        apply_chat_template: Render prompts with the model's chat template.
        batch_size: Inputs per forward pass.
        seed: Seed of lm-eval's few-shot sampling and of sampled generation.
        out: JSON file for the results.
        device: auto, cpu, cuda or mps.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's).
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from acornlm.eval.harness import AcornLM
    except ImportError as exc:
        raise ConfigError(f"`acornlm eval harness` needs lm-evaluation-harness ({exc}): "
                          "pip install 'acornlm[eval]'") from exc
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include_path {include_path} is not a folder of task YAMLs")
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks is empty; name lm-eval tasks, e.g. --tasks arc_easy,hellaswag")
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=5) for name in unknown}
        listed = "; ".join(f"{name} (close: {', '.join(close) or 'none'})" for name, close in hints.items())
        raise ConfigError(f"unknown lm-eval task(s): {listed}. lm-eval knows {len(manager.all_tasks)} tasks and groups; "
                          "list them with `lm-eval ls tasks`, or add your own with --include_path DIR")
    model = AcornLM(lm=load_for_eval(ckpt, device, dtype), batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, apply_chat_template=apply_chat_template,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    print(make_table(results))
    report = json_safe(json.loads(json.dumps(
        {"checkpoint": str(ckpt), "results": results.get("results", {}), "groups": results.get("groups", {}),
         "n-samples": results.get("n-samples", {}), "versions": results.get("versions", {}),
         "n-shot": results.get("n-shot", {})}, default=str)))
    if out:
        atomic_write_json(Path(out), report)
        print(f"wrote {out}")
    return report


def ppl(ckpt: str, input: list[str], window: int | None = None, stride: int | None = None, batch_size: int = 8,
        out: str | None = None, device: str = "auto", dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity and bits per byte of a model on your own text (sliding windows with a stride).

    Compare two models, or a model before and after fine-tuning, on the same files: bits per byte
    is comparable across tokenizers, perplexity only between models that share one.

    Example: acornlm eval ppl --ckpt runs/demo --input my_notes.txt --stride 128

    Args:
        ckpt: acornlm checkpoint or run directory, or a Hugging Face model folder.
        input: Text, jsonl ({"text": ...}) or parquet files, or folders of them; each document is scored on its own.
        window: Tokens per forward pass (default: the model's context).
        stride: New tokens scored per window (default: half the window); smaller = more context per token, slower.
        batch_size: Windows per forward pass.
        out: JSON file for the result.
        device: auto, cpu, cuda or mps.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's).
        progress: Show a progress bar.
    """
    lm = load_for_eval(ckpt, device, dtype)
    result = {"checkpoint": str(ckpt), "input": list(input),
              **perplexity(lm, (document.text for document in iter_documents(input)), window=window,
                           stride=stride, batch_size=batch_size, progress=progress)}
    print(f"{result['documents']} documents, {result['tokens']:,} tokens, {result['bytes']:,} bytes: "
          f"perplexity {result['perplexity']:.3f}, {result['cross_entropy']:.4f} nats/token, "
          f"{result['bits_per_byte']:.4f} bits/byte (window {result['window']}, stride {result['stride']}; "
          f"{result['tokens_per_second']} tokens/s)")
    save_json(out, result)
    return result


def contamination(train: list[str], data: list[str] | None = None, format: str = "auto", split: str = "auto",
                  subjects: list[str] | None = None, from_hub: str | None = None, ngram: int = 13,
                  threshold: float = 0.5, out: str | None = None) -> dict[str, Any]:
    """How much of each benchmark question appears word for word in a training corpus.

    For every question (with its options) the fraction of its n-grams found in the corpus, on
    normalised text (a CJK character counts as a word); per subject, the number of questions at or
    above --threshold. A prepared data folder is compared in token ids. Memory stays bounded by
    the benchmark, whatever the corpus size.

    Example: acornlm eval contamination --train corpus/ --data ceval-exam --out contamination.json

    Args:
        train: Training corpus: text, jsonl or parquet files, folders, or prepared data folders (or their .bin files).
        data: Benchmark files or folders (as `acornlm eval bench --data`).
        format: auto, ceval, cmmlu, mmlu, arc, hellaswag, piqa or winogrande.
        split: The split subfolder to check (auto = test, or val when test has no answers).
        subjects: Check only these subjects.
        from_hub: Download the benchmark with `datasets` instead (online).
        ngram: n-gram length in words (13, as GPT-3's and lm-eval's decontamination).
        threshold: Fraction of an item's n-grams that makes it contaminated.
        out: JSON report file (per subject and per item).
    """
    benchmark = read_benchmark(data, format, split, None, from_hub, subjects, 0)
    report = check_contamination(benchmark.items, train, ngram, threshold)
    print("| benchmark | subject | n | checked | contaminated | mean overlap |\n|---|---|---|---|---|---|")
    for row in report["subjects"]:
        overlap = "n/a" if row["mean_overlap"] is None else f"{row['mean_overlap']:.4f}"
        print(f"| {row['benchmark']} | {row['subject']} | {row['n']} | {row['checked']} | {row['contaminated']} | {overlap} |")
    print(f"{report['contaminated']} of {report['checked']} checkable questions have >= {threshold:.0%} of their "
          f"{ngram}-grams in the corpus ({report['n'] - report['checked']} shorter than {ngram} words); "
          f"scanned {report['corpus_bytes'] / 1e6:,.1f} MB in {report['seconds']:.1f} s "
          f"({report['mb_per_second']} MB/s), peak memory {report['peak_memory_mb']} MB")
    save_json(out, report)
    return report


def agent(ckpt: str | None = None, tasks: str = "price,add", n: int = 100, seed: int = 0,
          out: str | None = None) -> None:
    """Measure tool calling and thinking on held-out questions of the agent tasks (greedy; tools really run).

    price: the share of first replies with a valid tool call, with exactly the right call
    (price of the asked item), and of final answers that hold the right price after a call; each
    question has its own price list, so only the tool knows it. add: three-digit addition accuracy
    with thinking on (the prompt opens <think>) and off (an empty think block). See
    acornlm/eval/agent.py and `acornlm demo-agent`.

    Args:
        ckpt: The checkpoint or run directory to evaluate (its tokenizer needs the chat tokens).
        tasks: Comma-separated: price, add.
        n: Held-out questions per task.
        seed: Which held-out questions.
        out: Also write the figures as JSON here.
    """
    if ckpt is None:
        raise ConfigError("--ckpt is required: the checkpoint or run directory to evaluate")
    source = resolve_checkpoint(ckpt)
    model, _ = load_model(source)
    figures = evaluate_agent(model, load_tokenizer(source), [t.strip() for t in tasks.split(",") if t.strip()],
                             n=n, seed=seed)
    text = json.dumps(figures, indent=2)
    if out is not None:
        atomic_write_text(Path(out), text + "\n")
    print(text)
