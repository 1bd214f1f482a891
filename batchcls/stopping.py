"""Stopping on SIGINT/SIGTERM at a safe point, shared by ``run``, the Ray runner and ``watch``.

The handler only sets a flag. Raising KeyboardInterrupt wherever the main thread happens to be can
land inside concurrent.futures while it starts a decode worker, and leave a worker that never gets
its exit sentinel (seen under load: a Ctrl-C'd run hung at exit). Taking a lock in the handler is
no better: ``threading.Event.set()`` there deadlocks whenever the signal lands while the main thread
is inside ``Event.wait()`` holding the same non-reentrant lock (seen in CI: ``watch`` hung after
Ctrl-C). A second signal is the user insisting: it interrupts at once.
"""
from __future__ import annotations

import signal


class StopRequested:
    """A SIGINT/SIGTERM handler that records the request; the caller polls ``requested``."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def __call__(self, signum, frame):  # signal handler signature
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    @property
    def name(self) -> str:
        """The signal's name (SIGINT, SIGTERM), for the log line."""
        return signal.Signals(self.signum).name if self.signum is not None else "stop"

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def install(self) -> dict:
        """Handle SIGINT and SIGTERM; returns the previous handlers, for ``restore``."""
        return {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def restore(previous: dict) -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)
