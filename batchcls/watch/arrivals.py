"""Arrival rules: when a seen file counts as ready, and the queue of ready files waiting for a batch.

- a close-after-write (inotify) or a move into the folder makes a file ready at once;
- anything else (created/modified events, polling, a catch-up scan) waits until its size and mtime have
  been stable for an interval (``stable_s``; ``close_grace_s`` for a file that should have sent a close);
- a batch is due when it is full or its oldest file has waited ``max_wait_s``.

No threads and no observer here: the clock is a parameter, so the rules are tested with a fake one.
``Arrivals`` is shared by the daemon's intake thread (events in) and worker thread (batches out), hence
its one lock.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from batchcls.scan import InputFile
from batchcls.watch.config import is_temporary
from batchcls.watch.events import Event, Kind

log = logging.getLogger("batchcls.watch")


class Scope:
    """Which paths are inputs, and under what ledger key (relative to the folder, '/' separators)."""

    def __init__(self, root: str, *, recursive: bool, excluded_files: Iterable[str] = (),
                 excluded_dirs: Iterable[str] = ()) -> None:
        self.root, self.recursive = root, recursive
        self.excluded_files = set(excluded_files)
        self.excluded_dirs = [str(d).rstrip(os.sep) + os.sep for d in excluded_dirs]

    def excluded_dir(self, path: str) -> bool:
        return any((path + os.sep).startswith(d) for d in self.excluded_dirs)

    def rel(self, path: str) -> str | None:
        """The ledger key of an absolute path, or None when it is not an input (temp, excluded, outside)."""
        path = os.fsdecode(path)
        if path in self.excluded_files or self.excluded_dir(path):
            return None
        rel = os.path.relpath(path, self.root)
        if rel.startswith(".." + os.sep) or rel in (".", ".."):
            return None
        parts = rel.split(os.sep)
        if not self.recursive and len(parts) > 1:
            return None
        if any(p.startswith(".") for p in parts[:-1]) or is_temporary(parts[-1]):
            return None
        return "/".join(parts)


@dataclass
class _Pending:
    path: str
    interval: float
    sig: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    since: float = 0.0  # when sig was first seen


class Arrivals:
    """Seen -> pending (until stable) -> ready (until batched) -> in flight (until its row is written)."""

    def __init__(self, *, done: Container[str], close_events: bool, stable_s: float, close_grace_s: float,
                 max_wait_s: float, batch_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.done = done  # the ledger's keys: never labelled again
        self.close_events, self.stable_s, self.close_grace_s = close_events, stable_s, close_grace_s
        self.max_wait_s, self.batch_size, self.clock = max_wait_s, batch_size, clock
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._ready: dict[str, tuple[InputFile, float]] = {}  # rel -> (file, when ready); insertion order
        self._inflight: set[str] = set()
        self.stopping = False

    # --- in: events ---

    def on_event(self, event: Event, rel: str) -> None:
        """A file event for the input ``rel`` (``Scope.rel`` of the event's path)."""
        path = os.fsdecode(event.path)
        if event.kind is Kind.GONE:
            self.forget(rel)
        elif event.kind is Kind.MOVED:  # renamed or moved in: complete by convention
            self._promote(rel, path, live=True)
        elif event.kind is Kind.CLOSED and _size(path) != 0:  # a 0-byte close is often create-then-write
            self._promote(rel, path, live=True)
        elif event.kind is Kind.FOUND:
            self.watch(rel, path, self.stable_s)
        elif event.kind in (Kind.CLOSED, Kind.CREATED):  # with close events, a created file waits for its close
            self.watch(rel, path, self.close_grace_s if self.close_events else self.stable_s)

    def watch(self, rel: str, path: str, interval: float) -> bool:
        """Judge ``rel`` by stability over ``interval``; False when it is labelled or already on its way."""
        with self._cond:
            if rel in self.done or rel in self._ready or rel in self._inflight or rel in self._pending:
                return False
            self._pending[rel] = _Pending(path, interval)
            return True

    def check(self) -> None:
        """Promote pending files whose size and mtime have held for their interval."""
        now = self.clock()
        with self._cond:
            pending = list(self._pending.items())
        for rel, p in pending:
            try:
                st = os.stat(p.path)
            except OSError:  # deleted before it was ready
                with self._cond:
                    self._pending.pop(rel, None)
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if sig != p.sig:
                p.sig, p.since = sig, now
            elif now - p.since >= p.interval:
                self._promote(rel, p.path, live=False)

    def _promote(self, rel: str, path: str, *, live: bool) -> None:
        with self._cond:
            self._pending.pop(rel, None)
            if rel in self.done:
                if live:
                    log.info("%s is already in the ledger: not labelled again (give it a new name)", rel)
                return
            if rel in self._ready or rel in self._inflight:
                return
            self._ready[rel] = (InputFile(path, rel), self.clock())
            self._cond.notify_all()

    def forget(self, rel: str) -> None:
        """A file (or a folder's files) deleted or moved away before it was labelled."""
        prefix = rel + "/"
        with self._cond:
            for table in (self._pending, self._ready):
                for key in [k for k in table if k == rel or k.startswith(prefix)]:
                    del table[key]

    # --- out: batches ---

    def take(self, block: bool) -> list[InputFile]:
        """The next batch when one is due (full, or its oldest file waited max_wait_s); [] otherwise."""
        with self._cond:
            while not self.stopping:
                timeout = None
                if self._ready:
                    due = next(iter(self._ready.values()))[1] + self.max_wait_s
                    now = self.clock()
                    if len(self._ready) >= self.batch_size or now >= due:
                        rels = list(self._ready)[:self.batch_size]
                        self._inflight.update(rels)
                        return [self._ready.pop(r)[0] for r in rels]
                    timeout = due - now
                if not block:
                    return []
                self._cond.wait(timeout)
        return []

    def finished(self, rels: list[str]) -> None:
        """Rows written (the ledger now holds them), or no longer inputs (deleted)."""
        with self._cond:
            self._inflight.difference_update(rels)

    def waiting(self) -> set[str]:
        """Paths seen but not yet labelled (waiting to be stable, ready or in flight)."""
        with self._cond:
            return set(self._pending) | set(self._ready) | self._inflight

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
