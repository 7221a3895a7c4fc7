"""`acornlm serve`: an OpenAI-compatible HTTP server (and a web chat page) for a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from acornlm.errors import ConfigError

API_KEY_ENV = "ACORNLM_API_KEY"


def serve(
    ckpt: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_file: str | None = None,
    allowed_hosts: list[str] | None = None,
    cors_origins: list[str] | None = None,
    max_batch: int = 16,
    max_queue: int | None = None,
    max_context: int = 2048,
    model_name: str | None = None,
    max_tokens: int = 2048,
    max_body_bytes: int = 1_000_000,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
    threads: int = 0,
    engine_process: bool = True,
    max_connections: int = 256,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
    shutdown_timeout: float = 10.0,
) -> None:
    """Serve a checkpoint over HTTP with the OpenAI API and a chat page at http://HOST:PORT/.

    Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, and the
    web chat page at /. Concurrent requests are decoded together (continuous batching); requests
    beyond --max_batch running and --max_queue waiting get HTTP 429.

    Chat completions take OpenAI's `tools` and `tool_choice` and return `tool_calls` (finish_reason
    "tool_calls") when the model writes valid calls; a malformed call comes back as plain text. The
    model's thinking comes back as `reasoning_content` (vLLM's name), and
    `chat_template_kwargs: {"enable_thinking": false}` asks for an answer without thinking. Both need
    a tokenizer with the chat tokens (`acornlm tokenizer add-chat-tokens` adds them to an older one).

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint is used).
        host: Address to listen on; 127.0.0.1 (this machine only) unless you mean to expose it.
        port: TCP port to listen on.
        api_key: Require "Authorization: Bearer KEY" on every /v1 route and /openapi.json. Other users of
            the machine can read it in `ps`: prefer --api_key_file or $ACORNLM_API_KEY.
        api_key_file: Read the API key from this file (surrounding whitespace is stripped).
        allowed_hosts: Host names the server answers for, besides loopback ones ('["*"]' = any). Default:
            any with an API key; without one, loopback only (and --host if it is a specific address),
            so a web page cannot drive the server through DNS rebinding.
        cors_origins: Web origins whose pages may call the API from a browser, e.g. '["https://my.app"]';
            default none (no CORS headers are sent).
        max_batch: Most sequences decoded together (each takes a KV cache slot of --max_context positions).
        max_queue: Most sequences waiting for a slot (default: 4 x max_batch).
        max_context: Most tokens per conversation, prompt and reply together, capped at the model's context;
            0 = the model's context. The KV cache holds max_batch x max_context positions (its size is printed).
        model_name: Name clients pass as `model` (default: the checkpoint's directory name).
        max_tokens: Most tokens one reply may generate (also the default when a request gives none).
        max_body_bytes: Largest request body accepted (HTTP 413 beyond it).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto" (as stored in the checkpoint), "float32", "bfloat16" or "float16".
        quantize: "none", or "int8": int8 weights in the linear layers, for faster CPU decoding of a few
            sequences at a time (logits change slightly; see acornlm/infer/quantize.py).
        rope_scaling: Run beyond the trained length with scaled RoPE, e.g. '{"rope_type": "yarn", "factor": 4}'
            ("linear" and "dynamic" too; original_max_position_embeddings defaults to the trained length).
        max_position_embeddings: Longest sequence to accept; default: trained length x rope_scaling factor.
        threads: CPU threads for the model's math (0 = PyTorch's default, one per core). On a machine
            shared with other work, 1 often decodes faster than oversubscribed cores.
        engine_process: Run the model in a process of its own (default), so that it and the HTTP
            server do not take turns on one Python interpreter lock; false keeps it on a thread of
            the server process (one process to debug or profile).
        max_connections: Most open connections and requests; beyond it new requests get HTTP 503.
        header_timeout: Seconds a connection has to send a request's headers; then it is closed.
        body_timeout: Seconds a client has to send a request's body (HTTP 408 beyond).
        shutdown_timeout: On SIGTERM or Ctrl-C, seconds running requests get to finish; a second
            signal stops at once.
    """
    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"serving needs the serve extra ({exc.name} is missing): pip install 'acornlm[serve]'") from exc
    from acornlm.serve.app import clean_api_key
    from acornlm.serve.engine_process import EngineProcess, EngineSettings
    from acornlm.serve.protocol import ServerLimits
    from acornlm.serve.server import ConnectionLimits, run_server

    for name, value in (("max_tokens", max_tokens), ("max_body_bytes", max_body_bytes)):
        if value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = PyTorch's default), got {threads}")
    if max_context < 0:
        raise ConfigError(f"--max_context must be >= 0 (0 = the model's context), got {max_context}")
    if body_timeout <= 0:
        raise ConfigError(f"--body_timeout must be > 0, got {body_timeout}")
    connections = ConnectionLimits(max_connections=max_connections, header_timeout_s=header_timeout,
                                   shutdown_timeout_s=shutdown_timeout)
    api_key = clean_api_key(api_key or read_api_key_file(api_key_file) or os.environ.get(API_KEY_ENV) or None)
    settings = EngineSettings(str(ckpt), device=device, dtype=dtype, max_batch=max_batch, max_queue=max_queue,
                              max_context=max_context or None, quantize=quantize, rope_scaling=rope_scaling,
                              max_position_embeddings=max_position_embeddings, threads=threads)
    engine = EngineProcess(settings) if engine_process else settings.load()
    name = model_name or Path(ckpt).resolve().name
    limits = ServerLimits(max_output_tokens=max_tokens, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout)
    url = f"http://{host}:{port}"
    print(f"serving {name}: {engine.num_params / 1e6:.1f}M parameters, context {engine.context_length} "
          f"tokens, KV cache {engine.kv_cache_bytes / 2**20:.0f} MiB for {engine.max_batch} sequences", flush=True)
    print(f"chat page {url}/  OpenAI API {url}/v1" + ("  (API key required)" if api_key else ""), flush=True)
    run_server(engine, name, host=host, port=port, api_key=api_key, limits=limits, allowed_hosts=allowed_hosts,
               cors_origins=cors_origins or (), connections=connections)


def read_api_key_file(path: str | None) -> str | None:
    """The key in `path` (None for no path); ConfigError naming the file when it cannot be read."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            key = file.read(4097)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api_key_file {path}: cannot read it ({exc})") from exc
    if len(key) > 4096:
        raise ConfigError(f"--api_key_file {path}: over 4096 characters; it should hold just the key")
    if not key.strip():
        raise ConfigError(f"--api_key_file {path}: the file is empty")
    return key
