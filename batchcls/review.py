"""``batchcls review``: put the low-confidence images where a person can fix their labels by moving files.

Each row under the threshold has its image copied (or linked) into ``DIR/<predicted label>/``; a
person moves the wrong ones to the right folder, and ``DIR`` is then laid out like training data
(``<class>/<image>``). Nothing is ever overwritten: a second image with the same name gets a
``~2`` suffix, and rerunning the same review finds its earlier copies instead of duplicating them.
``DIR/_manifest.csv`` maps every placed file back to its row, so corrections can be traced.

The rows are data, not instructions: a row whose path leaves ``--images`` ('../../etc/passwd',
'/etc/shadow') is skipped and counted, and nothing is written outside ``DIR`` (a label is made a
safe folder name, a different one for each label: ``label_folders``; a folder in ``DIR`` that links
elsewhere is refused). The check is on the row's spelling: a symlink inside ``--images`` is followed,
as ``batchcls run`` followed it.
"""
from __future__ import annotations

import csv
import filecmp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from batchcls.card import UNKNOWN_LABEL
from batchcls.errors import InputError, OutputError
from batchcls.fsutil import atomic_open, confined, inside
from batchcls.label_folders import ERRORS_DIR, MANIFEST, label_folder, moved_to_path
from batchcls.output import encode_name, escape_cell
from batchcls.report.labels import read_labels

LINK_MODES = ("symlink", "hardlink")
# model_label (the model's own guess on a row labelled 'unknown') and known_score come last: scripts that read
# the first five columns by position keep working.
MANIFEST_COLUMNS = ["file", "path", "label", "confidence", "error", "model_label", "known_score"]


@dataclass
class ReviewSummary:
    to: Path
    selected: int = 0  # rows under the threshold (plus error rows with --errors)
    placed: int = 0  # files newly copied or linked
    already: int = 0  # found in DIR from an earlier run of the same review
    missing: list[str] = field(default_factory=list)  # row paths whose file was not found
    outside: list[str] = field(default_factory=list)  # row paths that point outside --images: skipped
    labels: dict[str, int] = field(default_factory=dict)


def _same_file(a: Path, b: Path) -> bool:
    """b is an earlier placement of a: the same inode (links) or the same bytes (copies)."""
    try:
        return os.path.samefile(a, b) or (a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False))
    except OSError:
        return False


def _place(src: Path, folder: Path, link: str | None) -> tuple[Path, bool]:
    """Copy or link src into folder under a free name; returns (destination, newly placed)."""
    stem, suffix = os.path.splitext(src.name)
    n = 1
    while True:
        dest = folder / (src.name if n == 1 else f"{stem}~{n}{suffix}")
        if dest.is_symlink() or dest.exists():
            if _same_file(src, dest):
                return dest, False
            n += 1
            continue
        try:
            if link == "symlink":
                os.symlink(os.path.abspath(src), dest)
            elif link == "hardlink":
                os.link(src, dest)
            else:
                shutil.copy2(src, dest)
        except FileExistsError:  # another process took the name between the check and the write
            n += 1
            continue
        except OSError as e:
            if link == "hardlink" and e.errno == 18:  # EXDEV
                raise OutputError(f"cannot hard-link {src} into {folder}: different filesystems; "
                                  "use --link symlink or copy") from None
            raise OutputError(f"cannot place {src} in {folder}: {e.strerror}") from None
        return dest, True


def review(labels: str | os.PathLike, to: str | os.PathLike, *, below: float | None = None,
           images: str | os.PathLike | None = None, link: str | None = None,
           errors: bool = False, unknown: bool = False) -> ReviewSummary:
    """Place every image whose confidence is under ``below`` into ``to/<label>/``; with ``unknown`` also every
    row labelled 'unknown' (the open-set decision or --threshold declined it) into ``to/unknown/``, whatever
    its confidence, so ``unknown`` alone needs no ``below``.

    ``images`` is the folder the row paths are relative to (default: the current folder); a watch ledger's
    row whose file was moved is looked for where it went (``moved_to``, as ``report`` does).
    ``link`` is None (copy), 'symlink' or 'hardlink'; ``errors`` also places error rows in ``to/_errors``.
    """
    if link not in (None, *LINK_MODES):
        raise OutputError(f"unknown link mode {link!r}: choose one of {', '.join(LINK_MODES)}")
    if below is None and not (unknown or errors):
        raise InputError("nothing to review: give a confidence to review under (--below), --unknown or --errors")
    rows = read_labels(labels)
    root, to = Path(images) if images is not None else Path("."), Path(to)
    summary = ReviewSummary(to=to)
    chosen: list[tuple[float, dict, str]] = []
    for r in rows:
        try:
            conf = float(r.get("confidence", ""))
        except (TypeError, ValueError):
            conf = 0.0  # no readable confidence (error rows, damaged cells): doubtful by definition
        doubtful = below is not None and conf < below
        if r.get("status") == "ok" and (doubtful or (unknown and r.get("label") == UNKNOWN_LABEL)):
            chosen.append((conf, r, label_folder(r)))
        elif r.get("status") != "ok" and errors:
            chosen.append((conf, r, ERRORS_DIR))
    # Least confident first, so the manifest reads in the order a person should look.
    chosen.sort(key=lambda c: c[0])
    summary.selected = len(chosen)
    manifest = []
    beside = Path(os.path.realpath(labels)).parent
    for _, r, folder in chosen:
        moved = moved_to_path(r, labels)
        where = confined(root, str(r["path"])) if moved is None else confined(beside, moved) or confined(root, moved)
        if where is None:
            summary.outside.append(str(r["path"]))
            continue
        src = Path(where)
        if not src.is_file():
            summary.missing.append(str(r["path"]))
            continue
        (to / folder).mkdir(parents=True, exist_ok=True)
        if not inside(to, to / folder):
            raise OutputError(f"{to / folder} leads outside {to} (a symlink?): remove it, or choose another --to")
        dest, new = _place(src, to / folder, link)
        summary.placed += new
        summary.already += not new
        summary.labels[folder] = summary.labels.get(folder, 0) + 1
        manifest.append([escape_cell(encode_name(dest.relative_to(to).as_posix())), escape_cell(encode_name(str(r["path"]))),
                         escape_cell(str(r.get("label", ""))), _cell(r.get("confidence")),
                         escape_cell(str(r.get("error", ""))), escape_cell(str(r.get("model_label") or "")),
                         _cell(r.get("known_score"))])
    if summary.missing and not manifest:
        raise InputError(f"none of the {len(summary.missing)} images to review was found under "
                         f"{images or 'the current folder'} (e.g. {summary.missing[0]}): "
                         "pass --images <the folder given to batchcls run>")
    if manifest:
        with atomic_open(to / MANIFEST, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            w = csv.writer(fh)
            w.writerow(MANIFEST_COLUMNS)
            w.writerows(manifest)
    return summary


def _cell(value: object) -> str:
    """A number as the manifest holds it: empty when the row has none (error rows, no open-set decision)."""
    return "" if value is None else str(value)


def describe(s: ReviewSummary, images: str | None) -> str:
    line = (f"{s.selected} rows to review: {s.placed} placed in {s.to}, {s.already} already there"
            + (f", {len(s.missing)} not found" if s.missing else "")
            + (f", {len(s.outside)} skipped" if s.outside else ""))
    if s.missing:
        line += (f"\nnot found under {images or 'the current folder'} (e.g. {s.missing[0]}): "
                 "pass --images <the folder given to batchcls run>")
    if s.outside:
        line += (f"\nwarning: {len(s.outside)} rows skipped because their path points outside "
                 f"{images or 'the current folder'} (e.g. {s.outside[0]!r}): review only reads inside --images")
    return line
