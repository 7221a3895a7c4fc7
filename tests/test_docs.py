"""The learner's docs stay true: every function a page links exists, and every page has its
Chinese counterpart (and the README its README.zh-CN.md)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
# [`acornlm.module.name`](../acornlm/module.py): the dotted name in backticks, the source file as target
LINK = re.compile(r"\[`(acornlm(?:\.\w+)*)`\]\(((?:\.\./)+acornlm/[\w/]+\.py)\)")
ENGLISH_ONLY = {"ARCHITECTURE.md", "gguf.md", "use-elsewhere.md"}  # reference pages kept in English


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md", ROOT / "README.zh-CN.md"]


def resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_docs_link_functions_that_exist_in_the_files_they_name():
    problems, count = [], 0
    for page in pages():
        for dotted, target in LINK.findall(page.read_text(encoding="utf-8")):
            count += 1
            file = (page.parent / target).resolve()
            if not file.is_file():
                problems.append(f"{page.relative_to(ROOT)}: {target} does not exist")
                continue
            try:
                obj = resolve(dotted)
            except (ImportError, AttributeError) as exc:
                problems.append(f"{page.relative_to(ROOT)}: {dotted} does not exist ({exc})")
                continue
            module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
            expected = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if module != expected and not dotted.startswith(expected):
                problems.append(f"{page.relative_to(ROOT)}: {dotted} is defined in {module}, not {target}")
    assert count > 60, f"only {count} formula links found: is the link format still [`name`](path)?"
    assert not problems, "\n".join(problems)


def test_every_page_exists_in_english_and_chinese():
    english = {p.name for p in DOCS.glob("*.md")} - ENGLISH_ONLY
    chinese = {p.name for p in (DOCS / "zh").glob("*.md")}
    assert english == chinese, f"missing in docs/zh: {english - chinese}; missing in docs: {chinese - english}"
    assert (ROOT / "README.zh-CN.md").is_file()


@pytest.mark.parametrize("name", ["model.md", "pretraining.md", "finetuning.md", "inference.md"])
def test_the_formulas_a_learner_looks_for_are_there(name):
    text = (DOCS / name).read_text(encoding="utf-8")
    wanted = {"model.md": ["softmax", "RoPE", "RMSNorm", "SwiGLU"],
              "pretraining.md": ["cross entropy", "AdamW", "cos", "MFU"],
              "finetuning.md": ["LoRA", "DPO", "GRPO", "KL"],
              "inference.md": ["top-k", "top-p", "min-p", "temperature"]}[name]
    assert all(word in text for word in wanted), [w for w in wanted if w not in text]
