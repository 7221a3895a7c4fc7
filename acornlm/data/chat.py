"""Chat rendering in one place: messages -> ChatML token ids + the loss mask.

Interface (used by SFT, DPO, GRPO, distillation, evaluation and generation):

    from acornlm.data.chat import render_chat, render_prompt, chat_text, message_problem, IM_END_ID

    chat = render_chat(tokenizer, messages)        # RenderedChat(ids, loss_mask)
    chat.ids        # exactly what transformers' apply_chat_template(messages, tokenize=True) gives
    chat.loss_mask  # 1 on every assistant content token and its closing <|im_end|>, else 0
    ids = render_prompt(tokenizer, messages)        # the conversation + "<|im_start|>assistant\\n"
    text = chat_text(messages, add_generation_prompt=True)   # the same, as text
    problem = message_problem(messages)             # None, or why the list is not a valid chat

A message is `{"role": "system" | "user" | "assistant", "content": str}`. The layout is ChatML,
the template stored in every acornlm tokenizer_config.json:

    <|im_start|>system\\nBe brief.<|im_end|>\\n          loss 0 (optional, first only)
    <|im_start|>user\\nWho are you?<|im_end|>\\n         loss 0
    <|im_start|>assistant\\nI am acornlm.<|im_end|>\\n   loss 1 on "I am acornlm.<|im_end|>" only

Why render the text and tokenize it whole: BPE merges may cross the boundary between the
"assistant\\n" header and the content, so tokenizing the pieces separately could give ids that
differ from `apply_chat_template`. Instead the whole text is tokenized once and each token's
character offsets decide its mask: a token is trained on when it overlaps an assistant span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from acornlm.errors import DataError
from acornlm.tokenizer import Tokenizer
from acornlm.tokenizer.hf_config import render_chatml
from acornlm.tokenizer.special_tokens import IM_END_TOKEN, IM_START_TOKEN, SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
# Every acornlm tokenizer has the special tokens at these ids; <|im_end|> ends a reply (a stop token).
IM_START_ID = SPECIAL_TOKENS.index(IM_START_TOKEN)
IM_END_ID = SPECIAL_TOKENS.index(IM_END_TOKEN)
Message = dict[str, str]


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


def chat_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The ChatML text of `messages` (identical to the tokenizer's chat_template)."""
    return render_chatml(list(messages), add_generation_prompt)


def message_problem(messages: object, *, need_assistant: bool = True) -> str | None:
    """Why `messages` is not a valid conversation, or None when it is.

    Valid: a list of {"role", "content"} dicts with string contents free of ChatML special tokens;
    an optional system message first, then user and assistant turns alternating, starting with
    user. With `need_assistant`, at least one assistant turn (training needs something to learn).
    The first words of the answer ("no assistant turn", "roles out of order", ...) are stable, so
    callers can count problems by kind.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return "empty conversation: expected a non-empty list of messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return f"malformed message #{index}: expected {{'role': str, 'content': str}}, got {message!r:.80}"
        if message["role"] not in ROLES:
            return f"unsupported role {message['role']!r} in message #{index}: supported roles are {', '.join(ROLES)}"
        for token in SPECIAL_TOKENS:
            if token in message["content"]:
                return f"special token {token} inside the content of message #{index}"
    roles = [message["role"] for message in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    for position, role in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            order = " -> ".join(roles)
            return (f"roles out of order ({order}): expected an optional system message, then user and "
                    "assistant turns alternating, starting with user")
    if need_assistant and "assistant" not in turns:
        return "no assistant turn: nothing to learn from"
    return None


def assistant_spans(messages: Sequence[Message]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant content + its <|im_end|> in `chat_text(messages)`."""
    spans, position = [], 0
    for message in messages:
        header = f"{IM_START_TOKEN}{message['role']}\n"
        start = position + len(header)
        end = start + len(message["content"]) + len(IM_END_TOKEN)
        if message["role"] == "assistant":
            spans.append((start, end))
        position = end + 1  # the "\n" after <|im_end|>
    return spans


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message],
                add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids of the ChatML conversation and its assistant-only loss mask.

    Raises DataError for an invalid conversation (see `message_problem`); a conversation without
    an assistant turn is allowed here (its mask is all zeros), loaders skip those.
    """
    problem = message_problem(messages, need_assistant=False)
    if problem:
        raise DataError(f"cannot render this conversation: {problem}")
    text = chat_text(messages, add_generation_prompt)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    spans = assistant_spans(messages)
    mask = [int(any(start < span_end and end > span_start for span_start, span_end in spans))
            for start, end in encoding.offsets]
    return RenderedChat(ids=list(encoding.ids), loss_mask=mask)


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of the conversation so far plus "<|im_start|>assistant\\n": the prompt for a reply."""
    return render_chat(tokenizer, messages, add_generation_prompt=True).ids

