"""``batchcls report``: one self-contained HTML page to look at a run's results instead of reading CSV rows.

The page holds a summary (counts per label, a confidence histogram, how many rows each review
threshold would send to a person), one section per label with thumbnails sorted least-confident
first, and a section for error rows with their reasons. It needs no network, server or JavaScript:
thumbnails are small JPEGs in ``<report>_files/thumbs/`` beside the page, loaded lazily by the
browser, made in parallel and cached under a key that covers everything that shapes them.

Every string that comes from the rows (paths, labels, reasons) is untrusted: it goes through
``html.escape`` (text and attributes) or ``urllib.parse.quote`` (URLs), and a Content-Security-Policy
forbids scripts outright, so a file named ``<img src=x onerror=alert(1)>.jpg`` is only text. A row whose
path leaves the images folder ('../../etc/passwd', '/etc/shadow') is neither read nor linked: it is
listed without a picture and counted in the summary.
"""
from __future__ import annotations

import hashlib
import html
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from batchcls.errors import InputError, OutputError
from batchcls.fsutil import atomic_path, atomic_write, confined
from batchcls.metrics import REVIEW_THRESHOLDS
from batchcls.output import read_rows

THUMB_SIZE = 160  # px, longest side of a thumbnail (and its box on the page)
THUMB_QUALITY = 80  # JPEG quality; ~5 KB per thumbnail at 160 px
THUMB_VERSION = 1  # bump when thumbnail making changes, so old cache entries are not reused
HIST_BINS = 20  # confidence histogram bars over [0, 1]
LOW, MID = 0.5, 0.9  # captions under LOW are red, under MID amber: the eye finds doubtful rows first
_THUMB_NAME = re.compile(r"[0-9a-f]{24}\.jpg")

# No scripts at all: even an escaping bug elsewhere could not run code. Images only from beside the page.
CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"

STYLE = """
:root{--t:%(t)dpx;font:14px/1.4 system-ui,sans-serif;color:#222}
body{margin:0 1.5em 3em}
nav{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd;z-index:1;
display:flex;flex-wrap:wrap;gap:.15em 1em;max-height:33vh;overflow-y:auto}
nav a{white-space:nowrap}
table{border-collapse:collapse}td,th{padding:.15em .6em;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.8em;background:#4a7fc1;max-width:22vw}
svg.hist{max-width:100%%;height:auto}.cards>div{max-width:100%%;overflow-x:auto}
.hist rect{fill:#4a7fc1}.hist text{font-size:11px;fill:#555}.hist line{stroke:#999}.hist .n{font-size:10px;fill:#222}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:var(--t);content-visibility:auto;contain-intrinsic-size:auto var(--t) calc(var(--t) + 3.2em)}
figure img,figure .none{display:block;width:var(--t);height:var(--t);object-fit:contain;background:#f3f3f3}
figure .none{display:flex;align-items:center;justify-content:center;text-align:center;font-size:12px;color:#888}
figcaption{font-size:11px;overflow-wrap:anywhere}
figcaption b{display:block;font-size:13px}
.lo b{color:#c0392b}.mid b{color:#b7791f}
.err td:first-child{overflow-wrap:anywhere}
.cards{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}
"""


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


@dataclass
class _Item:
    row: dict
    confidence: float | None
    path: str  # as written in the row: relative to the images root, '/' separators
    source: str  # the file on disk
    thumb: str | None = None  # cache key; None when there is no thumbnail to show
    note: str = ""  # why there is no thumbnail


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


def _thumb_key(st: os.stat_result, size: int) -> str:
    """Everything that shapes a thumbnail: which file (device, inode), its size and mtime, and how it is made.

    The inode rather than the name: the same picture under two names (links, copies of a row) gets one
    thumbnail, and an edited or replaced file gets a new one.
    """
    raw = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{size}:{THUMB_VERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def make_thumbnail(job: tuple[str, str, int]) -> str | None:
    """Decode ``src`` and write a JPEG of at most size x size to ``dest``; the error text on failure."""
    from PIL import Image

    from batchcls.decode import DecodeError, decode_image

    src, dest, size = job
    try:
        img = decode_image(src, min_side=size)  # JPEG draft mode: decode at reduced scale, most of the cost
    except DecodeError as e:
        return str(e)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    with atomic_path(dest, durable=False) as tmp:  # a reader (or a crash) never sees half a thumbnail
        img.save(tmp, "JPEG", quality=THUMB_QUALITY)
    return None


def _run_jobs(jobs: list[tuple[str, str, int]], workers: int, progress: bool) -> list[str | None]:
    bar = _progress_bar(len(jobs)) if progress else None
    try:
        return _make_all(jobs, workers, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()


def _make_all(jobs: list[tuple[str, str, int]], workers: int,
              progress: Callable[[int], None] | None) -> list[str | None]:
    if workers <= 0 or len(jobs) < 32:  # a pool costs more than it saves for a handful of images
        results = []
        for job in jobs:
            results.append(make_thumbnail(job))
            if progress:
                progress(1)
        return results
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for r in pool.map(make_thumbnail, jobs, chunksize=16):
            results.append(r)
            if progress:
                progress(1)
    return results


def _prepare(rows: list[dict], root: Path, thumbs: Path, size: int,
             summary: ReportSummary) -> tuple[list[_Item], dict[str, str]]:
    """Find each row's file and its cache key; returns the items and the thumbnails still to make."""
    items: list[_Item] = []
    cached = set(os.listdir(thumbs))  # one listing instead of an exists() per row
    todo: dict[str, str] = {}  # key -> source; one thumbnail per distinct file, however many rows name it
    for row in rows:
        path = str(row.get("path", ""))
        source = confined(root, path)
        item = _Item(row, _confidence(row), path, source or "")
        items.append(item)
        if source is None:
            item.note = "outside the images folder: not shown"
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
        item.thumb = _thumb_key(st, size)
        if item.thumb not in todo and f"{item.thumb}.jpg" not in cached:
            todo[item.thumb] = source
    return items, todo


def _linker(root: Path, base: Path) -> Callable[[str], str]:
    """Row path -> URL of the image relative to the page, percent-encoded so no name can become a
    scheme (``javascript:``) or break out of the attribute. The root's part is worked out once:
    20,000 relpath calls would cost seconds."""
    def rel(target: str) -> str:
        return os.path.relpath(target, base).replace(os.sep, "/")
    prefix = rel(str(root))

    def href(path: str) -> str:
        if confined(root, path) is None:  # a row pointing outside the images folder gets no link
            return "#"
        joined = rel(path) if os.path.isabs(path) else path if prefix == "." else f"{prefix}/{path}"
        return quote(joined, safe="/", errors="surrogateescape")  # a non-UTF-8 name: its real bytes
    return href


def _histogram_svg(confidences: list[float]) -> str:
    """Bars with their counts on top, a row axis on the left and a confidence axis below."""
    counts = [0] * HIST_BINS
    for c in confidences:
        counts[min(int(c * HIST_BINS), HIST_BINS - 1)] += 1
    left, w, h, top_pad, bw = 34, 400, 120, 14, 400 // HIST_BINS
    top = max(counts) or 1
    bars = []
    for i, n in enumerate(counts):
        bh = round(n / top * h)
        lo, hi = i / HIST_BINS, (i + 1) / HIST_BINS
        x, y = left + i * bw, top_pad + h - bh
        bars.append(f'<rect x="{x}" y="{y}" width="{bw - 2}" height="{bh}">'
                    f"<title>{lo:.2f}-{hi:.2f}: {n} rows</title></rect>")
        if n:
            bars.append(f'<text class="n" x="{x + (bw - 2) / 2:g}" y="{y - 2}" text-anchor="middle">{n}</text>')
    base = top_pad + h
    axes = (f'<line x1="{left - 2}" y1="{top_pad}" x2="{left - 2}" y2="{base}"/>'
            f'<line x1="{left - 2}" y1="{base}" x2="{left + w}" y2="{base}"/>'
            f'<text x="{left - 5}" y="{top_pad + 4}" text-anchor="end">{top}</text>'
            f'<text x="{left - 5}" y="{base}" text-anchor="end">0</text>'
            f'<text x="0" y="{top_pad + h / 2:g}" transform="rotate(-90 8 {top_pad + h / 2:g})">rows</text>')
    ticks = "".join(f'<text x="{left + x * w:.0f}" y="{base + 14}" text-anchor="{a}">{x:g}</text>'
                    for x, a in ((0, "start"), (0.5, "middle"), (1, "end")))
    ticks += f'<text x="{left + w / 2:g}" y="{base + 28}" text-anchor="middle">confidence</text>'
    height = base + 32
    return (f'<svg class="hist" role="img" aria-label="confidence histogram" width="{left + w + 4}" '
            f'height="{height}" viewBox="0 0 {left + w + 4} {height}">{axes}{"".join(bars)}{ticks}</svg>')


_BREAK_AFTER = re.compile(r"([/_\-.])")


def _breakable(text: str) -> str:
    """Escaped text that the browser may wrap after a separator (/, _, -, .) rather than mid-word."""
    return _BREAK_AFTER.sub(r"\1<wbr>", html.escape(text))


def _summary_html(groups: dict[str, list[_Item]], errors: list[_Item], confidences: list[float]) -> list[str]:
    e = html.escape
    total = sum(len(v) for v in groups.values()) + len(errors)
    top = max((len(v) for v in groups.values()), default=1)
    out = ['<section id="summary"><h2>Summary</h2>',
           f"<p>{total} rows: {total - len(errors)} classified, {len(errors)} errors, {len(groups)} labels.</p>",
           '<div class="cards"><div><h3>Rows per label</h3><table>'
           "<tr><th>label</th><th>rows</th><th></th><th>mean confidence</th></tr>"]
    for i, (label, items) in enumerate(groups.items()):
        known = [it.confidence for it in items if it.confidence is not None]
        mean = f"{sum(known) / len(known):.3f}" if known else "-"
        out.append(f'<tr><td><a href="#label-{i}">{e(label)}</a></td><td class="n">{len(items)}</td>'
                   f'<td><span class="bar" style="width:{round(len(items) / top * 200)}px"></span></td>'
                   f'<td class="n">{mean}</td></tr>')
    if errors:
        out.append(f'<tr><td><a href="#errors">errors</a></td><td class="n">{len(errors)}</td><td></td><td></td></tr>')
    out.append("</table></div><div><h3>Confidence of classified rows</h3>")
    out.append(_histogram_svg(confidences))
    out.append("</div><div><h3>Rows a review threshold would send to a person</h3>"
               "<table><tr><th>threshold</th><th>rows below</th><th>share</th></tr>")
    for t in REVIEW_THRESHOLDS:
        below = sum(c < t for c in confidences)
        share = below / len(confidences) if confidences else 0.0
        out.append(f'<tr><td class="n">{t:g}</td><td class="n">{below}</td><td class="n">{share:.1%}</td></tr>')
    out.append("</table></div></div></section>")
    return out


def _figure(item: _Item, thumbs_url: str, href: Callable[[str], str]) -> str:
    e = html.escape
    c = item.confidence
    cls = "" if c is None or c >= MID else ' class="lo"' if c < LOW else ' class="mid"'
    if item.thumb:
        pic = f'<img loading="lazy" decoding="async" alt="" src="{thumbs_url}/{item.thumb}.jpg">'
    else:
        pic = f'<span class="none">{e(item.note or "no preview")}</span>'
    conf = "-" if c is None else f"{c:.3f}"
    return (f'<figure{cls}><a href="{e(href(item.path))}">{pic}</a>'
            f"<figcaption><b>{conf}</b>{_breakable(item.path)}</figcaption></figure>")


def render(groups: dict[str, list[_Item]], errors: list[_Item], *, title: str, thumbs_url: str,
           href: Callable[[str], str], thumb_size: int) -> str:
    """The whole page as one string; every piece of row data passes through html.escape or quote."""
    e = html.escape
    confidences = [it.confidence for items in groups.values() for it in items if it.confidence is not None]
    nav = "".join(f'<a href="#label-{i}">{e(label)} ({len(items)})</a>'
                  for i, (label, items) in enumerate(groups.items()))
    if errors:
        nav += f'<a href="#errors">errors ({len(errors)})</a>'
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>{e(title)}</title>", '<link rel="icon" href="data:,">',
             f"<style>{STYLE % {'t': thumb_size}}</style></head><body>",
             f"<h1>{e(title)}</h1>", f'<nav><a href="#summary">summary</a>{nav}</nav>']
    parts += _summary_html(groups, errors, confidences)
    for i, (label, items) in enumerate(groups.items()):
        parts.append(f'<section class="label" id="label-{i}"><h2>{e(label)} '
                     f"<small>({len(items)} rows, least confident first)</small></h2><div class=\"grid\">")
        parts.extend(_figure(it, thumbs_url, href) for it in items)
        parts.append("</div></section>")
    if errors:
        parts.append(f'<section id="errors"><h2>Errors <small>({len(errors)} rows)</small></h2>'
                     '<table class="err"><tr><th>path</th><th>reason</th></tr>')
        parts.extend(f'<tr><td><a href="{e(href(it.path))}">{e(it.path)}</a></td>'
                     f'<td>{e(str(it.row.get("error", "")))}</td></tr>' for it in errors)
        parts.append("</table></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _prune(thumbs: Path, keep: Iterable[str]) -> None:
    """Drop cached thumbnails this page no longer shows, so the cache stays the size of the report."""
    keep = {f"{k}.jpg" for k in keep}
    for p in thumbs.iterdir():
        if (_THUMB_NAME.fullmatch(p.name) and p.name not in keep) or p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def _make_thumbnails(items: list[_Item], todo: dict[str, str], thumbs: Path, size: int, workers: int | None,
                     progress: bool, summary: ReportSummary) -> None:
    """Make the missing thumbnails in parallel, count hits and failures, and prune what is no longer shown."""
    jobs = [(src, str(thumbs / f"{key}.jpg"), size) for key, src in todo.items()]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    failed = {key: reason for key, reason in zip(todo, _run_jobs(jobs, workers, progress)) if reason}
    shown = {it.thumb for it in items if it.thumb}
    summary.thumbs_made = len(todo) - len(failed)
    summary.thumbs_failed = len(failed)
    summary.thumbs_cached = len(shown - set(todo))
    for it in items:
        if it.thumb in failed:  # the file changed since the run, or is not an image after all
            it.note = failed[it.thumb]
            it.thumb = None
    _prune(thumbs, shown - set(failed))


def _group(items: list[_Item]) -> tuple[dict[str, list[_Item]], list[_Item]]:
    """Classified rows per label (labels sorted, least confident first within each) and the error rows."""
    groups: dict[str, list[_Item]] = {}
    errors = []
    for it in items:
        if it.row.get("status") == "ok":
            groups.setdefault(str(it.row.get("label", "")), []).append(it)
        else:
            errors.append(it)
    def least_confident_first(it: _Item) -> float:
        return -1.0 if it.confidence is None else it.confidence  # an unreadable confidence is the most doubtful
    return {k: sorted(groups[k], key=least_confident_first) for k in sorted(groups)}, errors


def build_report(labels: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
                 thumb_size: int = THUMB_SIZE, workers: int | None = None,
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
    rows = read_rows(labels)
    if rows and "path" not in rows[0]:
        raise InputError(f"{labels} has no 'path' column: it is not a batchcls output")
    summary = ReportSummary(out=out, rows=len(rows))
    root = Path(images) if images is not None else Path(".")
    thumbs = files_dir(out) / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)

    items, todo = _prepare(rows, root, thumbs, thumb_size, summary)
    looked_for = sum(1 for it in items if it.row.get("status") == "ok" and it.source)
    if looked_for and summary.missing == looked_for:  # a page of placeholders only: the wrong --images
        raise InputError(f"none of the {looked_for} images of {labels} was found under "
                         f"{images or 'the current folder'}: pass --images <the folder given to batchcls run>")
    _make_thumbnails(items, todo, thumbs, thumb_size, workers, progress, summary)
    groups, errors = _group(items)
    summary.labels = {k: len(v) for k, v in groups.items()}
    summary.errors = len(errors)

    href = _linker(Path(os.path.abspath(root)), Path(os.path.abspath(out.parent)))
    page = render(groups, errors, title=f"batchcls report: {labels.name}",
                  thumbs_url=quote(files_dir(out).name) + "/thumbs", href=href, thumb_size=thumb_size)
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


def _progress_bar(total: int):
    """A tqdm bar on an interactive stderr, else nothing (logs stay clean)."""
    if not total or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="thumbnails", file=sys.stderr, dynamic_ncols=True)
