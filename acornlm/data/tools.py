"""Reading what a model wrote: its thinking, its answer and its tool calls, checked against the tools.

Interface (used by the server, `acornlm chat`, agentic rollouts and the demo's scoring):

    from acornlm.data.tools import parse_reply, ReplyStreamParser, tool_call_problem, tool_names

    reply = parse_reply(text, tools)          # the whole generated text (after "<|im_start|>assistant\\n")
    reply.reasoning_content                   # what was inside <think>...</think>, or None
    reply.content                             # the answer
    reply.tool_calls                          # [{"name": str, "arguments": dict}], all valid
    reply.problems                            # why a call was refused: then the text stays content

    parser = ReplyStreamParser()              # the same, piece by piece, for streaming
    for kind, text in parser.feed(piece): ... # ("reasoning" | "content", text); tool calls at finish()

A tool call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (acornlm.tokenizer.
chat_template). A call is valid when its JSON parses, it names a tool in `tools` and its arguments
fit that tool's JSON schema. A reply whose calls are not all valid is returned as plain content
with the problems listed: a small model's broken call must reach the user as text, never as an
error, and a caller that counts validity reads `problems`.

The schema check covers what function signatures use: type (one or a list), properties,
required, additionalProperties: false, enum, items. Other keywords are not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from acornlm.tokenizer.special_tokens import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

TOOL_CALL = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


@dataclass
class Reply:
    """A parsed assistant reply (see the module docstring)."""

    content: str
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        """The reply as an assistant message, ready to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


# --- tools and their schemas ---

def tool_function(tool: Any) -> dict[str, Any]:
    """The {"name", "description", "parameters"} part of a tool, given as OpenAI's
    {"type": "function", "function": {...}} or bare."""
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        return tool["function"]
    return tool if isinstance(tool, dict) else {}


def tool_names(tools: Sequence[Any] | None) -> list[str]:
    """The function names of `tools`, in order."""
    return [name for name in (tool_function(tool).get("name") for tool in tools or []) if isinstance(name, str)]


def find_tool(tools: Sequence[Any] | None, name: str) -> dict[str, Any] | None:
    """The function of `tools` called `name`, or None."""
    return next((tool_function(tool) for tool in tools or [] if tool_function(tool).get("name") == name), None)


def schema_problem(value: Any, schema: Any, path: str = "arguments") -> str | None:
    """Why `value` does not fit the JSON schema `schema` (the subset in the module docstring), or None."""
    if not isinstance(schema, dict):
        return None
    expected = schema.get("type")
    if expected is not None:
        types = expected if isinstance(expected, list) else [expected]
        if not any(fits_type(value, kind) for kind in types):
            return f"{path} must be {' or '.join(map(str, types))}, got {type(value).__name__} {value!r:.40}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} must be one of {schema['enum']!r:.80}, got {value!r:.40}"
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                return f"{path} lacks the required {name!r}"
        for name, item in value.items():
            if name in properties:
                problem = schema_problem(item, properties[name], f"{path}.{name}")
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{path} has {name!r}, which the schema does not allow (allowed: {', '.join(properties)})"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problem = schema_problem(item, schema["items"], f"{path}[{index}]")
            if problem:
                return problem
    return None


def fits_type(value: Any, kind: str) -> bool:
    """Whether `value` is of the JSON schema type `kind` (booleans are not numbers)."""
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    python_type = JSON_TYPES.get(kind)
    return python_type is None or isinstance(value, python_type)


def tool_call_problem(call: dict[str, Any], tools: Sequence[Any] | None) -> str | None:
    """Why `call` ({"name", "arguments": dict}) is not a valid call of one of `tools`, or None.
    With no tools given, any well-formed call passes."""
    name = call.get("name")
    if not isinstance(name, str) or not isinstance(call.get("arguments"), dict):
        return f"a tool call needs a string name and an object of arguments, got {call!r:.80}"
    if not tools:
        return None
    function = find_tool(tools, name)
    if function is None:
        return f"the model called {name!r}, which is not among the tools ({', '.join(tool_names(tools))})"
    problem = schema_problem(call["arguments"], function.get("parameters"))
    return f"{name}: {problem}" if problem else None


def parse_tool_call(body: str) -> tuple[dict[str, Any] | None, str | None]:
    """The {"name", "arguments"} of one call's JSON text, or (None, why not)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        return None, f"a tool call is not valid JSON ({exc.msg}, column {exc.colno}): {body.strip()!r:.80}"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None, f"a tool call must be a JSON object with a name, got {body.strip()!r:.80}"
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as the API does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None, f"the arguments of {data['name']!r} are not a JSON object: {arguments!r:.80}"
    return {"name": data["name"], "arguments": arguments}, None


# --- whole replies ---

def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) of a reply that opens with a think block (after any newlines), with the
    newlines the template adds stripped; (None, text) otherwise, the text untouched. An unclosed
    <think> (the model ran out of tokens while thinking) is all reasoning. Only a block at the start
    counts, as a streaming reader sees it: "</think>" later in an answer is just text."""
    stripped = text.lstrip("\n")
    if not stripped.startswith(THINK_START):
        return None, text
    inside = stripped[len(THINK_START):]
    if THINK_END not in inside:
        return inside.strip("\n"), ""
    reasoning, _, after = inside.partition(THINK_END)
    return reasoning.strip("\n"), after.lstrip("\n")


def parse_reply(text: str, tools: Sequence[Any] | None = None, in_thinking: bool = False) -> Reply:
    """The reasoning, answer and tool calls of a generated reply (see the module docstring).
    `in_thinking`: the prompt opened the think block (enable_thinking=True), the text continues it."""
    reasoning, rest = split_thinking(THINK_START + text if in_thinking else text)
    bodies = TOOL_CALL.findall(rest)
    if not bodies:
        return Reply(rest, reasoning,
                     problems=["an unclosed <tool_call>"] if TOOL_CALL_START in rest else [])
    calls, problems = [], []
    for body in bodies:
        call, problem = parse_tool_call(body)
        problem = problem or tool_call_problem(call, tools)
        if problem:
            problems.append(problem)
        else:
            calls.append(call)
    if problems:
        return Reply(rest, reasoning, problems=problems)
    content = TOOL_CALL.sub("", rest).strip("\n")
    return Reply(content, reasoning, calls)


def openai_tool_calls(calls: Sequence[dict[str, Any]], id_prefix: str = "call") -> list[dict[str, Any]]:
    """Calls in the OpenAI response form: {"id", "type": "function", "function": {"name", "arguments": JSON text}}."""
    return [{"id": f"{id_prefix}_{index}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for index, call in enumerate(calls)]


class ReplyStreamParser:
    """`parse_reply` for text that arrives in pieces: reasoning and answer text are passed on as soon as
    they are known not to be part of a tag; tool-call blocks are held back and parsed at `finish`.

    A piece that ends with what could be the start of a tag ("<thi") is held until the next piece
    settles it, so a tag is never shown half.
    """

    TAGS = (THINK_START, THINK_END, TOOL_CALL_START)

    def __init__(self, tools: Sequence[Any] | None = None, in_thinking: bool = False) -> None:
        """`in_thinking`: the prompt already opened the think block (enable_thinking=True), so the
        reply starts with reasoning."""
        self.tools = tools
        self.in_thinking = in_thinking
        self.text = ""       # everything fed so far
        self.pending = ""    # text not yet passed on
        self.state = "thinking" if in_thinking else "start"  # start -> (thinking ->) content -> tool_calls
        self.skip_newlines = in_thinking  # the newlines the template puts after <think> and </think>
        self.sent_content = ""

    def feed(self, piece: str) -> Iterator[tuple[str, str]]:
        """("reasoning" | "content", text) for what `piece` settles."""
        self.text += piece
        self.pending += piece
        while self.pending and self.state != "tool_calls":
            if self.skip_newlines:
                self.pending = self.pending.lstrip("\n")
                if not self.pending:
                    return
                self.skip_newlines = False
            if self.state == "start":  # a think block may open the reply, after newlines
                head = self.pending.lstrip("\n")
                if not head or (THINK_START.startswith(head) and head != THINK_START):
                    return  # maybe "<think>" still arriving
                if head.startswith(THINK_START):
                    self.pending = head[len(THINK_START):]
                    self.state, self.skip_newlines = "thinking", True
                else:
                    self.state = "content"  # the newlines stay: they are the answer's
                continue
            tag = THINK_END if self.state == "thinking" else TOOL_CALL_START
            index = self.pending.find(tag)
            if index >= 0:
                yield from self._emit(self.pending[:index].rstrip("\n"))
                self.pending = self.pending[index + len(tag):]
                self.state, self.skip_newlines = ("content", True) if self.state == "thinking" else ("tool_calls", False)
                continue
            # hold what may be the start of the tag, and newlines that may be the template's before it
            partial = partial_tag_length(self.pending, tag)
            ready = self.pending[:len(self.pending) - partial].rstrip("\n")
            self.pending = self.pending[len(ready):]
            yield from self._emit(ready)
            return
        if self.state == "tool_calls":
            self.pending = ""

    def _emit(self, text: str) -> Iterator[tuple[str, str]]:
        if not text:
            return
        if self.state == "thinking":
            yield "reasoning", text
        else:
            self.sent_content += text
            yield "content", text

    def finish(self) -> tuple[Reply, str]:
        """(the whole reply parsed, content text not yet passed on). When the calls are refused, the
        held-back call text is part of that rest, so the user sees everything the model wrote."""
        reply = parse_reply(self.text, self.tools, self.in_thinking)
        if reply.tool_calls or self.state == "thinking":
            return reply, ""
        full = reply.content
        return reply, full[len(self.sent_content):] if full.startswith(self.sent_content) else self.pending


def partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is the start of `tag` (0 when none)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
