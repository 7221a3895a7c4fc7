"""`acornlm demo --corpus tang-poems`, end to end on a small generated tarball in the chinese-poetry layout:
char vs BPE compared, poems prompted by title with their regular-form share, Chinese fine-tuning and chat."""

from __future__ import annotations

import hashlib
import json
import random

from archives import write_tar_gz

import acornlm
from acornlm.cli import main
from acornlm.cli.demo_chinese import chinese_section, title_prompt
from acornlm.data import poetry
from acornlm.data import tasks as task_module
from acornlm.data.poetry import split_poem

HANZI = "春眠不覺曉處聞啼鳥夜來風雨聲花落知多少白日依山盡黃河入海流欲窮千里目更上一層樓空見人但語響返景深林復照青苔"


def poem(rng: random.Random, lines: int, length: int) -> list[str]:
    verses = ["".join(rng.choice(HANZI) for _ in range(length)) for _ in range(lines)]
    return [f"{verses[i]}，{verses[i + 1]}。" for i in range(0, lines, 2)]


def tarball(path, poets: int = 24, per_poet: int = 10):
    rng = random.Random(0)
    records = [{"title": "".join(rng.choice(HANZI) for _ in range(2)) + str(i), "author": f"詩人{p}",
                "paragraphs": poem(rng, rng.choice([4, 8]), rng.choice([5, 7]))}
               for p in range(poets) for i in range(per_poet)]
    raw = json.dumps(records, ensure_ascii=False).encode()
    return write_tar_gz(path, {"package/dist/quantangshi/poet.tang.0.json": raw})


def test_helpers_read_the_corpus_format():
    assert split_poem("《春曉》孟浩然\n春眠不覺曉，處處聞啼鳥。") == ("春曉", "春眠不覺曉，處處聞啼鳥。")
    assert split_poem("no header") == ("", "")
    assert title_prompt("春曉") == "《春曉》"
    lines = chinese_section([{"kind": "char", "vocab_size": 100, "bytes_per_token": 2.9, "steps": 3, "val_bpb": 3.1}],
                            {"before": {"poems": 8, "regular_share": 0.0}, "after": {"poems": 8, "regular_share": 0.5}},
                            {"chat": [("你是谁？", "我是 acornlm。")]})
    text = "\n".join(lines)
    assert "| char | 100 | 2.90 | 3 | 3.1000 |" in text and "| after training | 8 | 50.0% |" in text
    assert "- 用户：你是谁？" in text


def test_chinese_demo_runs_the_whole_path(tmp_path, monkeypatch, capsys):
    archive = tarball(tmp_path / poetry.ARCHIVE_NAME)
    monkeypatch.setattr(poetry, "ARCHIVE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setenv("ACORNLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(poetry.ARCHIVE_ENV, str(archive))
    monkeypatch.setattr(task_module, "POEMS", [])
    out = tmp_path / "demo"
    main(["demo", "--corpus", "tang-poems", "--out", str(out), "--preset", "tiny", "--minutes", "0.05",
          "--vocab-size", "400", "--max_new_tokens", "8", "--finetune-minutes", "0.1", "--eval-examples", "4",
          "--compare_minutes", "0.05"])
    err = capsys.readouterr().err
    assert "char against byte-level BPE" in err and "keeping " in err
    assert "regular form (4 or 8 lines of 5 or 7 characters)" in err
    assert "zh_identity" in err and "zh_arithmetic" in err and "zh_poem" in err
    assert "用户：你是谁？" in err
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "| char | " in summary and "| bpe | " in summary and "## 格律" in summary and "## 对话" in summary
    assert "| zh_poem | " in summary
    kept = "char" if "keeping char" in err else "bpe"
    assert acornlm.load(out / "run").tokenizer.kind == kept
    assert (out / "report" / "report.html").is_file()
    assert len(task_module.POEMS) > 50  # the corpus's regular poems fed the zh_poem task
    # streaming the poetry model never splits a character: the pieces join to the whole decoded text
    lm = acornlm.load(out / "run")
    pieces = list(lm.stream("《春曉》", max_new_tokens=24, temperature=1.0, seed=3))
    assert "".join(pieces) == lm.generate("《春曉》", max_new_tokens=24, temperature=1.0, seed=3)
    assert all(piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)
