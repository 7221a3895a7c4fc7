"""Chat datasets in the formats users already have, read into one shape: a list of messages.

Interface (used by the SFT stage and by the DPO/GRPO/distillation stages):

    from acornlm.data.conversations import load_conversations, iter_records, parse_record

    conversations, stats = load_conversations(["data/sft.jsonl"], data_format="auto")
    conversations[0].messages   # [{"role": "user", "content": ...}, {"role": "assistant", ...}]
    conversations[0].source     # "data/sft.jsonl:1"
    print(stats.summary())      # kept / skipped (no assistant turn, roles out of order) with examples
    for where, record in iter_records(path): ...   # (file:line, parsed JSON) of a .jsonl/.json file

Formats (auto-detected from the first record of each file, or named with `data_format`):

    messages   {"messages": [{"role", "content"}, ...], "tools"?}             OpenAI / TRL
    minimind   {"conversations": [{"role", "content"}, ...]}                  MiniMind sft_*.jsonl
    sharegpt   {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}  ShareGPT / LLaMA-Factory
    alpaca     {"instruction", "input"?, "output", "system"?, "history"?}     Alpaca / LLaMA-Factory

Tools and thinking, as each format writes them:

    messages   assistant {"tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}],
               "reasoning_content"?}, then {"role": "tool", "tool_call_id", "content"}; "tools" beside "messages"
    minimind   the same roles; "tools" (a JSON string or list) on the system message, "tool_calls"
               (a JSON string or list) and "reasoning_content" on assistant messages
    sharegpt   {"from": "function_call", "value": "{\"name\", \"arguments\"}"} (one call or a list) and
               {"from": "observation", "value": result}; "tools" a JSON string beside "conversations"

Every form becomes one shape: assistant messages with "tool_calls": [{"name", "arguments": dict}]
and "reasoning_content" (also split out of a content written "<think>...</think>answer"), "tool"
messages, and the conversation's `tools`. Tool JSON that does not parse is a DataError naming the
file and line.

Files are `.jsonl` (one record per line; errors name the line) or `.json` holding a list of records
(errors name the item); a folder means every such file inside, in sorted order.

What is an error and what is skipped: a file that is not JSON, a record that does not have the
fields of its format, or a message without a string role/content is a DataError naming the file
and line (the file is malformed and needs fixing). A well-formed conversation that cannot be
trained on is *skipped and counted*: one with no assistant turn, roles out of order (after an
optional system message, turns must alternate user/assistant starting with user), an unsupported
role or ChatML special tokens inside a content. Skipping, not failing,
because large public datasets always hold a few such rows; `stats` reports how many and where.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from acornlm.data.chat import Message, message_problem, tool_call_shape_problem
from acornlm.data.tools import tool_names
from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer.chat_template import split_inline_reasoning

FORMATS = {
    "messages": '{"messages": [{"role", "content"}, ...]} (OpenAI / TRL)',
    "minimind": '{"conversations": [{"role", "content"}, ...]} (MiniMind)',
    "sharegpt": '{"conversations": [{"from", "value"}, ...]} (ShareGPT)',
    "alpaca": '{"instruction", "input"?, "output", "system"?, "history"?} (Alpaca / LLaMA-Factory)',
}
DATA_SUFFIXES = (".jsonl", ".json")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}
MAX_PROBLEM_EXAMPLES = 5


@dataclass(frozen=True)
class Conversation:
    """One conversation ready for rendering, and where it came from (`file:line`)."""

    messages: list[Message]
    source: str
    tools: list[dict[str, Any]] | None = None  # the functions the model may call, shown in the system turn


@dataclass
class LoadStats:
    """What loading kept and skipped; `summary()` is the line the stages print."""

    records: int = 0
    kept: int = 0
    no_assistant: int = 0
    bad_roles: int = 0
    formats: dict[str, str] = field(default_factory=dict)  # file -> format
    problems: list[str] = field(default_factory=list)  # the first few "file:line: reason"

    def skip(self, where: str, reason: str) -> None:
        if reason.startswith("no assistant turn"):
            self.no_assistant += 1
        else:
            self.bad_roles += 1
        if len(self.problems) < MAX_PROBLEM_EXAMPLES:
            self.problems.append(f"{where}: {reason}")

    @property
    def skipped(self) -> int:
        return self.no_assistant + self.bad_roles

    def summary(self) -> str:
        text = (f"{self.kept:,} of {self.records:,} conversations kept; skipped {self.no_assistant:,} "
                f"with no assistant turn and {self.bad_roles:,} with roles out of order or unsupported")
        if self.problems:
            text += " (first: " + "; ".join(self.problems[:2]) + ")"
        return text


# --- reading records ---

def data_files(paths: Sequence[str | Path]) -> list[Path]:
    """The .jsonl/.json files of `paths` (folders searched recursively, in sorted order)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                           and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path} holds no {' or '.join(DATA_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise DataError(f"{path}: chat data must be a .jsonl file (one record per line) or a .json list")
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for each record of a .jsonl file (location `file:line`) or .json list (`file[item]`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte offset {exc.start}); re-encode it as UTF-8") from exc
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must hold a list of records, got {type(data).__name__}; "
                            "or write one record per line in a .jsonl file")
        for index, record in enumerate(data):
            yield f"{path}[{index}]", record
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
        yield f"{path}:{line_number}", record


# --- formats ---

def detect_format(record: Any) -> str | None:
    """The format name of one record, from its keys; None when no format fits."""
    if not isinstance(record, dict):
        return None
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if isinstance(turns, list):
            first = turns[0] if turns else {}
            if isinstance(first, dict) and "from" in first and "value" in first:
                return "sharegpt"
            return "messages" if key == "messages" else "minimind"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def describe_keys(record: Any) -> str:
    if isinstance(record, dict):
        return "keys " + ", ".join(repr(k) for k in record) if record else "an empty object"
    return f"a JSON {type(record).__name__}"


def unknown_format_error(where: str, record: Any) -> DataError:
    supported = "; ".join(f"{name}: {layout}" for name, layout in FORMATS.items())
    return DataError(f"{where}: cannot tell the chat format of this record (found {describe_keys(record)}). "
                     f"Supported formats: {supported}")


def content_text(content: Any, where: str) -> str:
    """A message content as text: a string, or OpenAI content parts [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise DataError(f"{where}: a message content must be a string (or a list of text parts), "
                    f"got {type(content).__name__}")


def parse_messages(turns: Any, where: str, role_key: str = "role", content_key: str = "content",
                   role_names: dict[str, str] | None = None) -> list[Message]:
    """A list of {role, content} dicts (keys and role names as in the source format) as messages,
    with their tool calls and thinking in the one shape described in the module docstring.

    A role name that `role_names` does not know is kept as it is, so the conversation is
    skipped as "unsupported role" rather than failing the whole file.
    """
    if not isinstance(turns, list):
        raise DataError(f"{where}: expected a list of messages, got {type(turns).__name__}")
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        here = f"{where}: message #{index}"
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or (
                content_key not in turn and not turn.get("tool_calls")):
            raise DataError(f"{where}: message #{index} must be an object with a string {role_key!r} and a "
                            f"{content_key!r}, got {describe_keys(turn)}")
        role = turn[role_key]
        if role_names is not None:
            role = role_names.get(role.lower(), role)
        content = turn.get(content_key)
        text = "" if content is None else content_text(content, here)
        if role == "function_call":  # ShareGPT: the value is the call (or a list of calls)
            calls = parse_tool_calls(text, here)
            if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"] = calls  # a reply that both speaks and calls
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        message: Message = {"role": role, "content": text}
        if role == "assistant":
            reasoning = turn.get("reasoning_content", turn.get("reasoning"))
            if reasoning is not None and not isinstance(reasoning, str):
                raise DataError(f"{here}: reasoning_content must be a string, got {type(reasoning).__name__}")
            if reasoning is None:
                reasoning, text = split_inline_reasoning(text)
                reasoning = None if reasoning is None else reasoning.strip("\n")  # as the template renders it
                message["content"] = text
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if turn.get("tool_calls"):
                message["tool_calls"] = parse_tool_calls(turn["tool_calls"], here)
        messages.append(message)
    return messages


def parse_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls in any of the formats' spellings (a JSON string or a list; each call bare or in
    OpenAI's {"function": {...}}, arguments a dict or a JSON string) as [{"name", "arguments": dict}]."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: the tool calls are not valid JSON ({exc.msg}, column {exc.colno}): "
                            f"{value!r:.80}") from exc
    calls = value if isinstance(value, list) else [value]
    parsed = []
    for number, call in enumerate(calls):
        problem = tool_call_shape_problem(call)
        if problem:
            raise DataError(f"{where}: tool call #{number}: {problem}")
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        parsed.append({"name": function["name"],
                       "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments})
    return parsed


def parse_tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """A tools list (a JSON string or a list of schemas) as a list; None when there is none."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: 'tools' is not valid JSON ({exc.msg}, column {exc.colno})") from exc
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(tool, dict) and tool_names([tool]) for tool in value):
        raise DataError(f"{where}: 'tools' must be a list of function schemas, each with a name "
                        "({\"type\": \"function\", \"function\": {\"name\", \"parameters\"}} or bare)")
    return value


def parse_alpaca(record: dict, where: str) -> list[Message]:
    """Alpaca / LLaMA-Factory: system?, history [[instruction, response], ...]?, then instruction
    (+ "\\n" + input when there is one) as the user turn and output as the assistant turn."""
    def text(key: str) -> str:
        value = record.get(key) or ""
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        return value

    messages: list[Message] = []
    if text("system"):
        messages.append({"role": "system", "content": text("system")})
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            for pair in history):
        raise DataError(f"{where}: 'history' must be a list of [instruction, response] string pairs")
    for query, response in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    prompt = text("instruction") + ("\n" + text("input") if text("input") else "")
    messages.append({"role": "user", "content": prompt})
    if record.get("output") is not None:
        messages.append({"role": "assistant", "content": text("output")})
    return messages


def fits_format(record: Any, data_format: str) -> bool:
    """Whether `record` has the top-level fields of `data_format` (the messages are checked when parsed)."""
    if not isinstance(record, dict):
        return False
    if data_format == "messages":
        return isinstance(record.get("messages"), list)
    if data_format == "minimind":
        return isinstance(record.get("conversations"), list)
    if data_format == "sharegpt":
        return isinstance(record.get("conversations", record.get("messages")), list)
    return "instruction" in record and "output" in record


def parse_record(record: Any, data_format: str, where: str) -> tuple[list[Message], list[dict] | None]:
    """The (messages, tools) of one record in `data_format`; DataError (naming `where`) when it does not fit."""
    if data_format not in FORMATS:
        raise DataError(f"unknown chat data format {data_format!r}: choose auto or one of {', '.join(FORMATS)}")
    if not fits_format(record, data_format):
        raise DataError(f"{where}: expected the {data_format} format {FORMATS[data_format]}, "
                        f"found {describe_keys(record)}")
    if data_format == "alpaca":
        return parse_alpaca(record, where), None
    if data_format == "sharegpt":
        turns = record.get("conversations", record.get("messages"))
        messages = parse_messages(turns, where, "from", "value", SHAREGPT_ROLES)
        system = record.get("system")
        if isinstance(system, str) and system and messages[:1] and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return messages, parse_tools(record.get("tools"), where)
    turns = record["messages"] if data_format == "messages" else record["conversations"]
    messages = parse_messages(turns, where)
    tools = parse_tools(record.get("tools"), where)
    if tools is None and isinstance(turns, list) and turns and isinstance(turns[0], dict):
        tools = parse_tools(turns[0].get("tools") or turns[0].get("functions"), where)  # MiniMind: on the system turn
    return messages, tools


# --- loading ---

def load_conversations(paths: Sequence[str | Path] | str | Path,
                       data_format: str = "auto") -> tuple[list[Conversation], LoadStats]:
    """Every trainable conversation of the files in `paths`, and what was skipped (see module docstring).

    With `data_format="auto"` each file's format is detected from its first record. DataError
    when a file is malformed or when no conversation at all can be trained on.
    """
    if data_format != "auto" and data_format not in FORMATS:
        raise DataError(f"unknown chat data format {data_format!r}: choose auto or one of {', '.join(FORMATS)}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    stats = LoadStats()
    conversations: list[Conversation] = []
    for path in data_files(paths):
        file_format = None if data_format == "auto" else data_format
        for where, record in iter_records(path):
            if file_format is None:
                file_format = detect_format(record)
                if file_format is None:
                    raise unknown_format_error(where, record)
            stats.formats[str(path)] = file_format
            stats.records += 1
            messages, tools = parse_record(record, file_format, where)
            problem = message_problem(messages)
            if problem:
                stats.skip(where, problem)
                continue
            conversations.append(Conversation(messages, where, tools))
            stats.kept += 1
    if not conversations:
        detail = f": {'; '.join(stats.problems)}" if stats.problems else ""
        raise DataError(f"no trainable conversation in {', '.join(map(str, paths))} "
                        f"({stats.records} records, {stats.skipped} skipped){detail}")
    return conversations, stats


VAL_SPLIT_STREAM = 2**31 - 2  # the random stream that picks held-out conversations


def split_conversations(conversations: Sequence[Conversation], val_fraction: float,
                        seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a seeded random `val_fraction` of the conversations is held out (at least
    one when val_fraction > 0 and there are two or more)."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(conversations)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    order = np.random.Generator(np.random.PCG64([seed, VAL_SPLIT_STREAM])).permutation(n)
    held_out = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    val = [c for i, c in enumerate(conversations) if i in held_out]
    return train, val
