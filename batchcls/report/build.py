"""``build_report``: rows in, a page and its thumbnail folder out, plus the one-line result for the terminal.

A row whose path leaves the images folder ('../../etc/passwd', '/etc/shadow') is neither read nor
linked: it is listed without a picture and counted in the summary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from batchcls.card import UNKNOWN_LABEL
from batchcls.errors import InputError, OutputError
from batchcls.fsutil import atomic_write, confined
from batchcls.label_folders import moved_to_path
from batchcls.report import thumbs
from batchcls.report.labels import read_labels
from batchcls.report.page import (
    Item,
    Links,
    Section,
    errors_section,
    label_section,
    linker,
    render,
    summary_section,
    unknown_section,
)


@dataclass
class ReportSummary:
    out: Path
    rows: int = 0
    errors: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    thumbs_made: int = 0
    thumbs_cached: int = 0  # reused from an earlier run: the cache key (path, size, mtime) still matched
    thumbs_failed: int = 0  # the file exists but could not be decoded into a thumbnail
    missing: int = 0  # the row's file was not found under the images root
    outside: int = 0  # the row's path points outside the images root: not read, not linked
    html_bytes: int = 0


def files_dir(out: Path) -> Path:
    """The folder beside the page that holds its thumbnails (``report.html`` -> ``report_files``)."""
    return out.with_name(out.stem + "_files")


def _confidence(row: dict) -> float | None:
    """The row's confidence, or None when the cell is empty or not a probability (a damaged file)."""
    try:
        c = float(row.get("confidence", ""))
    except (TypeError, ValueError):
        return None
    return c if 0.0 <= c <= 1.0 else None  # also rejects NaN


def _prepare(rows: list[dict], labels: Path, root: Path, folder: str, size: int,
             summary: ReportSummary) -> tuple[list[Item], dict[str, str]]:
    """Find each row's file and its cache key; returns the items and the thumbnails still to make.

    A watch ledger's row whose file was moved (``moved_to``) is looked for where it went, which may lie inside
    the ledger's own folder or inside ``root``: the ledger usually sits beside its --move-to folders.
    """
    items: list[Item] = []
    cached = set(os.listdir(folder))  # one listing instead of an exists() per row
    todo: dict[str, str] = {}  # key -> source; one thumbnail per distinct file, however many rows name it
    beside = Path(os.path.realpath(labels)).parent
    for row in rows:
        path = str(row.get("path", ""))
        moved = moved_to_path(row, labels)
        source = confined(root, path) if moved is None else confined(beside, moved) or confined(root, moved)
        item = Item(row, _confidence(row), path, source or "", moved=moved is not None)
        items.append(item)
        if source is None:
            item.note = ("moved outside the ledger's folder and the images folder: not shown" if item.moved
                         else "outside the images folder: not shown")
            summary.outside += 1
            continue
        if row.get("status") != "ok":
            continue
        try:
            st = os.stat(source)
        except OSError:
            item.note = "image not found"
            summary.missing += 1
            continue
        item.thumb = thumbs.thumb_key(st, size)
        if item.thumb not in todo and f"{item.thumb}.jpg" not in cached:
            todo[item.thumb] = source
    return items, todo


def _thumbnails(items: list[Item], todo: dict[str, str], folder: str, size: int, workers: int | None,
                progress: bool, summary: ReportSummary) -> None:
    """Make the missing thumbnails, count hits and failures, and prune what is no longer shown."""
    failed = thumbs.make_all(todo, folder, size, workers=workers, progress=progress)
    shown = {it.thumb for it in items if it.thumb}
    summary.thumbs_made = len(todo) - len(failed)
    summary.thumbs_failed = len(failed)
    summary.thumbs_cached = len(shown - set(todo))
    for it in items:
        if it.thumb in failed:  # the file changed since the run, or is not an image after all
            it.note = failed[it.thumb]
            it.thumb = None
    thumbs.prune(folder, shown - set(failed))


def _group(items: list[Item]) -> tuple[dict[str, list[Item]], list[Item]]:
    """Classified rows per label (labels sorted, least confident first within each) and the error rows."""
    groups: dict[str, list[Item]] = {}
    errors = []
    for it in items:
        if it.row.get("status") == "ok":
            groups.setdefault(str(it.row.get("label", "")), []).append(it)
        else:
            errors.append(it)

    def least_confident_first(it: Item) -> float:
        return -1.0 if it.confidence is None else it.confidence  # an unreadable confidence is the most doubtful
    return {k: sorted(groups[k], key=least_confident_first) for k in sorted(groups)}, errors


def _sections(groups: dict[str, list[Item]], errors: list[Item], links: Links) -> list[Section]:
    """The page, top to bottom: summary, one section per label, the rows the model declined, errors."""
    labels = [(f"label-{i}", label, items) for i, (label, items) in enumerate(groups.items())]
    sections = [summary_section(labels, errors)]
    declined = [it for it in groups.get(UNKNOWN_LABEL, []) if it.row.get("model_label") not in (None, "", UNKNOWN_LABEL)]
    sections += [label_section(sid, label, items, links) for sid, label, items in labels
                 if not (label == UNKNOWN_LABEL and declined)]
    if declined:
        sections.append(unknown_section(groups[UNKNOWN_LABEL], links))
    if errors:
        sections.append(errors_section(errors, links))
    return sections


def build_report(labels: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
                 thumb_size: int = thumbs.THUMB_SIZE, workers: int | None = None,
                 progress: bool = False) -> ReportSummary:
    """Write ``out`` (HTML) and its thumbnail folder for the rows in ``labels`` (csv, jsonl or parquet).

    ``images`` is the folder the row paths are relative to (the SOURCE given to ``batchcls run``);
    default: the current folder. ``workers`` thumbnail processes (None: one per core, 0: in-process);
    ``progress`` shows a bar on an interactive stderr while thumbnails are made.
    """
    labels, out = Path(labels), Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise OutputError(f"report file {out} must end in .html: it is overwritten on every run")
    if out.resolve() == labels.resolve():
        raise OutputError(f"the report {out} would overwrite the labels file: choose another --out")
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist: create it first")
    rows = read_labels(labels)
    summary = ReportSummary(out=out, rows=len(rows))
    root = Path(images) if images is not None else Path(".")
    folder = thumbs.thumbs_folder(files_dir(out))

    items, todo = _prepare(rows, labels.absolute(), root, folder, thumb_size, summary)
    looked_for = sum(1 for it in items if it.row.get("status") == "ok" and it.source)
    if looked_for and summary.missing == looked_for:  # a page of placeholders only: the wrong --images
        raise InputError(f"none of the {looked_for} images of {labels} was found under "
                         f"{images or 'the current folder'}: pass --images <the folder given to batchcls run>")
    _thumbnails(items, todo, folder, thumb_size, workers, progress, summary)
    groups, errors = _group(items)
    summary.labels = {k: len(v) for k, v in groups.items()}
    summary.errors = len(errors)

    links = Links(thumbs_url=quote(files_dir(out).name) + "/thumbs",
                  href=linker(Path(os.path.abspath(root)), Path(os.path.abspath(out.parent))))
    page = render(_sections(groups, errors, links), title=f"batchcls report: {labels.name}", thumb_size=thumb_size)
    data = page.encode("utf-8", "backslashreplace")  # a name that is not UTF-8 can't break the page
    atomic_write(out, data)
    summary.html_bytes = len(data)
    return summary


def describe(s: ReportSummary, images: str | None) -> str:
    """The one-line result for the terminal, plus a hint when the images were not where we looked."""
    line = (f"{s.out}: {s.rows} rows, {len(s.labels)} labels, {s.errors} errors; thumbnails: "
            f"{s.thumbs_made} made, {s.thumbs_cached} reused, {s.thumbs_failed} failed")
    if s.missing:
        line += (f"\n{s.missing} images not found under {images or 'the current folder'}: "
                 "pass --images <the folder given to batchcls run>")
    if s.outside:
        line += (f"\nwarning: {s.outside} rows point outside {images or 'the current folder'}: "
                 "listed without a picture or link (report only reads inside --images)")
    return line
