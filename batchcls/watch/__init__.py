"""The watched-folder daemon (``batchcls watch``), split by job:

    events.py    the typed Event the rest passes around
    observer.py  watchdog: observer + a handler that only enqueues; a new watch when the folder is made again
    arrivals.py  when a file is ready, and the queue of ready files (rules testable with a fake clock)
    ledger.py    OUT: a row per labelled file, never labelled again
    moves.py     --move-to / --errors-to: atomic, never overwriting, after the row is on disk
    daemon.py    Watcher (lifecycle, intake and worker threads) and ``watch()`` (signals)
"""
from batchcls.watch.config import WatchConfig, WatchError, WatchStats, is_temporary
from batchcls.watch.daemon import Watcher, log_to_stderr, watch
from batchcls.watch.moves import move_into

__all__ = ["WatchConfig", "WatchError", "WatchStats", "Watcher", "is_temporary", "log_to_stderr", "move_into", "watch"]
