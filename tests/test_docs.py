"""The learner's docs stay true: every function a page links exists in the file the link names, and
every page has its Chinese counterpart (and README.md its README.zh-CN.md) linking the same functions.

A formula link is [`acornlm.module.name`](../acornlm/module.py): the dotted name in backticks, the
source file as a relative path without an anchor (../../acornlm/... from docs/zh, acornlm/... from the
repository root).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ENGLISH_ONLY = {"ARCHITECTURE.md", "gguf.md", "use-elsewhere.md"}  # reference pages kept in English
# Any markdown link whose text is a backticked acornlm name, whatever its target ...
ANY_LINK = re.compile(r"\[`(acornlm[\w.]*)`\]\(([^)\s]*)\)")
# ... and the one form such a link must take.
TARGET = re.compile(r"(?:\.\./)*acornlm/[\w/]+\.py")
STAGES = ["tokenizer", "data", "model", "pretraining", "finetuning", "inference", "serving", "export"]


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md", ROOT / "README.zh-CN.md"]


def links(page: Path) -> list[tuple[str, str]]:
    return ANY_LINK.findall(page.read_text(encoding="utf-8"))


def resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def module_of(file: Path) -> str:
    return ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def defines(file: Path, name: str) -> bool:
    """Whether `file` itself defines `name` (def, class, assignment or annotated field), not just imports it."""
    pattern = rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]"
    return re.search(pattern, file.read_text(encoding="utf-8"), re.MULTILINE) is not None


def link_problem(page: Path, dotted: str, target: str) -> str | None:
    where = page.relative_to(ROOT)
    if not TARGET.fullmatch(target):
        return f"{where}: the link to {dotted} has target {target!r}; write a relative path to the .py file, no anchor"
    file = (page.parent / target).resolve()
    if not file.is_file():
        return f"{where}: {dotted} links {target}, which does not exist"
    expected = module_of(file)
    if not (dotted == expected or dotted.startswith(expected + ".")):
        return f"{where}: {dotted} is not in {target} (that file is {expected})"
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as exc:
        return f"{where}: {dotted} does not exist ({type(exc).__name__}: {exc})"
    if dotted != expected:
        first = dotted[len(expected) + 1:].split(".")[0]  # the name the module defines
        if not defines(file, first):
            return f"{where}: {dotted}: {target} imports {first} but does not define it"
    return None


def test_formula_links_name_objects_defined_in_the_files_they_link():
    problems, count = [], 0
    for page in pages():
        for dotted, target in links(page):
            count += 1
            problem = link_problem(page, dotted, target)
            if problem:
                problems.append(problem)
    assert count > 100, f"only {count} formula links found: is the link format still [`name`](path)?"
    assert not problems, "\n".join(problems)


def test_every_page_exists_in_english_and_chinese():
    english = {p.name for p in DOCS.glob("*.md")} - ENGLISH_ONLY
    chinese = {p.name for p in (DOCS / "zh").glob("*.md")}
    assert english == chinese, f"missing in docs/zh: {english - chinese}; missing in docs: {chinese - english}"
    assert {f"{stage}.md" for stage in STAGES} | {"README.md"} <= english
    assert (ROOT / "README.zh-CN.md").is_file()


@pytest.mark.parametrize("english", sorted(p.name for p in DOCS.glob("*.md") if p.name not in ENGLISH_ONLY)
                         + ["../README.md"])
def test_both_languages_link_the_same_functions(english):
    en = (DOCS / english).resolve()
    zh = ROOT / "README.zh-CN.md" if english == "../README.md" else DOCS / "zh" / english
    en_names = {dotted for dotted, _ in links(en)}
    zh_names = {dotted for dotted, _ in links(zh)} if zh.is_file() else set()
    assert en_names == zh_names, (f"only in {en.relative_to(ROOT)}: {sorted(en_names - zh_names)}; "
                                  f"only in {zh.relative_to(ROOT)}: {sorted(zh_names - en_names)}")


def test_the_index_lists_every_stage_in_pipeline_order():
    for index in (DOCS / "README.md", DOCS / "zh" / "README.md"):
        text = index.read_text(encoding="utf-8")
        positions = [text.find(f"]({stage}.md)") for stage in STAGES]
        assert -1 not in positions, f"{index.relative_to(ROOT)} does not link {STAGES[positions.index(-1)]}.md"
        assert positions == sorted(positions), f"{index.relative_to(ROOT)} lists the stages out of order"


def test_the_readmes_switch_language():
    assert "(README.zh-CN.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(README.md)" in (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    for stage in ["README", *STAGES]:
        assert f"(zh/{stage}.md)" in (DOCS / f"{stage}.md").read_text(encoding="utf-8"), stage
        assert f"(../{stage}.md)" in (DOCS / "zh" / f"{stage}.md").read_text(encoding="utf-8"), stage


@pytest.mark.parametrize("name, words", [
    ("tokenizer.md", ["BPE", "merge", "bytes per token"]),
    ("model.md", ["softmax", "GQA", "RoPE", "RMSNorm", "LayerNorm", "SwiGLU", "gelu", "tie_word_embeddings"]),
    ("pretraining.md", ["cross entropy", "Perplexity", "AdamW", "cos", "clipping", "MFU"]),
    ("finetuning.md", ["assistant", "LoRA", "DPO", "GRPO", "KL", "Distillation"]),
    ("inference.md", ["KV cache", "temperature", "top-k", "top-p", "min-p", "repetition", "frequency",
                      "presence", "Continuous batching"]),
    ("serving.md", ["OpenAI", "Limits", "Guards"]),
    ("export.md", ["safetensors", "GGUF", "q8_0"]),
])
def test_the_formulas_a_learner_looks_for_are_there(name, words):
    text = (DOCS / name).read_text(encoding="utf-8")
    assert all(word in text for word in words), [w for w in words if w not in text]
