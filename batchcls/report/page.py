"""The report page: CSS, the SVG histogram and the HTML of each section, from rows already grouped.

Every string that comes from the rows (paths, labels, reasons) is untrusted: it goes through
``html.escape`` (text and attributes) or ``urllib.parse.quote`` (URLs), and a Content-Security-Policy
forbids scripts outright, so a file named ``<img src=x onerror=alert(1)>.jpg`` is only text.

The page is a list of ``Section``s: each brings its id, the text of its link in the top bar and its
markup. To add one (say, rows the model declined to name), write a function that returns a ``Section``
for its rows and put it in the list ``build.build_report`` hands to ``render``; the top bar follows.
"""
from __future__ import annotations

import html
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from batchcls.fsutil import confined
from batchcls.metrics import REVIEW_THRESHOLDS

HIST_BINS = 20  # confidence histogram bars over [0, 1]
LOW, MID = 0.5, 0.9  # captions under LOW are red, under MID amber: the eye finds doubtful rows first

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
class Item:
    """One row as the page shows it."""

    row: dict
    confidence: float | None
    path: str  # as written in the row: relative to the images root, '/' separators
    source: str  # the file on disk
    thumb: str | None = None  # cache key; None when there is no thumbnail to show
    note: str = ""  # why there is no thumbnail
    moved: bool = False  # a watch moved the file: ``source`` is where its ledger row says it went


@dataclass(frozen=True)
class Section:
    id: str  # the element id, ours (never row data)
    nav: str  # the text of its link in the top bar (escaped by render)
    html: str  # its markup, row data already escaped


@dataclass(frozen=True)
class Links:
    """How the page points at things: thumbnails beside it, and each row's image."""

    thumbs_url: str  # the thumbnail folder, relative to the page, already percent-encoded
    href: Callable[[Item], str]  # item -> URL of its image, '#' when it must not be linked


def linker(root: Path, base: Path) -> Callable[[Item], str]:
    """Item -> URL of its image relative to the page, percent-encoded so no name can become a
    scheme (``javascript:``) or break out of the attribute. The root's part is worked out once:
    a relpath call per row would cost seconds on a big report (a moved file, already checked, pays one)."""
    def rel(target: str) -> str:
        return os.path.relpath(target, base).replace(os.sep, "/")
    prefix = rel(str(root))

    def href(item: Item) -> str:
        path = item.path
        if item.moved:
            if not item.source:  # moved somewhere the report may not read: no link
                return "#"
            joined = rel(item.source)
        elif confined(root, path) is None:  # a row pointing outside the images folder gets no link
            return "#"
        else:
            joined = rel(path) if os.path.isabs(path) else path if prefix == "." else f"{prefix}/{path}"
        return quote(joined, safe="/", errors="surrogateescape")  # a non-UTF-8 name: its real bytes
    return href


def histogram_svg(confidences: list[float]) -> str:
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


def summary_section(labels: Sequence[tuple[str, str, list[Item]]], errors: list[Item]) -> Section:
    """Counts per label (``(section id, label, items)``, in page order), the confidence histogram and
    how many rows each review threshold would send to a person."""
    e = html.escape
    confidences = [it.confidence for _, _, items in labels for it in items if it.confidence is not None]
    total = sum(len(items) for _, _, items in labels) + len(errors)
    top = max((len(items) for _, _, items in labels), default=1)
    out = ['<section id="summary"><h2>Summary</h2>',
           f"<p>{total} rows: {total - len(errors)} classified, {len(errors)} errors, {len(labels)} labels.</p>",
           '<div class="cards"><div><h3>Rows per label</h3><table>'
           "<tr><th>label</th><th>rows</th><th></th><th>mean confidence</th></tr>"]
    for sid, label, items in labels:
        known = [it.confidence for it in items if it.confidence is not None]
        mean = f"{sum(known) / len(known):.3f}" if known else "-"
        out.append(f'<tr><td><a href="#{sid}">{e(label)}</a></td><td class="n">{len(items)}</td>'
                   f'<td><span class="bar" style="width:{round(len(items) / top * 200)}px"></span></td>'
                   f'<td class="n">{mean}</td></tr>')
    if errors:
        out.append(f'<tr><td><a href="#errors">errors</a></td><td class="n">{len(errors)}</td><td></td><td></td></tr>')
    out.append("</table></div><div><h3>Confidence of classified rows</h3>")
    out.append(histogram_svg(confidences))
    out.append("</div><div><h3>Rows a review threshold would send to a person</h3>"
               "<table><tr><th>threshold</th><th>rows below</th><th>share</th></tr>")
    for t in REVIEW_THRESHOLDS:
        below = sum(c < t for c in confidences)
        share = below / len(confidences) if confidences else 0.0
        out.append(f'<tr><td class="n">{t:g}</td><td class="n">{below}</td><td class="n">{share:.1%}</td></tr>')
    out.append("</table></div></div></section>")
    return Section("summary", "summary", "\n".join(out))


def figure(item: Item, links: Links) -> str:
    """A thumbnail (or why there is none) linked to the image, captioned with confidence and path."""
    e = html.escape
    c = item.confidence
    cls = "" if c is None or c >= MID else ' class="lo"' if c < LOW else ' class="mid"'
    if item.thumb:
        pic = f'<img loading="lazy" decoding="async" alt="" src="{links.thumbs_url}/{item.thumb}.jpg">'
    else:
        pic = f'<span class="none">{e(item.note or "no preview")}</span>'
    conf = "-" if c is None else f"{c:.3f}"
    return (f'<figure{cls}><a href="{e(links.href(item))}">{pic}</a>'
            f"<figcaption><b>{conf}</b>{_breakable(item.path)}</figcaption></figure>")


def label_section(sid: str, label: str, items: list[Item], links: Links) -> Section:
    """One label's rows as a grid of thumbnails, in the order given (least confident first)."""
    parts = [f'<section class="label" id="{sid}"><h2>{html.escape(label)} '
             f"<small>({len(items)} rows, least confident first)</small></h2><div class=\"grid\">"]
    parts.extend(figure(it, links) for it in items)
    parts.append("</div></section>")
    return Section(sid, f"{label} ({len(items)})", "\n".join(parts))


def unknown_section(items: list[Item], links: Links) -> Section:
    """Rows the model declined to name ('unknown'): each with the class it would have said and how known it
    looked (``known_score``, or the confidence under ``--threshold``), the most foreign first."""
    def score(it: Item) -> float:
        try:
            return float(it.row.get("known_score") if it.row.get("known_score") not in (None, "") else it.confidence)
        except (TypeError, ValueError):
            return -1.0
    e = html.escape
    ordered = sorted(items, key=score)
    parts = ['<section class="label" id="unknown"><h2>unknown <small>(' f"{len(items)} rows that show none of the "
             "classes, the most foreign first; under each: the model's own guess and its known_score)</small></h2>"
             '<div class="grid">']
    for it in ordered:
        pic = (f'<img loading="lazy" decoding="async" alt="" src="{links.thumbs_url}/{it.thumb}.jpg">' if it.thumb
               else f'<span class="none">{e(it.note or "no preview")}</span>')
        ks = it.row.get("known_score")
        ks = "-" if ks in (None, "") else f"{float(ks):.3f}"
        parts.append(f'<figure><a href="{e(links.href(it))}">{pic}</a><figcaption>'
                     f'<b>{e(str(it.row.get("model_label", "") or "?"))}</b>known {ks} · {_breakable(it.path)}'
                     "</figcaption></figure>")
    parts.append("</div></section>")
    return Section("unknown", f"unknown ({len(items)})", "\n".join(parts))


def errors_section(errors: list[Item], links: Links) -> Section:
    """Rows that could not be classified, with their reasons."""
    e = html.escape
    parts = [f'<section id="errors"><h2>Errors <small>({len(errors)} rows)</small></h2>'
             '<table class="err"><tr><th>path</th><th>reason</th></tr>']
    parts.extend(f'<tr><td><a href="{e(links.href(it))}">{e(it.path)}</a></td>'
                 f'<td>{e(str(it.row.get("error", "")))}</td></tr>' for it in errors)
    parts.append("</table></section>")
    return Section("errors", f"errors ({len(errors)})", "\n".join(parts))


def render(sections: Sequence[Section], *, title: str, thumb_size: int) -> str:
    """The whole page as one string: head, a top bar linking every section, the sections in order."""
    e = html.escape
    nav = "".join(f'<a href="#{s.id}">{e(s.nav)}</a>' for s in sections)
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>{e(title)}</title>", '<link rel="icon" href="data:,">',
             f"<style>{STYLE % {'t': thumb_size}}</style></head><body>",
             f"<h1>{e(title)}</h1>", f"<nav>{nav}</nav>"]
    parts.extend(s.html for s in sections)
    parts.append("</body></html>\n")
    return "\n".join(parts)
