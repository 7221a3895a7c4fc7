"""Running the app: from a checkpoint to a listening uvicorn server.

`load_engine` builds the engine of a checkpoint; `run_server` serves it until Ctrl-C (what
`acornlm serve` does); `BackgroundServer` runs it in a thread on a free port (tests, benchmarks,
notebooks):

    with BackgroundServer(create_app(engine, "demo")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

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


def run_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, limits: ServerLimits | None = None, log_level: str = "info") -> None:
    """Serve until interrupted; the engine thread is started here and stopped on exit.

    uvicorn logs each request at log_level "info" (on stdout); "warning" keeps only problems.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if host not in LOOPBACK_HOSTS and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model; "
                    "pass --api_key or set ACORNLM_API_KEY", host)
    app = create_app(engine.start(), model_name, api_key=api_key, limits=limits)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.shutdown()


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread on a free localhost port; a context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))  # port 0: the OS picks a free one; bound now, so no race
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
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
