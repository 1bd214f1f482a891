"""The watch daemon's loop: label images as they arrive, through the same stages as ``run``.

Three threads, each with one job (STYLE rule 9):

- watchdog's dispatch thread runs the handler (``observer.py``), which only enqueues ``Event``s;
- the intake thread turns events into readiness (``arrivals.py``) and re-scans the folder against the
  ledger now and then (lost events, inotify overflow);
- the worker thread takes due batches, decodes them a few batches ahead in the decode stage
  (``batchcls.decode_stage``, which survives killed or hung workers), classifies them
  (``Classifier.rows``), appends the rows to the ledger (``ledger.py``) and only then files the
  images away (``moves.py``).

On start the daemon scans the folder against the ledger (catch-up), so no file is missed across
restarts; at startup a file in the ledger but still here with a move configured is a move cut short by
a crash, and is finished.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from batchcls.decode_stage import DecodedBatch, DecodeStage, Job, image_stage
from batchcls.errors import InputError, OutputError
from batchcls.infer import Classifier
from batchcls.machine import default_threads
from batchcls.output import Provenance
from batchcls.scan import InputFile, scan_dir
from batchcls.stopping import StopRequested
from batchcls.watch.arrivals import Arrivals, Scope
from batchcls.watch.config import WATCH_FORMATS, WatchConfig, WatchError, WatchStats
from batchcls.watch.events import Event, Kind
from batchcls.watch.ledger import Ledger
from batchcls.watch.moves import Mover
from batchcls.watch.observer import FolderWatch

log = logging.getLogger("batchcls.watch")


class Watcher:
    """The daemon. ``start()`` returns once the observer runs; ``close()`` finishes the batches
    in flight, closes the ledger and stops everything. Usable as a context manager."""

    def __init__(self, config: WatchConfig, classifier: Classifier | None = None) -> None:
        self.config = config
        # Real paths throughout: events, the ledger and the move targets must be spelled alike.
        self.root = os.path.realpath(config.folder)
        self.stats = WatchStats()
        self.classifier = classifier
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.ledger: Ledger | None = None
        self.stage: DecodeStage[DecodedBatch] | None = None
        self.arrivals: Arrivals | None = None
        self.folder: FolderWatch | None = None
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None

    # --- lifecycle ---

    def start(self) -> Watcher:
        try:
            return self._start()
        except BaseException:
            self.close()  # a half-started daemon leaves no threads, pool or open ledger behind
            raise

    def _start(self) -> Watcher:
        from batchcls.backends import load_backend
        from batchcls.card import load_card

        cfg = self.config
        if not os.path.isdir(self.root):
            raise InputError(f"{cfg.folder} is not a folder: give the folder to watch")
        if cfg.fmt not in WATCH_FORMATS:
            raise OutputError(f"watch writes {' or '.join(WATCH_FORMATS)}, not {cfg.fmt}: parquet can't be appended live")
        self.mover = Mover(self.root, cfg.move_to, cfg.errors_to)
        if self.classifier is None:
            card = load_card(cfg.model)
            self.classifier = Classifier(card, load_backend(card, cfg.backend, device=cfg.device),
                                         tta=cfg.options.tta, open_set=cfg.options.open_set)
        card = self.classifier.card
        provenance = Provenance.of(card, cfg.options, source=cfg.folder)
        self.ledger = Ledger(cfg.out, fmt=cfg.fmt, columns=cfg.options.columns(card), provenance=provenance,
                             moves=bool(self.mover.targets))
        self.scope = Scope(self.root, recursive=cfg.recursive, excluded_files=self.ledger.files,
                           excluded_dirs=[str(p) for p in self.mover.folders])
        workers = default_threads() if cfg.options.workers is None else cfg.options.workers
        self.stage = image_stage(self.classifier.preset, workers=workers, max_pixels=cfg.options.max_pixels)
        self.stage.warm()
        self.folder = FolderWatch(cfg, self.root, self.events.put)
        close_events = self.folder.close_events
        self.arrivals = Arrivals(done=self.ledger.done, close_events=close_events, stable_s=cfg.stable_s,
                                 close_grace_s=cfg.close_grace_s, max_wait_s=cfg.max_wait_s,
                                 batch_size=cfg.options.batch())
        try:
            self.folder.start()
        except OSError as e:
            raise WatchError(f"cannot watch {cfg.folder}: {e.strerror or e} (for inotify limits raise "
                             "fs.inotify.max_user_watches, or use --polling)") from None
        for target in (self._intake, self._work):
            t = threading.Thread(target=self._guard(target), name=f"batchcls-watch{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        self.events.put(Event(Kind.SCAN))
        log.info("watching %s -> %s (%s, %d already labelled)", self.root, self.ledger.out,
                 "inotify" if close_events else "polling" if cfg.polling else "native events", len(self.ledger.done))
        return self

    def close(self) -> None:
        """Stop watching, finish the batches in flight, flush the ledger; re-raise a worker failure."""
        if self.folder is not None:
            self.folder.stop()
        if self.arrivals is not None:
            self.arrivals.stop()
        self.events.put(Event(Kind.STOP))
        for t in self._threads:
            t.join()
        self._threads = []
        if self.stage is not None:
            self.stage.close()
            self.stage = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def failed(self) -> bool:
        """A thread died; close() re-raises why (the daemon must not idle on silently)."""
        return self._failure is not None

    def waiting(self) -> set[str]:
        """Paths seen but not yet labelled (waiting to be stable, ready or in flight)."""
        return self.arrivals.waiting() if self.arrivals is not None else set()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as e:  # handed to the main thread: failed, then close()
                log.error("watch %s thread failed: %s", target.__name__.strip("_"), e)
                self._failure = e
                self.arrivals.stop()  # type: ignore[union-attr]
                self.events.put(Event(Kind.STOP))
        return run

    # --- intake: events -> arrivals ---

    def _intake(self) -> None:
        cfg, arrivals, folder = self.config, self.arrivals, self.folder
        assert arrivals is not None and folder is not None
        intervals = [cfg.stable_s] + ([cfg.close_grace_s] if arrivals.close_events else [])
        tick = max(0.02, min(0.25, min(intervals) / 4))
        next_check = time.monotonic()
        next_rescan = next_check + cfg.rescan_s
        while True:
            try:
                event: Event | None = self.events.get(timeout=tick)
            except queue.Empty:
                event = None
            if event is not None and event.kind is Kind.STOP:
                return
            if event is not None:
                self._on_event(event)
            now = time.monotonic()
            if now >= next_check:
                arrivals.check()
                if folder.check():  # deleted or replaced, and a folder is there again: watched anew
                    self._rescan()  # what arrived in it before its watch was set
                next_check = now + tick
            if cfg.rescan_s > 0 and now >= next_rescan and not folder.lost:
                self._rescan()
                next_rescan = now + cfg.rescan_s

    def _rescan(self) -> None:
        try:
            self._scan(startup=False)
        except (OSError, InputError) as e:  # e.g. a sub-folder made unreadable: keep watching
            log.warning("re-scan of %s failed: %s", self.root, e)

    def _on_event(self, event: Event) -> None:
        if event.kind is Kind.SCAN:
            self._scan(startup=True)
            return
        path = os.fsdecode(event.path)
        if event.kind in (Kind.DIR_CREATED, Kind.DIR_MOVED_IN):  # its files, as if each had arrived
            if self.config.recursive and not self.scope.excluded_dir(path):
                # In a new folder, a file can be written and closed before its watch exists
                # (mkdir x; cp a.jpg x/), so no close event will come: judge it by stability.
                kind = Kind.MOVED if event.kind is Kind.DIR_MOVED_IN else Kind.FOUND
                try:
                    for f in scan_dir(path):
                        self._on_event(Event(kind, f.path))
                except (OSError, InputError):  # gone again already
                    pass
            return
        rel = self.scope.rel(path)
        if rel is not None:
            self.arrivals.on_event(event, rel)  # type: ignore[union-attr]

    def _scan(self, *, startup: bool) -> None:
        """Catch-up: every file in the folder not yet in the ledger, watched for stable_s even if old
        (mtimes from other clocks, e.g. shares, can't be trusted)."""
        assert self.arrivals is not None and self.ledger is not None
        unmoved: list[InputFile] = []
        queued = 0
        rows = self.ledger.rows() if startup and self.mover.targets and self.ledger.done else {}
        here: set[str] = set()
        for f in scan_dir(self.root, recursive=self.config.recursive):
            path = os.path.abspath(f.path)
            rel = self.scope.rel(path)
            if rel is None:
                continue
            here.add(rel)
            if rel in rows and self.mover.target_for(rows[rel]) is not None:  # labelled, and should have moved
                if self.ledger.cut_short(rel, path):
                    if not self.ledger.stays(rel):  # could not be placed when labelled: its row says it stayed
                        unmoved.append(InputFile(path, rel))
                    continue
                self.ledger.done.discard(rel)  # another file under a labelled name: it is labelled too
                log.info("%s: a new file under a name labelled before: labelling it", rel)
            queued += self.arrivals.watch(rel, path, self.config.stable_s)
        taken: set[Path] = set()
        for f in unmoved:  # to the name its row gives (a ledger without moved_to: a free one, as then)
            dst = self.ledger.recorded_move(rows[f.rel]) or self.mover.plan(f, rows[f.rel], taken)
            if dst is not None and self.mover.finish(f, dst) is not None:
                log.info("finished moving %s (labelled before a restart)", f.rel)
                self.ledger.settle([f.rel])
        if startup and self.ledger.moving:  # moved before the crash, or gone since: nothing left to finish
            self.ledger.settle([], [rel for rel in self.ledger.moving if rel not in here])
        if startup or queued:
            log.info("%s: %d file(s) to label", "catch-up" if startup else "re-scan", queued)

    # --- worker: ready -> batches -> rows -> ledger -> moves ---

    def _work(self) -> None:
        arrivals, stage = self.arrivals, self.stage
        assert arrivals is not None and stage is not None
        window: deque[Job[DecodedBatch]] = deque()
        while True:
            files = []
            for f in arrivals.take(block=not window):
                if os.path.lexists(f.path):
                    files.append(f)
                else:  # deleted after it was ready: no longer an input
                    arrivals.finished([f.rel])
            if files:
                window.append(stage.submit(files))
            if window and (len(window) >= stage.window or not files):
                self._label(window.popleft())
            elif not window and arrivals.stopping:
                return

    def _label(self, job: Job[DecodedBatch]) -> None:
        assert self.stage is not None and self.ledger is not None and self.arrivals is not None
        start = time.perf_counter()
        batch = self.stage.result(job)
        opts = self.config.options
        rows = self.classifier.rows(batch, **opts.row_args())  # type: ignore[union-attr]
        kept, gone = [], []
        for f, row in zip(job.files, rows):
            # Deleted between arrival and decode: no longer an input, so no row (it may come back).
            if row["status"] == "error" and not os.path.lexists(f.path):
                gone.append(f.rel)
            else:
                kept.append((f, row))
        to_move = [(f, row) for f, row in kept if self.mover.target_for(row) is not None]
        if to_move:  # before the rows: a restart can tell a cut-short move from a new file under the name
            self.ledger.intend([f for f, _ in to_move])
        taken: set[Path] = set()
        planned = {f.rel: self.mover.plan(f, row, taken) for f, row in to_move}  # where each row says it goes
        for f, row in kept:
            self.ledger.record_move(row, planned.get(f.rel))
        self.ledger.write([row for _, row in kept])  # flushed + fsynced before any file moves
        moved_rels = [f.rel for f, _ in to_move if planned[f.rel] is not None
                      and self.mover.finish(f, planned[f.rel]) is not None]
        if to_move:
            self.ledger.settle(moved_rels, staying=[f.rel for f, _ in to_move if planned[f.rel] is None])
        self.arrivals.finished(gone + [f.rel for f, _ in kept])
        errors = sum(row["status"] != "ok" for _, row in kept)
        moved = len(moved_rels)
        self.stats.files += len(kept)
        self.stats.errors += errors
        self.stats.moved += moved
        self.stats.batches += 1
        if kept:
            log.info("labelled %d files (%d errors%s) in %.2fs", len(kept), errors,
                     f", {moved} moved" if self.mover.targets else "", time.perf_counter() - start)


def log_to_stderr(quiet: bool = False) -> None:
    """One line per batch on stderr (the journal, under systemd)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")


def watch(config: WatchConfig, stop: threading.Event | None = None) -> WatchStats:
    """Run the daemon until SIGINT/SIGTERM (or ``stop`` is set); the batch in flight is finished
    and the ledger flushed before it returns. The signal handler only sets a flag:
    setting ``stop`` from it could deadlock on the lock ``stop.wait`` holds."""
    stop = stop or threading.Event()
    signalled = StopRequested()
    previous = signalled.install() if threading.current_thread() is threading.main_thread() else {}
    watcher = Watcher(config)
    try:
        watcher.start()
        while not (signalled.requested or stop.wait(0.2) or watcher.failed):
            pass
        if signalled.requested:
            log.info("%s: finishing the batch in flight", signalled.name)
    finally:
        try:
            watcher.close()
        finally:
            StopRequested.restore(previous)
    log.info("stopped: labelled %d files (%d errors) since start", watcher.stats.files, watcher.stats.errors)
    return watcher.stats
