"""Running the app: from a checkpoint to a listening uvicorn server.

`load_engine` builds the engine of a checkpoint; `run_server` serves it until Ctrl-C (what
`acornlm serve` does); `BackgroundServer` runs it in a thread on a free port (tests, benchmarks,
notebooks):

    with BackgroundServer(create_app(engine, "demo")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from acornlm.errors import ConfigError
from acornlm.infer.api import LanguageModel
from acornlm.infer.engine import Engine
from acornlm.serve.app import create_app
from acornlm.serve.protocol import ServerLimits

log = logging.getLogger("acornlm.serve")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def load_engine(ckpt: str | Path, device: str = "auto", dtype: str = "auto", max_batch: int = 16,
                max_queue: int | None = None, max_context: int | None = None, quantize: str = "none",
                rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int | None = None) -> Engine:
    """The checkpoint's model and tokenizer in an `Engine` (not started)."""
    lm = LanguageModel.from_checkpoint(ckpt, device=device, dtype=dtype, quantize=quantize,
                                       rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings)
    return Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context)


@dataclass
class ConnectionLimits:
    """What one TCP connection may cost the server, against slow or idle clients (slowloris).

    Args:
        max_connections: Most open connections and requests; beyond it new requests get HTTP 503.
        header_timeout_s: Seconds a connection has to send a request's headers, when it opens and
            between requests; then it is closed.
        keep_alive_s: Seconds an idle keep-alive connection stays open after a response.
        shutdown_timeout_s: On SIGTERM or Ctrl-C, seconds open requests get to finish before they
            are cut; a second signal cuts them at once.
    """

    max_connections: int = 256
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "header_timeout_s", "keep_alive_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, but a connection must send complete request headers within
    `header_timeout_s` of opening (and of its previous response); uvicorn itself waits for ever."""

    header_timeout_s = ConnectionLimits.header_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle and self._header_timer is not None:  # a request's headers are complete
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


class AcornServer(uvicorn.Server):
    """uvicorn's server, but a second SIGTERM stops it at once (uvicorn forces only on a second Ctrl-C)."""

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(sig, frame)


def server_config(app: FastAPI, connections: ConnectionLimits, log_level: str = "info", **kwargs) -> uvicorn.Config:
    """uvicorn's configuration with `connections`' limits and timeouts."""
    protocol = type("Protocol", (HeaderTimeoutProtocol,), {"header_timeout_s": connections.header_timeout_s})
    return uvicorn.Config(app, log_level=log_level, http=protocol, limit_concurrency=connections.max_connections,
                          timeout_keep_alive=connections.keep_alive_s,
                          timeout_graceful_shutdown=connections.shutdown_timeout_s, **kwargs)


def run_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, limits: ServerLimits | None = None, log_level: str = "info",
               allowed_hosts: Sequence[str] | None = None, cors_origins: Sequence[str] = (),
               connections: ConnectionLimits | None = None) -> None:
    """Serve until interrupted; the engine thread is started here and stopped on exit.

    uvicorn logs each request at log_level "info" (on stdout); "warning" keeps only problems.
    Without an API key only loopback Host names are answered, unless `allowed_hosts` names more
    (a server bound to a specific non-loopback address answers for that address too).
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if host not in LOOPBACK_HOSTS and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model; "
                    "pass --api_key_file or set ACORNLM_API_KEY", host)
        if allowed_hosts is None and host not in ("0.0.0.0", "::"):
            allowed_hosts = [host]
    app = create_app(engine.start(), model_name, api_key=api_key, limits=limits, allowed_hosts=allowed_hosts,
                     cors_origins=cors_origins)
    try:
        AcornServer(server_config(app, connections or ConnectionLimits(), log_level, host=host, port=port)).run()
    finally:
        engine.shutdown()


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread on a free localhost port; a context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 connections: ConnectionLimits | None = None) -> None:
        self.app = app
        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))  # port 0: the OS picks a free one; bound now, so no race
        self.port = self._socket.getsockname()[1]
        connections = connections or ConnectionLimits(shutdown_timeout_s=1)
        self._server = AcornServer(server_config(app, connections, "warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="acornlm-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
