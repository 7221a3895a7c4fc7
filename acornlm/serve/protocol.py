"""The OpenAI request bodies the server accepts, and how they become `SamplingParams`.

Field names and meanings are OpenAI's (https://platform.openai.com/docs/api-reference/chat);
`top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are extras, as vLLM accepts them. Unknown fields
(`user`, `logit_bias`, ...) are ignored rather than rejected, so existing clients keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from acornlm.errors import ConfigError
from acornlm.infer.sampling import SamplingParams
from acornlm.serve.errors import bad_request


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
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

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


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

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

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as plain {"role", "content"} dicts ("developer" is OpenAI's new name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


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
