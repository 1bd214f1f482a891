"""Progress bars: tqdm on an interactive stderr, nothing in logs and pipes.

A run streams its files (the first batch starts before the walk ends), so its total is counted in a
background thread beside the work and given to the bar once known; the bar then shows a percentage
and an ETA. The count starts once the first batch is done, so it never competes with the start of the
run (model load, first decode), and the thread only counts: the bar is touched from the caller's thread.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable

Count = Callable[[threading.Event], "int | None"]  # counts until done (or the event is set: None)


class Progress:
    def __init__(self, desc: str, *, total: int | None = None, count: Count | None = None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True)
        self._counted: int | None = None
        self._stop = threading.Event()
        self._to_count = count if total is None else None

    def _count(self, count: Count) -> None:
        try:
            self._counted = count(self._stop)
        except Exception:  # a total is a nicety: the run itself reports any real problem
            pass

    def update(self, n: int) -> None:
        if self._to_count is not None:
            threading.Thread(target=self._count, args=(self._to_count,), name="batchcls-count", daemon=True).start()
            self._to_count = None
        counted = self._counted
        if self._bar.total is None and counted is not None:
            self._bar.total = max(counted, self._bar.n + n)
            self._bar.refresh()
        self._bar.update(n)

    def close(self) -> None:
        self._stop.set()
        self._bar.close()


def progress(desc: str, *, quiet: bool = False, total: int | None = None, count: Count | None = None) -> Progress | None:
    """A bar when stderr is a terminal and the user did not ask for quiet, else None."""
    if quiet or not sys.stderr.isatty():
        return None
    return Progress(desc, total=total, count=count)
