"""Evaluation of tool calling and thinking on the agent tasks (acornlm/data/agent_tasks.py): held-out
questions, greedy replies, the tools really run.

    from acornlm.eval.agent import evaluate_agent
    figures = evaluate_agent(model, tokenizer, ["price", "add"], n=100, seed=0)
    figures["price"]   # {"n": 100, "tool_call_valid": 0.97, "tool_call_right": 0.95, "accuracy": 0.93, ...}
    figures["add"]     # {"n": 100, "accuracy_thinking": 0.62, "accuracy_no_thinking": 0.18, ...}

price: each question is played out as a conversation (acornlm.infer.agent.rollout_group, greedy, at
most `max_turns` turns) against its own price list. Three shares of the questions:
    tool_call_valid   the first reply holds tool calls that parse and fit the tool's schema
    tool_call_right   ... and is exactly one call of `price` for the item asked about
    accuracy          the final answer holds the right price (after a tool call: no lucky guesses)
add: the same questions asked twice, with thinking on (the prompt opens <think>, the model writes
its scratchpad) and off (the question ends with "/no_think" and the prompt closes an empty think
block): accuracy in each mode, and how many tokens the replies took on average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from acornlm.data.agent_tasks import AGENT_FUNCTIONS, AgentExample, answer_correct, make_agent_examples
from acornlm.data.chat import ADD_CHAT_TOKENS_HINT
from acornlm.errors import ConfigError
from acornlm.infer.agent import Trajectory, rollout_group
from acornlm.infer.sampling import SamplingParams
from acornlm.model import Transformer
from acornlm.tokenizer import Tokenizer


def play(model: Transformer, tokenizer: Tokenizer, record: dict[str, Any], *, max_new_tokens: int,
         enable_thinking: bool | None = None, max_turns: int = 3) -> Trajectory:
    """One greedy conversation on a question (with its tools, if it has any)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, num_samples=1)
    return rollout_group(model, tokenizer, record["messages"], tools=record.get("tools") or [],
                         functions=AGENT_FUNCTIONS if record.get("tools") else {}, params=params,
                         max_turns=max_turns, enable_thinking=enable_thinking, example=record)[0]


def first_call_checks(record: dict[str, Any], trajectory: Trajectory) -> tuple[bool, bool]:
    """(valid, right) of the model's first turn on a price question: valid calls at all, and exactly
    the call of `price` for the asked item."""
    first = next(m for m in trajectory.messages[len(record["messages"]):] if m["role"] == "assistant")
    calls = first.get("tool_calls") or []
    right = calls == [{"name": "price", "arguments": {"item": record["item"]}}]
    return bool(calls), right


def evaluate_price(model: Transformer, tokenizer: Tokenizer, examples: Sequence[AgentExample],
                   max_new_tokens: int = 48) -> dict[str, Any]:
    valid = right = correct = errors = 0
    for example in examples:
        record = example.record()
        trajectory = play(model, tokenizer, record, max_new_tokens=max_new_tokens)
        is_valid, is_right = first_call_checks(record, trajectory)
        valid, right = valid + is_valid, right + is_right
        correct += answer_correct(record, trajectory.reply.content) and trajectory.stats["valid_calls"] > 0
        errors += trajectory.stats["tool_errors"] + trajectory.stats["timeouts"]
    n = len(examples)
    return {"n": n, "tool_call_valid": valid / n, "tool_call_right": right / n, "accuracy": correct / n,
            "tool_errors": errors}


def evaluate_add(model: Transformer, tokenizer: Tokenizer, examples: Sequence[AgentExample],
                 max_new_tokens: int = 96) -> dict[str, Any]:
    figures: dict[str, Any] = {"n": len(examples)}
    for mode, thinking in (("thinking", True), ("no_thinking", False)):
        correct = tokens = 0
        for example in examples:
            record = example.record(thinking)
            trajectory = play(model, tokenizer, record, max_new_tokens=max_new_tokens, enable_thinking=thinking,
                              max_turns=1)
            correct += answer_correct(record, trajectory.reply.content)
            tokens += trajectory.num_generated
        figures[f"accuracy_{mode}"] = correct / len(examples)
        figures[f"reply_tokens_{mode}"] = tokens / len(examples)
    return figures


EVALUATORS = {"price": evaluate_price, "add": evaluate_add}


def evaluate_agent(model: Transformer, tokenizer: Tokenizer, tasks: Sequence[str], n: int = 100,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """The figures of each task on `n` held-out questions (see the module docstring)."""
    unknown = [task for task in tasks if task not in EVALUATORS]
    if unknown or n < 1:
        raise ConfigError(f"agent evaluation needs tasks among {', '.join(EVALUATORS)} and n >= 1; "
                          f"got {list(tasks)} and n={n}")
    missing = tokenizer.missing_chat_tokens
    if missing:
        raise ConfigError(f"the tokenizer lacks the chat tokens {', '.join(missing)}: {ADD_CHAT_TOKENS_HINT}")
    was_training = model.training
    model.eval()
    try:
        return {task: EVALUATORS[task](model, tokenizer, make_agent_examples(task, n, seed, "heldout"))
                for task in tasks}
    finally:
        model.train(was_training)
