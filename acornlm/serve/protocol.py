"""The OpenAI request bodies the server accepts, and how they become `SamplingParams`.

Field names and meanings are OpenAI's (https://platform.openai.com/docs/api-reference/chat);
`top_k`, `min_p`, `repetition_penalty`, `ignore_eos` and `chat_template_kwargs` are extras, as vLLM
accepts them. Unknown fields (`user`, `logit_bias`, `parallel_tool_calls`, ...) are ignored rather
than rejected, so existing clients keep working.

Tools: `tools` are OpenAI function schemas and `tool_choice` says what to do with them
(`ToolPolicy`): "auto" (the default) renders them and accepts any valid call; "none" renders none
and accepts none; "required" and {"type": "function", "function": {"name": ...}} render them all
and expect a call (of the named function). Nothing forces the model's tokens, so an expected call
that does not come is reported beside the plain-text answer instead of failing the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from acornlm.errors import ConfigError
from acornlm.infer.sampling import SamplingParams
from acornlm.serve.errors import bad_request
from acornlm.tokenizer import SPECIAL_TOKENS


@dataclass
class ServerLimits:
    """What one request may ask for (the context length is the model's own limit on prompt tokens).

    Args:
        max_output_tokens: Most tokens one choice may generate; also the default of max_tokens.
        max_body_bytes: Largest request body accepted (HTTP 413 beyond it).
        max_n: Most choices (`n`) per request.
        max_stop: Most stop strings per request.
        body_timeout_s: Seconds a client has to send the whole request body (HTTP 408 beyond), so a
            client that trickles its body cannot hold a connection and a request open for ever.
    """

    max_output_tokens: int = 2048
    max_body_bytes: int = 1_000_000
    max_n: int = 8
    max_stop: int = 8
    body_timeout_s: float = 30.0


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    """One part of a message's content list (`{"type": "text", "text": ...}`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A request message. An assistant message may carry `reasoning_content` (its thinking) and
    `tool_calls` (OpenAI's form, arguments as a JSON string); a `tool` message is a tool's result
    (its `tool_call_id` is accepted and not needed: results are matched to calls by order)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as acornlm.data.chat takes it ("developer" is OpenAI's new name for "system")."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text()}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    def text(self) -> str:
        """The content as one string; only text parts are understood."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise bad_request(f"content parts of type {part.type!r} are not supported (text only)", "messages")
        return "".join(part.text or "" for part in self.content)


class GenerationRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False  # vLLM's extra: generate past the end-of-text token (benchmarks)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def output_token_limit(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, limits: ServerLimits) -> SamplingParams:
        """The request's settings as SamplingParams (one choice; the server submits `n` of them).

        Out-of-range values become HTTP 400 naming the field.
        """
        if not 1 <= self.n <= limits.max_n:
            raise bad_request(f"n must be between 1 and {limits.max_n}, got {self.n}", "n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > limits.max_stop:
            raise bad_request(f"at most {limits.max_stop} stop strings are allowed, got {len(stop)}", "stop")
        if any(not s for s in stop):
            raise bad_request("stop strings must not be empty", "stop")
        max_tokens = self.output_token_limit()
        if max_tokens is None:
            max_tokens = limits.max_output_tokens
        elif max_tokens > limits.max_output_tokens:
            raise bad_request(
                f"max_tokens is {max_tokens} but this server generates at most {limits.max_output_tokens} tokens "
                "per choice; ask for fewer", "max_tokens")
        top_k = self.top_k if self.top_k is not None else 0
        values = dict(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            stop=stop,
            seed=self.seed,
        )
        try:
            return SamplingParams(**values)
        except ConfigError as exc:
            field = str(exc).split(" ", 1)[0]
            param = {"max_new_tokens": "max_tokens"}.get(field, field)
            raise bad_request(str(exc).replace("max_new_tokens", "max_tokens"), param) from exc


@dataclass
class ToolPolicy:
    """What a request's `tools` and `tool_choice` mean for one reply.

    Args:
        rendered: The tools shown to the model in the system turn (None: no tools section).
        accepted: The tools whose calls are returned as tool_calls (None: tool-call text stays content).
        required: A call is expected ("required" or a named function); its absence is reported.
        choice: The tool_choice: "auto", "none", "required" or the named function's name (for messages).
        names: The names of all the request's tools.
    """

    rendered: list[dict[str, Any]] | None = None
    accepted: list[dict[str, Any]] | None = None
    required: bool = False
    choice: str = "none"
    names: list[str] = field(default_factory=list)


    def wanted(self) -> str | None:
        """What a call is expected of, in words ("a tool", "the function 'f'"), or None when none is."""
        if not self.required:
            return None
        return "a tool" if self.choice == "required" else f"the function {self.choice!r}"


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: {"enable_thinking": false}

    def output_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_wanted(self) -> int | None:
        """None = no logprobs, else how many alternatives per token (0..20)."""
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise bad_request(f"top_logprobs must be between 0 and 20, got {self.top_logprobs}", "top_logprobs")
        if not self.logprobs:
            if self.top_logprobs:
                raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
            return None
        return self.top_logprobs or 0

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as acornlm.data.chat takes them: {"role", "content"} and, on assistant messages,
        `reasoning_content` and `tool_calls` (checked later by message_problem)."""
        return [m.as_dict() for m in self.messages]

    def enable_thinking(self) -> bool | None:
        """`chat_template_kwargs.enable_thinking`: None = the model's default (other keys are ignored)."""
        value = (self.chat_template_kwargs or {}).get("enable_thinking")
        if value is not None and not isinstance(value, bool):
            raise bad_request(f"chat_template_kwargs.enable_thinking must be true or false, got {value!r:.40}",
                              "chat_template_kwargs")
        return value

    def tool_policy(self) -> ToolPolicy:
        """The checked `tools` and `tool_choice` (see the module docstring); 400 naming what is wrong."""
        tools = check_tools(self.tools or [])
        names = [tool["function"]["name"] for tool in tools]
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        if isinstance(choice, dict):
            function = choice.get("function") if choice.get("type") == "function" else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str):
                raise bad_request('tool_choice must be "auto", "none", "required" or {"type": "function", '
                                  f'"function": {{"name": ...}}}}, got {json.dumps(choice)[:80]}', "tool_choice")
            if name not in names:
                available = ", ".join(names) if names else "none: the request has no tools"
                raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools "
                                  f"(available: {available})", "tool_choice")
            return ToolPolicy(tools, [tools[names.index(name)]], True, name, names)
        if choice not in ("auto", "none", "required"):
            raise bad_request(f'tool_choice must be "auto", "none", "required" or a named function, got {choice!r:.40}',
                              "tool_choice")
        if choice == "required" and not tools:
            raise bad_request('tool_choice "required" needs tools: the request has none', "tool_choice")
        if choice == "none" or not tools:
            return ToolPolicy(choice=choice)
        return ToolPolicy(tools, tools, choice == "required", choice, names)

    def text_length(self) -> int:
        """Characters of everything the prompt renders from the request (messages, thinking, calls, tools),
        for the cheap too-long check that runs before tokenizing."""
        total = 0
        for message in self.messages:
            total += len(message.text()) + len(message.reasoning_content or "")
            total += len(json.dumps(message.tool_calls, ensure_ascii=False)) if message.tool_calls else 0
        return total + (len(json.dumps(self.tools, ensure_ascii=False)) if self.tools else 0)


def check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's tools in OpenAI's form, each {"type": "function", "function": {"name", ...}}, or
    HTTP 400: a malformed tool, a name given twice, or a ChatML special token anywhere (it would end
    the system turn early and let the tools forge turns of their own)."""
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise bad_request(f'tools[{index}] must be {{"type": "function", "function": {{"name", "description", '
                              f'"parameters"}}}}, got {json.dumps(tool)[:80]}', "tools")
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise bad_request(f"tools[{index}].function.name must be a string of 1 to 64 characters", "tools")
        if name in seen:
            raise bad_request(f"tools: the function name {name!r} is given twice", "tools")
        seen.add(name)
        if not isinstance(function.get("description", ""), str):
            raise bad_request(f"tools[{index}].function.description must be a string", "tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise bad_request(f"tools[{index}].function.parameters must be a JSON schema object", "tools")
    text = json.dumps(tools, ensure_ascii=False)
    for token in SPECIAL_TOKENS:
        if token in text:
            raise bad_request(f"special token {token} inside the tools: only the chat template may write it", "tools")
    return tools


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def logprobs_wanted(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad_request(f"logprobs must be between 0 and 20, got {self.logprobs}", "logprobs")
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)
