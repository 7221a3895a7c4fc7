"""The HTTP app: OpenAI-compatible routes over the continuous-batching engine, and the chat page.

    GET  /                      the web chat page (static/index.html; it calls the same API)
    GET  /health                liveness and load: running / waiting sequences (no API key needed)
    GET  /v1/models             the one served model
    POST /v1/chat/completions   ChatML prompt from `messages` (+ `tools`, thinking); streaming with SSE
    POST /v1/completions        plain text continuation of `prompt`

Every route sits behind `HostGuard` (without an API key, only loopback Host names are answered,
against cross-site requests and DNS rebinding) and `SecurityHeaders` (see guards.py).

How a request flows: read the body (size and time limits, JSON content type), parse JSON, validate with the pydantic models in
`protocol.py`, build the prompt tokens, submit one engine sequence per choice, then either wait for
all of them or stream their events as SSE chunks. A chat reply's text goes through a `ReplyAssembler`
(replies.py), which splits it into `reasoning_content`, `content` and `tool_calls`, the same way
streamed or not. The engine thread hands events over with
`loop.call_soon_threadsafe`, so the event loop never blocks on the model. When a streaming client
disconnects, Starlette cancels the response; the `finally` cancels the sequences, which frees their
batch slots before the next decode step. A non-streaming request watches for the disconnect itself.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from acornlm.data.chat import message_problem, render_prompt
from acornlm.errors import ConfigError, DataError
from acornlm.infer.engine import Engine, EngineFull, EngineStopped, Event, TokenLogprob, sampling_for_request
from acornlm.infer.sampling import SamplingParams
from acornlm.serve.errors import (
    APIError,
    bad_request,
    internal_error,
    not_found,
    request_timeout,
    too_large,
    too_many_requests,
    unauthorized,
    unavailable,
    unprocessable,
    unsupported_media_type,
)
from acornlm.serve.guards import HostGuard, SecurityHeaders
from acornlm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ServerLimits,
    ToolPolicy,
)
from acornlm.serve.replies import FinishedReply, ReplyAssembler

STATIC_DIR = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
log = logging.getLogger("acornlm.serve")
RequestT = TypeVar("RequestT", bound=BaseModel)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away (never seen by it)


# --------------------------------------------------------------------------- one request's choices


@dataclass
class ChoiceResult:
    """Everything one choice produced, for a non-streaming response."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class ChoiceRun:
    """The engine sequences of one request (n choices, maybe several prompts), merged into one queue.

    Events arrive on the engine thread and are moved into an asyncio.Queue on the server's loop.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles = []
        self.prompt_tokens = 0

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams, n: int, top_logprobs: int | None,
               ignore_eos: bool = False) -> None:
        """Choice index = prompt index * n + sample index, as OpenAI numbers them. All or nothing."""
        try:
            for prompt_ids in prompts:
                self.prompt_tokens += len(prompt_ids)
                for sample in range(n):
                    index = len(self.handles)
                    self.handles.append(self.engine.submit(
                        prompt_ids, sampling_for_request(params, sample), top_logprobs=top_logprobs,
                        ignore_eos=ignore_eos,
                        on_event=lambda event, index=index: self.loop.call_soon_threadsafe(
                            self.queue.put_nowait, (index, event)),
                    ))
        except ConfigError as exc:
            self.cancel()
            raise bad_request(str(exc)) from exc
        except EngineFull as exc:
            self.cancel()
            raise too_many_requests(str(exc)) from exc
        except EngineStopped as exc:
            self.cancel()
            raise unavailable(str(exc)) from exc

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) pairs until every choice has finished."""
        remaining = len(self.handles)
        while remaining:
            index, event = await self.queue.get()
            remaining -= event.finished
            yield index, event

    async def collect_while_connected(self, request: Request) -> list[ChoiceResult] | None:
        """collect(), or None as soon as the client hangs up (the caller then cancels the run).

        A non-streaming response is only written at the end, so nothing else would notice a
        client that gave up: its sequences would hold their batch slots until their last token.
        """
        collecting = asyncio.ensure_future(self.collect())
        hang_up = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, pending = await asyncio.wait({collecting, hang_up}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            return collecting.result() if collecting in done else None
        finally:
            self.cancel()  # frees the slots of a client that left (finished sequences ignore it)

    async def collect(self) -> list[ChoiceResult]:
        results = [ChoiceResult() for _ in self.handles]
        async for index, event in self.events():
            result = results[index]
            result.text += event.text
            if event.logprob is not None:
                result.logprobs.append(event.logprob)
            if event.finished:
                raise_for_failure(event)
                result.finish_reason = event.finish_reason
                result.completion_tokens = event.completion_tokens
        return results


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the ASGI server reports that the client closed the connection (the request
    body has been read already, so the next message can only be `http.disconnect`)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_unicode(data: Any) -> None:
    """400 for a string holding a lone UTF-16 surrogate ("\\ud800" is valid JSON but not Unicode, and
    would fail later, when the text is encoded). Walks the parsed body without recursion."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise bad_request("the request holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                  "escape), which is not valid Unicode text", code="invalid_json") from exc


def raise_for_failure(event: Event) -> None:
    if event.finish_reason == "error":
        log.error("generation failed: %s", event.error)
        raise APIError(500, f"generation failed: {event.error}", type="server_error", code="generation_failed")
    if event.finish_reason == "abort":
        raise unavailable("the server is shutting down; retry later")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------- the app


def clean_api_key(api_key: str | None) -> str | None:
    """The key without surrounding whitespace (a key read from a file ends in a newline); ConfigError
    for a key no client could send in an Authorization header (empty, inner spaces, control or
    non-ASCII characters), so a bad key fails at start instead of locking everyone out."""
    if api_key is None:
        return None
    key = api_key.strip()
    if not key or not all(33 <= ord(c) < 127 for c in key):
        raise ConfigError("the API key must be printable ASCII without spaces (as sent in 'Authorization: "
                          f"Bearer KEY'); got {len(key)} characters that are not")
    return key


def cheap_token_floor(text_length: int, max_token_bytes: int) -> int:
    """A lower bound on the tokens of a text of `text_length` characters, without tokenizing it: a
    character is at least one UTF-8 byte and no token holds more than `max_token_bytes` bytes. Why:
    tokenizing a 1 MB prompt takes ~0.5 s, so an obviously too long prompt is refused before that."""
    return -(-text_length // max(1, max_token_bytes))


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               limits: ServerLimits | None = None, allowed_hosts: Sequence[str] | None = None,
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name` (the engine thread must be started by the caller).

    Args:
        engine: A started `Engine`.
        model_name: The id clients pass as `model` and see in /v1/models.
        api_key: When set, every /v1 route and /openapi.json require `Authorization: Bearer <api_key>`.
        limits: Per-request limits (max output tokens, body size and time, n, stop strings).
        allowed_hosts: Host names (besides loopback ones) the server answers for; ["*"] = any.
            Default: any with an API key, loopback only without one (against DNS rebinding).
        cors_origins: Web origins allowed to call the API from a browser (CORS); default none.
    """
    limits = limits or ServerLimits()
    api_key = clean_api_key(api_key)
    tokenizer = engine.tokenizer
    max_token_bytes = max(len(tokenizer.token_bytes(i)) for i in range(engine.vocab_size))
    created = int(time.time())
    app = FastAPI(title="acornlm", summary=f"OpenAI-compatible API serving {model_name}",
                  docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    if allowed_hosts is None:
        allowed_hosts = ["*"] if api_key else []
    app.add_middleware(HostGuard, allowed=allowed_hosts)
    app.add_middleware(SecurityHeaders)

    # ---------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=code).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return unprocessable(str(exc)).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return internal_error().response()

    # ---------------------------------------------------------------- helpers

    def check_api_key(request: Request) -> None:
        """Bearer authentication, compared in constant time (no timing hint about the key)."""
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise unauthorized("invalid API key")

    async def read_json(request: Request) -> dict[str, Any]:
        """The body as a JSON object, refusing bodies over the size limit before reading them whole,
        bodies that take longer than the time limit, and anything but `Content-Type: application/json`
        (a browser sends text/plain across sites without asking first: that is how CSRF gets in)."""
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            raise unsupported_media_type(f"send the request body as JSON with 'Content-Type: application/json' "
                                         f"(got {content_type or 'no content type'!r})")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_large(f"the request body is {declared} bytes; the limit is {limits.max_body_bytes}")

        async def read_body() -> bytearray:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise too_large(f"the request body is over the limit of {limits.max_body_bytes} bytes")
            return body

        try:
            body = await asyncio.wait_for(read_body(), limits.body_timeout_s)
        except asyncio.TimeoutError as exc:
            raise request_timeout(f"the request body did not arrive within {limits.body_timeout_s:g} s") from exc
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int over 4300 digits, deep nesting
            reason = "it is nested too deeply" if isinstance(exc, RecursionError) else exc
            raise bad_request(f"the request body is not valid JSON: {reason}", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        check_unicode(data)
        return data

    def parse(model: type[RequestT], data: dict[str, Any]) -> RequestT:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(str(part) for part in error["loc"]) or None
            raise unprocessable(f"{param}: {error['msg']}" if param else error["msg"], param) from exc

    def check_model(request: GenerationRequest) -> None:
        if request.model not in (None, "", model_name):
            raise not_found(f"the model {request.model!r} does not exist; this server serves {model_name!r}",
                            param="model", code="model_not_found")

    def check_text_length(characters: int, param: str) -> None:
        """Refuse a prompt that cannot fit the context whatever its tokens, before tokenizing it."""
        at_least = cheap_token_floor(characters, max_token_bytes)
        if at_least > engine.context_length:
            raise bad_request(
                f"this model's maximum context length is {engine.context_length} tokens, but the prompt has "
                f"{characters} characters, at least {at_least} tokens; shorten the prompt or the conversation",
                param, code="context_length_exceeded")

    def check_prompt(prompt_ids: list[int], param: str) -> None:
        if not prompt_ids:
            raise bad_request("the prompt is empty", param)
        if len(prompt_ids) > engine.context_length:
            raise bad_request(
                f"this model's maximum context length is {engine.context_length} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens; shorten the prompt or the conversation",
                param, code="context_length_exceeded")

    def logprob_entry(item: TokenLogprob) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            raw = tokenizer.token_bytes(token_id)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return {**one(item.token_id, item.logprob), "top_logprobs": [one(t, lp) for t, lp in item.top]}

    def start_run(prompts: list[list[int]], request: GenerationRequest, top_logprobs: int | None) -> ChoiceRun:
        if not engine.alive:
            raise unavailable("the generation engine is not running; restart the server")
        params = request.sampling_params(limits)
        run = ChoiceRun(engine)
        run.submit(prompts, params, request.n, top_logprobs, request.ignore_eos)
        return run

    # ---------------------------------------------------------------- routes

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(check_api_key)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/health")
    async def health() -> JSONResponse:
        status = {"status": "ok" if engine.alive else "stopped", "model": model_name,
                  "running": engine.num_running, "waiting": engine.num_waiting, "max_batch": engine.max_batch,
                  "context_length": engine.context_length, "decode_steps": engine.decode_steps,
                  "finished": dict(engine.finished)}
        return JSONResponse(status, status_code=200 if engine.alive else 503)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "acornlm",
                "max_model_len": engine.context_length}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise not_found(f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                            param="model", code="model_not_found")
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse(ChatCompletionRequest, await read_json(request))
        check_model(body)
        top_logprobs = body.logprobs_wanted()
        policy = body.tool_policy()
        enable_thinking = body.enable_thinking()
        messages = body.chat_messages()
        problem = message_problem(messages, need_assistant=False)
        if problem:
            raise bad_request(f"invalid messages: {problem}", "messages")
        check_text_length(body.text_length(), "messages")
        try:  # off the event loop: tokenizing a long prompt must not stall the other streams
            prompt_ids = await asyncio.to_thread(render_prompt, tokenizer, messages, tools=policy.rendered,
                                                 enable_thinking=enable_thinking)
        except DataError as exc:
            raise bad_request(str(exc), "messages") from exc
        except ConfigError as exc:  # thinking or tools with a tokenizer that lacks the chat tokens
            raise bad_request(str(exc), code="missing_chat_tokens") from exc
        check_prompt(prompt_ids, "messages")
        run = start_run([prompt_ids], body, top_logprobs)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        assemblers = [ReplyAssembler(policy.accepted, required=policy.wanted(), in_thinking=enable_thinking is True,
                                     id_prefix=f"call_{uuid.uuid4().hex[:16]}") for _ in run.handles]
        if body.stream:
            return StreamingResponse(chat_stream(run, meta, assemblers, policy, body.include_usage,
                                                 top_logprobs is not None),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await run.collect_while_connected(request)
        if results is None:  # nobody is left to read the response
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = []
        for i, (result, assembler) in enumerate(zip(results, assemblers)):
            assembler.feed(result.text)
            done = assembler.finish()
            choice = {"index": i, "message": done.message(),
                      "logprobs": {"content": [logprob_entry(lp) for lp in result.logprobs]}
                      if top_logprobs is not None else None,
                      "finish_reason": done.finish_reason(result.finish_reason)}
            choices.append(with_problems(choice, done, meta, policy))
        return {**meta, "object": "chat.completion", "choices": choices, "system_fingerprint": None,
                "usage": usage(run.prompt_tokens, sum(r.completion_tokens for r in results))}

    def with_problems(choice: dict[str, Any], done: FinishedReply, meta: dict[str, Any],
                      policy: ToolPolicy) -> dict[str, Any]:
        """The choice with `tool_call_problems` when the model's calls were refused or an expected call did
        not come (also logged): the reply is still a 200 with the text as content."""
        if done.problems:
            choice["tool_call_problems"] = done.problems
            log.info("%s choice %d (tool_choice %s): %s", meta["id"], choice["index"], policy.choice,
                     "; ".join(done.problems))
        return choice

    async def chat_stream(run: ChoiceRun, meta: dict[str, Any], assemblers: list[ReplyAssembler],
                          policy: ToolPolicy, include_usage: bool, with_logprobs: bool) -> AsyncIterator[str]:
        """SSE: a role delta per choice, reasoning_content and content deltas, each tool call whole in one
        delta, a finish chunk per choice, usage if asked, [DONE]."""
        def chunk(choice: dict[str, Any] | None, usage_value: dict | None = None) -> str:
            data = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                    "choices": [choice] if choice else []}
            if include_usage:
                data["usage"] = usage_value
            return sse(data)

        def delta(index: int, fields: dict[str, Any]) -> str:
            logprobs = {"content": pending[index]} if with_logprobs else None
            pending[index] = []
            return chunk({"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": None})

        n = len(assemblers)
        completion_tokens = 0
        pending: dict[int, list[dict]] = {i: [] for i in range(n)}  # logprobs of tokens whose text is held back
        try:
            for i in range(n):
                yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            async for index, event in run.events():
                if event.logprob is not None:
                    pending[index].append(logprob_entry(event.logprob))
                for kind, text in assemblers[index].feed(event.text):
                    yield delta(index, {"reasoning_content" if kind == "reasoning" else "content": text})
                if event.finished:
                    if event.finish_reason in ("error", "abort"):
                        yield sse({"error": {"message": f"generation ended: {event.error or 'server shutdown'}",
                                             "type": "server_error", "param": None, "code": event.finish_reason}})
                        break
                    completion_tokens += event.completion_tokens
                    done = assemblers[index].finish()
                    if done.reasoning_rest:
                        yield delta(index, {"reasoning_content": done.reasoning_rest})
                    if done.content_rest:
                        yield delta(index, {"content": done.content_rest})
                    if done.tool_calls:
                        yield delta(index, {"tool_calls": [{"index": k, **call}
                                                           for k, call in enumerate(done.tool_calls)]})
                    logprobs = {"content": pending[index]} if with_logprobs and pending[index] else None
                    final = {"index": index, "delta": {}, "logprobs": logprobs,
                             "finish_reason": done.finish_reason(event.finish_reason)}
                    yield chunk(with_problems(final, done, meta, policy))
            else:
                if include_usage:
                    yield chunk(None, usage(run.prompt_tokens, completion_tokens))
            yield sse("[DONE]")
        finally:
            run.cancel()  # a disconnected client frees its batch slots here

    @v1.post("/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_json(request))
        check_model(body)
        top_logprobs = body.logprobs_wanted()
        prompts = []
        for prompt in body.prompts():
            if isinstance(prompt, str):
                check_text_length(len(prompt), "prompt")
            ids = prompt if isinstance(prompt, list) else await asyncio.to_thread(tokenizer.encode, prompt)
            if isinstance(prompt, str) and not ids:
                ids = [tokenizer.eot_id]  # an empty prompt starts a fresh document
            if any(not 0 <= t < engine.vocab_size for t in ids):
                raise bad_request(f"token ids must be in [0, {engine.vocab_size})", "prompt")
            check_prompt(ids, "prompt")
            prompts.append(ids)
        run = start_run(prompts, body, top_logprobs)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            return StreamingResponse(completion_stream(run, meta, body.include_usage, top_logprobs is not None),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await run.collect_while_connected(request)
        if results is None:  # nobody is left to read the response
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                    "logprobs": legacy_logprobs(r.logprobs) if top_logprobs is not None else None}
                   for i, r in enumerate(results)]
        return {**meta, "object": "text_completion", "choices": choices, "system_fingerprint": None,
                "usage": usage(run.prompt_tokens, sum(r.completion_tokens for r in results))}

    def legacy_logprobs(items: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """The completions API's logprobs: parallel lists of tokens, logprobs, top alternatives, offsets."""
        tokens = [tokenizer.token_bytes(i.token_id).decode("utf-8", errors="replace") for i in items]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top = [{tokenizer.token_bytes(t).decode("utf-8", errors="replace"): lp for t, lp in i.top} for i in items]
        return {"tokens": tokens, "token_logprobs": [i.logprob for i in items], "top_logprobs": top,
                "text_offset": offsets}

    async def completion_stream(run: ChoiceRun, meta: dict[str, Any], include_usage: bool,
                                with_logprobs: bool) -> AsyncIterator[str]:
        def chunk(choice: dict[str, Any] | None, usage_value: dict | None = None) -> str:
            data = {**meta, "object": "text_completion", "system_fingerprint": None,
                    "choices": [choice] if choice else []}
            if include_usage:
                data["usage"] = usage_value
            return sse(data)

        completion_tokens = 0
        pending: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(run.handles))}
        try:
            async for index, event in run.events():
                if event.logprob is not None:
                    pending[index].append(event.logprob)
                if event.finished and event.finish_reason in ("error", "abort"):
                    yield sse({"error": {"message": f"generation ended: {event.error or 'server shutdown'}",
                                         "type": "server_error", "param": None, "code": event.finish_reason}})
                    break
                if event.text or event.finished:
                    logprobs = legacy_logprobs(pending[index]) if with_logprobs else None
                    pending[index] = []
                    yield chunk({"index": index, "text": event.text, "logprobs": logprobs,
                                 "finish_reason": event.finish_reason})
                if event.finished:
                    completion_tokens += event.completion_tokens
            else:
                if include_usage:
                    yield chunk(None, usage(run.prompt_tokens, completion_tokens))
            yield sse("[DONE]")
        finally:
            run.cancel()

    app.include_router(v1)
    return app
