"""From generated text to an OpenAI assistant message: thinking, answer and tool calls, as the text streams.

    assembler = ReplyAssembler(tools, id_prefix="call_ab12")  # tools whose calls are accepted, or None
    for kind, text in assembler.feed(piece): ...   # ("reasoning" | "content", text) as soon as it is safe
    done = assembler.finish()                      # what was held back, the tool calls, the problems
    done.message()                                 # {"role": "assistant", "content", "reasoning_content", ...}

The streaming half is acornlm.data.tools.ReplyStreamParser: the text inside a leading
<think>...</think> is reasoning (all text up to </think> when the prompt opened the block,
enable_thinking=True), the rest is the answer, a tag is never shown half, and a
<tool_call> block is held back until the end. The pieces it is fed come from the engine's
streaming detokenizer, which never splits a UTF-8 character.

At the end the held text is settled here: calls are returned as tool_calls only when tools are
accepted (the server's `ToolPolicy.accepted`, the chat's functions) and every call is valid (its JSON parses, it names an
accepted tool, its arguments fit the schema). Otherwise the call text becomes part of the answer, so
a small model's broken call reaches the client as text, never as an error, and `problems` says why
(the server returns them as the choice's `tool_call_problems`). Streaming and non-streaming replies
go through the same code, so both give the same message for the same text; `acornlm chat` uses it
too (this module needs no web framework).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from acornlm.data.tools import ReplyStreamParser, openai_tool_calls, parse_reply, split_thinking
from acornlm.tokenizer.special_tokens import THINK_START


@dataclass
class FinishedReply:
    """What `ReplyAssembler.finish` settles: text not yet passed on, the calls, the problems."""

    reasoning_rest: str = ""
    content_rest: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI form: id, type, function
    calls: list[dict[str, Any]] = field(default_factory=list)  # the same as {"name", "arguments": dict}
    problems: list[str] = field(default_factory=list)
    reasoning: str | None = None  # the whole reply's parts, for a non-streaming message
    content: str = ""

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """"tool_calls" when the reply is calls, else the engine's ("stop", "length")."""
        return "tool_calls" if self.tool_calls else engine_reason

    def message(self) -> dict[str, Any]:
        """The assistant message of a non-streaming response (content null when only calls were made)."""
        message: dict[str, Any] = {"role": "assistant",
                                   "content": None if self.tool_calls and not self.content else self.content,
                                   "reasoning_content": self.reasoning or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class ReplyAssembler:
    """One choice's reply, fed piece by piece (see the module docstring)."""

    def __init__(self, accepted: list[dict[str, Any]] | None = None, *, required: str | None = None,
                 id_prefix: str = "call", in_thinking: bool = False) -> None:
        """
        Args:
            accepted: The tools whose calls become tool_calls; None = tool-call text stays content.
            required: What a call was expected of ("a tool", "the function 'f'"); its absence is a problem.
            id_prefix: Prefix of the calls' ids (unique per reply, so a conversation's ids never clash).
            in_thinking: The prompt opened the think block (enable_thinking=True): the reply starts
                with reasoning.
        """
        self.accepted = accepted
        self.required = required
        self.id_prefix = id_prefix
        self.in_thinking = in_thinking
        self.parser = ReplyStreamParser(accepted, in_thinking=in_thinking)
        self.sent_reasoning = ""
        self.sent_content = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        """("reasoning" | "content", text) pairs that `piece` settles."""
        if not piece:
            return []
        out = list(self.parser.feed(piece))
        for kind, text in out:
            if kind == "reasoning":
                self.sent_reasoning += text
            else:
                self.sent_content += text
        return out

    def finish(self) -> FinishedReply:
        """Settle the held text: the tool calls when they are accepted, else the rest of the answer."""
        text = self.parser.text
        reasoning, content = split_thinking(THINK_START + text if self.in_thinking else text)
        done = FinishedReply(reasoning=reasoning)
        if reasoning and reasoning.startswith(self.sent_reasoning):
            done.reasoning_rest = reasoning[len(self.sent_reasoning):]
        if self.accepted is not None:
            reply = parse_reply(content, self.accepted)
            done.problems = list(reply.problems)
            if reply.tool_calls and not reply.problems:
                done.calls = reply.tool_calls
                done.tool_calls = openai_tool_calls(reply.tool_calls, self.id_prefix)
                content = reply.content
            if self.required and not done.tool_calls:
                done.problems.append(f"tool_choice asked for a call of {self.required}, but the model did not "
                                     "make a valid one; its text is returned as content")
        done.content = content
        if content.startswith(self.sent_content):
            done.content_rest = content[len(self.sent_content):]
        else:  # the calls' content lost newlines the stream kept, or a stray </think> moved it: keep what was sent
            done.content = self.sent_content
        return done
