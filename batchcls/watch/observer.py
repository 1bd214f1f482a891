"""The watchdog side: an observer for the folder and a handler that only turns OS events into ``Event``s.

Handlers run on watchdog's single dispatch thread, so slow work there would hold up every later event:
this one only enqueues. inotify reports close-after-write (a file is complete); no other observer does.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from batchcls.watch.config import WatchConfig
from batchcls.watch.events import Event, Kind


def handler(put: Callable[[Event], None]) -> Any:
    """A FileSystemEventHandler that only enqueues."""
    from watchdog.events import FileSystemEventHandler

    class Events(FileSystemEventHandler):
        def on_closed(self, event) -> None:  # inotify IN_CLOSE_WRITE: the writer is done
            put(Event(Kind.CLOSED, event.src_path))

        def on_created(self, event) -> None:
            put(Event(Kind.DIR_CREATED if event.is_directory else Kind.CREATED, event.src_path))

        def on_modified(self, event) -> None:
            if not event.is_directory:
                put(Event(Kind.CREATED, event.src_path))

        def on_moved(self, event) -> None:  # src or dest may be '' when the other side is outside
            if event.src_path:
                put(Event(Kind.GONE, event.src_path))
            if event.dest_path:
                put(Event(Kind.DIR_MOVED_IN if event.is_directory else Kind.MOVED, event.dest_path))

        def on_deleted(self, event) -> None:
            put(Event(Kind.GONE, event.src_path))

    return Events()


def make_observer(config: WatchConfig) -> tuple[Any, bool]:
    """(observer, has close events)."""
    if config.polling:
        from watchdog.observers.polling import PollingObserver
        return PollingObserver(timeout=config.poll_interval_s), False
    if sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyObserver
        # Full events: a move in from outside arrives as a move (complete), not as a create.
        return InotifyObserver(generate_full_events=True), True
    from watchdog.observers import Observer
    return Observer(), False


def event_filter(close_events: bool) -> list | None:
    if not close_events:
        return None
    from watchdog.events import (
        DirCreatedEvent,
        DirDeletedEvent,
        DirMovedEvent,
        FileClosedEvent,
        FileCreatedEvent,
        FileDeletedEvent,
        FileMovedEvent,
    )
    # No modify events: with close-after-write they add nothing, and each write() makes one.
    return [FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileDeletedEvent,
            DirCreatedEvent, DirMovedEvent, DirDeletedEvent]
