"""`batchcls report` and `batchcls review` on the output of a real run over real images.

The report is also opened in a real headless Chromium, driven over the DevTools protocol on a
pipe (``--remote-debugging-pipe``: no port, no websocket library), to check what a person would
see: no console errors, the right sections and thumbnails, and hostile file names shown as text.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from PIL import Image
from procs import group_members, wait_for

from batchcls.cli import cli
from batchcls.output import RowWriter, columns_for, read_rows
from batchcls.report import build_report, files_dir
from batchcls.review import review

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.path.exists(p)), None)
EVIL = "<img src=x onerror=alert(1)>.jpg"
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not installed: apt-get install -y chromium (.ci/run installs it)")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- fixtures: a real folder, a real run ------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Real sample photos under hostile and clashing names, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    samples = sorted(SAMPLES.glob("*/*.jpg"))
    for i, src in enumerate(samples[:10]):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        shutil.copy(src, sub / src.name)
    shutil.copy(samples[20], root / EVIL)
    shutil.copy(samples[21], root / "javascript:alert(1).jpg")
    shutil.copy(samples[22], root / "=1+2.jpg")  # formula-escaped in the CSV, must show unescaped
    Image.open(samples[23]).save(root / "quote\"amp&'.png")
    # Same name in two folders, different pictures: review must keep both.
    shutil.copy(samples[24], root / "a" / "same.jpg")
    shutil.copy(samples[25], root / "b" / "same.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def labels(tree, colour_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "labels.csv"
    r = invoke("run", tree, "--out", out, "--model", colour_bundle, "--workers", 0)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def report(labels, tree) -> Path:
    out = labels.parent / "report.html"
    r = invoke("report", labels, "--images", tree, "--out", out, "--workers", 2)
    assert r.exit_code == 0, r.output
    assert "thumbnails: 16 made, 0 reused, 0 failed" in r.output
    return out


class Page(HTMLParser):
    """What the page is made of: tags with attributes, and the text of each figure caption."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.captions: list[str] = []
        self.sections: list[str] = []
        self._caption: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "figcaption":
            self._caption = []
        if tag == "section" and a.get("class") == "label":
            self.sections.append(a["id"])

    def handle_endtag(self, tag):
        if tag == "figcaption" and self._caption is not None:
            self.captions.append("".join(self._caption))
            self._caption = None

    def handle_data(self, data):
        if self._caption is not None:
            self._caption.append(data)

    def count(self, tag: str, **attrs) -> int:
        return sum(t == tag and all(a.get(k) == v for k, v in attrs.items()) for t, a in self.tags)


# --- the report as HTML -----------------------------------------------------------------------


def test_report_has_a_section_per_label_and_a_thumbnail_per_row(report, labels):
    rows = read_rows(labels)
    ok = [r for r in rows if r["status"] == "ok"]
    page = Page(report.read_text(encoding="utf-8"))
    assert len(page.sections) == len({r["label"] for r in ok})
    assert page.count("figure") == len(ok) == 16
    thumbs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(thumbs) == len(ok) and all(a.get("loading") == "lazy" for t, a in page.tags if t == "img")
    for src in thumbs:  # every thumbnail is a real small JPEG beside the report
        with Image.open(report.parent / src) as im:
            assert im.format == "JPEG" and max(im.size) <= 160
    # Least confident first inside each section.
    confs = [float(c[:5]) for c in page.captions]  # a caption is "<b>0.123</b>path"
    start = 0
    for label in sorted({r["label"] for r in ok}):
        n = sum(r["label"] == label for r in ok)
        assert confs[start:start + n] == sorted(confs[start:start + n])
        start += n


def test_hostile_names_are_text_and_links_stay_relative(report):
    text = report.read_text(encoding="utf-8")
    page = Page(text)
    assert any(c.endswith(EVIL) for c in page.captions), page.captions
    assert any(c.endswith("=1+2.jpg") for c in page.captions)  # CSV formula escape undone
    assert any(c.endswith("quote\"amp&'.png") for c in page.captions)
    assert "<script" not in text.lower()
    assert not [(t, k) for t, a in page.tags for k in a if k.startswith("on")]  # no event handlers at all
    assert not [a["src"] for t, a in page.tags if t == "img" and not a["src"].startswith("report_files/thumbs/")]
    hrefs = [a["href"] for t, a in page.tags if t == "a"]
    assert all(h.startswith("#") or ":" not in h for h in hrefs), [h for h in hrefs if ":" in h]
    assert "Content-Security-Policy" in text


def test_error_rows_have_their_own_section_with_reasons(report, labels):
    errors = [r for r in read_rows(labels) if r["status"] == "error"]
    assert [r["path"] for r in errors] == ["broken.jpg"]
    text = report.read_text(encoding="utf-8")
    assert 'id="errors"' in text and errors[0]["error"] in text and "broken.jpg" in text


def test_second_run_reuses_the_thumbnail_cache_and_rebuilds_changed_files(labels, tree, tmp_path):
    out = tmp_path / "r.html"
    first = build_report(labels, out, images=tree, workers=0)
    again = build_report(labels, out, images=tree, workers=0)
    assert (first.thumbs_made, first.thumbs_cached) == (16, 0)
    assert (again.thumbs_made, again.thumbs_cached) == (0, 16)
    target = tree / "a" / "same.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        changed = build_report(labels, out, images=tree, workers=0)
    finally:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (changed.thumbs_made, changed.thumbs_cached) == (1, 15)
    assert len(list((files_dir(out) / "thumbs").iterdir())) == 16  # the stale entry was pruned


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_report_reads_every_output_format(tree, colour_bundle, tmp_path, fmt):
    out = tmp_path / f"labels.{fmt}"
    assert invoke("run", tree, "--out", out, "--model", colour_bundle, "--format", fmt, "--workers", 0).exit_code == 0
    s = build_report(out, tmp_path / "r.html", images=tree, workers=0)
    assert (s.rows, s.errors, sum(s.labels.values())) == (17, 1, 16)


def test_missing_images_get_a_hint_and_placeholders(labels, tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the row paths are not relative to here
    r = invoke("report", labels, "--out", tmp_path / "r.html")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output  # none found: the wrong --images
    assert "none of the 16 images" in r.output and "under the current folder: pass --images" in r.output
    assert not (tmp_path / "r.html").exists()
    rows = read_rows(labels)
    some = _rows_csv(tmp_path / "some.csv", [(rows[0]["path"], rows[0]["label"], 0.5), ("gone.jpg", "red", 0.4)])
    r = invoke("report", some, "--images", tree, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    assert "1 images not found under" in r.output and "pass --images" in r.output
    assert Page((tmp_path / "r.html").read_text(encoding="utf-8")).count("img") == 1


@pytest.mark.parametrize("out, message", [("labels.csv", "must end in .html"), ("nowhere/r.html", "does not exist")])
def test_report_refuses_bad_outputs(labels, tree, out, message):
    r = invoke("report", labels, "--images", tree, "--out", labels.parent / out)
    assert r.exit_code == 1 and message in r.output


NOT_OURS = {
    "someone else's CSV": ("x.csv", "path,size,owner\nholiday.jpg,1200,ann\nwork.jpg,800,bob\n"),
    "only the word path": ("x.csv", "path\n"),
    "no header at all": ("x.csv", ""),
    "no path column": ("x.csv", "name,value\na,1\n"),
    "batchcls columns, other rows": ("x.csv", "path,label,confidence,status,error\na.jpg,red,0.9,maybe,\n"),
    "a row too wide": ("x.csv", "path,label,confidence,status,error\na.jpg,red,0.9,ok,,extra\n"),
    "columns reordered": ("x.csv", "label,path,confidence,status,error\nred,a.jpg,0.9,ok,\n"),
    "JSON lines of something else": ("x.jsonl", '{"path": "a.jpg", "kind": "photo"}\n'),
    "an empty .jsonl": ("x.jsonl", ""),
    "not JSON": ("x.jsonl", "path\n"),
}


@pytest.mark.parametrize("command", ["report", "review"])
@pytest.mark.parametrize("case", list(NOT_OURS))
def test_a_file_that_is_not_a_batchcls_output_is_refused_in_one_line(tree, tmp_path, command, case):
    """Such a file used to become a page of error rows, or an empty page, and exit 0."""
    name, text = NOT_OURS[case]
    bad = tmp_path / name
    bad.write_text(text)
    extra = ["--out", tmp_path / "r.html"] if command == "report" else ["--below", 1, "--to", tmp_path / "rv"]
    r = invoke(command, bad, "--images", tree, *extra)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith(f"Error: {bad} is not an output of batchcls run or watch ("), r.output
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "rv").exists()


@pytest.mark.parametrize("name, header", [
    ("l.csv", columns_for(3, model_label=True, known_score=True, prob_classes=["a/b", "label_2"])),
    ("l.csv", columns_for(1) + ["moved_to"]),  # a watch ledger with moves
    ("l.jsonl", columns_for(2, model_label=True)),
])
def test_every_header_batchcls_writes_is_accepted_with_no_rows(tmp_path, name, header):
    w = RowWriter(str(tmp_path / name), fmt=name.split(".")[1], columns=header)
    w.write([{"path": "gone.jpg", "label": "", "confidence": None, "status": "error", "error": "gone"}])
    w.close()
    r = invoke("report", tmp_path / name, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    empty = tmp_path / "empty.csv"
    w = RowWriter(str(empty), columns=header)  # a run over nothing: header only
    w.close()
    assert invoke("report", empty, "--out", tmp_path / "e.html").exit_code == 0


# --- 20,000 rows --------------------------------------------------------------------------------

BIG = 20_000


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """20,000 rows naming 20,000 different files that are links to 40 real photos."""
    root = tmp_path_factory.mktemp("big")
    images = root / "images"
    samples = sorted(SAMPLES.glob("*/*.jpg"))
    labels = ["bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson"]
    writer = RowWriter(str(root / "labels.csv"), columns=columns_for(1))
    rows = []
    for i in range(BIG):
        folder = images / f"d{i // 1000:02d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        name = f"img_{i:05d}.jpg"
        os.symlink(samples[i % len(samples)], folder / name)
        rows.append({"path": f"{folder.name}/{name}", "label": labels[i % 4], "confidence": (i * 7919 % 1000) / 1000,
                     "status": "ok", "error": ""})
    writer.write(rows)
    writer.close()
    return root / "labels.csv", images


@pytest.mark.slow
def test_20000_rows_make_a_lean_page_and_reuse_the_cache(big):
    labels, images = big
    out = labels.parent / "report.html"
    first = build_report(labels, out, images=images, workers=2)
    assert first.rows == BIG and first.thumbs_made == 40  # one thumbnail per distinct file, not per row
    assert first.html_bytes < 300 * BIG, first.html_bytes  # ~6 MB at most: no inlined images
    again = build_report(labels, out, images=images, workers=2)
    assert (again.thumbs_made, again.thumbs_cached) == (0, 40)
    page = Page(out.read_text(encoding="utf-8"))
    assert page.count("figure") == page.count("img", loading="lazy") == BIG


# --- in a real browser --------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, profile: Path) -> None:
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()

        def wire():  # in the child: the protocol expects its pipes on fds 3 and 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id, self.events = b"", 0, []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=self.session)

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 120) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def open(self, url: str, timeout: float = 120) -> None:
        """Navigate and wait for the load event; a dialog (which would block loading) is noted and dismissed."""
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=self.session)
        deadline = time.monotonic() + timeout
        seen = 0
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            for e in self.events[seen:]:
                if e.get("method") == "Page.javascriptDialogOpening":
                    self.send("Page.handleJavaScriptDialog", {"accept": True}, session=self.session)
            seen = len(self.events)
            if not any(e.get("method") == "Page.loadEventFired" for e in self.events):
                self.events.append(self._next(deadline))

    def js(self, expression: str, timeout: float = 120):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session=self.session, timeout=timeout)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def screenshot(self, url: str, width: int, path: Path, height: int = 1100) -> None:
        """The page as a phone or desktop browser of this width lays it out, saved as PNG."""
        import base64
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                          "mobile": width < 600}, session=self.session)
        self.open(url)
        self.js(LOAD_ALL)
        png = self.send("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        path.write_bytes(base64.b64decode(png))

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions, failed loads, CSP violations and dialogs so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {p['args']}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails']}")
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
            elif m == "Page.javascriptDialogOpening":
                out.append(f"dialog: {p['message']}")
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=30)
        except (EOFError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


# Make every lazy thumbnail load now and report how many decoded to a real picture.
LOAD_ALL = """Promise.all([...document.images].map(i => { i.loading = 'eager';
  return i.complete ? i.decode().catch(() => 0) : new Promise(r => { i.onload = i.onerror = r; }); }))
  .then(() => [...document.images].filter(i => i.complete && i.naturalWidth > 0).length)"""


@needs_chromium
def test_the_harness_sees_console_errors(browser, tmp_path):
    """A page with a broken image, a console error and an alert: the checks below are not vacuous."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><img src="missing.jpg"><script>console.error("boom"); alert(1)</script>')
    browser.open(page.as_uri())
    found = " | ".join(browser.problems())
    assert "boom" in found and "dialog" in found and "missing.jpg" in found, found


@needs_chromium
def test_report_in_headless_chromium(browser, report, labels):
    ok = [r for r in read_rows(labels) if r["status"] == "ok"]
    browser.open(report.as_uri())
    assert browser.js("document.querySelectorAll('section.label').length") == len({r["label"] for r in ok})
    assert browser.js("document.querySelectorAll('section.label figure').length") == len(ok)
    assert browser.js("document.querySelectorAll('section.label img').length") == len(ok)
    assert browser.js("document.querySelectorAll('#errors tr').length") == 1 + 1  # header + broken.jpg
    # The hostile name is a caption's text, and no element came out of it.
    captions = browser.js("[...document.querySelectorAll('figcaption')]"
                          ".map(f => f.textContent.slice(f.firstChild.textContent.length))")
    assert EVIL in captions and "javascript:alert(1).jpg" in captions
    assert browser.js("[...document.images].filter(i => i.getAttribute('src') === 'x').length") == 0
    assert browser.js(LOAD_ALL) == len(ok)
    assert browser.problems() == []


@needs_chromium
@pytest.mark.slow
def test_20000_row_report_opens_in_chromium(browser, big):
    labels, images = big
    out = labels.parent / "report.html"
    build_report(labels, out, images=images, workers=2)
    browser.open(out.as_uri(), timeout=300)
    assert browser.js("document.querySelectorAll('figure').length") == BIG
    # Lazy loading: only thumbnails near the first screen are fetched, not 20,000.
    loaded = browser.js("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
    assert 0 < loaded < BIG // 10, loaded
    assert browser.problems() == []


REPO = SAMPLES.parent.parent
SCREENSHOTS = {1280: REPO / "docs" / "report-1280.png", 390: REPO / "docs" / "report-390.png"}

# Layout facts a person relies on, measured in the page itself.
LAYOUT = """(() => {
  const nav = document.querySelector('nav'), links = [...nav.querySelectorAll('a')];
  const caps = [...document.querySelectorAll('figcaption')];
  return {
    width: innerWidth, pageWidth: document.documentElement.scrollWidth,
    navLinks: links.length,
    linksOutside: links.filter(a => { const r = a.getBoundingClientRect();
                                      return r.left < 0 || r.right > innerWidth + 1; }).length,
    navRows: new Set(links.map(a => Math.round(a.offsetTop))).size,
    navScrollsToEnd: nav.scrollHeight <= nav.clientHeight || getComputedStyle(nav).overflowY === 'auto',
    navHeight: nav.getBoundingClientRect().height, viewport: innerHeight,
    overflowingCaptions: caps.filter(c => c.scrollWidth > c.clientWidth + 1).length,
    captionBreaks: caps.filter(c => c.querySelector('wbr')).length, captions: caps.length,
    histCounts: [...document.querySelectorAll('svg.hist text.n')].map(t => +t.textContent),
  };
})()"""


@pytest.fixture(scope="module")
def simpsons_run(tmp_path_factory) -> Path:
    """The shipped model on the committed sample frames, plus every class of its card as a label."""
    out = tmp_path_factory.mktemp("simpsons") / "labels.csv"
    assert invoke("run", SAMPLES, "--out", out, "--workers", 0).exit_code == 0
    return out


@pytest.fixture(scope="module")
def every_label(tmp_path_factory) -> Path:
    """42 labels (the shipped card's classes) on real frames, long names included: the nav's worst case."""
    from batchcls.card import load_card
    classes = load_card(None).classes
    samples = sorted(SAMPLES.glob("*/*.jpg"))
    out = tmp_path_factory.mktemp("labels42") / "labels.csv"
    rows = [{"path": str(samples[i % len(samples)].relative_to(SAMPLES)), "label": c,
             "confidence": 0.3 + 0.7 * ((i * 37) % 100) / 100, "status": "ok", "error": ""}
            for i, c in enumerate(classes)]
    w = RowWriter(str(out), columns=columns_for(1))
    w.write(rows)
    w.close()
    return out


@needs_chromium
@pytest.mark.parametrize("width", [1280, 390])
def test_report_layout_reachable_and_wrapping(browser, every_label, simpsons_run, tmp_path, width):
    page = tmp_path / "every.html"
    build_report(every_label, page, images=SAMPLES, workers=0)
    shot = tmp_path / "every.png"
    browser.screenshot(page.as_uri(), width, shot)
    m = browser.js(LAYOUT)
    assert m["width"] == width and m["pageWidth"] <= width, m  # nothing forces sideways scrolling
    assert m["navLinks"] == 1 + 42 and m["linksOutside"] == 0, m  # every label reachable, none off screen
    assert m["navRows"] > 1 and m["navScrollsToEnd"] and m["navHeight"] <= m["viewport"] / 2, m
    assert m["overflowingCaptions"] == 0 and m["captionBreaks"] == m["captions"] == 42, m
    assert sum(m["histCounts"]) == 42, m  # the histogram shows its counts
    assert browser.problems() == []
    with Image.open(shot) as im:
        assert im.width == width

    # The picture kept in docs/: the shipped model's real output on the sample frames at this width.
    real = tmp_path / "report.html"
    build_report(simpsons_run, real, images=SAMPLES, workers=0)
    shot = tmp_path / f"report-{width}.png"
    browser.screenshot(real.as_uri(), width, shot)
    assert sum(browser.js(LAYOUT)["histCounts"]) == len(read_rows(simpsons_run))
    with Image.open(shot) as im:
        assert im.width == width and len(set(im.convert("L").resize((64, 64)).tobytes())) > 20  # not blank
    if os.environ.get("BATCHCLS_UPDATE_SCREENSHOTS"):
        shutil.copy(shot, SCREENSHOTS[width])
    assert SCREENSHOTS[width].is_file(), f"run scripts/report_screenshot.sh to keep {SCREENSHOTS[width]}"


# --- review -------------------------------------------------------------------------------------


def test_review_copies_low_confidence_images_into_label_folders(labels, tree, tmp_path):
    to = tmp_path / "review"
    r = invoke("review", labels, "--images", tree, "--below", 0.6, "--to", to)
    assert r.exit_code == 0, r.output
    rows = [x for x in read_rows(labels) if x["status"] == "ok" and float(x["confidence"]) < 0.6]
    assert rows, "the colour model should be unsure about some photos"
    placed = sorted(p.relative_to(to).as_posix() for p in to.rglob("*") if p.is_file() and p.name != "_manifest.csv")
    assert len(placed) == len(rows)
    assert {p.split("/")[0] for p in placed} == {x["label"] for x in rows}
    manifest = read_rows(to / "_manifest.csv")
    assert [float(m["confidence"]) for m in manifest] == sorted(float(m["confidence"]) for m in manifest)
    for m in manifest:  # each placed file is the row's image, byte for byte
        assert (to / m["file"]).read_bytes() == (tree / m["path"]).read_bytes()
    assert f"{len(rows)} rows to review: {len(rows)} placed" in r.output
    again = invoke("review", labels, "--images", tree, "--below", 0.6, "--to", to)
    assert f"0 placed in {to}, {len(rows)} already there" in again.output
    assert not list(to.rglob("*~2*"))


def _rows_csv(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    w = RowWriter(str(path), columns=columns_for(1))
    w.write([{"path": p, "label": lab, "confidence": c, "status": "ok", "error": ""} for p, lab, c in rows])
    w.close()
    return path


def test_review_never_overwrites_a_name_clash(tree, tmp_path):
    labels = _rows_csv(tmp_path / "l.csv", [("a/same.jpg", "red", 0.3), ("b/same.jpg", "red", 0.4)])
    s = review(labels, tmp_path / "rv", below=0.5, images=tree)
    assert (s.placed, s.already) == (2, 0)
    assert (tmp_path / "rv/red/same.jpg").read_bytes() == (tree / "a/same.jpg").read_bytes()
    assert (tmp_path / "rv/red/same~2.jpg").read_bytes() == (tree / "b/same.jpg").read_bytes()
    assert review(labels, tmp_path / "rv", below=0.5, images=tree).already == 2


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_review_links_instead_of_copying(tree, tmp_path, link):
    labels = _rows_csv(tmp_path / "l.csv", [("a/same.jpg", "red", 0.3)])
    r = invoke("review", labels, "--images", tree, "--below", 0.5, "--to", tmp_path / "rv", "--link", link)
    assert r.exit_code == 0, r.output
    dest = tmp_path / "rv/red/same.jpg"
    assert dest.is_symlink() == (link == "symlink") and os.path.samefile(dest, tree / "a/same.jpg")


def test_review_keeps_hostile_labels_inside_the_folder_and_errors_apart(labels, tree, tmp_path):
    hostile = _rows_csv(tmp_path / "l.csv", [("a/same.jpg", "../escape", 0.1), ("b/same.jpg", "..", 0.2)])
    s = review(hostile, tmp_path / "rv", below=0.5, images=tree)
    assert set(s.labels) == {"%2E.%2Fescape", "%2E."} and not (tmp_path / "escape").exists()
    s = review(labels, tmp_path / "rv2", below=0.0, images=tree, errors=True)
    assert (s.selected, s.placed) == (1, 1) and (tmp_path / "rv2/_errors/broken.jpg").exists()



def test_review_keeps_labels_that_share_a_safe_name_apart(tree, tmp_path):
    """'a/b' and 'a_b', a class called 'unknown' beside rows the model declined, a class called '_errors'
    beside the error rows: each its own folder, and the manifest says which row each file came from."""
    columns = columns_for(1, model_label=True)
    w = RowWriter(str(tmp_path / "l.csv"), columns=columns)
    picks = {"a/same.jpg": ("a/b", "a/b"), "b/same.jpg": ("a_b", "a_b"), EVIL: ("unknown", "unknown"),
             "javascript:alert(1).jpg": ("unknown", "a_b"), "=1+2.jpg": ("_errors", "_errors")}
    w.write([{"path": p, "label": lab, "model_label": model, "confidence": 0.3, "status": "ok", "error": ""}
             for p, (lab, model) in picks.items()]
            + [{"path": "broken.jpg", "label": "", "model_label": "", "confidence": None, "status": "error",
                "error": "not a recognised image"}])
    w.close()
    s = review(tmp_path / "l.csv", tmp_path / "rv", below=0.5, images=tree, errors=True)
    assert s.labels == {"a%2Fb": 1, "a_b": 1, "%75nknown": 1, "unknown": 1, "%5Ferrors": 1, "_errors": 1}
    placed = {m["file"]: (m["path"], m["label"]) for m in read_rows(tmp_path / "rv" / "_manifest.csv")}
    assert placed == {"a%2Fb/same.jpg": ("a/same.jpg", "a/b"), "a_b/same.jpg": ("b/same.jpg", "a_b"),
                      f"%75nknown/{EVIL}": (EVIL, "unknown"), "unknown/javascript:alert(1).jpg":
                      ("javascript:alert(1).jpg", "unknown"), "%5Ferrors/=1+2.jpg": ("=1+2.jpg", "_errors"),
                      "_errors/broken.jpg": ("broken.jpg", "")}
    for file, (path, _) in placed.items():
        assert (tmp_path / "rv" / file).read_bytes() == (tree / path).read_bytes()

def test_review_reports_missing_images(labels, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("review", labels, "--below", 1.0, "--to", tmp_path / "rv")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output  # none found: the wrong --images
    assert "none of the 16 images" in r.output and "not found" not in r.output and "pass --images" in r.output
    assert not (tmp_path / "rv").exists()


def test_a_row_whose_file_no_longer_decodes_shows_the_reason(tree, tmp_path):
    labels = _rows_csv(tmp_path / "l.csv", [("broken.jpg", "red", 0.3), ("a/same.jpg", "red", float("nan"))])
    s = build_report(labels, tmp_path / "r.html", images=tree, workers=0)
    assert (s.thumbs_made, s.thumbs_failed) == (1, 1)
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert page.count("img") == 1 and "not a recognised image" in (tmp_path / "r.html").read_text()
    assert page.captions[0].startswith("-") and page.captions[0].endswith("a/same.jpg")  # unreadable first


# --- the thumbnail cache is ours alone ------------------------------------------------------------


@pytest.mark.parametrize("link", ["r_files", "r_files/thumbs"])
def test_a_planted_symlink_for_the_thumbnail_cache_is_refused_and_nothing_it_points_at_is_deleted(
        labels, tree, tmp_path, link):
    victim = tmp_path / "victim"
    victim.mkdir()
    planted = {"x.tmp": b"a temp file of someone else", "0123456789abcdef01234567.jpg": b"a photo", "keep.txt": b"t"}
    for name, data in planted.items():
        (victim / name).write_bytes(data)
    (tmp_path / "site").mkdir()
    if link == "r_files/thumbs":
        (tmp_path / "site" / "r_files").mkdir()
    os.symlink(victim, tmp_path / "site" / link)
    r = invoke("report", labels, "--images", tree, "--out", tmp_path / "site" / "r.html", "--workers", 0)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "is a symlink" in r.output and "remove the link" in r.output
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == planted  # nothing written, nothing deleted
    assert not (tmp_path / "site" / "r.html").exists()


def test_the_prune_removes_only_stale_entries_of_the_real_folder(labels, tree, tmp_path):
    out = tmp_path / "r.html"
    build_report(labels, out, images=tree, workers=0)
    thumbs = files_dir(out) / "thumbs"
    stale, temp, other = thumbs / "0123456789abcdef01234567.jpg", thumbs / ".x.jpg.1.ab.tmp", thumbs / "notes.txt"
    for p in (stale, temp, other):
        p.write_bytes(b"x")
    (thumbs / "abcdefabcdefabcdefabcdef.jpg").mkdir()  # a folder under a thumbnail's name is not ours to remove
    again = build_report(labels, out, images=tree, workers=0)
    assert (again.thumbs_made, again.thumbs_cached) == (0, 16)
    assert not stale.exists() and not temp.exists() and other.exists()
    assert (thumbs / "abcdefabcdefabcdefabcdef.jpg").is_dir()


# --- thumbnails in worker processes: the decode stage's rules -------------------------------------


def start_report(tmp_path: Path, n: int = 400) -> tuple[subprocess.Popen, Path]:
    """`batchcls report` over ``n`` distinct large PNGs with 2 workers, in its own process group as a
    terminal starts it; returns once the first thumbnails are on disk (the workers are busy)."""
    images = tmp_path / "images"
    images.mkdir()
    yy, xx = np.mgrid[0:1500, 0:1500]
    pattern = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(pattern).save(images / "0000.png")
    for i in range(1, n):  # copies: a new inode each, so a thumbnail each
        shutil.copy(images / "0000.png", images / f"{i:04d}.png")
    labels = _rows_csv(tmp_path / "labels.csv", [(f"{i:04d}.png", "red", 0.5) for i in range(n)])
    out = tmp_path / "r.html"
    proc = subprocess.Popen([sys.executable, "-m", "batchcls.cli", "report", str(labels), "--images", str(images),
                             "--out", str(out), "--workers", "2"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    thumbs = files_dir(out) / "thumbs"
    wait_for(lambda: proc.poll() is not None or (thumbs.is_dir() and any(thumbs.glob("*.jpg"))),
             "the first thumbnails", timeout=60)
    assert proc.poll() is None, "the report finished before the test could act on it: make it longer"
    return proc, out


def test_ctrl_c_of_report_is_one_line_and_rc_130_with_no_worker_left(tmp_path):
    proc, out = start_report(tmp_path)
    assert len(group_members(proc.pid)) >= 3  # the CLI and its two thumbnail workers (+ any helper process)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process in the group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip() == "Error: interrupted", err
    wait_for(lambda: not group_members(proc.pid), "no process of the report left")
    assert not out.exists()


def test_kill_9_of_report_leaves_no_worker_behind(tmp_path):
    proc, _ = start_report(tmp_path)
    members = group_members(proc.pid)
    assert len(members) >= 3, members
    proc.kill()  # the parent only: its workers must notice on their own
    proc.wait()
    proc.stderr.close()  # not read: a worker that outlived the parent would hold it open
    wait_for(lambda: not group_members(proc.pid), f"the report's processes {members} to exit", timeout=15)
