"""Scoring multiple-choice benchmarks the two ways the field does it.

- likelihood: the log-likelihood of each option's own text after the question ("Question: ...
  Answer:" + " option"), as lm-evaluation-harness scores ARC, HellaSwag, PIQA and Winogrande.
  acc picks the option with the highest log p; acc_norm divides log p by the option's length in
  characters first, so long options are not penalised for having more tokens (lm-eval's acc_norm).
- letter: the options are listed as "A. ...", "B. ..." and the model is scored on the answer
  letter, log p(" A" | prompt), as C-Eval's reference code, MiniMind and lm-eval's MMLU/C-Eval/CMMLU
  tasks do. A letter is usually one token, so one forward pass scores every option.

Prompts follow lm-eval's task YAMLs (the C-Eval/CMMLU/MMLU descriptions, "答案：" and "Answer:"),
k-shot examples come first from each subject's dev split (the first k, lm-eval's first_n sampler),
each followed by a blank line. With `chat=True` the question is a user turn, the examples are
earlier turns, and the answer is scored as the start of the assistant's reply.

    result = evaluate_benchmark(lm, load_items(["ceval-exam"]), shots=5, method="letter")
    result["accuracy"], result["subjects"][0]
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from acornlm.data.chat import render_prompt
from acornlm.errors import ConfigError
from acornlm.eval.benchmarks import LETTERS, Benchmark, Item
from acornlm.eval.likelihood import TokenPair, encode_pair, score_continuations
from acornlm.eval.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS
from acornlm.infer.api import LanguageModel

METHODS = ("likelihood", "letter")
CHINESE = {"ceval", "cmmlu"}


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

def description(item: Item) -> str:
    """The line before the questions, as each benchmark's reference prompt (and lm-eval) writes it."""
    if item.benchmark == "ceval":
        name = CEVAL_SUBJECTS.get(item.subject, item.subject.replace("_", " "))
        return f"以下是中国关于{name}的单项选择题，请选出其中的正确答案。\n\n"
    if item.benchmark == "cmmlu":
        name = CMMLU_SUBJECTS.get(item.subject, item.subject.replace("_", " "))
        return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
    if item.benchmark == "mmlu":
        return f"The following are multiple choice questions (with answers) about {item.subject.replace('_', ' ')}.\n\n"
    return ""


def question_text(item: Item, method: str) -> str:
    """The question as the model reads it, up to where the answer starts."""
    cue = "答案：" if item.benchmark in CHINESE else "Answer:"
    if method == "letter":
        options = "".join(f"{LETTERS[i]}. {choice}\n" for i, choice in enumerate(item.choices))
        return f"{item.question.strip()}\n{options}{cue}"
    if item.benchmark == "hellaswag":
        return item.question
    if item.benchmark in CHINESE:
        return f"{item.question.strip()}\n{cue}"
    if item.benchmark in ("mmlu", "arc", "piqa"):
        return f"Question: {item.question.strip() if item.benchmark == 'mmlu' else item.question}\n{cue}"
    raise ConfigError(f"no likelihood prompt for {item.benchmark}")


def options(item: Item, method: str) -> list[str]:
    """What is scored for each option (without the space before it)."""
    return [LETTERS[i] for i in range(len(item.choices))] if method == "letter" else list(item.choices)


def winogrande_parts(item: Item) -> tuple[list[str], str]:
    """Winogrande's partial scoring (lm-eval): the blank is filled with each option, and the
    same rest of the sentence is scored after each: the option that makes it likelier wins."""
    blank = item.question.index("_")
    return [item.question[:blank] + choice for choice in item.choices], item.question[blank + 1:].strip()


def text_requests(item: Item, method: str, shots: Sequence[Item]) -> list[tuple[str, str]]:
    """(context, continuation) strings for each option, few-shot examples included."""
    prefix = description(item)
    if item.benchmark == "winogrande" and method == "likelihood":
        for shot in shots:
            contexts, rest = winogrande_parts(shot)
            prefix += f"{contexts[shot.answer]} {rest}\n\n"
        contexts, rest = winogrande_parts(item)
        return [(prefix + context, " " + rest) for context in contexts]
    for shot in shots:
        prefix += f"{question_text(shot, method)} {options(shot, method)[shot.answer]}\n\n"
    context = prefix + question_text(item, method)
    return [(context, " " + option) for option in options(item, method)]


def chat_requests(lm: LanguageModel, item: Item, method: str, shots: Sequence[Item]) -> list[TokenPair]:
    """Token ids for each option with the chat template: the examples as earlier turns, the
    question as the last user turn, the option as the start of the assistant's reply."""
    if item.benchmark == "winogrande" and method == "likelihood":
        raise ConfigError("Winogrande's likelihood scoring completes a sentence, which has no chat form; "
                          "use --method letter with --chat, or drop --chat")
    messages: list[dict[str, str]] = []
    for number, shot in enumerate(shots):
        content = (description(item) if number == 0 else "") + question_text(shot, method)
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": options(shot, method)[shot.answer]}]
    messages.append({"role": "user", "content": (description(item) if not shots else "") + question_text(item, method)})
    context = render_prompt(lm.tokenizer, messages)
    return [(context, lm.tokenizer.encode(option)) for option in options(item, method)]


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------

def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean: sample standard deviation / sqrt(n) (lm-eval's `mean_stderr`)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


@dataclass
class ItemResult:
    item: Item
    logprobs: list[float]
    prediction: int
    prediction_norm: int | None
    truncated: bool

    @property
    def correct(self) -> bool:
        return self.prediction == self.item.answer

    @property
    def correct_norm(self) -> bool | None:
        return None if self.prediction_norm is None else self.prediction_norm == self.item.answer


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def summarize(results: Sequence[ItemResult]) -> dict[str, Any]:
    """accuracy, its standard error and n (and acc_norm when the method has it)."""
    correct = [float(r.correct) for r in results]
    summary: dict[str, Any] = {"n": len(results), "accuracy": sum(correct) / len(correct) if correct else float("nan"),
                               "stderr": mean_stderr(correct)}
    norms = [float(r.correct_norm) for r in results if r.correct_norm is not None]
    if norms and len(norms) == len(results):
        summary.update(acc_norm=sum(norms) / len(norms), acc_norm_stderr=mean_stderr(norms))
    return summary


@dataclass
class BenchmarkRun:
    results: list[ItemResult]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def report(self, excluded: set[str] | None = None) -> dict[str, Any]:
        """The JSON report: overall (over questions), macro (mean over subjects), per subject, per item."""
        subjects: dict[tuple[str, str], list[ItemResult]] = {}
        for result in self.results:
            subjects.setdefault((result.item.benchmark, result.item.subject), []).append(result)
        rows = [{"benchmark": bench, "subject": subject, **summarize(group)}
                for (bench, subject), group in sorted(subjects.items())]
        report = {
            **summarize(self.results),
            "macro_accuracy": sum(row["accuracy"] for row in rows) / len(rows),
            **self.settings,
            "truncated": sum(r.truncated for r in self.results),
            "seconds": round(self.seconds, 3),
            "questions_per_second": round(len(self.results) / self.seconds, 3) if self.seconds > 0 else None,
            "subjects": rows,
            "items": [{"where": r.item.where, "subject": r.item.subject, "answer": r.item.answer,
                       "prediction": r.prediction, "correct": r.correct,
                       "logprobs": [round(lp, 6) for lp in r.logprobs]} for r in self.results],
        }
        if excluded is not None:
            clean = [r for r in self.results if r.item.where not in excluded]
            report["clean"] = {**summarize(clean), "excluded": len(self.results) - len(clean)}
        return report


def evaluate_benchmark(lm: LanguageModel, benchmark: Benchmark, shots: int = 0, method: str = "likelihood",
                       chat: bool = False, batch_size: int = 16, limit: int | None = None,
                       progress: bool = True) -> BenchmarkRun:
    """Score every question of `benchmark` with `method` and k = `shots` examples from its dev split.

    A prompt longer than the model's context loses tokens from its left (the oldest examples
    first); the report counts those questions in `truncated`.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    items = benchmark.items
    if limit is not None:  # the first `limit` questions of each subject
        counts: Counter[str] = Counter()
        kept = []
        for item in items:
            counts[item.subject] += 1
            if counts[item.subject] <= limit:
                kept.append(item)
        items = kept
    if method == "letter" and any(len(i.choices) > len(LETTERS) for i in items):
        raise ConfigError(f"--method letter lists at most {len(LETTERS)} options")
    pairs: list[TokenPair] = []
    spans = []
    for item in items:
        examples = benchmark.dev.get(item.subject, [])
        if shots and len(examples) < shots:
            raise ConfigError(f"--shots {shots}: subject {item.subject!r} has {len(examples)} few-shot examples; "
                              "put its dev file beside the split folder (dev/), pass --dev FILE, or lower --shots")
        examples = [e for e in examples if e.where != item.where][:shots]
        requests = (chat_requests(lm, item, method, examples) if chat else
                    [encode_pair(lm.tokenizer, c, x) for c, x in text_requests(item, method, examples)])
        spans.append((len(pairs), len(requests)))
        pairs.extend(requests)
    started = time.perf_counter()
    with tqdm(total=len(pairs), unit="option", desc="scoring", disable=not progress, leave=False) as bar:
        scored = score_continuations(lm.model, pairs, batch_size=batch_size, progress=bar.update)
    seconds = time.perf_counter() - started
    results = []
    for item, (start, count) in zip(items, spans):
        logprobs = [s.logprob for s in scored[start:start + count]]
        norm = None
        if method == "likelihood" and item.benchmark != "winogrande":
            norm = argmax([lp / max(len(choice), 1) for lp, choice in zip(logprobs, item.choices)])
        results.append(ItemResult(item, logprobs, argmax(logprobs), norm,
                                  any(s.truncated for s in scored[start:start + count])))
    settings = {"method": method, "shots": shots, "chat": chat}
    return BenchmarkRun(results, seconds, settings)


def markdown_table(report: dict[str, Any]) -> str:
    """The per-subject table and the overall line, for a terminal or a README."""
    has_norm = "acc_norm" in report
    head = "| benchmark | subject | n | accuracy | ± stderr |" + (" acc_norm |" if has_norm else "")
    lines = [head, "|" + "---|" * (5 + has_norm)]

    def row(bench: str, subject: str, r: dict[str, Any]) -> str:
        cells = [bench, subject, str(r["n"]), _number(r["accuracy"]), _number(r["stderr"])]
        if has_norm:
            cells.append(_number(r.get("acc_norm")))
        return "| " + " | ".join(cells) + " |"

    lines += [row(r["benchmark"], r["subject"], r) for r in report["subjects"]]
    lines.append(row("**all**", f"{len(report['subjects'])} subjects", report))
    text = "\n".join(lines) + f"\n\nmacro accuracy (mean over subjects): {_number(report['macro_accuracy'])}; " \
                              f"method {report['method']}, {report['shots']}-shot" + (", chat template" if report["chat"] else "")
    if report.get("truncated"):
        text += f"; {report['truncated']} prompts were cut from the left to fit the context"
    if "clean" in report:
        clean = report["clean"]
        text += (f"\n\nwithout the {clean['excluded']} contaminated questions: accuracy {_number(clean['accuracy'])} "
                 f"± {_number(clean['stderr'])} (n={clean['n']})")
    return text + "\n"


def _number(value: float | None) -> str:
    """Four decimals; "n/a" for a figure that does not exist (the stderr of one question, no questions)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
