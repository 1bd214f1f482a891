"""The decode stage: batches of files -> decoded batches, in order, a bounded number of batches ahead.

``batchcls run``, the watch daemon and the GPU path all decode through ``DecodeStage``; none keeps a
look-ahead of its own. Work runs in worker processes while the model runs on the previous batch, and at
most ``window`` batches are in flight, so memory stays flat however many files there are.

What the stage guarantees, whoever calls it:
- a stuck read is one file's error: workers (and in-process decoding) read files through ``reader.read_file``,
  whose helper process is given up after ``READ_STALL_S`` without a byte, so no process of ours waits on a hung
  mount, and the other files of that batch decode;
- recovery: a batch whose worker died (killed, out of memory, a decoder crash) or hung past
  ``DECODE_TIMEOUT_S`` is decoded again in a fresh pool, file by file where the caller can ``join`` results, so
  only the file that fails again gets an error row (without ``join``: the whole batch, twice, then error rows);
- Ctrl-C: workers ignore SIGINT/SIGTERM, so a signal sent to the whole process group (a terminal's
  Ctrl-C) reaches only the parent, which decides; no worker prints a traceback;
- no orphans: workers exit when the parent process dies, by any signal, kill -9 included: each watches
  its parent through a pidfd (polls its parent pid where pidfds are missing), even in the middle of a job;
- nothing of the caller's is run again: workers are fresh interpreters (``WorkerPool``), not
  multiprocessing children, so a script or notebook needs no ``__main__`` guard, a forked child can
  start its own stage, and a killed run leaves no temp folder behind.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Generic, TypeVar

import numpy as np

from batchcls.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from batchcls.errors import first_line
from batchcls.machine import default_threads, max_decode_workers
from batchcls.presets import EvalPreset
from batchcls.reader import READ_STALL_S
from batchcls.scan import InputFile

log = logging.getLogger("batchcls.decode")

# A batch of 64 frames decodes in well under a second; a stuck worker never answers. A batch holding a stalled
# read answers after READ_STALL_S (its file an error row): that must come well within this.
DECODE_TIMEOUT_S = max(60.0, 2 * READ_STALL_S)
WORKER_EXIT_S = 5.0  # a worker leaves at once when its job pipe closes; one that does not is killed, not awaited
WORKER_START_S = 60.0  # a fresh interpreter importing numpy and Pillow: well under a second, unless the box is swamped
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

WORKER_FLAG = "--batchcls-decode-worker"  # on each worker's command line: how ps (and the tests) tell them apart
# A worker is a fresh interpreter running this module's worker_main: it ignores SIGINT/SIGTERM before
# anything else, and gets the parent's sys.path so the same batchcls (and whatever ``work`` needs) imports.
_BOOT = ("import signal, sys, json; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); sys.path[:] = json.loads(sys.argv[2]); "
         "from batchcls.decode_stage import worker_main; worker_main(int(sys.argv[3]), int(sys.argv[4]))")


class WorkerDied(Exception):
    """The process running a job exited before answering (killed, out of memory, a decoder crash)."""


def _exit_with(parent: int) -> None:
    """Runs on a thread in each worker: end the worker as soon as ``parent`` has gone."""
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfds (old kernel, not Linux): poll
        fd = None
    if fd is None or os.getppid() != parent:  # polling, or the parent went before the pidfd was open
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    select.select([fd], [], [])  # readable once the parent has exited
    os._exit(0)


def worker_main(jobs_fd: int, results_fd: int) -> None:
    """A worker's loop: (fn, args) in, (True, result) or (False, exception) out, until the parent closes the
    job pipe (a normal shutdown) or dies (the watch thread ends the worker even in the middle of a job)."""
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="batchcls-parent-watch", daemon=True).start()
    jobs, results = Connection(jobs_fd, writable=False), Connection(results_fd, readable=False)
    while True:
        try:
            data = jobs.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args = pickle.loads(data)
            out: tuple[bool, object] = (True, fn(*args))
        except Exception as e:
            out = (False, e)
        try:
            data = pickle.dumps(out, pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an exception (or result) that does not pickle still answers the job
            data = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))
        results.send_bytes(data)


@dataclass
class _Worker:
    proc: subprocess.Popen
    jobs: Connection
    results: Connection

    def died(self) -> WorkerDied:
        code = self._end()
        how = ("did not end" if code is None else f"killed by {signal.Signals(-code).name}" if code < 0
               else f"exit status {code}")
        return WorkerDied(f"decode worker {self.proc.pid} died ({how})")

    def stop(self) -> None:
        """Close its job pipe (it exits when it reads the end) and reap it."""
        self.jobs.close()
        self.results.close()
        self._end()

    def _end(self) -> int | None:
        """Its exit status; one still there after WORKER_EXIT_S is killed, and never waited on for long: a
        process held in the kernel (a hung mount) can outlive any kill, and nothing of ours may wait on it."""
        try:
            return self.proc.wait(WORKER_EXIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            return self.proc.wait(WORKER_EXIT_S)
        except subprocess.TimeoutExpired:
            return None


class WorkerPool:
    """``workers`` processes that run picklable functions, like a ProcessPoolExecutor, but started with
    ``subprocess`` as fresh interpreters running ``worker_main`` instead of by multiprocessing.

    Why not multiprocessing: its spawn and forkserver workers import the caller's ``__main__`` again, so a
    script without an ``if __name__ == "__main__"`` guard runs its whole body once per worker (and the
    nested pool it starts there fails); its forkserver and resource tracker are per-process singletons that
    an ``os.fork()`` child cannot use (ChildProcessError), and the socket folder (``pymp-*``) it makes in
    the temp dir is left behind by a kill -9. These workers import nothing of the caller's but the
    pickled function's module, and the pool is plain state of this object.

    One thread per worker feeds it jobs from a shared queue, so each worker holds one job at a time. A
    worker that dies fails only the job it held (``WorkerDied``); the next job starts a fresh one.
    Workers start on their first job.
    """

    def __init__(self, workers: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._closed = self._killed = False
        self._threads = [threading.Thread(target=self._serve, name=f"batchcls-decode-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., T], *args: object) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode pool is shut down")
            future: Future = Future()
            self._queue.put((future, fn, args))
            return future

    def processes(self) -> list[int]:
        """Pids of the live workers."""
        with self._lock:
            return [p.pid for p in self._procs]

    def _start(self) -> _Worker:
        with self._lock:
            if self._killed:
                raise WorkerDied("the decode pool was stopped")
            jobs_r, jobs_w = os.pipe()
            results_r, results_w = os.pipe()
            try:
                proc = subprocess.Popen([sys.executable, "-c", _BOOT, WORKER_FLAG, json.dumps(sys.path),
                                         str(jobs_r), str(results_w)], stdin=subprocess.DEVNULL,
                                        pass_fds=(jobs_r, results_w))
            except BaseException:
                for fd in (jobs_w, results_r):
                    os.close(fd)
                raise
            finally:
                os.close(jobs_r)
                os.close(results_w)
            self._procs.add(proc)
        return _Worker(proc, Connection(jobs_w, readable=False), Connection(results_r, writable=False))

    def _serve(self) -> None:
        worker: _Worker | None = None
        try:
            while (item := self._queue.get()) is not None:
                future, fn, args = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    data = pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL)
                    if worker is None:
                        worker = self._start()
                except Exception as e:
                    future.set_exception(e)
                    continue
                try:
                    worker.jobs.send_bytes(data)
                    ok, value = pickle.loads(worker.results.recv_bytes())
                except (EOFError, OSError):
                    future.set_exception(worker.died())
                    self._forget(worker)
                    worker = None
                    continue
                except Exception as e:  # a result that does not unpickle here
                    future.set_exception(e)
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)  # type: ignore[arg-type]
        finally:
            if worker is not None:
                self._forget(worker)

    def _forget(self, worker: _Worker) -> None:
        worker.stop()
        with self._lock:
            self._procs.discard(worker.proc)

    def shutdown(self, *, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """No new jobs; each worker finishes the job it holds (``cancel_futures``: the queued ones are
        dropped) and exits. Waits ``timeout`` seconds (None: no wait), then kills the workers still there."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    while True:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is not None:
                            item[0].cancel()
                for _ in self._threads:
                    self._queue.put(None)
        if timeout is None:
            return
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self.kill()
            for t in self._threads:
                t.join(timeout)

    def kill(self) -> None:
        """Stop now (a stuck pool): queued jobs are cancelled, the running ones fail with WorkerDied."""
        self.shutdown(cancel_futures=True)
        with self._lock:
            self._killed = True
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(OSError):
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
    builds the result for a batch that could not be decoded; ``join(results)`` builds a batch's result from
    its files' results, each decoded alone, which lets a failed batch be retried file by file. Use as a
    context manager, or call close().
    """

    def __init__(self, work: Callable[[list[InputFile]], T], fail: Callable[[list[InputFile], str], T], *,
                 workers: int, window: int | None = None, join: Callable[[list[T]], T] | None = None) -> None:
        if not sys.executable:  # embedded interpreters: no python to start workers with
            workers = 0
        if workers > max_decode_workers():
            log.warning("%d decode workers is more than this machine can use (%d cores): using %d",
                        workers, default_threads(), max_decode_workers())
            workers = max_decode_workers()
        self.work, self.fail, self.join, self.workers = work, fail, join, workers
        self.window = max(1, window if window is not None else workers + 1)
        self.pool: WorkerPool | None = WorkerPool(workers) if workers > 0 else None

    def warm(self) -> None:
        """Start every worker and import the decoder there now, not on the first file."""
        if self.pool is not None:
            for f in [self.pool.submit(self.work, []) for _ in range(self.workers)]:
                f.result(timeout=WORKER_START_S + DECODE_TIMEOUT_S)

    def submit(self, files: list[InputFile]) -> Job[T]:
        if self.pool is None:
            return Job(files, value=self.work(files))
        return Job(files, self.pool.submit(self.work, files))

    def result(self, job: Job[T]) -> T:
        """The job's result; a dead or hung worker costs a retry in a fresh one: file by file with ``join`` (a
        file that fails alone too gets an error row), else the whole batch (failing twice, error rows)."""
        if job.future is None:
            return job.value  # type: ignore[return-value]
        try:
            # A decoder can hang (a pathological file): nobody may wait on it forever.
            return job.future.result(timeout=DECODE_TIMEOUT_S)
        except Exception as e:  # killed, out of memory, a decoder crash, or hung
            reason = self._failed(e)
        if self.join is not None and len(job.files) > 1:
            log.error("decode worker failed on a batch of %d files (%s): retrying them one by one in a fresh one",
                      len(job.files), reason)
            return self.join(self._one_by_one(job.files))
        log.error("decode worker failed on a batch of %d files (%s): retrying in a fresh one", len(job.files), reason)
        job = self.submit(job.files)
        try:
            return job.future.result(timeout=DECODE_TIMEOUT_S)  # type: ignore[union-attr]
        except Exception as e:
            reason = self._failed(e)
        log.error("decode worker failed again on that batch (%s): its %d files get error rows", reason, len(job.files))
        return self.fail(job.files, f"decode worker crashed twice on this batch: {reason}")

    def _failed(self, e: Exception) -> str:
        """The reason, in a word; a hung worker's pool is replaced (a pool that keeps it would wait on it at close)."""
        if isinstance(e, TimeoutError):
            self.replace()
        return type(e).__name__

    def _one_by_one(self, files: list[InputFile]) -> list[T]:
        """Each file of a failed batch decoded alone; one that fails again is the culprit and gets its error."""
        jobs = [self.submit([f]) for f in files]
        out: list[T] = []
        for i, job in enumerate(jobs):
            try:
                out.append(job.future.result(timeout=DECODE_TIMEOUT_S))  # type: ignore[union-attr]
                continue
            except Exception as e:
                reason = self._failed(e)
            log.error("decode worker failed again on %s alone (%s): it gets an error row", job.files[0].rel, reason)
            out.append(self.fail(job.files, f"decode worker crashed twice on this file: {reason}"))
            if reason == "TimeoutError":  # the pool was replaced: the files after it start again in the new one
                jobs[i + 1:] = [j if _succeeded(j.future) else self.submit(j.files) for j in jobs[i + 1:]]
        return out

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
        """Replace the pool if it is stuck (no worker answers within DECODE_TIMEOUT_S); a healthy one is kept.
        A dead worker needs no restart: the pool starts a fresh one for the next job."""
        if self.pool is None:
            return
        try:
            self.pool.submit(os.getpid).result(timeout=DECODE_TIMEOUT_S)
        except Exception:
            self.replace()

    def replace(self) -> None:
        """Kill the pool's workers and start a fresh pool."""
        if self.pool is not None:
            self.pool.kill()
            self.pool = WorkerPool(self.workers)

    def close(self, *, cancel: bool = False) -> None:
        """Let each worker finish the batch it is on (``cancel``: drop the queued ones) and exit, waiting
        here, not at interpreter exit. A worker still busy after DECODE_TIMEOUT_S is killed."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        pool.shutdown(cancel_futures=cancel, timeout=DECODE_TIMEOUT_S)

    def __enter__(self) -> DecodeStage[T]:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        # Ctrl-C, a consumer that stopped early, an error: nobody wants the queued batches
        self.close(cancel=exc_type is not None)


def _succeeded(future: Future | None) -> bool:
    return future is not None and future.done() and not future.cancelled() and future.exception() is None


def joined(batches: list[DecodedBatch]) -> DecodedBatch:
    """One batch from several, in order (a failed batch's files decoded one by one)."""
    return DecodedBatch([f for b in batches for f in b.files], np.concatenate([b.images for b in batches]),
                        [e for b in batches for e in b.errors])


def image_stage(preset: EvalPreset, *, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                window: int | None = None) -> DecodeStage[DecodedBatch]:
    """The CPU decode stage: Pillow decode + the card's resize, in worker processes."""
    return DecodeStage(functools.partial(load_images, preset=preset, max_pixels=max_pixels),
                       functools.partial(failed_batch, preset=preset), workers=workers, window=window, join=joined)
