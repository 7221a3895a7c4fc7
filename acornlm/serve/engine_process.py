"""The engine in a process of its own, so that the model and the HTTP server never wait for each
other's Python lock (the GIL).

Why: with the engine on a thread of the server process, both share one interpreter lock. The
engine gives it up around every PyTorch operation (hundreds per decode step) and the event loop
takes it to write each token of each stream; each hand-over wakes the other thread, which may
first have to wait for a core that PyTorch's worker threads are using. On the 2-core benchmark
machine that cost the engine most of its second core: 16 streams through HTTP decoded no faster
with 2 PyTorch threads than with 1, while the engine alone went 1.6x faster (benchmarks/README.md).
In its own process the engine keeps its interpreter to itself, as vLLM's engine core does.

`EngineProcess(settings)` starts the process, which loads the checkpoint and drives
`Engine.step()` in its main thread. It offers what the server uses of an `Engine` (`submit`,
`check_prompt`, the sizes and counters of `/health`), so `create_app` takes either:

- the server sends `submit` / `cancel` / `stop` messages down a pipe;
- after each step the engine process sends back, in one message, every sequence's events of that
  step and its counters; a reader thread here hands each event to its sequence's callback.

A request's settings are checked here, before anything is sent, so a bad one still gets its
HTTP 400 at once, and the queue limit is counted here too (HTTP 429). If the engine process dies,
every unfinished sequence ends with an error event and `alive` turns False (`/health` says 503).
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from acornlm.allocator import keep_freed_memory
from acornlm.errors import AcornError, ConfigError
from acornlm.infer.engine import Engine, EngineFull, EngineStopped, Event, check_prompt, make_sampler
from acornlm.infer.sampling import SamplingParams
from acornlm.serve.server import load_engine
from acornlm.tokenizer import Tokenizer

START_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes


@dataclass
class EngineSettings:
    """What the engine process needs to build its `Engine` (the arguments of `load_engine`)."""

    ckpt: str
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 16
    max_queue: int | None = None
    max_context: int | None = None
    quantize: str = "none"
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = None
    threads: int = 0  # PyTorch threads of the process that runs the engine; 0 = PyTorch's default

    def load(self) -> Engine:
        """The engine (not started), in this process; sets this process's PyTorch threads."""
        if self.threads:
            torch.set_num_threads(self.threads)
        return load_engine(self.ckpt, device=self.device, dtype=self.dtype, max_batch=self.max_batch,
                           max_queue=self.max_queue, max_context=self.max_context, quantize=self.quantize,
                           rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings)


@dataclass
class _Ready:
    """The engine process's first message: the figures the server reports and checks against."""

    tokenizer: Tokenizer
    context_length: int
    vocab_size: int
    max_batch: int
    max_queue: int
    kv_cache_bytes: int
    num_params: int


@dataclass
class _Status:
    running: int = 0
    waiting: int = 0
    decode_steps: int = 0
    finished: dict[str, int] = field(default_factory=dict)


def _status(engine) -> _Status:
    return _Status(engine.num_running, engine.num_waiting, engine.decode_steps, dict(engine.finished))


def _engine_main(conn, settings: EngineSettings) -> None:
    """The engine process: load, say ready, then step while there is work and wait when there is none."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server stops us
    keep_freed_memory()  # as every acornlm command does (acornlm/allocator.py); a spawned process starts without it
    try:
        engine = settings.load()
    except Exception as exc:  # noqa: BLE001 - reported to the server process, which raises it
        conn.send(("failed", str(exc) if isinstance(exc, AcornError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", _Ready(engine.tokenizer, engine.context_length, engine.vocab_size, engine.max_batch,
                               engine.max_queue, engine.kv_cache_bytes, engine.num_params)))
    try:
        _EngineLoop(conn, engine).run()
    except (EOFError, OSError):  # the server process is gone: nobody is left to serve
        return


class _EngineLoop:
    """The engine process's loop: take messages, step while there is work, send each step's events."""

    def __init__(self, conn, engine) -> None:
        self.conn = conn
        self.engine = engine
        self.outbox: list[tuple[int, Event]] = []  # (sequence id, event) of this step, sent together
        self.handles = {}  # sequence id -> SequenceHandle, while running or waiting

    def deliver(self, seq_id: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            self.outbox.append((seq_id, event))
            if event.finished:
                self.handles.pop(seq_id, None)
        return on_event

    def handle(self, message: tuple) -> bool:
        """Act on one message from the server; False for "stop"."""
        if message[0] == "submit":
            _, seq_id, prompt_ids, params, top_logprobs, ignore_eos = message
            try:
                self.handles[seq_id] = self.engine.submit(prompt_ids, params, on_event=self.deliver(seq_id),
                                                          top_logprobs=top_logprobs, ignore_eos=ignore_eos)
            except AcornError as exc:  # the server checked the request already; kept for safety
                self.outbox.append((seq_id, Event(finish_reason="error", error=str(exc))))
        elif message[0] == "cancel":
            if message[1] in self.handles:
                self.handles[message[1]].cancel()
            else:  # finished already, or never got here: answer anyway, so the server's callback cannot leak
                self.outbox.append((message[1], Event(finish_reason="abort")))
        return message[0] != "stop"

    def run(self) -> None:
        running = True
        while running:
            busy = self.engine.num_running or self.engine.num_waiting
            while running and self.conn.poll(0 if busy else None):  # wait only when there is nothing to do
                running = self.handle(self.conn.recv())
                busy = True
            if running:
                self.engine.step_or_fail()
            else:
                self.engine.shutdown()  # every sequence left ends with "abort"
            if self.outbox or not running:
                self.conn.send(("events", self.outbox, _status(self.engine)))
                self.outbox = []
        self.conn.send(("stopped",))


class _Handle:
    """Returned by `EngineProcess.submit`, like `SequenceHandle`: cancel() frees the slot."""

    def __init__(self, engine: EngineProcess, seq_id: int) -> None:
        self._engine = engine
        self.id = seq_id

    def cancel(self) -> None:
        """Ask the engine process to end the sequence, unless its final event has come already."""
        with self._engine._lock:
            unfinished = self.id in self._engine._callbacks
        if unfinished:
            self._engine._send(("cancel", self.id))


class EngineProcess:
    """An `Engine` running in a child process, used through the same calls as the engine itself.

        engine = EngineProcess(EngineSettings("runs/demo", max_batch=16)).start()
        app = create_app(engine, "demo")
        ...
        engine.shutdown()
    """

    def __init__(self, settings: EngineSettings, start_timeout: float = START_TIMEOUT_S) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(child_conn, settings),
                                        name="acornlm-engine", daemon=True)
        self._process.start()
        child_conn.close()
        ready = self._wait_ready(start_timeout)
        self.tokenizer = ready.tokenizer
        self.context_length = ready.context_length
        self.vocab_size = ready.vocab_size
        self.max_batch = ready.max_batch
        self.max_queue = ready.max_queue
        self.kv_cache_bytes = ready.kv_cache_bytes
        self.num_params = ready.num_params
        self._status = _Status()
        self._callbacks: dict[int, Callable[[Event], None]] = {}
        self._ids = itertools.count()
        # Two locks, so the reader thread never waits behind a send: a send can block while the pipe is
        # full, and only the reader's progress lets the engine process drain it.
        self._lock = threading.Lock()  # guards _callbacks
        self._send_lock = threading.Lock()  # one message at a time down the pipe
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="acornlm-engine-reader", daemon=True)

    def _wait_ready(self, timeout: float) -> _Ready:
        if not self._conn.poll(timeout):
            self._process.kill()
            raise AcornError(f"the engine process did not load the checkpoint within {timeout:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise AcornError(f"the engine process exited (code {self._process.exitcode}) while loading "
                             "the checkpoint") from None
        if kind == "failed":
            self._process.join(5)
            raise ConfigError(payload)
        return payload

    # ------------------------------------------------------------------ what the server uses

    def start(self) -> EngineProcess:
        if not self._reader.is_alive() and not self._stopping:
            self._reader.start()
        return self

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and not self._stopping

    @property
    def num_running(self) -> int:
        return self._status.running

    @property
    def num_waiting(self) -> int:
        return self._status.waiting

    @property
    def decode_steps(self) -> int:
        return self._status.decode_steps

    @property
    def finished(self) -> collections.Counter:
        return collections.Counter(self._status.finished)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        check_prompt(prompt_ids, self.context_length)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, on_event: Callable[[Event], None],
               top_logprobs: int | None = None, ignore_eos: bool = False) -> _Handle:
        """As `Engine.submit`: the same checks and errors, here and now; events arrive on the reader thread."""
        self.check_prompt(prompt_ids)
        make_sampler(params, prompt_ids, self.vocab_size, "cpu")  # raises for settings that cannot be sampled with
        with self._lock:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            if len(self._callbacks) >= self.max_batch + self.max_queue:
                raise EngineFull(
                    f"{len(self._callbacks)} sequences are running or waiting (the limit); retry later or "
                    "start the server with a larger --max_batch / --max_queue"
                )
            seq_id = next(self._ids)
            self._callbacks[seq_id] = on_event
        if not self._send(("submit", seq_id, list(prompt_ids), params, top_logprobs, ignore_eos)):
            with self._lock:
                self._callbacks.pop(seq_id, None)
            raise EngineStopped("the engine process is not running")
        return _Handle(self, seq_id)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process; every running or waiting sequence ends with finish_reason "abort"."""
        if self._stopping:
            return
        self._stopping = True
        self._send(("stop",))
        if self._reader.is_alive():
            self._reader.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._end_all("abort", None)

    # ------------------------------------------------------------------ plumbing

    def _send(self, message: tuple) -> bool:
        """Send one message; False when the engine process is gone (the reader then ends every sequence)."""
        with self._send_lock:
            try:
                self._conn.send(message)
                return True
            except OSError:
                return False

    def _read(self) -> None:
        """Hand each event to its sequence's callback, until the engine process stops or dies."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "stopped":
                    break
                _, events, self._status = message
                for seq_id, event in events:
                    with self._lock:
                        callback = (self._callbacks.pop(seq_id, None) if event.finished
                                    else self._callbacks.get(seq_id))
                    if callback is not None:
                        _call(callback, event)
        except (EOFError, OSError):
            pass
        if not self._stopping:
            self._process.join(5)  # reap it, for its exit code
            code = self._process.exitcode
            self._status = _Status(finished=self._status.finished)  # /health must not show the dead one's load
            self._end_all("error", f"the engine process exited unexpectedly (code {code})")

    def _end_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, {}
        for callback in callbacks.values():
            _call(callback, Event(finish_reason=reason, error=error))


def _call(callback: Callable[[Event], None], event: Event) -> None:
    try:
        callback(event)
    except Exception:  # noqa: BLE001 - a broken consumer only loses its own sequence
        pass
