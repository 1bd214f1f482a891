"""``batchcls run`` as a library call: a typed job config in, a summary out."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from batchcls.backends import load_backend
from batchcls.card import load_card
from batchcls.output import RowWriter
from batchcls.pipeline import Classifier, RunOptions, RunSummary, run
from batchcls.progress import progress
from batchcls.scan import InputFile, count, scan
from batchcls.stopping import StopRequested


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


class Interrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM; the partial output is kept for --resume."""

    def __init__(self, rows: int, partial: str) -> None:
        super().__init__(f"interrupted after {rows} rows; they are kept in {partial}: rerun with --resume to finish")


def _pending(files: Iterator[InputFile], done: set[str]) -> Iterator[InputFile]:
    """Skip files already written (resume) and repeats (a list naming a file twice): one row per file."""
    seen: set[str] = set()
    for f in files:
        if f.rel in done or f.rel in seen:
            continue
        seen.add(f.rel)
        yield f


def run_job(job: RunJob) -> RunSummary:
    card = load_card(job.model)
    backend = load_backend(card, job.backend, device=job.device)
    columns = job.options.columns(card)
    classifier = Classifier(card, backend, tta=job.options.tta)
    writer = RowWriter(job.out, fmt=job.fmt, columns=columns,
                       resume=job.resume, overwrite=job.overwrite)
    exclude = [] if writer.to_stdout else [str(writer.out), str(writer.partial)]
    files = _pending(scan(job.source, recursive=job.recursive, files_from=job.files_from, exclude=exclude),
                     writer.done)
    # the total, for a percentage and an ETA: counted by a second walk while the first batches run
    bar = progress("classifying", quiet=job.quiet, count=lambda stop: count(
        job.source, recursive=job.recursive, files_from=job.files_from, exclude=exclude, skip=writer.done, stop=stop))
    stop = StopRequested()
    previous = stop.install()

    def write(rows: list[dict]) -> None:
        writer.write(rows)
        if bar is not None:
            bar.update(len(rows))
        stop.check()  # after the batch is on disk: what was classified is kept

    try:
        summary = run(files, classifier, write, job.options)
    except KeyboardInterrupt:
        writer.close(complete=False)
        raise Interrupted(writer.rows_written, "stdout" if writer.to_stdout else str(writer.partial)) from None
    except Exception:  # a run stopped by an error (GpuFailure: the GPU ran out of memory) resumes like a Ctrl-C'd one
        writer.close(complete=False)
        raise
    finally:
        stop.restore(previous)
        if bar is not None:
            bar.close()
    writer.close(complete=True)
    summary.skipped = len(writer.done)
    return summary


def describe(summary: RunSummary, out: str) -> str:
    where = "" if out == "-" else f" -> {out}"
    return (f"classified {summary.files} files ({summary.errors} errors) in {summary.seconds:.1f}s, "
            f"{summary.images_per_s:.1f} images/s{where}")

