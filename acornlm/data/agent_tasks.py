"""Synthetic tasks that a model can only solve with its tool, or solves better by thinking first:
the data behind `acornlm demo-agent`, where tool calling and thinking are measured, not assumed.

Interface (used by the agent demo, GRPO/PPO's agentic rollouts and their evaluation):

    from acornlm.data.agent_tasks import AGENT_TASKS, make_agent_examples, price_tool, PRICE_TOOL

    examples = make_agent_examples("price", n=100, seed=0, split="train")
    examples[0].messages       # the SFT conversation: user -> tool call -> tool result -> answer
    examples[0].tools          # [PRICE_TOOL]
    examples[0].record()       # the RL prompt record: {"messages", "tools", "answer", "task", "table", ...}
    price_tool("kiwi", example=record)   # the environment: this question's price of a kiwi

Tasks:

    price   "How much does a kiwi cost?" Every question comes with its own price list (random prices
            for every item), so no amount of memorising helps: the model must call
            price({"item": "kiwi"}), read the tool's answer and repeat it ("37 coins."). Scored by
            the call's validity (it parses, names `price`, asks for the right item) and the answer.
    add     "What is 487 + 356?" with a column-by-column scratchpad as the reasoning
            ("7 + 6 = 13, write 3, carry 1" ...). Half the training questions are asked plainly
            and answered with the scratchpad; the other half end with "/no_think" (Qwen3's soft
            switch) and are answered at once, after an empty think block. So one model can be
            asked with thinking on (a plain question, the prompt opens <think>) or off ("/no_think",
            the prompt closes an empty block): accuracy on against off measures what thinking buys.

Held-out split: as acornlm.data.tasks, by a hash of the prompt (for `price`, of the question and
its price list), so evaluation asks questions training never saw.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from acornlm.data.tasks import split_of
from acornlm.data.tools import Reply
from acornlm.errors import ConfigError

GOODS = ("apple banana bread butter candle cheese coffee egg fish flour grape honey jam kiwi lemon melon milk "
         "nut onion orange pear pepper plum rice salt soap sugar tea tomato wine").split()
PRICE_QUESTIONS = ("How much does {a} {item} cost?", "What is the price of {a} {item}?",
                   "What does {a} {item} cost today?", "Tell me the price of {a} {item}.", "{A} {item}: how much?")
PRICE_TOOL = {"type": "function", "function": {
    "name": "price", "description": "The price of one item in today's shop, in coins.",
    "parameters": {"type": "object", "properties": {"item": {"type": "string", "description": "the item"}},
                   "required": ["item"], "additionalProperties": False}}}
NUMBER = re.compile(r"-?\d+")
NO_THINK = "/no_think"  # Qwen3's soft switch: answer without thinking


@dataclass(frozen=True)
class AgentExample:
    """One question, its full training conversation, the tools it may use and the right answer."""

    task: str
    prompt: str
    answer: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the environment's state (the price list)

    def prompt_messages(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.prompt}]

    def record(self, thinking: bool = True) -> dict[str, Any]:
        """The prompt record RL stages and evaluation read (acornlm.data.prompts' shape, plus tools).
        For `add`, `thinking` chooses the mode: on (the prompt opens <think>) or off ("/no_think"
        and an empty think block)."""
        record = {"messages": self.prompt_messages(), "prompt": self.prompt, "answer": self.answer,
                  "task": self.task, **self.extra}
        if self.tools:
            record["tools"] = self.tools
        if self.task == "add":
            record["enable_thinking"] = thinking
            if not thinking:
                record["messages"] = [{"role": "user", "content": f"{self.prompt} {NO_THINK}"}]
        return record


def article(item: str) -> str:
    return "an" if item[0] in "aeiou" else "a"


def make_price(rng: random.Random, index: int) -> AgentExample:
    table = {item: rng.randint(1, 999) for item in GOODS}
    item = rng.choice(GOODS)
    question = rng.choice(PRICE_QUESTIONS)
    prompt = question.format(a=article(item), A=article(item).capitalize(), item=item)
    answer = f"{table[item]} coins."
    messages = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "price", "arguments": {"item": item}}]},
                {"role": "tool", "content": str(table[item])},
                {"role": "assistant", "content": answer}]
    return AgentExample("price", prompt, answer, messages, [PRICE_TOOL], {"table": table, "item": item})


def addition_scratchpad(a: int, b: int) -> str:
    """Column addition written out, right to left: "7 + 6 = 13, write 3, carry 1" per column."""
    lines, carry = [], 0
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    for column in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[column]) if column < len(digits_a) else 0
        y = int(digits_b[column]) if column < len(digits_b) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = total // 10
        lines.append(f"{terms} = {total}, write {total % 10}" + (f", carry {carry}" if carry else ""))
    if carry:
        lines.append(f"write the carry {carry}")
    return "\n".join(lines) + f"\nso {a + b}"


def make_add(rng: random.Random, index: int) -> AgentExample:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    prompt = f"What is {a} + {b}?"
    answer = str(a + b)
    thinking = index % 2 == 0  # half think; half are asked "/no_think" and answer at once (an empty block)
    messages = [{"role": "user", "content": prompt if thinking else f"{prompt} {NO_THINK}"},
                {"role": "assistant", "content": answer,
                 "reasoning_content": addition_scratchpad(a, b) if thinking else ""}]
    return AgentExample("add", prompt, answer, messages)


AGENT_TASKS = {"price": make_price, "add": make_add}


def make_agent_examples(task: str, n: int, seed: int = 0, split: str = "train") -> list[AgentExample]:
    """`n` examples of one task from one split, the same for the same arguments."""
    if task not in AGENT_TASKS:
        raise ConfigError(f"unknown agent task {task!r}: choose from {', '.join(AGENT_TASKS)}")
    rng = random.Random(f"agent/{task}/{seed}/{split}")
    examples: list[AgentExample] = []
    while len(examples) < n:
        example = AGENT_TASKS[task](rng, len(examples))
        key = example.prompt + (f"|{sorted(example.extra['table'].items())}" if "table" in example.extra else "")
        if split_of(task, key) == split:
            examples.append(example)
    return examples


# --- the environment and the scoring ---

def price_tool(item: str, *, example: dict[str, Any]) -> str:
    """The price tool of one question: reads that question's price list (its prompt record)."""
    table = example.get("table") or {}
    if item not in table:
        return f"unknown item {item!r}"
    return str(table[item])


AGENT_FUNCTIONS = {"price": price_tool}


def first_number(text: str) -> int | None:
    match = NUMBER.search(text)
    return int(match.group()) if match else None


def answer_correct(record: dict[str, Any], final_content: str) -> bool:
    """The final answer holds the right number first (how both tasks are scored)."""
    return first_number(final_content) == first_number(record["answer"])


def call_is_right(record: dict[str, Any], reply: Reply) -> bool:
    """The tool call a `price` question needs: valid, one call of `price`, for the asked item."""
    return (not reply.problems and len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "price"
            and reply.tool_calls[0]["arguments"] == {"item": record["item"]})


def agent_task_reward(completion: str, example: dict[str, Any]) -> float:
    """A GRPO/PPO reward for the final answer: 1 when it is right, else 0 (reads `answer`)."""
    return float(answer_correct(example, completion))


def task_records(tasks: Sequence[str], n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """Prompt records of several tasks, `n` each, interleaved."""
    per_task = [[e.record() for e in make_agent_examples(task, n, seed, split)] for task in tasks]
    return [record for group in zip(*per_task) for record in group]
