"""The daemon's typed events: what the observer (or a scan) saw happen to a path."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    CLOSED = "closed"  # closed after writing (inotify IN_CLOSE_WRITE): the writer is done
    CREATED = "created"  # created or modified: complete once it stops changing
    MOVED = "moved"  # renamed or moved into the folder: complete by convention
    GONE = "gone"  # deleted or moved away
    FOUND = "found"  # listed by a scan of a new folder: complete once it stops changing
    DIR_CREATED = "dir-created"  # a folder made here: its files, as if each had arrived
    DIR_MOVED_IN = "dir-moved-in"  # a folder moved in: its files are complete
    SCAN = "scan"  # catch up: every file not yet in the ledger
    STOP = "stop"  # the intake thread ends


@dataclass(frozen=True)
class Event:
    kind: Kind
    path: str = ""  # absolute (the observer's spelling); empty for SCAN and STOP
