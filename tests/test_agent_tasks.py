"""The tool and thinking tasks behind `acornlm demo-agent`: deterministic, disjoint splits, a price list
per question that only the tool reveals, a scratchpad that adds up, rewards that read the final answer."""

from __future__ import annotations

import random

import pytest

from acornlm.data.agent_tasks import (
    PRICE_TOOL,
    addition_scratchpad,
    agent_task_reward,
    answer_correct,
    call_is_right,
    make_agent_examples,
    price_tool,
)
from acornlm.data.chat import chat_text, message_problem
from acornlm.data.prompts import task_prompt_records
from acornlm.data.tools import parse_reply
from acornlm.errors import ConfigError
from acornlm.train.rewards import task_reward


@pytest.mark.parametrize("task", ["price", "add"])
def test_examples_are_deterministic_valid_chats_with_disjoint_splits(task):
    train = make_agent_examples(task, 200, seed=3)
    assert train == make_agent_examples(task, 200, seed=3)
    heldout = make_agent_examples(task, 50, seed=3, split="heldout")
    assert not {e.prompt + str(e.extra) for e in train} & {e.prompt + str(e.extra) for e in heldout}
    for example in train[:20]:
        assert message_problem(example.messages) is None
        chat_text(example.messages, tools=example.tools)


def test_a_price_question_is_answered_only_through_its_own_price_list():
    examples = make_agent_examples("price", 50, seed=0)
    prices = {e.extra["table"]["tea"] for e in examples}
    assert len(prices) > 30  # the same item costs something else in almost every question
    example = examples[0]
    record = example.record()
    call = example.messages[1]["tool_calls"][0]
    assert call == {"name": "price", "arguments": {"item": record["item"]}}
    assert price_tool(**call["arguments"], example=record) == example.messages[2]["content"]
    assert example.answer == f"{record['table'][record['item']]} coins."
    assert price_tool("unicorn", example=record) == "unknown item 'unicorn'"
    assert record["tools"] == [PRICE_TOOL]


@pytest.mark.parametrize("seed", range(5))
def test_the_scratchpad_adds_up(seed):
    rng = random.Random(seed)
    a, b = rng.randint(1, 9999), rng.randint(1, 9999)
    lines = addition_scratchpad(a, b).splitlines()
    assert lines[-1] == f"so {a + b}"
    written = "".join(line.split("write ")[1].split(",")[0].replace("the carry ", "") for line in lines[:-1])
    assert int(written[::-1]) == a + b


def test_half_of_the_addition_answers_think():
    examples = make_agent_examples("add", 100, seed=1)
    thinking = [e for e in examples if e.messages[1]["reasoning_content"]]
    assert len(thinking) == 50
    assert all(not e.messages[0]["content"].endswith("/no_think") for e in thinking)
    direct = [e for e in examples if e not in thinking]  # asked "/no_think" (Qwen3's soft switch), answered at once
    assert all(e.messages[1]["reasoning_content"] == "" and e.messages[0]["content"].endswith(" /no_think")
               for e in direct)
    on, off = examples[0].record(), examples[0].record(thinking=False)
    assert on["enable_thinking"] is True and on["messages"][0]["content"] == examples[0].prompt
    assert off["enable_thinking"] is False and off["messages"][0]["content"] == examples[0].prompt + " /no_think"


def test_rewards_and_call_checks_read_the_final_answer():
    record = make_agent_examples("price", 1, seed=0)[0].record()
    price = record["table"][record["item"]]
    assert agent_task_reward(f"{price} coins.", record) == task_reward(f"{price} coins.", record) == 1.0
    assert agent_task_reward(f"{price + 1} coins.", record) == 0.0
    assert answer_correct(record, f"It is {price}.")
    good = parse_reply(f'<tool_call>\n{{"name": "price", "arguments": {{"item": "{record["item"]}"}}}}\n</tool_call>',
                       [PRICE_TOOL])
    wrong_item = parse_reply('<tool_call>\n{"name": "price", "arguments": {"item": "zzz"}}\n</tool_call>', [PRICE_TOOL])
    assert call_is_right(record, good) and not call_is_right(record, wrong_item)


def test_prompt_records_mix_plain_and_agent_tasks():
    records = task_prompt_records("arithmetic,price,add", 4, 0, "train")
    assert [r["task"] for r in records].count("price") == 4
    assert all("tools" in r for r in records if r["task"] == "price")
    with pytest.raises(ConfigError, match="unknown agent task"):
        make_agent_examples("juggle", 1)
