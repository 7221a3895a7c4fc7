"""Chat rendering in one place: messages -> token ids + the loss mask, with tools and thinking.

Interface (used by SFT, DPO, GRPO, PPO, distillation, evaluation, generation and the server):

    from acornlm.data.chat import render_chat, render_prompt, chat_text, message_problem, IM_END_ID

    chat = render_chat(tokenizer, messages, tools=tools)   # RenderedChat(ids, loss_mask)
    chat.ids        # exactly what transformers' apply_chat_template(messages, tools=tools) gives
    chat.loss_mask  # 1 on every assistant token (thinking, tool calls, answer) and its <|im_end|>, else 0
    ids = render_prompt(tokenizer, messages, tools=tools, enable_thinking=False)  # + the assistant header
    text = chat_text(messages, add_generation_prompt=True)   # the same, as text
    problem = message_problem(messages)             # None, or why the list is not a valid chat

A message is `{"role": "system" | "user" | "assistant" | "tool", "content": str}`; an assistant
message may also hold `reasoning_content` (its thinking, a string) and `tool_calls`
([{"name": str, "arguments": dict or JSON string}], or OpenAI's {"function": {...}} form). The
layout is ChatML grown the way Qwen3's is (acornlm.tokenizer.chat_template has it drawn out):

    <|im_start|>system\nBe brief.<|im_end|>\n          loss 0 (optional, first only; + the tools list)
    <|im_start|>user\nWho are you?<|im_end|>\n         loss 0
    <|im_start|>assistant\nI am acornlm.<|im_end|>\n   loss 1 on "I am acornlm.<|im_end|>" only
    <|im_start|>user\n<tool_response>...               loss 0 (tool results come back as a user turn)

Why render the text and tokenize it whole: BPE merges may cross the boundary between the
"assistant\n" header and the content, so tokenizing the pieces separately could give ids that
differ from `apply_chat_template`. Instead the whole text is tokenized once and each token's
character offsets decide its mask: a token is trained on when it overlaps an assistant span.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer import Tokenizer
from acornlm.tokenizer.chat_template import Segment, render_segments
from acornlm.tokenizer.special_tokens import (
    CHAT_TOKENS,
    IM_END_TOKEN,
    IM_START_TOKEN,
    SPECIAL_TOKENS,
    THINK_END,
    )

ROLES = ("system", "user", "assistant", "tool")
# Every acornlm tokenizer has the special tokens at these ids; <|im_end|> ends a reply (a stop token).
IM_START_ID = SPECIAL_TOKENS.index(IM_START_TOKEN)
IM_END_ID = SPECIAL_TOKENS.index(IM_END_TOKEN)
Message = dict[str, Any]
Tools = Sequence[dict[str, Any]]
ADD_CHAT_TOKENS_HINT = ("add them with `acornlm tokenizer add-chat-tokens --ckpt CKPT --out NEW_CKPT` (the ids "
                        "the model knows stay put; the new tokens get fresh embedding rows), then fine-tune")


@dataclass(frozen=True)
class RenderedChat:
    """Token ids of a rendered conversation and, per token, whether training predicts it."""

    ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_targets(self) -> int:
        """How many tokens the loss is computed on."""
        return sum(self.loss_mask)


def chat_text(messages: Sequence[Message], add_generation_prompt: bool = False, *, tools: Tools | None = None,
              enable_thinking: bool | None = None) -> str:
    """The ChatML text of `messages` (identical to the tokenizer's chat_template)."""
    return "".join(s.text for s in render_segments(messages, tools, add_generation_prompt, enable_thinking))


def message_problem(messages: object, *, need_assistant: bool = True) -> str | None:
    """Why `messages` is not a valid conversation, or None when it is.

    Valid: a list of {"role", "content"} dicts with string contents free of ChatML special tokens;
    an optional system message first, then turns starting with user, where a user turn is answered
    by the assistant, an assistant turn with tool calls is followed by one or more `tool` results
    (then the assistant again), and an assistant turn without is followed by the user. With
    `need_assistant`, at least one assistant turn (training needs something to learn). The first
    words of the answer ("no assistant turn", "roles out of order", ...) are stable, so callers can
    count problems by kind.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return "empty conversation: expected a non-empty list of messages"
    for index, message in enumerate(messages):
        problem = single_message_problem(message, index)
        if problem:
            return problem
    roles = [message["role"] for message in messages]
    turns = list(messages[1:] if roles[0] == "system" else messages)
    previous = None
    for message in turns:
        role = message["role"]
        if previous is None:
            allowed = {"user"}
        elif previous["role"] == "user":
            allowed = {"assistant"}
        elif previous["role"] == "assistant":
            allowed = {"tool"} if previous.get("tool_calls") else {"user"}
        else:  # tool
            allowed = {"tool", "assistant"}
        if role not in allowed:
            order = " -> ".join(roles)
            return (f"roles out of order ({order}): expected an optional system message, then user and "
                    "assistant turns alternating, starting with user (tool results only right after an "
                    "assistant turn with tool_calls)")
        previous = message
    if need_assistant and "assistant" not in roles:
        return "no assistant turn: nothing to learn from"
    return None


def single_message_problem(message: object, index: int) -> str | None:
    """Why one message is malformed (its fields, not its place in the conversation), or None."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
            or not isinstance(message.get("content"), str):
        return f"malformed message #{index}: expected {{'role': str, 'content': str}}, got {message!r:.80}"
    if message["role"] not in ROLES:
        return f"unsupported role {message['role']!r} in message #{index}: supported roles are {', '.join(ROLES)}"
    texts = [message["content"]]
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        if message["role"] != "assistant" or not isinstance(reasoning, str):
            return f"malformed message #{index}: reasoning_content must be a string on an assistant message"
        texts.append(reasoning)
    calls = message.get("tool_calls")
    if calls:
        if message["role"] != "assistant" or not isinstance(calls, list):
            return f"malformed message #{index}: tool_calls must be a list on an assistant message"
        for number, call in enumerate(calls):
            problem = tool_call_shape_problem(call)
            if problem:
                return f"malformed tool call #{number} in message #{index}: {problem}"
            texts.append(json.dumps(call, ensure_ascii=False))
    for token in SPECIAL_TOKENS:
        if any(token in text for text in texts):
            return f"special token {token} inside the content of message #{index}"
    return None


def tool_call_shape_problem(call: object) -> str | None:
    """Why `call` is not {"name": str, "arguments": dict | JSON-object string} (or OpenAI's
    {"function": {...}} around it), or None."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        return f"expected {{'name': str, 'arguments': object}}, got {call!r:.80}"
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return f"the arguments of {function['name']!r} are not valid JSON ({exc.msg}, column {exc.colno})"
    if not isinstance(arguments, dict):
        return f"the arguments of {function['name']!r} must be a JSON object, got {type(arguments).__name__}"
    return None


def thinking_tokens_problem(tokenizer: Tokenizer, messages: Sequence[Message], tools: Tools | None,
                            enable_thinking: bool | None) -> str | None:
    """Why `tokenizer` cannot render this chat's thinking or tool calls, or None.

    Without <think> as one token, "<think>" would be split into pieces the model has no use for:
    an older tokenizer must gain the chat tokens first (ADD_CHAT_TOKENS_HINT).
    """
    missing = tokenizer.missing_chat_tokens
    if not missing:
        return None
    uses_thinking = enable_thinking is not None or any(
        m.get("reasoning_content") is not None or THINK_END in str(m.get("content", "")) for m in messages)
    uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not (uses_thinking or uses_tools):
        return None
    what = "thinking" if uses_thinking else "tool calls"
    return (f"{what} needs the chat tokens {', '.join(CHAT_TOKENS)} in the tokenizer, which lacks "
            f"{', '.join(missing)}: {ADD_CHAT_TOKENS_HINT}")


def trained_spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """Character spans [start, end) of the trained segments (each assistant turn's body + its
    <|im_end|>) in the text the segments join to."""
    spans, position = [], 0
    for segment in segments:
        if segment.trained:
            spans.append((position, position + len(segment.text)))
        position += len(segment.text)
    return spans


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False, *,
                tools: Tools | None = None, enable_thinking: bool | None = None) -> RenderedChat:
    """Token ids of the ChatML conversation and its assistant-only loss mask.

    Raises DataError for an invalid conversation (see `message_problem`); a conversation without
    an assistant turn is allowed here (its mask is all zeros), loaders skip those. ConfigError
    when the chat uses thinking or tools and the tokenizer lacks the chat tokens.
    """
    problem = message_problem(messages, need_assistant=False)
    if problem:
        raise DataError(f"cannot render this conversation: {problem}")
    problem = thinking_tokens_problem(tokenizer, messages, tools, enable_thinking)
    if problem:
        raise ConfigError(problem)
    segments = render_segments(messages, tools, add_generation_prompt, enable_thinking)
    text = "".join(segment.text for segment in segments)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    spans = trained_spans(segments)
    mask = [int(any(start < span_end and end > span_start for span_start, span_end in spans))
            for start, end in encoding.offsets]
    return RenderedChat(ids=list(encoding.ids), loss_mask=mask)


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Message], *, tools: Tools | None = None,
                  enable_thinking: bool | None = None) -> list[int]:
    """Ids of the conversation so far plus "<|im_start|>assistant\\n" (and, with enable_thinking=False,
    an empty think block): the prompt for a reply."""
    return render_chat(tokenizer, messages, add_generation_prompt=True, tools=tools,
                       enable_thinking=enable_thinking).ids
