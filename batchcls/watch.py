"""The watched-folder daemon: label images as they arrive, through the same pipeline as ``run``.

Three threads, each with one job (STYLE rule 9):

- watchdog's dispatch thread runs ``_Events``, which only enqueues (kind, path) tuples;
- the intake thread turns those into readiness: a close-after-write (inotify) or a move into the
  folder makes a file ready at once; anything else (created/modified events, polling, the catch-up
  scan) waits until its size and mtime have been stable for an interval;
- the worker batches ready files (``batch_size`` / ``max_wait_s``), decodes them in a process
  pool a few batches ahead (``pipeline.load_images``), classifies them (``Classifier.rows``) and
  appends the rows to OUT through ``RowWriter(in_place=True)``, flushed and fsynced per batch.

OUT is the ledger: a path in it is never labelled again, and on start the daemon scans the folder
against it (catch-up), so no file is missed across restarts. Rows keep the file's ORIGINAL path
relative to the folder, also with ``--move-to``; the move (an atomic no-overwrite rename into
``MOVE_TO/<label>/``) happens only after the row is on disk, so after ``kill -9`` a file is either
not in the ledger (labelled again on restart) or in it (and moved on restart if it wasn't yet).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from batchcls.errors import BatchclsError, InputError, OutputError
from batchcls.pipeline import Classifier, DecodedBatch, RunOptions, decode_pool, load_images
from batchcls.scan import InputFile, scan_dir

log = logging.getLogger("batchcls.watch")

# Names that are still being written by convention; they count once renamed to their real name.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".swp", "~")
WATCH_FORMATS = ("csv", "jsonl")  # parquet can't be appended row by row
DECODE_TIMEOUT_S = 60.0  # a decode batch of 64 small frames takes well under a second


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


# --- moving files: atomic, never overwriting ---------------------------------------------------

_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src: str, dst: str) -> None:
    """Atomically rename src to dst; FileExistsError if dst exists (os.rename would overwrite it)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # those mean: this filesystem can't
            raise OSError(err, os.strerror(err), dst)  # EEXIST becomes FileExistsError
    # link() refuses to overwrite; a crash between the two calls leaves two names for one inode,
    # which move_into() recognises and finishes.
    os.link(src, dst)
    os.unlink(src)


def safe_dir_name(label: str) -> str:
    name = label.replace("/", "_").replace("\\", "_").strip()
    return "_" if name in ("", ".", "..") else name


def move_into(src: str, folder: Path) -> Path:
    """Move src into folder under its own name, or name-1, name-2... on a clash; returns where it went."""
    folder.mkdir(parents=True, exist_ok=True)
    base = os.path.basename(src)
    stem, ext = os.path.splitext(base)
    for i in range(10_000):
        dst = folder / (base if i == 0 else f"{stem}-{i}{ext}")
        try:
            rename_noreplace(src, str(dst))
            return dst
        except FileExistsError:
            if os.path.samefile(src, dst):  # an interrupted link+unlink move: finish it
                os.unlink(src)
                return dst
    raise OSError(errno.EEXIST, f"no free name for {base} in {folder}")


# --- the watchdog handler: enqueue only ------------------------------------------------------------

def _handler(put):
    """A FileSystemEventHandler that only enqueues: it runs on watchdog's single dispatch thread."""
    from watchdog.events import FileSystemEventHandler

    class Events(FileSystemEventHandler):
        def on_closed(self, event) -> None:  # inotify IN_CLOSE_WRITE: the writer is done
            put(("closed", event.src_path))

        def on_created(self, event) -> None:
            put(("dir" if event.is_directory else "created", event.src_path))

        def on_modified(self, event) -> None:
            if not event.is_directory:
                put(("created", event.src_path))

        def on_moved(self, event) -> None:  # src or dest may be '' when the other side is outside
            if event.src_path:
                put(("gone", event.src_path))
            if event.dest_path:
                put(("dir-in" if event.is_directory else "moved", event.dest_path))

        def on_deleted(self, event) -> None:
            put(("gone", event.src_path))

    return Events()


def _observer(config: WatchConfig):
    """(observer, has close events). inotify reports close-after-write; nothing else does."""
    if config.polling:
        from watchdog.observers.polling import PollingObserver
        return PollingObserver(timeout=config.poll_interval_s), False
    if sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyObserver
        # Full events: a move in from outside arrives as a move (complete), not as a create.
        return InotifyObserver(generate_full_events=True), True
    from watchdog.observers import Observer
    return Observer(), False


def _event_filter(close_events: bool):
    if not close_events:
        return None
    from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent,
                                 FileCreatedEvent, FileDeletedEvent, FileMovedEvent)
    # No modify events: with close-after-write they add nothing, and each write() makes one.
    return [FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileDeletedEvent,
            DirCreatedEvent, DirMovedEvent, DirDeletedEvent]


@dataclass
class _Pending:
    path: str
    interval: float
    sig: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    since: float = 0.0  # when sig was first seen


class Watcher:
    """The daemon. ``start()`` returns once the observer runs; ``close()`` finishes the batches
    in flight, closes the ledger and stops everything. Usable as a context manager."""

    def __init__(self, config: WatchConfig, classifier: Classifier | None = None) -> None:
        self.config = config
        # Real paths throughout: events, the ledger and the move targets must be spelled alike.
        self.root = os.path.realpath(config.folder)
        self.stats = WatchStats()
        self._classifier = classifier
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._ready: dict[str, tuple[InputFile, float]] = {}  # rel -> (file, when ready); insertion order
        self._inflight: set[str] = set()
        self._pending: dict[str, _Pending] = {}  # rel -> stability watch; the intake thread checks it
        self._stopping = False
        self._failure: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._observer = None
        self._pool: ProcessPoolExecutor | None = None
        self.writer = None

    # --- lifecycle ---

    def start(self) -> "Watcher":
        try:
            return self._start()
        except BaseException:
            self.close()  # a half-started daemon leaves no threads, pool or open ledger behind
            raise

    def _start(self) -> "Watcher":
        from batchcls.backends import default_threads, load_backend
        from batchcls.card import load_card
        from batchcls.output import RowWriter, columns_for

        cfg = self.config
        if not os.path.isdir(self.root):
            raise InputError(f"{cfg.folder} is not a folder: give the folder to watch")
        if cfg.fmt not in WATCH_FORMATS:
            raise OutputError(f"watch writes {' or '.join(WATCH_FORMATS)}, not {cfg.fmt}: parquet can't be appended live")
        self._targets = {k: self._prepare_target(v, flag) for k, flag, v in
                         (("ok", "--move-to", cfg.move_to), ("error", "--errors-to", cfg.errors_to)) if v}
        if self._classifier is None:
            card = load_card(cfg.model)
            self._classifier = Classifier(card, load_backend(card, cfg.backend, device=cfg.device))
        self.writer = RowWriter(cfg.out, fmt=cfg.fmt, columns=columns_for(cfg.options.top_k), resume=True, in_place=True)
        self._excluded_files = {os.path.realpath(p) for p in (self.writer.out, self.writer.partial)}
        self._excluded_dirs = [str(p) + os.sep for p in self._targets.values()]
        workers = default_threads() if cfg.options.workers is None else cfg.options.workers
        self._window = workers + 1  # decode this many batches ahead, like pipeline.decoded_batches
        self._workers = workers
        if workers > 0:
            self._pool = self._new_pool()
            warm = [self._pool.submit(load_images, [], self._classifier.preset) for _ in range(workers)]
            for f in warm:  # import the decoder in the workers now, not on the first file
                f.result()
        self._observer, self._close_events = _observer(cfg)
        self._observer.schedule(_handler(self._events.put), self.root, recursive=cfg.recursive,
                                event_filter=_event_filter(self._close_events))
        try:
            self._observer.start()
        except OSError as e:
            raise WatchError(f"cannot watch {cfg.folder}: {e.strerror or e} (for inotify limits raise "
                             "fs.inotify.max_user_watches, or use --polling)") from None
        for target in (self._intake, self._work):
            t = threading.Thread(target=self._guard(target), name=f"batchcls-watch{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        self._events.put(("scan", "startup"))
        log.info("watching %s -> %s (%s, %d already labelled)", self.root, self.writer.out,
                 "inotify" if self._close_events else "polling" if cfg.polling else "native events",
                 len(self.writer.done))
        return self

    def _new_pool(self) -> ProcessPoolExecutor:
        return decode_pool(self._workers, initializer=_leave_signals_to_parent)

    def _prepare_target(self, folder: str, flag: str) -> Path:
        path = Path(folder).resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WatchError(f"cannot create {flag} folder {folder}: {e.strerror}") from None
        if path.stat().st_dev != os.stat(self.root).st_dev:
            raise WatchError(f"{flag} {folder} is on another filesystem than {self.config.folder}: "
                             "moves must be atomic renames, so choose a folder on the same one")
        return path

    def close(self) -> None:
        """Stop watching, finish the batches in flight, flush the ledger; re-raise a worker failure."""
        if self._observer is not None and self._observer.is_alive():
            self._observer.stop()
            self._observer.join()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._events.put(("stop", ""))
        for t in self._threads:
            t.join()
        self._threads = []
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def __enter__(self) -> "Watcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def failed(self) -> bool:
        """A thread died; close() re-raises why (the daemon must not idle on silently)."""
        return self._failure is not None

    def waiting(self) -> set[str]:
        """Paths seen but not yet labelled (waiting to be stable, ready or in flight)."""
        with self._cond:
            return set(self._pending) | set(self._ready) | self._inflight

    def _guard(self, target):
        def run() -> None:
            try:
                target()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread: failed, then close()
                log.error("watch %s thread failed: %s", target.__name__.strip("_"), e)
                self._failure = e
                with self._cond:
                    self._stopping = True
                    self._cond.notify_all()
                self._events.put(("stop", ""))
        return run

    # --- intake: events -> pending -> ready ---

    def _rel(self, path: str) -> str | None:
        """The ledger key of an absolute path, or None when it is not an input (temp, excluded, outside)."""
        path = os.fsdecode(path)
        if path in self._excluded_files or any((path + os.sep).startswith(d) for d in self._excluded_dirs):
            return None
        rel = os.path.relpath(path, self.root)
        if rel.startswith(".." + os.sep) or rel in (".", ".."):
            return None
        parts = rel.split(os.sep)
        if not self.config.recursive and len(parts) > 1:
            return None
        if any(p.startswith(".") for p in parts[:-1]) or is_temporary(parts[-1]):
            return None
        return "/".join(parts)

    def _intake(self) -> None:
        cfg = self.config
        intervals = [cfg.stable_s] + ([cfg.close_grace_s] if self._close_events else [])
        tick = max(0.02, min(0.25, min(intervals) / 4))
        next_check = time.monotonic()
        next_rescan = next_check + cfg.rescan_s
        while True:
            try:
                kind, path = self._events.get(timeout=tick)
            except queue.Empty:
                kind = None
            if kind == "stop":
                return
            if kind is not None:
                self._on_event(kind, path)
            now = time.monotonic()
            if now >= next_check:
                self._check_pending(now)
                next_check = now + tick
            if cfg.rescan_s > 0 and now >= next_rescan:
                try:
                    self._scan(startup=False)
                except (OSError, InputError) as e:  # e.g. a sub-folder made unreadable: keep watching
                    log.warning("re-scan of %s failed: %s", self.root, e)
                next_rescan = now + cfg.rescan_s

    def _on_event(self, kind: str, path: str) -> None:
        if kind == "scan":
            self._scan(startup=True)
            return
        path = os.fsdecode(path)
        if kind in ("dir", "dir-in"):  # a folder made or moved in: its files, as if each had arrived
            if self.config.recursive and not any((path + os.sep).startswith(d) for d in self._excluded_dirs):
                try:
                    for f in scan_dir(path):
                        # In a new folder, a file can be written and closed before its watch exists
                        # (mkdir x; cp a.jpg x/), so no close event will come: judge it by stability.
                        self._on_event("moved" if kind == "dir-in" else "found", f.path)
                except (OSError, InputError):  # gone again already
                    pass
            return
        rel = self._rel(path)
        if rel is None:
            return
        if kind == "gone":
            self._forget(rel)
        elif kind == "moved":  # renamed or moved in: complete by convention
            self._promote(rel, path, live=True)
        elif kind == "closed" and self._size(path) != 0:  # a 0-byte close is often create-then-write
            self._promote(rel, path, live=True)
        elif kind == "found":
            self._wait_until_stable(rel, path, self.config.stable_s)
        elif kind in ("closed", "created"):  # with close events, a created file waits for its close
            grace = self.config.close_grace_s if self._close_events else self.config.stable_s
            self._wait_until_stable(rel, path, grace)

    @staticmethod
    def _size(path: str) -> int | None:
        try:
            return os.stat(path).st_size
        except OSError:
            return None

    def _wait_until_stable(self, rel: str, path: str, interval: float) -> None:
        with self._cond:
            busy = rel in self.writer.done or rel in self._ready or rel in self._inflight
            if not busy and rel not in self._pending:
                self._pending[rel] = _Pending(path, interval)

    def _check_pending(self, now: float) -> None:
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
            if rel in self.writer.done:
                if live:
                    log.info("%s is already in %s: not labelled again (give it a new name)", rel, self.writer.out)
                return
            if rel in self._ready or rel in self._inflight:
                return
            self._ready[rel] = (InputFile(path, rel), time.monotonic())
            self._cond.notify_all()

    def _forget(self, rel: str) -> None:
        """A file (or a folder's files) deleted or moved away before it was labelled."""
        prefix = rel + "/"
        with self._cond:
            for table in (self._pending, self._ready):
                for key in [k for k in table if k == rel or k.startswith(prefix)]:
                    del table[key]

    def _scan(self, *, startup: bool) -> None:
        """Catch-up: every file in the folder not yet in the ledger. At startup, a file that is in
        the ledger but still here with a move configured is a move cut short by a crash: finish it."""
        unmoved: list[InputFile] = []
        queued = 0
        for f in scan_dir(self.root, recursive=self.config.recursive):
            rel = self._rel(os.path.abspath(f.path))
            if rel is None:
                continue
            with self._cond:
                done = rel in self.writer.done
                if not (done or rel in self._ready or rel in self._inflight or rel in self._pending):
                    # Watched for stable_s even if old: mtimes from other clocks (shares) can't be trusted.
                    self._pending[rel] = _Pending(os.path.abspath(f.path), self.config.stable_s)
                    queued += 1
            if done and startup and self._targets:
                unmoved.append(InputFile(os.path.abspath(f.path), rel))
        if unmoved:
            self._finish_moves(unmoved)
        if startup or queued:
            log.info("%s: %d file(s) to label", "catch-up" if startup else "re-scan", queued)

    def _finish_moves(self, files: list[InputFile]) -> None:
        from batchcls.output import read_rows
        rows = {r["path"]: r for r in read_rows(self.writer.out)}
        for f in files:
            row = rows.get(f.rel)
            if row is not None and self._file_away(f, row):
                log.info("finished moving %s (labelled before a restart)", f.rel)

    # --- worker: ready -> batches -> rows -> ledger -> moves ---

    def _take(self, block: bool) -> list[InputFile]:
        """The next batch when one is due (full, or its oldest file waited max_wait_s); [] otherwise."""
        cfg = self.config
        size = cfg.options.batch()
        with self._cond:
            while not self._stopping:
                if self._ready:
                    due = next(iter(self._ready.values()))[1] + cfg.max_wait_s
                    now = time.monotonic()
                    if len(self._ready) >= size or now >= due:
                        rels = list(self._ready)[:size]
                        self._inflight.update(rels)
                        return [self._ready.pop(r)[0] for r in rels]
                    timeout = due - now
                else:
                    timeout = None
                if not block:
                    return []
                self._cond.wait(timeout)
        return []

    def _work(self) -> None:
        window: deque[tuple[list[InputFile], Future | DecodedBatch]] = deque()
        while True:
            files = []
            for f in self._take(block=not window):
                if os.path.lexists(f.path):
                    files.append(f)
                else:  # deleted after it was ready: no longer an input
                    self._drop(f)
            if files:
                window.append((files, self._submit(files)))
            if window and (len(window) >= self._window or not files):
                self._label(*window.popleft())
            elif not window and self._stopping:
                return

    def _drop(self, f: InputFile) -> None:
        with self._cond:
            self._inflight.discard(f.rel)

    def _submit(self, files: list[InputFile]) -> Future | DecodedBatch:
        """Decode ahead in the pool (or here, with no workers)."""
        args = (files, self._classifier.preset, self.config.options.max_pixels)
        if self._pool is None:
            return load_images(*args)
        try:
            return self._pool.submit(load_images, *args)
        except RuntimeError:  # BrokenProcessPool: a worker died since the last batch
            self._restart_pool()
            return self._pool.submit(load_images, *args)

    def _decoded(self, files: list[InputFile], job: Future | DecodedBatch) -> DecodedBatch:
        if isinstance(job, DecodedBatch):
            return job
        try:
            # A worker killed at the wrong moment can leave its future pending forever instead of
            # breaking the pool (seen with SIGKILL under load): a daemon must not hang on it.
            return job.result(timeout=DECODE_TIMEOUT_S)
        except Exception as e:  # a worker died (killed, out of memory, a decoder crash): retry once
            log.error("decode worker failed on a batch of %d files (%s): retrying in a fresh one",
                      len(files), type(e).__name__ if isinstance(e, TimeoutError) else e)
        self._restart_pool()
        try:
            return self._submit(files).result(timeout=DECODE_TIMEOUT_S)
        except Exception as e:  # twice: one of these files kills the decoder; they get error rows
            self._restart_pool()
            reason = f"decode worker crashed twice on this batch: {type(e).__name__}"
            return DecodedBatch(files, load_images([], self._classifier.preset).images, [reason] * len(files))

    def _restart_pool(self) -> None:
        """Replace the pool if it is broken or stuck; a healthy one (already replaced) is kept.

        Stuck: a worker SIGKILLed halfway through sending a result leaves the pool's reader thread
        waiting forever for the rest, so the health check itself must time out.
        """
        try:
            self._pool.submit(os.getpid).result(timeout=DECODE_TIMEOUT_S)
        except Exception:  # BrokenProcessPool, shut down after a failure, or TimeoutError: stuck
            old = self._pool
            procs = list((getattr(old, "_processes", None) or {}).values())  # no public kill before 3.14
            old.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.kill()
            self._pool = self._new_pool()

    def _label(self, files: list[InputFile], job: Future | DecodedBatch) -> None:
        start = time.perf_counter()
        batch = self._decoded(files, job)
        opts = self.config.options
        rows = self._classifier.rows(batch, top_k=opts.top_k, threshold=opts.threshold)
        kept = []
        for f, row in zip(files, rows):
            # Deleted between arrival and decode: no longer an input, so no row (it may come back).
            if row["status"] == "error" and not os.path.lexists(f.path):
                self._drop(f)
            else:
                kept.append((f, row))
        if kept:
            self.writer.write([row for _, row in kept])  # flushed + fsynced before any file moves
        with self._cond:
            for f, row in kept:
                self.writer.done.add(f.rel)
                self._inflight.discard(f.rel)
        errors = sum(row["status"] != "ok" for _, row in kept)
        moved = sum(self._file_away(f, row) for f, row in kept)
        self.stats.files += len(kept)
        self.stats.errors += errors
        self.stats.moved += moved
        self.stats.batches += 1
        if kept:
            log.info("labelled %d files (%d errors%s) in %.2fs", len(kept), errors,
                     f", {moved} moved" if self._targets else "", time.perf_counter() - start)

    def _file_away(self, f: InputFile, row: dict) -> bool:
        target = self._targets.get("ok" if row["status"] == "ok" else "error")
        if target is None:
            return False
        folder = target / safe_dir_name(row["label"]) if row["status"] == "ok" else target
        try:
            move_into(f.path, folder)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:  # the row is written; the move is retried on the next start
            log.warning("could not move %s into %s: %s", f.rel, folder, e.strerror or e)
            return False


def _leave_signals_to_parent() -> None:
    """Decode workers ignore SIGINT/SIGTERM: Ctrl-C (whole process group) or a group-wide stop must
    not break the batch in flight; the daemon finishes it and then shuts the pool down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def log_to_stderr(quiet: bool = False) -> None:
    """One line per batch on stderr (the journal, under systemd)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")


def watch(config: WatchConfig, stop: threading.Event | None = None) -> WatchStats:
    """Run the daemon until SIGINT/SIGTERM (or ``stop`` is set); the batch in flight is finished
    and the ledger flushed before it returns."""
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):  # noqa: ANN001 - signal handler signature
            log.info("%s: finishing the batch in flight", signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)  # a second one stops at once
            stop.set()
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    watcher = Watcher(config)
    try:
        watcher.start()
        while not stop.wait(0.2) and not watcher.failed:
            pass
    finally:
        try:
            watcher.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    log.info("stopped: labelled %d files (%d errors) since start", watcher.stats.files, watcher.stats.errors)
    return watcher.stats
