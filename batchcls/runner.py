"""``batchcls run`` as a library call: a typed job config in, a summary out.

``run_job`` is the one job loop of both runners: the output (lock, resume, provenance, the ``--embeddings``
sidecar: one ``RowWriter`` transaction), the scan of what is left to do, the progress bar, Ctrl-C/SIGTERM at a
batch boundary and the summary. What turns files into rows is a *stage*: the local pipeline here, or the Ray
Data stages of ``ray_runner``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchcls.card import UNKNOWN_LABEL, ModelCard, load_card
from batchcls.output import Provenance, RowWriter
from batchcls.pipeline import RunOptions, RunSummary
from batchcls.progress import progress
from batchcls.scan import InputFile, Written, count, scan
from batchcls.stopping import StopRequested

Classify = Callable[[Iterable[InputFile]], Iterator[list[dict]]]
"""Rows for the files, batch by batch, in input order."""



@dataclass(frozen=True)
class Loaded:
    """A stage with its model loaded: what classifies, and the model file it runs (part of the output's
    provenance, since an INT8 model or a TensorRT plan gives other rows than the FP32 ONNX); None where the
    file is chosen elsewhere (each Ray actor picks its own)."""

    classify: Classify
    served: Path | None = None
    cut: float | None = None  # the open-set decision's cut for what serves (model file x TTA); None: off or unknown


Stage = Callable[[ModelCard], Loaded]
"""Loads the model for a card; called before the output is touched, so a model that cannot load (or an
engine that cannot start) fails without creating or locking anything."""


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
    embeddings: str | None = None  # --embeddings FILE.npy (see batchcls.output.embeddings)


class Interrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM; the partial output is kept for --resume."""

    def __init__(self, rows: int, partial: str) -> None:
        super().__init__(f"interrupted after {rows} rows; they are kept in {partial}: rerun with --resume to finish")


def local_stage(job: RunJob) -> Stage:
    """The pipeline on this machine: decode workers, then the backend ``job`` names."""

    def build(card: ModelCard) -> Loaded:
        from batchcls.backends import load_backend
        from batchcls.pipeline import Classifier, classify

        classifier = Classifier(card, load_backend(card, job.backend, device=job.device), tta=job.options.tta,
                                open_set=job.options.open_set)
        cut = classifier.open_set.cut if classifier.open_set is not None else None
        return Loaded(lambda files: classify(files, classifier, job.options), served_file(classifier.backend, card), cut)

    return build


def served_file(backend: object, card: ModelCard) -> Path | None:
    """The file of the bundle ``backend`` runs: ONNX Runtime names its own (the FP32, optimised or INT8 model),
    the torch backends run the bundle's program, TensorRT its plan."""
    path = getattr(backend, "model_path", None)
    if path is not None:
        return Path(path)
    name = getattr(backend, "name", "")
    if name in ("cuda", "torch"):
        from batchcls.backends.pytorch import program_path

        return program_path(card)
    if name == "tensorrt":
        from batchcls.backends.tensorrt import plan_path

        return plan_path(card)
    return None


def _pending(files: Iterator[InputFile], done: Written | set[str], *, written_ns: int | None = None,
             changed: list[str] | None = None) -> Iterator[InputFile]:
    """Skip files already written (resume) and repeats (a list naming a file twice): one row per file.

    ``done`` matches a file by its key or, as ``Written``, by its identity: a file reached by another route
    than when its row was written is still done. A skipped file modified or replaced after the output was last
    written (its mtime or ctime is later) is listed in ``changed``: its row is kept (one row per file) and the
    run says so.
    """
    seen: set[str] = set()
    for f in files:
        if f.rel in seen:
            continue
        seen.add(f.rel)
        if (f in done) if isinstance(done, Written) else (f.rel in done):
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


def run_job(job: RunJob, stage: Stage | None = None) -> RunSummary:
    """Classify ``job.source`` into ``job.out`` with ``stage`` (default: the local pipeline)."""
    card = load_card(job.model)
    columns = job.options.columns(card)
    loaded = (stage or local_stage(job))(card)
    provenance = Provenance.of(card, job.options, source=job.source, files_from=job.files_from, served=loaded.served)
    writer = RowWriter(job.out, fmt=job.fmt, columns=columns, resume=job.resume, overwrite=job.overwrite,
                       provenance=provenance, embeddings=job.embeddings, embedding_dim=card.embedding_dim)
    exclude = writer.own_files()  # a run never labels its own output, nor its sidecar's files
    summary = RunSummary(cut=loaded.cut)
    try:
        done = Written(writer.done, provenance.input) if writer.done else writer.done
        files = _pending(scan(job.source, recursive=job.recursive, files_from=job.files_from, exclude=exclude),
                         done, written_ns=writer.last_written_ns, changed=summary.changed)
    except BaseException:
        writer.abandon()
        raise
    # the total, for a percentage and an ETA: counted by a second walk while the first batches run
    bar = progress("classifying", quiet=job.quiet, count=lambda stop: count(
        job.source, recursive=job.recursive, files_from=job.files_from, exclude=exclude, skip=done, stop=stop))
    stop = StopRequested()
    previous = stop.install()
    start = time.perf_counter()
    batches = loaded.classify(files)
    try:
        for rows in batches:
            writer.write(rows)  # the vectors first, then the rows: one transaction
            summary.add(rows)
            if bar is not None:
                bar.update(len(rows))
            stop.check()  # after the batch is on disk: what was classified is kept
    except KeyboardInterrupt:
        writer.close(complete=False)
        raise Interrupted(writer.rows_written, "stdout" if writer.to_stdout else str(writer.partial)) from None
    except BaseException:  # stopped by an error (a Ray failure, GpuFailure): rows so far are kept for --resume
        writer.abandon()
        raise
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # the stage's workers (or Ray session) end here, not at garbage collection
            close()
        stop.restore(previous)
        if bar is not None:
            bar.close()
    writer.close(complete=True)
    summary.seconds = time.perf_counter() - start
    summary.skipped = len(writer.done)
    return summary


def warnings(summary: RunSummary, job: RunJob | None = None) -> list[str]:
    """What the user should know although the run succeeded (shown even with --quiet)."""
    out = []
    if summary.files == 0 and summary.skipped == 0:  # a mistyped or empty folder: exit 0 over a header-only file
        out.append(f"warning: no files found {_where(job)}: nothing was classified; check the name"
                   + (" (sub-folders are not read with --no-recursive)" if job and not job.recursive else ""))
    if summary.changed:
        n = len(summary.changed)
        out.append(f"warning: {n} file{'s' if n > 1 else ''} changed since "
                   f"{'their rows were' if n > 1 else 'its row was'} written (e.g. {summary.changed[0]!r}); "
                   "the old rows were kept: rerun with --overwrite to relabel")
    return out


def _where(job: RunJob | None) -> str:
    if job is None:
        return "in the input"
    if job.files_from is not None:
        return f"in the list {'on stdin' if job.files_from == '-' else job.files_from}"
    sources = [job.source] if isinstance(job.source, (str, os.PathLike)) else list(job.source or ())
    return f"in {', '.join(map(os.fspath, sources[:3]))}{', ...' if len(sources) > 3 else ''}"


def served_cut(job: RunJob, summary: RunSummary) -> float | None:
    """The cut the run's open-set decision labelled 'unknown' below, in known_score's units; None when off.

    The served decision's own cut (fitted for the model file and TTA that ran), unless --open-set-cut moved it.
    """
    if not job.options.open_set:
        return None
    return job.options.open_set_cut if job.options.open_set_cut is not None else summary.cut


def describe(summary: RunSummary, out: str, *, cut: float | None = None, threshold: float | None = None) -> str:
    """The run's one-line result: error, labelled and unknown rows counted apart (with why a row is unknown: the
    open-set ``cut`` in known_score's units, the ``threshold``), and on a resume how many rows were there before."""
    unknown = summary.labels.get(UNKNOWN_LABEL, 0)
    why = " or ".join(w for w in (f"known_score below {cut:.4g}" if cut is not None else "",
                                  f"confidence below {threshold:g}" if threshold is not None else "") if w)
    line = (f"classified {summary.files} files ({summary.errors} errors) in {summary.seconds:.1f}s, "
            f"{summary.images_per_s:.1f} images/s: {summary.files - summary.errors - unknown} labelled")
    if why:  # without a decision no row says 'unknown' (a card with a class of that name is refused)
        line += f", {unknown} unknown ({why})"
    if summary.skipped:
        line += f"; {summary.skipped} row{' was' if summary.skipped == 1 else 's were'} already there"
    return line + ("" if out == "-" else f" -> {out}")
