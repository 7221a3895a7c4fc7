"""Stop a training run cleanly on Ctrl-C (SIGINT) or SIGTERM: finish the step, save, exit.

A spot instance being reclaimed, a VM shutting down, `docker stop`, Slurm and Kubernetes all end a
process with SIGTERM, and then with SIGKILL after a grace period (10 s to 2 min). Python's default
is to die at once (SIGTERM) or raise KeyboardInterrupt anywhere (Ctrl-C), losing every step since
the last periodic checkpoint. (An ssh session that drops sends SIGHUP, which is not caught: its
terminal is gone, so the run could not even report; run long jobs in tmux or under nohup.) Inside

    with StopOnSignal():
        summary = run_pretrain(...)   # the Trainer asks requested_stop() before every step

the first SIGINT or SIGTERM only sets a flag and prints one line. The Trainer sees it at the end
of the current optimizer step, all ranks agree on it (a signal that reached one rank stops them
all), rank 0 writes a checkpoint, and the run returns with `stopped_by_signal` in its summary.
A second Ctrl-C raises KeyboardInterrupt at once, for when saving is not wanted or hangs; the
checkpoint writer is atomic, so that leaves no half-written checkpoint. After a Ctrl-C, a SIGTERM
aborts too: torchrun forwards the first Ctrl-C to its workers as SIGINT and turns the second one
into SIGTERM. A SIGTERM after a SIGTERM only repeats the note: schedulers (spot reclaims, Slurm,
Kubernetes, docker stop) send one SIGTERM and then SIGKILL, and aborting on a repeat would only
throw the save away.

The handler is installed by the program's top level (each `acornlm train ...` command), not by
the Trainer: a library call that quietly turned Ctrl-C into "return normally" would let a script
that chains stages (the demos, the benchmarks) carry on with the next stage after the user asked
it to stop. Signal handlers can only be installed in the main thread; elsewhere StopOnSignal says
so once and does nothing, and a signal ends the process as it would without it.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The handlers that are installed, innermost last (nesting works; the innermost one is active).
_active: list[StopOnSignal] = []


def _write_line(text: str) -> None:
    """Write one line to stderr from a signal handler.

    It goes straight to file descriptor 2: the handler runs between two bytecodes of the main
    thread, which may be inside a write to sys.stderr (a tqdm bar), and a second write to the
    same buffered stream from there fails with "reentrant call".
    """
    try:
        os.write(2, (text + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _is_rank_zero() -> bool:
    """Under torchrun every rank gets the signal; only rank 0 (or a plain process) says so."""
    return os.environ.get("RANK", "0") == "0"


class StopOnSignal:
    """A context manager that turns the first SIGINT/SIGTERM into a stop request.

    `signal` is the first signal received (None until then); `installed` tells whether the
    handlers could be installed (main thread only). The handlers that were there before are
    put back on exit.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.installed = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is not threading.main_thread():
            _write_line("acornlm: not in the main thread, so Ctrl-C and SIGTERM are not caught: a signal ends "
                        "the run without a final checkpoint (the periodic ones are kept)")
            return self
        for received in HANDLED_SIGNALS:
            self._previous[received] = signal.getsignal(received)
            signal.signal(received, self._handle)
        self.installed = True
        _active.append(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if not self.installed:
            return
        for received, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best guess
            signal.signal(received, previous if previous is not None else signal.SIG_DFL)
        _active.remove(self)
        self.installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        received = signal.Signals(signum)
        if self.signal is None:
            self.signal = received
            if _is_rank_zero():
                _write_line(f"acornlm: {received.name} received: finishing the current step, then saving a "
                            "checkpoint (press Ctrl-C again to abort without saving)")
            return
        if signal.SIGINT in (received, self.signal):  # a person insists (see the module docstring)
            if _is_rank_zero():
                _write_line(f"acornlm: {received.name} after Ctrl-C: aborting now, without a final checkpoint")
            raise KeyboardInterrupt
        if _is_rank_zero():
            _write_line(f"acornlm: {received.name} again: still finishing the step and saving "
                        "(Ctrl-C aborts without saving)")


def requested_stop() -> signal.Signals | None:
    """The signal that asked the run to stop (the innermost active StopOnSignal's), or None."""
    return _active[-1].signal if _active else None


def exit_status(received: signal.Signals) -> int:
    """128 + the signal's number (130 for SIGINT, 143 for SIGTERM): what a shell reports for a
    process that a signal ended, so a wrapper script or scheduler sees "not finished"."""
    return 128 + int(received)


def signal_named(name: str) -> signal.Signals:
    """The signal called `name` ("SIGTERM"), as the summary's `stopped_by_signal` stores it."""
    return signal.Signals[name]
