"""The Chinese synthetic tasks: Chinese numerals, 你是谁, and a poem of the asked form, with held-out splits."""

from __future__ import annotations

import pytest

from acornlm.data import tasks
from acornlm.data.tasks import (
    TASKS,
    ZH_IDENTITY_ANSWER,
    chinese_number,
    make_dataset,
    make_examples,
    parse_tasks,
    split_of,
    use_poems,
)
from acornlm.errors import ConfigError

QUATRAIN = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
SEVENS = "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"
EIGHT_FIVES = "\n".join(["國破山河在，城春草木深。", "感時花濺淚，恨別鳥驚心。", "烽火連三月，家書抵萬金。",
                         "白頭搔更短，渾欲不勝簪。"])


@pytest.mark.parametrize("n,text", [(0, "零"), (7, "七"), (10, "十"), (11, "十一"), (20, "二十"), (45, "四十五"),
                                     (99, "九十九"), (100, "一百"), (105, "一百零五"), (110, "一百一十"),
                                     (119, "一百一十九"), (198, "一百九十八")])
def test_chinese_numbers(n, text):
    assert chinese_number(n) == text


def test_zh_arithmetic_and_identity_are_right_and_split():
    for example in make_examples("zh_arithmetic", 50, seed=3):
        assert example.prompt.endswith("等于多少？") and ("加" in example.prompt or "减" in example.prompt)
        assert all(ch in "零一二三四五六七八九十百" for ch in example.answer)
        assert split_of("zh_arithmetic", example.prompt) == "train"
    assert {e.answer for e in make_examples("zh_identity", 20)} == {ZH_IDENTITY_ANSWER}
    held_out = {e.prompt for e in make_examples("zh_arithmetic", 200, split="heldout")}
    assert not held_out & {e.prompt for e in make_examples("zh_arithmetic", 2000)}
    assert TASKS["zh_arithmetic"].check(" 八十二 ", "八十二") and not TASKS["zh_arithmetic"].check("82", "八十二")


def test_groups_keep_the_english_default_and_name_the_chinese_set():
    assert parse_tasks(None) == parse_tasks("all") == parse_tasks("en") == [
        "arithmetic", "reverse", "count", "sort", "identity"]
    assert parse_tasks("zh") == ["zh_identity", "zh_arithmetic", "zh_poem"]
    with pytest.raises(ConfigError, match="or a group: all, en, zh"):
        parse_tasks("poems")


def test_zh_poem_asks_for_a_form_and_any_poem_of_that_form_is_right(monkeypatch):
    monkeypatch.setattr(tasks, "POEMS", [])
    with pytest.raises(ConfigError, match="zh_poem needs poems"):
        make_examples("zh_poem", 1)
    assert use_poems([("靜夜思", QUATRAIN), ("雜詩", "一二三。"), ("", QUATRAIN)]) == 1  # irregular, untitled: out
    with pytest.raises(ConfigError, match="found 0 of the heldout split"):  # one prompt cannot fill both splits
        make_examples("zh_poem", 1, split="heldout" if split_of("zh_poem", "写一首题为《靜夜思》的五言绝句。")
                      == "train" else "train")
    kept = use_poems([(f"詩{i}", body) for i in range(40) for body in (QUATRAIN, SEVENS, EIGHT_FIVES)])
    assert kept == 120
    train, held_out = make_examples("zh_poem", 30, seed=1), make_examples("zh_poem", 10, seed=1, split="heldout")
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    example = train[0]
    assert example.prompt.startswith("写一首题为《詩") and example.prompt.endswith(("五言绝句。", "七言绝句。", "五言律诗。"))
    check = TASKS["zh_poem"].check
    assert check("白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。", QUATRAIN)  # another 五言绝句
    assert not check(SEVENS, QUATRAIN) and not check("床前明月光", QUATRAIN)
    data = make_dataset("zh", 5, seed=0)
    assert {e.task for e in data} == {"zh_identity", "zh_arithmetic", "zh_poem"}
