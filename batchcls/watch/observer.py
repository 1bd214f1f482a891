"""The watchdog side: an observer for the folder and a handler that only turns OS events into ``Event``s.

Handlers run on watchdog's single dispatch thread, so slow work there would hold up every later event:
this one only enqueues. inotify reports close-after-write (a file is complete); no other observer does.

A watch ends with the folder it was set on (inotify follows the inode; the polling emitter stops once
its folder is gone), so ``FolderWatch`` notices the folder deleted, or replaced by another under its
name, says so once, and sets a new watch on the new folder as soon as there is one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

from batchcls.watch.config import WatchConfig
from batchcls.watch.events import Event, Kind

log = logging.getLogger("batchcls.watch")


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


def folder_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the folder at ``path``; None when there is no folder there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class FolderWatch:
    """The observer and its one watch on ``root``, set again on the folder found under that name after
    the watched one was deleted or replaced.

    ``check()`` is cheap (a stat) and called often. The watch has ended when its emitter has stopped
    (watchdog stops it when the folder goes), or when another folder holds the name.
    """

    def __init__(self, config: WatchConfig, root: str, put: Callable[[Event], None]) -> None:
        self.config, self.root, self.put = config, root, put
        self.observer, self.close_events = make_observer(config)
        self.lost = False  # the watched folder is gone or replaced and no new watch is set yet (said once)
        self._failure = ""  # the last reason a new watch could not be set (said once)
        self._stopping = False
        self._lock = threading.Lock()  # check() against stop(): an observer being stopped ends its emitters
        self._arm()

    def _arm(self) -> None:
        ident = folder_id(self.root)
        self.watch = self.observer.schedule(handler(self.put), self.root, recursive=self.config.recursive,
                                            event_filter=event_filter(self.close_events))
        self.emitter = next(e for e in list(self.observer.emitters) if e.watch == self.watch)
        self.ident = ident

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        if self.observer.is_alive():
            self.observer.stop()
            self.observer.join()

    def check(self) -> bool:
        """Whether a new watch was set just now on a new folder (whose files then need a scan)."""
        with self._lock:
            if self._stopping:
                return False
            ident = folder_id(self.root)
            if not self.lost and ident == self.ident and self.emitter.is_alive():
                return False
            if not self.lost:
                what = ("deleted: waiting for it to be made again" if ident is None else
                        "deleted and made again: watching the new one" if ident == self.ident else
                        "replaced by another folder: watching the new one")
                log.warning("the watched folder %s was %s", self.root, what)
                self.lost = True
            if ident is None:
                return False
            with contextlib.suppress(KeyError):  # already unscheduled by a failed attempt
                self.observer.unschedule(self.watch)
            try:
                self._arm()
            except OSError as e:  # gone again already, or out of inotify watches: tried again on the next check
                if str(e) != self._failure:
                    log.warning("cannot watch %s again yet: %s", self.root, e.strerror or e)
                    self._failure = str(e)
                return False
            self.lost, self._failure = False, ""
            log.info("watching %s again", self.root)
            return True
