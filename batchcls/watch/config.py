"""What the watch daemon is told (``WatchConfig``) and what it reports (``WatchStats``, ``WatchError``)."""
from __future__ import annotations

from dataclasses import dataclass

from batchcls.errors import BatchclsError
from batchcls.pipeline import RunOptions

# Names that are still being written by convention; they count once renamed to their real name.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".swp", "~")
WATCH_FORMATS = ("csv", "jsonl")  # parquet can't be appended row by row


class WatchError(BatchclsError):
    """The daemon cannot start or keep going (folder, observer, move targets)."""


@dataclass(frozen=True)
class WatchConfig:
    folder: str
    out: str  # the ledger, appended in place
    model: str | None = None
    backend: str | None = None
    device: str | None = None
    fmt: str = "csv"
    recursive: bool = True
    polling: bool = False  # PollingObserver: for network mounts, where inotify events don't arrive
    poll_interval_s: float = 1.0  # how often the polling observer lists the folder
    stable_s: float = 2.0  # without a close event: size+mtime unchanged this long = complete
    close_grace_s: float = 30.0  # with close events: a file that never reports one is accepted after this
    max_wait_s: float = 0.25  # how long a partial batch waits for more arrivals
    rescan_s: float = 60.0  # periodic re-scan against the ledger (lost events, inotify overflow); 0 = off
    move_to: str | None = None  # labelled files go to MOVE_TO/<label>/<name>
    errors_to: str | None = None  # files that fail go to ERRORS_TO/<name>
    options: RunOptions = RunOptions()  # batch_size is the max batch; workers, top_k, threshold, max_pixels


@dataclass
class WatchStats:
    files: int = 0
    errors: int = 0
    moved: int = 0
    batches: int = 0


def is_temporary(name: str) -> bool:
    """Dot-files and partial-download names are ignored until renamed."""
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES)
