"""``batchcls run`` as a library call: a typed job config in, a summary out.

``run_job`` is the one job loop of both runners: the output (lock, resume, provenance), the scan of
what is left to do, the progress bar, Ctrl-C/SIGTERM at a batch boundary and the summary. What turns
files into rows is a *stage*: the local pipeline here, or the Ray Data stages of ``ray_runner``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from batchcls.card import ModelCard, load_card
from batchcls.errors import OutputError
from batchcls.output import Provenance, RowWriter
from batchcls.pipeline import RunOptions, RunSummary
from batchcls.progress import progress
from batchcls.scan import InputFile, count, scan
from batchcls.stopping import StopRequested

Classify = Callable[[Iterable[InputFile]], Iterator[list[dict]]]
"""Rows for the files, batch by batch, in input order."""

Stage = Callable[[ModelCard], Classify]
"""Makes the ``Classify`` for a model; called before the output is touched, so a model that cannot
load (or an engine that cannot start) fails without creating or locking anything."""


@dataclass(frozen=True)
class RunJob:
    source: str | Sequence[str] | None  # folders and files (scan.scan), or None with files_from
    out: str
    model: str | None = None
    backend: str | None = None
    device: str | None = None
    recursive: bool = True
    files_from: str | None = None
    fmt: str = "csv"
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    options: RunOptions = RunOptions()
    embeddings: str | None = None  # --embeddings FILE.npy (see batchcls.embeddings)


class Interrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM; the partial output is kept for --resume."""

    def __init__(self, rows: int, partial: str) -> None:
        super().__init__(f"interrupted after {rows} rows; they are kept in {partial}: rerun with --resume to finish")


def local_stage(job: RunJob) -> Stage:
    """The pipeline on this machine: decode workers, then the backend ``job`` names."""

    def build(card: ModelCard) -> Classify:
        from batchcls.backends import load_backend
        from batchcls.pipeline import Classifier, classify

        classifier = Classifier(card, load_backend(card, job.backend, device=job.device), tta=job.options.tta,
                                open_set=job.options.open_set)
        return lambda files: classify(files, classifier, job.options)

    return build


def _pending(files: Iterator[InputFile], done: set[str], *, written_ns: int | None = None,
             changed: list[str] | None = None) -> Iterator[InputFile]:
    """Skip files already written (resume) and repeats (a list naming a file twice): one row per file.

    A skipped file modified or replaced after the output was last written (its mtime or ctime is later)
    is listed in ``changed``: its row is kept (one row per file) and the run says so.
    """
    seen: set[str] = set()
    for f in files:
        if f.rel in seen:
            continue
        seen.add(f.rel)
        if f.rel in done:
            if written_ns is not None and changed is not None and _changed_since(f.path, written_ns):
                changed.append(f.rel)
            continue
        yield f


def _changed_since(path: str, ns: int) -> bool:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # gone, unreadable, a URI: nothing to compare
        return False
    return max(st.st_mtime_ns, st.st_ctime_ns) > ns


def _abandon(writer: RowWriter) -> None:
    """A failed run keeps its rows for --resume; one that wrote nothing leaves no stray OUT.partial behind."""
    writer.close(complete=False)
    if not writer.to_stdout and writer.rows_written == 0 and not writer.done:
        writer.partial.unlink(missing_ok=True)


def run_job(job: RunJob, stage: Stage | None = None) -> RunSummary:
    """Classify ``job.source`` into ``job.out`` with ``stage`` (default: the local pipeline)."""
    card = load_card(job.model)
    columns = job.options.columns(card)
    classify_files = (stage or local_stage(job))(card)
    vectors = None
    if job.embeddings:
        from batchcls.embeddings import EmbeddingWriter

        if job.resume:
            raise OutputError("--embeddings and --resume can't be combined: the vectors of the rows already "
                              "written are not kept; rerun with --overwrite")
        vectors = EmbeddingWriter(job.embeddings, overwrite=job.overwrite)
    provenance = Provenance.of(card, job.options, source=job.source, files_from=job.files_from)
    writer = RowWriter(job.out, fmt=job.fmt, columns=columns, resume=job.resume, overwrite=job.overwrite,
                       provenance=provenance)
    exclude = [] if writer.to_stdout else [str(writer.out), str(writer.partial)]
    summary = RunSummary()
    try:
        files = _pending(scan(job.source, recursive=job.recursive, files_from=job.files_from, exclude=exclude),
                         writer.done, written_ns=writer.last_written_ns, changed=summary.changed)
    except BaseException:
        _abandon(writer)
        raise
    # the total, for a percentage and an ETA: counted by a second walk while the first batches run
    bar = progress("classifying", quiet=job.quiet, count=lambda stop: count(
        job.source, recursive=job.recursive, files_from=job.files_from, exclude=exclude, skip=writer.done, stop=stop))
    stop = StopRequested()
    previous = stop.install()
    start = time.perf_counter()
    batches = classify_files(files)
    try:
        for rows in batches:
            writer.write(rows)
            if vectors is not None:
                vectors.add(rows)
            summary.add(rows)
            if bar is not None:
                bar.update(len(rows))
            stop.check()  # after the batch is on disk: what was classified is kept
    except KeyboardInterrupt:
        if vectors is not None:  # a cut run leaves no half-written vectors
            vectors.close(complete=False)
        writer.close(complete=False)
        raise Interrupted(writer.rows_written, "stdout" if writer.to_stdout else str(writer.partial)) from None
    except BaseException:  # stopped by an error (a Ray failure, GpuFailure): rows so far are kept for --resume
        if vectors is not None:
            vectors.close(complete=False)
        _abandon(writer)
        raise
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # the stage's workers (or Ray session) end here, not at garbage collection
            close()
        stop.restore(previous)
        if bar is not None:
            bar.close()
    writer.close(complete=True)
    if vectors is not None:
        vectors.close(complete=True)
    summary.seconds = time.perf_counter() - start
    summary.skipped = len(writer.done)
    return summary


def warnings(summary: RunSummary) -> list[str]:
    """What the user should know although the run succeeded (shown even with --quiet)."""
    if not summary.changed:
        return []
    n = len(summary.changed)
    return [f"warning: {n} file{'s' if n > 1 else ''} changed since {'their rows were' if n > 1 else 'its row was'} "
            f"written (e.g. {summary.changed[0]!r}); the old rows were kept: rerun with --overwrite to relabel"]


def describe(summary: RunSummary, out: str) -> str:
    where = "" if out == "-" else f" -> {out}"
    return (f"classified {summary.files} files ({summary.errors} errors) in {summary.seconds:.1f}s, "
            f"{summary.images_per_s:.1f} images/s{where}")
