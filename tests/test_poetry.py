"""The poetry corpora (Tang poems, Song ci, Shijing) and the form checker, offline: every fetch reads a small
tarball built here in the layout of npm's chinese-poetry-2.0.1.tgz, whose sha256 stands in for the real one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from archives import write_tar_gz

from acornlm.cli import main as cli_main
from acornlm.data import poetry
from acornlm.data.corpus import iter_documents
from acornlm.data.loader import read_meta
from acornlm.data.poetry import (
    Poem,
    fetch_poetry,
    held_out_poets,
    is_regular,
    poem_document,
    poem_form,
    poem_lines,
    regular_share,
)
from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer import train_tokenizer

# The small tarball's skipped file and poems warn on every fresh build; the tests that care catch them.
pytestmark = pytest.mark.filterwarnings("ignore:tang-poems. skipped:UserWarning")

JING_YE_SI = {"title": "靜夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]}
TANG_0 = [
    JING_YE_SI,
    {"title": "早發白帝城", "author": "李白",
     "paragraphs": ["朝辭白帝彩雲間，千里江陵一日還。", "兩岸猿聲啼不住，輕舟已過萬重山。"]},
    {"title": "將進酒", "author": "李白",
     "paragraphs": ["君不見黃河之水天上來，奔流到海不復回。", "君不見高堂明鏡悲白髮，朝如青絲暮成雪。"]},
    {"title": "春望", "author": "杜甫",
     "paragraphs": ["國破山河在，城春草木深。", "感時花濺淚，恨別鳥驚心。", "烽火連三月，家書抵萬金。", "白頭搔更短，渾欲不勝簪。"]},
    {"title": "登高", "author": "杜甫",
     "paragraphs": ["風急天高猿嘯哀，渚清沙白鳥飛迴。", "無邊落木蕭蕭下，不盡長江滾滾來。",
                    "萬里悲秋常作客，百年多病獨登臺。", "艱難苦恨繁霜鬢，潦倒新停濁酒杯。"]},
]
TANG_1000 = [
    {"title": "登鸛雀樓", "author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]},
    {"title": "春曉", "author": "孟浩然", "paragraphs": ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"]},
    {"title": "鹿柴", "author": "王維", "paragraphs": ["空山不見人，但聞人語響。", "返景入深林，復照青苔上。"]},
    {"title": "𠀋字歌", "author": "無名氏", "paragraphs": ["  𠀋𠀋復𠀋𠀋，□□又□□。  "]},  # Ext-B and tofu survive
    {"title": "空", "author": "無名氏", "paragraphs": []},                  # empty poems: skipped and counted
    {"title": "白", "author": "無名氏", "paragraphs": ["  ", ""]},
    {"title": "壞", "author": "無名氏", "paragraphs": "床前明月光"},        # malformed: lines not a list
]
SONG_CI = [{"rhythmic": "浣溪沙", "author": "晏殊",
            "paragraphs": ["一曲新词酒一杯，去年天气旧亭台。夕阳西下几时回。", "无可奈何花落去，似曾相识燕归来。小园香径独徘徊。"]},
           {"rhythmic": "如梦令", "author": "李清照",
            "paragraphs": ["常记溪亭日暮，沉醉不知归路。", "兴尽晚回舟，误入藕花深处。", "争渡，争渡，惊起一滩鸥鹭。"]}]
SHIJING = [{"title": "关雎", "chapter": "国风", "section": "周南",
            "content": ["关关雎鸠，在河之洲。窈窕淑女，君子好逑。", "参差荇菜，左右流之。窈窕淑女，寤寐求之。"]},
           {"title": "蜉蝣", "chapter": "国风", "section": "曹风",
            "content": ["蜉蝣之羽，衣裳楚楚。心之忧矣，于我归处。"]}]


def dump(records) -> bytes:
    return json.dumps(records, ensure_ascii=False).encode("utf-8")


MEMBERS = {
    "package/package.json": b'{"name": "chinese-poetry", "version": "2.0.1"}',
    "package/dist/quantangshi/poet.tang.1000.json": dump(TANG_1000),  # stored before 0: files are ordered by N
    "package/dist/quantangshi/poet.tang.0.json": dump(TANG_0),
    "package/dist/quantangshi/poet.tang.2000.json": b'[{"title": "broken", ',  # does not parse: counted
    "package/dist/quantangshi/error/poet.tang.0.json": dump([{"title": "錯", "author": "錯誤", "paragraphs": ["錯"]}]),
    "package/dist/quantangshi/poet.song.0.json": dump([{"title": "宋詩", "author": "蘇軾", "paragraphs": ["宋"]}]),
    "package/dist/quantangshi/../../../escaped/poet.tang.9.json": dump([JING_YE_SI]),
    "package/dist/songci/ci.song.0.json": dump(SONG_CI),
    "package/dist/shijing/shijing.json": dump(SHIJING),
}


make_tarball = write_tar_gz


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    return make_tarball(tmp_path_factory.mktemp("npm") / poetry.ARCHIVE_NAME, MEMBERS)


@pytest.fixture(autouse=True)
def small_archive(tarball, tmp_path, monkeypatch):
    """Every test trusts the small tarball instead of the real one, and has its own empty cache."""
    monkeypatch.setattr(poetry, "ARCHIVE_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    monkeypatch.setenv("ACORNLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(poetry.ARCHIVE_ENV, raising=False)


def no_npm(monkeypatch):
    """npm is not installed and nothing may start a process."""
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)

    def no_process(*args, **kwargs):
        raise AssertionError("no process may run")

    monkeypatch.setattr(subprocess, "run", no_process)


def read_split(out: Path, split: str) -> list[str]:
    lines = (out / split / "poems.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def poet_of(document: str) -> str:
    return document.split("\n", 1)[0].split("》", 1)[1]


# --- fetching ---


def test_fetch_from_archive_writes_one_document_per_poem_with_whole_poets_held_out(tarball, tmp_path):
    with pytest.warns(UserWarning) as caught:
        assert fetch_poetry("tang-poems", tmp_path / "tang", archive=tarball) == tmp_path / "tang"
    train, val = read_split(tmp_path / "tang", "train"), read_split(tmp_path / "tang", "val")
    assert len(train) + len(val) == 9 and val
    assert not {poet_of(d) for d in train} & {poet_of(d) for d in val}
    # poems in file-number order (0 before 1000, whatever the tarball order); the error/ folder, the
    # Song shi and the escaping member are never read
    in_order = [poem_document(Poem(r["title"], r["author"], r["paragraphs"])) for r in TANG_0 + TANG_1000[:3]]
    assert train == [d for d in in_order + ["《𠀋字歌》無名氏\n𠀋𠀋復𠀋𠀋，□□又□□。"] if d in train]
    assert not any(word in "".join(train + val) for word in ("錯誤", "蘇軾", "broken"))
    assert not (tmp_path / "escaped").exists()
    # bad file and empty poems: skipped, counted and warned about
    messages = " | ".join(str(w.message) for w in caught)
    assert "1 JSON file(s) that do not parse (first: package/dist/quantangshi/poet.tang.2000.json" in messages
    assert "2 empty poem(s)" in messages and "1 record(s) without the expected string fields" in messages
    manifest = json.loads((tmp_path / "cache" / "poetry" / "tang-poems-original" / "manifest.json").read_text("utf-8"))
    assert manifest["bad_files"]["count"] == 1 and manifest["empty_poems"] == 2 and manifest["malformed_records"] == 1
    assert manifest["poets_held_out"] == sorted({poet_of(d) for d in val})
    assert manifest["splits"]["val"]["poems"] == len(val)
    assert manifest["splits"]["train"]["characters"] == sum(map(len, train))


def test_the_document_format_and_chinese_round_trip_exactly(tarball, tmp_path):
    fetch_poetry("tang-poems", tmp_path / "tang", archive=tarball)
    expected = {poem_document(Poem(r["title"], r["author"], r["paragraphs"]))
                for r in TANG_0 + TANG_1000[:3]}
    expected.add("《𠀋字歌》無名氏\n𠀋𠀋復𠀋𠀋，□□又□□。")  # paragraphs are stripped, characters kept
    documents = [d.text for d in iter_documents([tmp_path / "tang" / "train", tmp_path / "tang" / "val"])]
    assert set(documents) == expected and len(documents) == len(expected)
    assert poem_document(Poem("靜夜思", "李白", JING_YE_SI["paragraphs"])) == \
        "《靜夜思》李白\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
    tokenizer = train_tokenizer(documents, kind="bpe", vocab_size=300)  # byte-level: exact for any text
    assert all(tokenizer.decode(tokenizer.encode(text)) == text for text in documents)


def test_song_ci_and_shijing_documents(tarball, tmp_path):
    fetch_poetry("song-ci", tmp_path / "ci", archive=tarball)
    ci = read_split(tmp_path / "ci", "train") + read_split(tmp_path / "ci", "val")
    assert "《如梦令》李清照\n常记溪亭日暮，沉醉不知归路。\n兴尽晚回舟，误入藕花深处。\n争渡，争渡，惊起一滩鸥鹭。" in ci
    fetch_poetry("shijing", tmp_path / "sj", archive=tarball)
    shijing = read_split(tmp_path / "sj", "train") + read_split(tmp_path / "sj", "val")
    assert sorted(shijing) == sorted(["《关雎》国风·周南\n关关雎鸠，在河之洲。窈窕淑女，君子好逑。\n参差荇菜，左右流之。窈窕淑女，寤寐求之。",
                                      "《蜉蝣》国风·曹风\n蜉蝣之羽，衣裳楚楚。心之忧矣，于我归处。"])
    assert len(read_split(tmp_path / "sj", "val")) == 1  # one whole section held out


def test_held_out_poets_are_whole_about_two_percent_and_deterministic():
    counts = {f"poet{i}": 1 + (i * 7919) % 40 for i in range(2000)}
    chosen = held_out_poets(counts)
    share = sum(counts[p] for p in chosen) / sum(counts.values())
    assert 0.019 <= share <= 0.02 and chosen == held_out_poets(dict(reversed(counts.items())))
    assert held_out_poets({"李白": 3, "杜甫": 2}) == {"杜甫"}  # nothing fits 2%: the smallest poet
    assert held_out_poets({"李白": 3}) == set()               # one poet cannot be held out whole


def test_cli_fetch_then_prepare(tarball, tmp_path, capsys):
    out = tmp_path / "tang"
    with pytest.warns(UserWarning):
        cli_main(["data", "fetch", "tang-poems", "--out", str(out), "--archive", str(tarball)])
    printed = capsys.readouterr().out
    assert "train: " in printed and "val: " in printed and "whole poet(s) for validation" in printed
    assert "ready in" in printed and "skipped 1 JSON files that do not parse, 2 empty poems" in printed
    documents = read_split(out, "train")
    train_tokenizer(documents, kind="char", vocab_size=500).save(tmp_path / "tok")
    cli_main(["data", "prepare", "--input", str(out), "--tokenizer", str(tmp_path / "tok"),
              "--out", str(tmp_path / "prepared"), "--workers", "1"])
    meta = read_meta(tmp_path / "prepared")
    assert meta["train"]["documents"] == len(documents) and meta["val"]["documents"] == len(read_split(out, "val"))


def test_cli_lists_the_poetry_corpora_and_checks_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "fetch", "wikipedia", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "shakespeare, tang-poems, song-ci, shijing" in err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "fetch", "shakespeare", "--out", str(tmp_path), "--script", "simplified"])
    assert exit_info.value.code == 2 and "Chinese poetry corpora only" in capsys.readouterr().err


def test_second_fetch_is_instant_from_the_cache_without_npm(tarball, tmp_path, monkeypatch):
    fetch_poetry("tang-poems", tmp_path / "first", archive=tarball)
    no_npm(monkeypatch)
    started = time.perf_counter()
    cli_main(["data", "fetch", "tang-poems", "--out", str(tmp_path / "again")])
    assert time.perf_counter() - started < 2.0
    for split in ("train", "val"):
        assert (tmp_path / "again" / split / "poems.jsonl").read_bytes() == \
            (tmp_path / "first" / split / "poems.jsonl").read_bytes()


def test_sha256_mismatch_is_refused_naming_both_hashes(tarball, tmp_path, monkeypatch):
    actual = poetry.ARCHIVE_SHA256
    monkeypatch.setattr(poetry, "ARCHIVE_SHA256", "0" * 64)
    with pytest.raises(DataError, match=f"sha256 {actual} does not match the expected {'0' * 64}"):
        fetch_poetry("tang-poems", tmp_path / "out", archive=tarball)
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "cache" / "poetry").iterdir()) == []


def test_without_npm_the_error_names_both_ways(tmp_path, monkeypatch):
    no_npm(monkeypatch)
    with pytest.raises(DataError) as error:
        fetch_poetry("tang-poems", tmp_path / "out")
    message = str(error.value)
    assert "install Node.js" in message and "npm" in message
    assert poetry.ARCHIVE_URL in message and "--archive FILE" in message


def fake_npm(folder: Path, tarball: Path, fail: bool = False) -> Path:
    """An `npm` script that logs its arguments and writes `tarball` into --pack-destination (or fails)."""
    folder.mkdir()
    log = folder / "calls.log"
    body = ('echo "npm error code ETARGET" >&2\necho "npm error notarget No matching version found" >&2\n'
            'echo "npm error A complete log of this run can be found in: /x.log" >&2\nexit 1\n' if fail else
            'while [ "$#" -gt 0 ]; do if [ "$1" = "--pack-destination" ]; then dest="$2"; fi; shift; done\n'
            f'cp "{tarball}" "$dest/{poetry.ARCHIVE_NAME}"\necho {poetry.ARCHIVE_NAME}\n')
    script = folder / "npm"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{body}', encoding="utf-8")
    script.chmod(0o755)
    return log


@pytest.mark.skipif(sys.platform == "win32", reason="the fake npm is a shell script")
def test_npm_pack_runs_as_a_real_process(tarball, tmp_path, monkeypatch):
    log = fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.warns(UserWarning):
        fetch_poetry("tang-poems", tmp_path / "out")
    assert log.read_text().startswith("pack chinese-poetry@2.0.1 --pack-destination ")
    assert len(read_split(tmp_path / "out", "train")) + len(read_split(tmp_path / "out", "val")) == 9


@pytest.mark.skipif(sys.platform == "win32", reason="the fake npm is a shell script")
def test_failed_npm_pack_explains_the_manual_route(tarball, tmp_path, monkeypatch):
    fake_npm(tmp_path / "bin", tarball, fail=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataError) as error:
        fetch_poetry("tang-poems", tmp_path / "out")
    message = str(error.value)
    assert "(npm error code ETARGET; npm error notarget No matching version found)" in message
    assert poetry.ARCHIVE_URL in message and "--archive FILE" in message and "complete log" not in message


def test_simplified_script_converts_with_opencc_and_keeps_the_split(tarball, tmp_path, monkeypatch):
    pytest.importorskip("opencc")
    fetch_poetry("tang-poems", tmp_path / "original", archive=tarball)
    no_npm(monkeypatch)  # the simplified cache is converted from the original one: no archive needed
    cli_main(["data", "fetch", "tang-poems", "--out", str(tmp_path / "simple"), "--script", "simplified"])
    for split in ("train", "val"):
        original, simple = read_split(tmp_path / "original", split), read_split(tmp_path / "simple", split)
        assert len(original) == len(simple)
    simple = read_split(tmp_path / "simple", "train") + read_split(tmp_path / "simple", "val")
    assert "《静夜思》李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。" in simple
    fetch_poetry("song-ci", tmp_path / "trad", archive=tarball, script="traditional")
    trad = read_split(tmp_path / "trad", "train") + read_split(tmp_path / "trad", "val")
    assert any(text.startswith("《如夢令》李清照\n常記溪亭日暮") for text in trad)


def test_simplified_without_opencc_is_a_clear_error(tarball, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "opencc", None)  # `import opencc` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'acornlm\[chinese\]'"):
        fetch_poetry("tang-poems", tmp_path / "out", archive=tarball, script="simplified")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "fetch", "tang-poems", "--out", str(tmp_path / "out"), "--archive", str(tarball),
                  "--script", "simplified"])
    assert exit_info.value.code == 2 and "acornlm[chinese]" in capsys.readouterr().err
    with pytest.warns(UserWarning):
        fetch_poetry("tang-poems", tmp_path / "out", archive=tarball)  # the original script needs no OpenCC


def test_an_out_folder_holding_other_files_is_refused(tarball, tmp_path):
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "hamlet_gut.txt").write_text("To be", encoding="utf-8")
    with pytest.raises(DataError, match="already holds other files"):
        fetch_poetry("tang-poems", tmp_path / "out", archive=tarball)


# --- the form checker ---

JUEJU_5 = "《靜夜思》李白\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
JUEJU_7 = "朝辭白帝彩雲間，千里江陵一日還。兩岸猿聲啼不住，輕舟已過萬重山。"
LUSHI_5 = "国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。\n烽火连三月，家书抵万金。\n白头搔更短，浑欲不胜簪。"
LUSHI_7 = ("《登高》杜甫\n風急天高猿嘯哀，渚清沙白鳥飛迴。\n無邊落木蕭蕭下，不盡長江滾滾來。\n"
           "萬里悲秋常作客，百年多病獨登臺。\n艱難苦恨繁霜鬢，潦倒新停濁酒杯。")
IRREGULAR = "君不見黃河之水天上來，奔流到海不復回。君不見高堂明鏡悲白髮，朝如青絲暮成雪。"


def test_poem_lines_cut_at_punctuation_and_skip_the_header():
    assert poem_lines(JUEJU_5) == ["床前明月光", "疑是地上霜", "舉頭望明月", "低頭思故鄉"]
    assert poem_lines("白日依山盡, 黃河入海流. 欲窮千里目? 更上一層樓!") == ["白日依山盡", "黃河入海流", "欲窮千里目", "更上一層樓"]
    assert poem_lines("「春眠」不覺曉；處處、聞啼鳥\n") == ["春眠不覺曉", "處處", "聞啼鳥"]
    assert poem_lines("《題》\n") == [] and poem_lines("") == []


@pytest.mark.parametrize("text, form", [
    (JUEJU_5, "五言绝句"), (JUEJU_7, "七言绝句"), (LUSHI_5, "五言律诗"), (LUSHI_7, "七言律诗"),
    (IRREGULAR, None), ("床前明月光，疑是地上霜。", None), ("一二三四五，一二三四五六七。一二三四五，一二三四五。", None),
    ("The moon is bright, the frost is white. I look up, then down.", None),
])
def test_poem_form_on_real_and_irregular_poems(text, form):
    assert poem_form(text) == form and is_regular(text) == (form is not None)


def test_characters_are_counted_as_characters_not_bytes():
    assert poem_form("𠀋𠀋𠀋𠀋𠀋，𠀋𠀋𠀋𠀋𠀋。𠀋𠀋𠀋𠀋𠀋，𠀋𠀋𠀋𠀋𠀋。") == "五言绝句"  # 4-byte UTF-8 characters


def test_regular_share():
    assert regular_share([JUEJU_5, JUEJU_7, LUSHI_5, IRREGULAR]) == 0.75
    assert regular_share(iter([IRREGULAR])) == 0.0 and regular_share([]) == 0.0
