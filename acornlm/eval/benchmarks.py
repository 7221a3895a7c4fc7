"""Multiple-choice benchmarks from the files people download: C-Eval, CMMLU, MMLU, ARC, HellaSwag,
PIQA and Winogrande, read into one `Item` shape.

    items = load_items(["ceval-exam/val"])                # a folder, files, or a mix
    items[0]  # Item(benchmark="ceval", subject="accountant", question=..., choices=(...), answer=2, ...)

Layouts understood (auto-detected from the header or the record's keys, or named with `fmt`):
- C-Eval csv: id,question,A,B,C,D,answer[,explanation], one file per subject: {dev,val,test}/{subject}_{split}.csv
- CMMLU csv: ,Question,A,B,C,D,Answer, one file per subject: {dev,test}/{subject}.csv
- MMLU csv (the original release): no header, question,A,B,C,D,answer: {dev,val,test}/{subject}_{split}.csv
- jsonl / json / parquet exports of the Hugging Face datasets: cais/mmlu, allenai/ai2_arc,
  Rowan/hellaswag, baber/piqa, allenai/winogrande, ceval/ceval-exam, haonan-li/cmmlu.
`hub_items` fetches the same datasets with `datasets` (online only) and reads them with the same parser.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acornlm.data.conversations import iter_records
from acornlm.errors import ConfigError
from acornlm.eval.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS

FORMATS = ("ceval", "cmmlu", "mmlu", "arc", "hellaswag", "piqa", "winogrande")
LETTERS = "ABCDEFGHIJ"
DATA_SUFFIXES = {".csv", ".jsonl", ".json", ".parquet"}
SPLIT_FOLDERS = ("test", "val", "validation")  # where `auto` looks for the scored questions, in order
MAX_FIELD = 1 << 20  # one cell of a benchmark csv is a question, never a megabyte


class NoAnswers(ConfigError):
    """The file is a benchmark split without answer keys (C-Eval's test split is scored on its site)."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    Attributes:
        benchmark: one of FORMATS.
        subject: the row of the per-subject table (a C-Eval/CMMLU/MMLU subject, or ARC-Easy ...).
        question: the question text (HellaSwag: the context to complete; Winogrande: the sentence with "_").
        choices: the options' texts.
        answer: the index of the right option.
        where: "file:line" (or "dataset:row") for error messages and per-item reports.
    """

    benchmark: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int
    where: str


# ---------------------------------------------------------------------------------------------
# finding the files
# ---------------------------------------------------------------------------------------------

def data_files(path: Path, split: str) -> list[Path]:
    """The files to score under `path`: the file itself, or a folder's files of one split.

    A folder with split subfolders (dev/val/test, as C-Eval, CMMLU and MMLU ship) is read from the
    `split` subfolder; `auto` takes test, then val/validation (the caller falls back to val when
    test has no answers). dev is never scored: it holds the few-shot examples.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"benchmark data {path} does not exist")
    if split != "auto":
        if (path / split).is_dir():
            path = path / split
    else:
        for name in SPLIT_FOLDERS:
            if (path / name).is_dir():
                path = path / name
                break
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and "dev" not in p.relative_to(path).parts[:-1] and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"{path} holds no benchmark files (.csv, .jsonl, .json or .parquet)")
    return files


def dev_file(file: Path) -> Path | None:
    """The few-shot file next to a split file: val/accountant_val.csv -> dev/accountant_dev.csv,
    test/agronomy.csv -> dev/agronomy.csv (the C-Eval, CMMLU and MMLU layouts)."""
    split = file.parent.name
    if split == "dev":
        return None
    root = file.parent.parent / "dev"
    stem = file.stem
    candidates = [root / f"{stem.removesuffix('_' + split)}_dev{file.suffix}", root / file.name]
    return next((c for c in candidates if c.is_file()), None)


def subject_of(file: Path) -> str:
    """accountant_val.csv -> accountant; abstract_algebra_test.csv -> abstract_algebra; agronomy.csv -> agronomy."""
    stem = file.stem
    for split in ("dev", "val", "test", "validation", "train"):
        stem = stem.removesuffix("_" + split)
    return stem


# ---------------------------------------------------------------------------------------------
# reading records
# ---------------------------------------------------------------------------------------------

def read_items(file: Path, fmt: str = "auto", subject: str | None = None) -> list[Item]:
    """The questions of one file (csv, jsonl, json or parquet); errors name the file and line."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"unknown benchmark format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if file.suffix == ".csv":
        items = _csv_items(file, fmt, subject)
    else:
        items = items_from_records(_records(file), fmt, subject or _path_subject(file))
    if not items:
        raise ConfigError(f"{file} holds no questions (an empty subject)")
    return items


def _csv_items(file: Path, fmt: str, subject: str | None) -> list[Item]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file} is not UTF-8 text (byte offset {exc.start})") from exc
    csv.field_size_limit(MAX_FIELD)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise ConfigError(f"{file}:{reader.line_num}: not a valid csv row: {exc}") from exc
    if not rows:
        raise ConfigError(f"{file} holds no questions (an empty subject)")
    subject = subject or subject_of(file)
    header = [cell.strip() for cell in rows[0][1]]
    lowered = [cell.lower() for cell in header]
    if "question" in lowered or "answer" in lowered or fmt in ("ceval", "cmmlu"):
        if fmt == "auto":
            fmt = "cmmlu" if "Question" in header else "ceval"
        columns = {name: lowered.index(name) for name in ("question", "a", "b", "c", "d", "answer") if name in lowered}
        missing = [name for name in ("question", "a", "b", "c", "d") if name not in columns]
        if missing:
            raise ConfigError(f"{file}: row 1 (the header) has columns {header}; a {fmt} csv needs question, "
                              f"A, B, C, D and answer (missing: {', '.join(m.upper() if len(m) == 1 else m for m in missing)})")
        if "answer" not in columns:
            raise NoAnswers(f"{file} has no answer column: this split is scored only by the benchmark's "
                            "own site; evaluate the val split (its answers are public)")
        body = rows[1:]
    else:  # the original MMLU release: no header, six columns
        fmt = "mmlu" if fmt == "auto" else fmt
        columns = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4, "answer": 5}
        body = rows
    items = []
    width = max(columns.values()) + 1
    for line, row in body:
        if len(row) < width:
            raise ConfigError(f"{file}:{line}: expected at least {width} cells, found {len(row)} "
                              f"(columns found: {header if body is not rows else 'question,A,B,C,D,answer'})")
        choices = tuple(row[columns[letter]] for letter in "abcd")
        answer = _letter_index(row[columns["answer"]], len(choices), f"{file}:{line}")
        items.append(_checked(Item(fmt, subject, row[columns["question"]], choices, answer, f"{file}:{line}")))
    return items


def _records(file: Path) -> Iterator[tuple[str, Any]]:
    """("file:line" or "file#row", record) pairs of a jsonl, json or parquet file."""
    if file.suffix != ".parquet":
        yield from iter_records(file)  # the chat-data reader: jsonl lines, or a .json list
        return
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError(f"reading {file} needs pyarrow: pip install 'acornlm[parquet]'") from exc
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ConfigError(f"{file} is not a readable parquet file: {exc}") from exc
    for number, row in enumerate(rows, start=1):
        yield f"{file}#{number}", row


# The keys that identify each format's records, most specific first.
SIGNATURES = [
    ("hellaswag", {"ctx_a", "ctx_b", "endings", "label"}),
    ("hellaswag", {"ctx", "endings", "label"}),
    ("piqa", {"goal", "sol1", "sol2"}),
    ("winogrande", {"sentence", "option1", "option2"}),
    ("arc", {"question", "choices", "answerKey"}),
    ("mmlu", {"question", "choices", "answer"}),
    ("ceval", {"question", "A", "B", "C", "D"}),
    ("cmmlu", {"Question", "A", "B", "C", "D"}),
]


def detect_format(record: dict[str, Any], where: str) -> str:
    for fmt, keys in SIGNATURES:
        if keys <= record.keys():
            return fmt
    raise ConfigError(f"{where}: cannot tell which benchmark this record belongs to (keys {sorted(record)}); "
                      f"pass --format (one of {', '.join(FORMATS)})")


def items_from_records(records: Iterable[tuple[str, Any]], fmt: str, subject: str) -> list[Item]:
    """Items from (location, record) pairs in any of the Hugging Face layouts of SIGNATURES."""
    items = []
    for where, record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, found {type(record).__name__}")
        record_fmt = detect_format(record, where) if fmt == "auto" else fmt
        needed = next((keys for name, keys in SIGNATURES if name == record_fmt and keys <= record.keys()),
                      next(keys for name, keys in SIGNATURES if name == record_fmt))
        missing = sorted(needed - record.keys())
        if missing:
            raise ConfigError(f"{where}: a {record_fmt} record needs {sorted(needed)}; missing {missing} "
                              f"(keys found: {sorted(record)})")
        items.append(_checked(_record_item(record, record_fmt, where, subject)))
    return items


def _record_item(r: dict[str, Any], fmt: str, where: str, subject: str) -> Item:
    if fmt == "hellaswag":
        query = (r["activity_label"] + ": " if r.get("activity_label") else "") + (
            r["ctx_a"] + " " + str(r["ctx_b"]).capitalize() if "ctx_a" in r else r["ctx"])
        choices = tuple(hellaswag_clean(e) for e in _list(r["endings"], where, "endings"))
        return Item(fmt, subject, hellaswag_clean(query), choices, _index(r["label"], len(choices), where), where)
    if fmt == "piqa":
        return Item(fmt, subject, r["goal"], (r["sol1"], r["sol2"]), _index(r.get("label"), 2, where), where)
    if fmt == "winogrande":
        if "_" not in str(r["sentence"]):
            raise ConfigError(f"{where}: a Winogrande sentence must contain the blank '_'")
        answer = str(r.get("answer", "")).strip()
        if answer not in ("1", "2"):
            raise _no_answer_or_bad(where, answer, "1, 2")
        return Item(fmt, subject, r["sentence"], (r["option1"], r["option2"]), int(answer) - 1, where)
    if fmt == "arc":
        choices = r["choices"]
        if not isinstance(choices, dict) or not {"text", "label"} <= choices.keys():
            raise ConfigError(f"{where}: ARC choices must be {{\"text\": [...], \"label\": [...]}}")
        labels = [str(label) for label in _list(choices["label"], where, "choices.label")]
        key = str(r["answerKey"]).strip()
        if key not in labels:
            raise _no_answer_or_bad(where, key, ", ".join(labels))
        return Item(fmt, r.get("subject") or subject, r["question"], tuple(_list(choices["text"], where, "choices.text")),
                    labels.index(key), where)
    if fmt == "mmlu":
        choices = tuple(_list(r["choices"], where, "choices"))
        answer = r["answer"]
        index = _letter_index(answer, len(choices), where) if isinstance(answer, str) and not answer.isdigit() \
            else _index(answer, len(choices), where)
        return Item(fmt, r.get("subject") or subject, r["question"], choices, index, where)
    question_key, answer_key = ("question", "answer") if fmt == "ceval" else ("Question", "Answer")
    if answer_key not in r or r[answer_key] in (None, ""):
        raise NoAnswers(f"{where}: no {answer_key}: this split is scored only by the benchmark's own site; "
                        "evaluate the val split")
    choices = tuple(r[letter] for letter in "ABCD")
    return Item(fmt, subject, r[question_key], choices, _letter_index(r[answer_key], 4, where), where)


def _checked(item: Item) -> Item:
    """Every text a non-empty string (numbers in csv cells are fine as text)."""
    texts = [item.question, *item.choices]
    if any(not isinstance(text, (str, int, float)) or isinstance(text, bool) for text in texts):
        raise ConfigError(f"{item.where}: the question and its options must be text")
    question, *choices = [str(text) for text in texts]
    if not question.strip():
        raise ConfigError(f"{item.where}: the question is empty")
    empty = [LETTERS[i] for i, choice in enumerate(choices) if not choice.strip()]
    if empty:
        raise ConfigError(f"{item.where}: option {', '.join(empty)} is empty")
    return Item(item.benchmark, item.subject, question, tuple(choices), item.answer, item.where)


def _list(value: Any, where: str, name: str) -> list:
    if hasattr(value, "tolist"):  # numpy arrays from parquet via datasets
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise ConfigError(f"{where}: {name} must be a list of at least 2 options")
    return list(value)


def _letter_index(value: Any, count: int, where: str) -> int:
    letter = str(value).strip().upper()
    allowed = LETTERS[:count]
    if len(letter) != 1 or letter not in allowed:
        raise _no_answer_or_bad(where, str(value), ", ".join(allowed))
    return allowed.index(letter)


def _index(value: Any, count: int, where: str) -> int:
    try:
        index = int(str(value).strip())
    except ValueError:
        raise _no_answer_or_bad(where, str(value), f"0 .. {count - 1}") from None
    if not 0 <= index < count:
        raise _no_answer_or_bad(where, str(value), f"0 .. {count - 1}")
    return index


def _no_answer_or_bad(where: str, value: str, allowed: str) -> ConfigError:
    if value.strip() in ("", "-1", "None"):
        return NoAnswers(f"{where}: no answer key: a test split without public answers; score the validation split")
    return ConfigError(f"{where}: answer {value!r} is not one of the choices ({allowed})")


def hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing: strip WikiHow's [title]/[step] artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _path_subject(file: Path) -> str:
    """ARC-Challenge/ARC-Easy when the path says so, otherwise the file's subject name."""
    for part in reversed(file.parts):
        match = re.search(r"arc[-_ ]?(challenge|easy)", part, re.IGNORECASE)
        if match:
            return "ARC-" + match.group(1).capitalize()
    return subject_of(file)


# ---------------------------------------------------------------------------------------------
# whole benchmarks
# ---------------------------------------------------------------------------------------------

@dataclass
class Benchmark:
    """The scored questions and the few-shot examples for each subject."""

    items: list[Item]
    dev: dict[str, list[Item]]  # subject -> examples (first_n, as lm-eval's C-Eval/MMLU configs)
    files: list[str]
    notes: list[str]


def load_items(paths: Sequence[str | Path], fmt: str = "auto", split: str = "auto",
               dev: Sequence[str | Path] = ()) -> Benchmark:
    """Read benchmark files and folders; few-shot examples come from the dev file beside each
    split file, or from `dev` (files or folders) matched by subject (any subject when only one)."""
    items: list[Item] = []
    shots: dict[str, list[Item]] = {}
    files: list[str] = []
    notes: list[str] = []
    for path in map(Path, paths):
        chosen = data_files(path, split)
        try:
            loaded = [(file, read_items(file, fmt)) for file in chosen]
        except NoAnswers:
            fallback = path / "val"
            if split != "auto" or path.is_file() or not fallback.is_dir():
                raise
            notes.append(f"{path}: the test split has no public answers; scored the val split instead")
            loaded = [(file, read_items(file, fmt)) for file in data_files(fallback, "val")]
        for file, file_items in loaded:
            files.append(str(file))
            items.extend(file_items)
            beside = dev_file(file)
            if beside is not None:
                shots.setdefault(file_items[0].subject, read_items(beside, file_items[0].benchmark,
                                                                   file_items[0].subject))
    for path in map(Path, dev):
        for file in data_files(path, "dev"):
            for item in read_items(file, fmt):
                shots.setdefault(item.subject, []).append(item)
    if not items:
        raise ConfigError("no benchmark questions were found in " + ", ".join(map(str, paths)))
    return Benchmark(items, shots, files, notes)


# Where `--from_hub` finds each benchmark: (dataset, config or None, scored split, few-shot split).
HUB = {
    "mmlu": ("cais/mmlu", "all", "test", "dev"),
    "arc": ("allenai/ai2_arc", "ARC-Challenge", "test", "train"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "train"),
    "hellaswag": ("Rowan/hellaswag", None, "validation", "train"),
    "piqa": ("baber/piqa", None, "validation", "train"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "train"),
    "ceval": ("ceval/ceval-exam", None, "val", "dev"),
    "cmmlu": ("haonan-li/cmmlu", None, "test", "dev"),
}


def hub_items(name: str, subjects: Sequence[str] = (), max_shots: int = 5) -> Benchmark:
    """Download a benchmark with `datasets` and read it with the parser the local files use.

    C-Eval and CMMLU are one dataset config per subject: `subjects` picks some (all by default).
    """
    if name not in HUB:
        raise ConfigError(f"--from_hub {name!r} is not known; known: {', '.join(HUB)}")
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError("--from_hub needs the datasets library: pip install 'acornlm[hf]'") from exc
    path, config, split, dev_split = HUB[name]
    fmt = "arc" if name.startswith("arc") else name
    per_subject = {"ceval": CEVAL_SUBJECTS, "cmmlu": CMMLU_SUBJECTS}.get(name)
    configs = list(subjects or per_subject) if per_subject else [config]
    items: list[Item] = []
    shots: dict[str, list[Item]] = {}
    for conf in configs:
        subject = conf if per_subject else (config or name)
        scored = datasets.load_dataset(path, conf, split=split)
        found = items_from_records(((f"{path}/{conf}/{split}#{n}", r) for n, r in enumerate(scored, start=1)),
                                   fmt, subject)
        items.extend(found)
        fewshot = datasets.load_dataset(path, conf, split=dev_split).select(range(max_shots))
        records = ((f"{path}/{conf}/{dev_split}#{n}", r) for n, r in enumerate(fewshot, start=1))
        for item in items_from_records(records, fmt, subject):
            shots.setdefault(item.subject, []).append(item)
    return Benchmark(items, shots, [f"hf://{path}"], [])
