"""Prompt records for reinforcement learning (GRPO): prompts with whatever the rewards read.

    records = load_prompt_records(["prompts.jsonl"])       # {"prompt": ..., "answer": ..., ...} per line
    records = task_prompt_records("arithmetic", 100, seed=0, split="train")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acornlm.data.agent_tasks import AGENT_TASKS
from acornlm.data.agent_tasks import task_records as agent_task_records
from acornlm.data.chat import message_problem
from acornlm.data.conversations import data_files, describe_keys, iter_records, parse_messages
from acornlm.data.tasks import make_dataset
from acornlm.errors import DataError


def load_prompt_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Prompt records of .jsonl/.json files: {"prompt": text or messages, ...any fields the rewards read}
    or chat data {"messages": [..., {"role": "assistant", ...}], ...} whose last answer becomes "answer".

    Each record gets "messages" (the prompt conversation, ending with a user turn) and "prompt"
    (the last user message). Malformed records are a DataError naming the file and line.
    """
    records = []
    for path in data_files(paths):
        for where, raw in iter_records(path):
            if not isinstance(raw, dict) or not ("prompt" in raw or "messages" in raw):
                raise DataError(f"{where}: a GRPO prompt record needs \"prompt\" (text or messages) or "
                                f"\"messages\", found {describe_keys(raw)}")
            record = dict(raw)
            if isinstance(raw.get("prompt"), str):
                messages = [{"role": "user", "content": raw["prompt"]}]
            else:
                messages = parse_messages(raw.get("prompt", raw.get("messages")), where)
                if messages and messages[-1]["role"] == "assistant":
                    record.setdefault("answer", messages[-1]["content"])
                    messages = messages[:-1]
            problem = message_problem([*messages, {"role": "assistant", "content": "x"}])
            if problem:
                raise DataError(f"{where}: the prompt is not a conversation awaiting an answer: {problem}")
            record["messages"], record["prompt"] = messages, messages[-1]["content"]
            records.append(record)
    if not records:
        raise DataError(f"no prompts in {', '.join(map(str, paths))}")
    return records


def task_prompt_records(tasks: str, count: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`count` prompts per task from acornlm.data.tasks (`split` "train" or "heldout"), with answers;
    the tool and thinking tasks of acornlm.data.agent_tasks (price, add) bring their tools and
    environment state too."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    agent = [name for name in names if name in AGENT_TASKS]
    plain = ",".join(name for name in names if name not in AGENT_TASKS)
    records = [{"messages": example.messages(with_answer=False), "prompt": example.prompt,
                "answer": example.answer, "task": example.task}
               for example in (make_dataset(plain, count, seed, split) if plain else [])]
    return records + (agent_task_records(agent, count, seed, split) if agent else [])
