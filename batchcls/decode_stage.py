"""The decode stage: batches of files -> decoded batches, in order, a bounded number of batches ahead.

``batchcls run``, the watch daemon and the GPU path all decode through ``DecodeStage``; none keeps a
look-ahead of its own. Work runs in worker processes while the model runs on the previous batch, and at
most ``window`` batches are in flight, so memory stays flat however many files there are.

What the stage guarantees, whoever calls it:
- recovery: a batch whose worker died (killed, out of memory, a decoder crash) or hung past
  ``DECODE_TIMEOUT_S`` is decoded again in a fresh pool; failing twice, its files get error rows;
- Ctrl-C: workers ignore SIGINT/SIGTERM, so a signal sent to the whole process group (a terminal's
  Ctrl-C) reaches only the parent, which decides; no worker prints a traceback;
- no orphans: workers exit when the parent process dies, by any signal, kill -9 included. Their own
  parent is the forkserver, which outlives a killed parent, so PR_SET_PDEATHSIG would not fire: each
  worker watches the parent through a pidfd (polls its pid where pidfds are missing). With the workers
  gone, the forkserver and resource tracker see their pipes close and exit too.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from batchcls.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from batchcls.errors import first_line
from batchcls.presets import EvalPreset
from batchcls.scan import InputFile

log = logging.getLogger("batchcls.decode")

DECODE_TIMEOUT_S = 60.0  # a batch of 64 frames decodes in well under a second; a stuck worker never answers
T = TypeVar("T")


@dataclass(frozen=True)
class DecodedBatch:
    files: list[InputFile]
    images: np.ndarray  # uint8 NHWC (NCHW on a device for the GPU path), one per file whose error is None
    errors: list[str | None]


def decode_one(f: InputFile, preset: EvalPreset, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """(image, None) or (None, reason): one odd file never takes its batch down."""
    if f.error:  # the scan could not look inside (an unreadable folder, a link into /proc): its reason
        return None, f.error
    try:
        return preset(decode_image(f.path, min_side=preset.min_decode_side, max_pixels=max_pixels)), None
    except DecodeError as e:
        return None, str(e)
    except Exception as e:  # whatever a decoder raises becomes this file's reason
        return None, f"unexpected decode failure: {first_line(e)}"


def load_images(files: list[InputFile], preset: EvalPreset, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedBatch:
    """Decode + resize a batch on the CPU; a file that fails gets its reason instead of an image."""
    images, errors = [], []
    for f in files:
        img, err = decode_one(f, preset, max_pixels)
        if img is not None:
            images.append(img)
        errors.append(err)
    s = preset.input_size
    stack = np.stack(images) if images else np.empty((0, s, s, 3), np.uint8)
    return DecodedBatch(files, stack, errors)


def failed_batch(files: list[InputFile], reason: str, *, preset: EvalPreset) -> DecodedBatch:
    """Every file of the batch errors with ``reason`` (its decoder kept dying)."""
    s = preset.input_size
    return DecodedBatch(files, np.empty((0, s, s, 3), np.uint8), [reason] * len(files))


def batched(files: Iterable[InputFile], size: int) -> Iterator[list[InputFile]]:
    it = iter(files)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# --- worker processes ------------------------------------------------------------------------------

def _exit_with(parent: int) -> None:
    """Runs on a thread in each worker: end the worker as soon as ``parent`` has gone."""
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfds (old kernel, not Linux): poll
        while _alive(parent):
            time.sleep(0.5)
        os._exit(0)
    select.select([fd], [], [])  # readable once the parent has exited
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def worker_init(parent: int) -> None:
    """Signals are the parent's to handle; the worker must not outlive it (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="batchcls-parent-watch", daemon=True).start()


def decode_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes started by a forkserver: a fork of this process could copy a lock held by one of
    ONNX Runtime's threads."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init,
                               initargs=(os.getpid(),))


def _kill(pool: ProcessPoolExecutor) -> None:
    """Shut a broken or stuck pool down without waiting on it."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public kill before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()


# --- the stage -------------------------------------------------------------------------------------

@dataclass
class Job(Generic[T]):
    files: list[InputFile]
    future: Future | None = None  # None: done in-process, ``value`` holds the result
    value: T | None = None


class DecodeStage(Generic[T]):
    """``work(files)`` run in ``workers`` processes (in-process with 0), at most ``window`` batches ahead.

    ``work`` must pickle (a module-level function, or a functools.partial of one); ``fail(files, reason)``
    builds the result for a batch that could not be decoded. Use as a context manager, or call close().
    """

    def __init__(self, work: Callable[[list[InputFile]], T], fail: Callable[[list[InputFile], str], T], *,
                 workers: int, window: int | None = None) -> None:
        self.work, self.fail, self.workers = work, fail, workers
        self.window = max(1, window if window is not None else workers + 1)
        self.pool: ProcessPoolExecutor | None = decode_pool(workers) if workers > 0 else None

    def warm(self) -> None:
        """Start every worker and import the decoder there now, not on the first file."""
        if self.pool is not None:
            for f in [self.pool.submit(self.work, []) for _ in range(self.workers)]:
                f.result(timeout=DECODE_TIMEOUT_S)

    def submit(self, files: list[InputFile]) -> Job[T]:
        if self.pool is None:
            return Job(files, value=self.work(files))
        try:
            return Job(files, self.pool.submit(self.work, files))
        except RuntimeError as e:  # BrokenProcessPool: a worker died while no batch of ours was on it
            log.error("decode worker died between batches (%s): starting a fresh pool", type(e).__name__)
            self.restart()
            assert self.pool is not None
            return Job(files, self.pool.submit(self.work, files))

    def result(self, job: Job[T]) -> T:
        """The job's result; a dead or hung worker costs a retry in a fresh pool, twice an error batch."""
        if job.future is None:
            return job.value  # type: ignore[return-value]
        for attempt in (1, 2):
            try:
                # A worker killed at the wrong moment can leave its future pending forever instead of
                # breaking the pool (seen with SIGKILL under load): nobody may hang on it.
                return job.future.result(timeout=DECODE_TIMEOUT_S)
            except Exception as e:  # killed, out of memory, a decoder crash, or hung
                reason = type(e).__name__
                if isinstance(e, TimeoutError):
                    self.replace()  # its worker is stuck: a pool that keeps it would wait on it at close
                else:
                    self.restart()
                if attempt == 2:  # one of these files kills (or hangs) the decoder
                    log.error("decode worker failed again on that batch (%s): its %d files get error rows",
                              reason, len(job.files))
                    return self.fail(job.files, f"decode worker crashed twice on this batch: {reason}")
                log.error("decode worker failed on a batch of %d files (%s): retrying in a fresh one",
                          len(job.files), reason if isinstance(e, TimeoutError) or not str(e) else e)
                job = self.submit(job.files)
        raise AssertionError("unreachable")

    def map(self, batches: Iterable[list[InputFile]]) -> Iterator[T]:
        """Results in input order, decoded ``window`` batches ahead of the consumer."""
        window: deque[Job[T]] = deque()
        try:
            for files in batches:
                window.append(self.submit(files))
                if len(window) > self.window:
                    yield self.result(window.popleft())
            while window:
                yield self.result(window.popleft())
        finally:
            for job in window:
                if job.future is not None:
                    job.future.cancel()

    def restart(self) -> None:
        """Replace the pool if it is broken or stuck; a healthy one (already replaced) is kept.

        Stuck: a worker SIGKILLed halfway through sending a result leaves the pool's reader thread
        waiting forever for the rest, so the health check itself must time out.
        """
        if self.pool is None:
            return
        try:
            self.pool.submit(os.getpid).result(timeout=DECODE_TIMEOUT_S)
        except Exception:  # BrokenProcessPool, shut down after a failure, or TimeoutError: stuck
            self.replace()

    def replace(self) -> None:
        """Kill the pool's workers and start a fresh pool."""
        if self.pool is not None:
            _kill(self.pool)
            self.pool = decode_pool(self.workers)

    def close(self, *, cancel: bool = False) -> None:
        """Let each worker finish the batch it is on (``cancel``: drop the queued ones), and wait for the
        pool to be shut down here, not at interpreter exit, where concurrent.futures would race its own
        manager thread. A worker still stuck after DECODE_TIMEOUT_S is killed."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        procs = list((getattr(pool, "_processes", None) or {}).values())
        shutdown = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": cancel},
                                    name="batchcls-decode-shutdown", daemon=True)
        shutdown.start()
        shutdown.join(DECODE_TIMEOUT_S)
        if shutdown.is_alive():
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.kill()
            shutdown.join(DECODE_TIMEOUT_S)

    def __enter__(self) -> DecodeStage[T]:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        # Ctrl-C, a consumer that stopped early, an error: nobody wants the queued batches
        self.close(cancel=exc_type is not None)


def image_stage(preset: EvalPreset, *, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                window: int | None = None) -> DecodeStage[DecodedBatch]:
    """The CPU decode stage: Pillow decode + the card's resize, in worker processes."""
    return DecodeStage(functools.partial(load_images, preset=preset, max_pixels=max_pixels),
                       functools.partial(failed_batch, preset=preset), workers=workers, window=window)
