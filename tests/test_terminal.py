"""Every user-facing command, run the way people meet it: in a real terminal, progress bar on.

Checks the exit code and what the screen shows, that Ctrl-C (0x03 typed into the terminal, so SIGINT to
the whole foreground process group) gives one line and rc 130 with no traceback from any process, that
`--resume` then finishes with each file exactly once, and that no process of ours outlives a command.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from procs import session_members
from terminal import Terminal, run_in_terminal

from batchcls.output import read_rows

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "simpsons"
N_SAMPLES = len(list(SAMPLES.glob("*/*.jpg")))


def assert_no_survivors(term: Terminal, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := session_members(term.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the command: {left}"


def assert_clean_screen(screen: str) -> None:
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen


@pytest.fixture
def samples(tmp_path) -> Path:
    dst = tmp_path / "images"
    shutil.copytree(SAMPLES, dst)
    return dst


@pytest.fixture
def many(tmp_path) -> Path:
    """1,200 real frames (hard links to the samples): long enough to interrupt mid-run."""
    root = tmp_path / "many"
    sources = sorted(SAMPLES.glob("*/*.jpg"))
    for i in range(30):
        d = root / f"part{i:02d}"
        d.mkdir(parents=True)
        for src in sources:
            dst = d / f"{src.parent.name}-{src.name}"
            try:
                os.link(src, dst)
            except OSError:  # another filesystem
                shutil.copy(src, dst)
    return root


def test_run_shows_progress_and_summary(samples, tmp_path):
    out = tmp_path / "labels.csv"
    term = Terminal("batchcls", "run", samples, "--out", out, cwd=tmp_path)
    rc = term.wait()
    assert rc == 0, term.screen
    assert_clean_screen(term.screen)
    assert "classifying" in term.screen  # the tqdm bar was drawn on the terminal
    assert f"classified {N_SAMPLES} files (0 errors)" in term.screen
    assert len(read_rows(out)) == N_SAMPLES
    assert not Path(f"{out}.partial").exists()
    assert_no_survivors(term)


def test_ctrl_c_is_one_line_and_resume_finishes_exactly_once(many, tmp_path):
    out = tmp_path / "labels.csv"
    n = len(list(many.rglob("*.jpg")))
    term = Terminal("batchcls", "run", many, "--out", out, "--batch-size", "16", "--workers", "2", cwd=tmp_path)
    term.expect(r"classifying:\s+\d+%?\|?.*?\b([1-9]\d+)\b", timeout=120)  # some rows are done
    term.ctrl_c()
    rc = term.wait()
    assert rc == 130, term.screen
    assert_clean_screen(term.screen)
    errors = [line for line in term.screen.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--resume" in errors[0], term.screen
    assert_no_survivors(term)
    partial = Path(f"{out}.partial")
    assert partial.exists() and not out.exists()

    term = Terminal("batchcls", "run", many, "--out", out, "--resume", "--batch-size", "16", cwd=tmp_path)
    assert term.wait(timeout=300) == 0, term.screen
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == n == len(set(paths))
    assert all(r["status"] == "ok" for r in rows)


def test_eval_in_a_terminal(tmp_path):
    rc, screen = run_in_terminal("batchcls", "eval", SAMPLES, cwd=tmp_path)
    assert rc == 0, screen
    assert_clean_screen(screen)
    assert "macro" in screen.lower() and "accuracy" in screen.lower()


def test_info_in_a_terminal(tmp_path):
    rc, screen = run_in_terminal("batchcls", "info", cwd=tmp_path)
    assert rc == 0, screen
    heads = [x for x in screen.splitlines() if x.strip() and not x.startswith(" ")]  # the class list wraps
    assert "42: abraham_grampa_simpson" in screen and "input:" in screen and len(heads) <= 14, screen
    rc, screen = run_in_terminal("batchcls", "info", "--json", cwd=tmp_path)
    assert rc == 0 and "homer_simpson" in screen and '"input_size": 160' in screen, screen


def test_report_and_review_in_a_terminal(samples, tmp_path):
    out = tmp_path / "labels.csv"
    assert run_in_terminal("batchcls", "run", samples, "--out", out, cwd=tmp_path)[0] == 0
    rc, screen = run_in_terminal("batchcls", "report", out, "--images", samples, "--out", tmp_path / "r.html",
                                 cwd=tmp_path)
    assert rc == 0, screen
    assert_clean_screen(screen)
    assert (tmp_path / "r.html").stat().st_size > 1000
    rc, screen = run_in_terminal("batchcls", "review", out, "--images", samples, "--below", "1.0",
                                 "--to", tmp_path / "review", cwd=tmp_path)
    assert rc == 0, screen
    assert_clean_screen(screen)
    assert len(list((tmp_path / "review").rglob("*.jpg"))) == N_SAMPLES


def test_watch_in_a_terminal_stops_on_ctrl_c(samples, tmp_path):
    inbox, ledger = tmp_path / "inbox", tmp_path / "ledger.csv"
    inbox.mkdir()
    term = Terminal("batchcls", "watch", inbox, "--out", ledger, "--stable-seconds", "0.5", cwd=tmp_path)
    term.expect(r"watching", timeout=60)
    for src in sorted(samples.glob("*/*.jpg"))[:3]:
        shutil.copy(src, inbox / src.name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not ledger.exists() or len(read_rows(ledger)) < 3):
        time.sleep(0.2)
    assert len(read_rows(ledger)) == 3, term.screen
    term.ctrl_c()
    rc = term.wait()
    assert rc in (0, 130), term.screen
    assert_clean_screen(term.screen)
    assert_no_survivors(term)


def test_engine_build_in_a_terminal(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("card.json", "model.onnx"):
        shutil.copy(REPO / "engines" / "simpsons" / name, bundle / name)
    rc, screen = run_in_terminal("batchcls", "engine", "build", "--model", bundle, "--target", "cpu",
                                 "--val-dir", SAMPLES, "--calib-dir", SAMPLES, "--calib-images", "16",
                                 cwd=tmp_path, timeout=400)
    assert rc == 0, screen
    assert_clean_screen(screen)
    assert "built" in screen and "engine" in screen


def test_usage_errors_are_one_line(samples, tmp_path):
    out = tmp_path / "labels.csv"
    rc, screen = run_in_terminal("batchcls", "run", tmp_path / "no-such-folder", "--out", out, cwd=tmp_path)
    assert rc == 1 and screen.strip().count("\n") == 0 and "does not exist" in screen, screen
    assert not out.exists() and not Path(f"{out}.partial").exists()
    rc, screen = run_in_terminal("batchcls", "run", samples, "--out", out, "--resume", "--overwrite", cwd=tmp_path)
    assert rc == 2 and "contradict" in screen, screen


def test_closed_pipe_ends_quietly(samples, tmp_path):
    """`batchcls run DIR --out - | head -3`: like cat, no error when the reader goes away."""
    r, w = os.pipe()
    term = Terminal("batchcls", "run", samples, "--out", "-", "--batch-size", "4", cwd=tmp_path, stdout=w)
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        head = [reader.readline() for _ in range(3)]
    rc = term.wait()
    assert head[0].startswith(b"path,label,confidence"), head
    assert rc in (0, 141), term.screen
    assert "Error" not in term.screen and "Broken pipe" not in term.screen, term.screen
    assert_clean_screen(term.screen)
    assert_no_survivors(term)


def test_ctrl_c_during_eval_is_one_line(many, tmp_path):
    term = Terminal("batchcls", "eval", many, "--batch-size", "8", cwd=tmp_path)
    term.expect(r"evaluating:\s+\d+%\|.*?\b([1-9]\d*)/1200\b", timeout=120)  # classifying, some done
    term.ctrl_c()
    rc = term.wait()
    assert rc == 130, term.screen
    assert_clean_screen(term.screen)
    last = [line for line in term.screen.splitlines() if line.strip()][-1]
    assert last.endswith("Error: interrupted"), term.screen  # after the terminal's own echo of ^C
    assert_no_survivors(term)


def test_run_progress_has_a_total_and_an_eta(many, tmp_path):
    """The files are streamed, yet the bar knows how many there are (counted beside the run): %, n/total, ETA."""
    term = Terminal("batchcls", "run", many, "--out", tmp_path / "labels.csv", "--batch-size", "16", cwd=tmp_path)
    term.expect(r"classifying:\s+\d+%\|[^|]*\|\s*[1-9]\d*/1200 \[\d\d:\d\d<\d\d:\d\d", timeout=180)
    term.ctrl_c()
    assert term.wait() == 130, term.screen
    assert_clean_screen(term.screen)
    assert_no_survivors(term)


def test_resumed_run_counts_only_what_is_left(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for src in sorted(SAMPLES.glob("*/*.jpg")):
        (flat / f"{src.parent.name}-{src.name}").write_bytes(src.read_bytes())
    names = sorted(p.name for p in flat.iterdir())
    (tmp_path / "first.txt").write_text("".join(f"{n}\n" for n in names[:10]))
    out = tmp_path / "labels.csv"
    rc, screen = run_in_terminal("batchcls", "run", "--files-from", tmp_path / "first.txt", "--out", out, cwd=flat)
    assert rc == 0, screen
    rc, screen = run_in_terminal("batchcls", "run", ".", "--out", out, "--resume", "--batch-size", "4", cwd=flat)
    assert rc == 0, screen
    left = N_SAMPLES - 10
    assert f"{left}/{left}" in screen and f"/{N_SAMPLES}" not in screen, screen
    assert len(read_rows(out)) == N_SAMPLES


def test_eval_shows_progress_and_quiet_hides_it(tmp_path):
    rc, screen = run_in_terminal("batchcls", "eval", SAMPLES, "--batch-size", "8", cwd=tmp_path)
    assert rc == 0, screen
    assert_clean_screen(screen)
    assert "evaluating: 100%" in screen and f"{N_SAMPLES}/{N_SAMPLES}" in screen and "accuracy" in screen, screen
    rc, screen = run_in_terminal("batchcls", "eval", SAMPLES, "--batch-size", "8", "--quiet", cwd=tmp_path)
    assert rc == 0 and "evaluating" not in screen and "accuracy" in screen, screen
