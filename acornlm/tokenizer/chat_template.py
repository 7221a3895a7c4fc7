"""The chat template: ChatML grown with tools and thinking, as Qwen3 and MiniMind write it.

One layout, written twice: `CHAT_TEMPLATE` is the Jinja text stored in every tokenizer_config.json
(what transformers, vLLM, llama.cpp and Ollama render), and `render_segments` is the same thing in
plain Python, which also says which characters training learns. A test renders both on the same
messages and compares them character for character.

    <|im_start|>system
    Be brief.                                       <- the system turn (optional, first only)

    # Tools ... <tools>
    {"type": "function", "function": {...}}         <- one JSON line per tool, only when tools are given
    </tools> ...<|im_end|>
    <|im_start|>user
    What is the price of tea?<|im_end|>
    <|im_start|>assistant
    <think>
    I should look it up.                            <- reasoning_content (only when the message has it)
    </think>

    <tool_call>
    {"name": "lookup", "arguments": {"item": "tea"}}
    </tool_call><|im_end|>
    <|im_start|>user
    <tool_response>
    {"price": 7}                                    <- a `tool` message; consecutive ones share this turn
    </tool_response><|im_end|>
    <|im_start|>assistant
    Tea costs 7.<|im_end|>

Trained (loss mask 1): everything an assistant turn holds after its "<|im_start|>assistant\\n"
header, through its <|im_end|>: the thinking, the tool calls and the answer. Never the system
turn, the user turns or the tool responses.

Thinking. An assistant message with a `reasoning_content` string renders it in a think block,
`<think>\\n{reasoning}\\n</think>\\n\\n`; an empty string renders an empty block, which is how a
model learns to answer without thinking. A message without it renders no block. The generation
prompt is "<|im_start|>assistant\\n"; with enable_thinking=False it is followed by the empty think
block, so the model answers at once (Qwen3's switch); with enable_thinking=True it is followed by
"<think>\n", so the model thinks (MiniMind's open_thinking; Qwen3 leaves the choice to the model,
as acornlm does when enable_thinking is not given). Differences from Qwen3's template, on
purpose: reasoning in earlier turns is kept (Qwen3 drops it before the last user query), so
what a learner writes in the data is what is trained.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from acornlm.tokenizer.special_tokens import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
)

TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
EMPTY_THINK = f"{THINK_START}\n\n{THINK_END}\n\n"
# What follows the generation prompt: the model decides (None), must think (True), must not (False).
GENERATION_THINKING = {None: "", True: f"{THINK_START}\n", False: EMPTY_THINK}


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (JSON escaping is valid Jinja)."""
    return json.dumps(text, ensure_ascii=False)


CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- " + _jinja_string(TOOLS_PREAMBLE) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- " + _jinja_string(TOOLS_POSTAMBLE) + " }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning = none %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if reasoning is not none %}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- elif enable_thinking is defined and enable_thinking is true %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered text, and whether training predicts it."""

    text: str
    trained: bool


def tool_json(tool: Any) -> str:
    """A tool schema or argument object as the template's `tojson` writes it (transformers' filter:
    json.dumps with ensure_ascii=False and the default separators)."""
    return json.dumps(tool, ensure_ascii=False)


def split_inline_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content that carries its thinking inline ("<think>...</think>answer"),
    as the template splits it; (None, content) when there is no "</think>"."""
    if THINK_END not in content:
        return None, content
    pieces = content.split(THINK_END)
    return pieces[0].split(THINK_START)[-1], pieces[-1].lstrip("\n")


def tool_call_text(call: Mapping[str, Any]) -> str:
    """One call as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`; `call` is
    {"name", "arguments"} or OpenAI's {"function": {"name", "arguments"}}, arguments a dict or a JSON string."""
    function = call.get("function") or call
    arguments = function.get("arguments")
    arguments_text = arguments if isinstance(arguments, str) else tool_json(arguments)
    return f'{TOOL_CALL_START}\n{{"name": "{function.get("name")}", "arguments": {arguments_text}}}\n{TOOL_CALL_END}'


def assistant_body(message: Mapping[str, Any]) -> str:
    """What an assistant turn holds between its header and <|im_end|>: think block, answer, tool calls."""
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning, content = split_inline_reasoning(content)
    text = content if reasoning is None else f"{THINK_START}\n{reasoning.strip(chr(10))}\n{THINK_END}\n\n" \
        + content.lstrip("\n")
    for index, call in enumerate(message.get("tool_calls") or []):
        if index > 0 or content:
            text += "\n"
        text += tool_call_text(call)
    return text


def render_segments(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = False, enable_thinking: bool | None = None) -> list[Segment]:
    """The conversation as text pieces, each marked trained or not (see the module docstring).

    Joined, the pieces are exactly what CHAT_TEMPLATE renders for the same arguments.
    """
    segments: list[Segment] = []

    def add(text: str, trained: bool = False) -> None:
        segments.append(Segment(text, trained))

    def text_of(message: Mapping[str, Any]) -> str:
        return message["content"] if isinstance(message.get("content"), str) else ""

    has_system = bool(messages) and messages[0].get("role") == "system"
    if tools:
        system = text_of(messages[0]) + "\n\n" if has_system else ""
        schemas = "".join("\n" + tool_json(tool) for tool in tools)
        add(f"{IM_START_TOKEN}system\n{system}{TOOLS_PREAMBLE}{schemas}{TOOLS_POSTAMBLE}{IM_END_TOKEN}\n")
    elif has_system:
        add(f"{IM_START_TOKEN}system\n{text_of(messages[0])}{IM_END_TOKEN}\n")
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "user" or (role == "system" and index > 0):
            add(f"{IM_START_TOKEN}{role}\n{text_of(message)}{IM_END_TOKEN}\n")
        elif role == "assistant":
            add(f"{IM_START_TOKEN}assistant\n")
            add(assistant_body(message) + IM_END_TOKEN, trained=True)
            add("\n")
        elif role == "tool":
            first = index == 0 or messages[index - 1].get("role") != "tool"
            last = index == len(messages) - 1 or messages[index + 1].get("role") != "tool"
            add((f"{IM_START_TOKEN}user" if first else "")
                + f"\n{TOOL_RESPONSE_START}\n{text_of(message)}\n{TOOL_RESPONSE_END}"
                + (f"{IM_END_TOKEN}\n" if last else ""))
    if add_generation_prompt:
        add(f"{IM_START_TOKEN}assistant\n" + GENERATION_THINKING[enable_thinking])
    return segments


def render_text(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                add_generation_prompt: bool = False, enable_thinking: bool | None = None) -> str:
    """The text CHAT_TEMPLATE renders, in plain Python (for code that does not load transformers)."""
    return "".join(s.text for s in render_segments(messages, tools, add_generation_prompt, enable_thinking))
