"""The watch daemon with a real observer on real folders, real images and real ONNX Runtime.

No fixed sleeps for results: every wait is on a condition with a deadline. The only sleeps are
a slow writer's own pauses, which are the behaviour under test.
"""
import contextlib
import io
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from bundles import make_colour_bundle
from click.testing import CliRunner
from PIL import Image
from procs import wait_for

from batchcls.cli import cli
from batchcls.decode_stage import WORKER_FLAG
from batchcls.errors import OutputError
from batchcls.output import RowWriter, columns_for, read_rows
from batchcls.pipeline import RunOptions
from batchcls.scan import InputFile
from batchcls.watch import WatchConfig, Watcher, is_temporary, move_into
from batchcls.watch.arrivals import Arrivals, Scope
from batchcls.watch.events import Event, Kind
from batchcls.watch.ledger import Ledger

COLOURS = {"red": (230, 10, 10), "green": (10, 220, 10), "blue": (10, 10, 240)}
DEADLINE = 30.0


def jpeg(colour: str, size=(40, 30), noise: bool = False) -> bytes:
    if noise:  # big, incompressible enough that a slow writer needs several chunks
        rng = np.random.default_rng(0)
        arr = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8))
    else:
        img = Image.new("RGB", size, COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def rows(out: Path) -> list[dict]:
    return read_rows(out) if out.exists() else []


def paths(out: Path) -> list[str]:
    return [r["path"] for r in rows(out)]


def has_rows(out: Path, *names: str):
    return lambda: set(names) <= set(paths(out))


@pytest.fixture
def inbox(tmp_path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


@pytest.fixture
def daemon(tmp_path, colour_bundle):
    """Start an in-process daemon on a folder; stopped (batch finished, ledger closed) on exit."""
    @contextmanager
    def start(folder: Path, **kw):
        kw.setdefault("options", RunOptions(workers=0, batch_size=16))
        kw.setdefault("stable_s", 0.3)
        kw.setdefault("max_wait_s", 0.05)
        w = Watcher(WatchConfig(folder=str(folder), out=str(tmp_path / "labels.csv"), model=str(colour_bundle), **kw))
        with w:
            yield w
    return start


# --- arrival rules, with a fake clock (no observer, no threads) -----------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def arrivals(*, close_events: bool, done=(), batch_size: int = 3):
    clock = FakeClock()
    return Arrivals(done=set(done), close_events=close_events, stable_s=2.0, close_grace_s=30.0, max_wait_s=0.25,
                    batch_size=batch_size, clock=clock), clock


def names(files) -> list[str]:
    return [f.rel for f in files]


def test_a_close_or_a_move_is_ready_at_once_and_batches_after_max_wait(tmp_path):
    a, clock = arrivals(close_events=True)
    for n in ("a.jpg", "b.jpg"):
        (tmp_path / n).write_bytes(b"x" * 10)
    a.on_event(Event(Kind.CLOSED, str(tmp_path / "a.jpg")), "a.jpg")
    a.on_event(Event(Kind.MOVED, str(tmp_path / "b.jpg")), "b.jpg")
    assert a.take(block=False) == []  # a partial batch waits max_wait_s for more arrivals
    clock.t += 0.3
    assert names(a.take(block=False)) == ["a.jpg", "b.jpg"]
    assert a.waiting() == {"a.jpg", "b.jpg"}  # in flight until their rows are written
    a.finished(["a.jpg", "b.jpg"])
    assert a.waiting() == set()


def test_a_full_batch_is_due_without_waiting(tmp_path):
    a, _ = arrivals(close_events=True, batch_size=2)
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / n).write_bytes(b"x")
        a.on_event(Event(Kind.MOVED, str(tmp_path / n)), n)
    assert names(a.take(block=False)) == ["a.jpg", "b.jpg"]
    assert a.take(block=False) == []  # c waits for company or for max_wait_s


def test_without_close_events_a_file_is_ready_once_stable(tmp_path):
    a, clock = arrivals(close_events=False)
    f = tmp_path / "slow.jpg"
    f.write_bytes(b"x" * 10)
    a.on_event(Event(Kind.CREATED, str(f)), "slow.jpg")
    a.check()  # first look: size and mtime noted
    clock.t += 1.9
    a.check()
    assert a.waiting() == {"slow.jpg"} and a.take(block=False) == []
    with open(f, "ab") as fh:  # still being written: the wait starts again
        fh.write(b"more")
    a.check()
    clock.t += 1.9
    a.check()
    clock.t += 0.3
    assert a.take(block=False) == []
    clock.t += 0.1  # 2.0 s unchanged since the write was seen
    a.check()
    clock.t += 0.3
    assert names(a.take(block=False)) == ["slow.jpg"]


def test_with_close_events_a_created_file_waits_for_its_close_or_the_grace(tmp_path):
    a, clock = arrivals(close_events=True)
    f, empty = tmp_path / "a.jpg", tmp_path / "empty.jpg"
    f.write_bytes(b"x")
    empty.write_bytes(b"")
    a.on_event(Event(Kind.CREATED, str(f)), "a.jpg")
    a.on_event(Event(Kind.CLOSED, str(empty)), "empty.jpg")  # a 0-byte close: often create-then-write
    a.check()
    clock.t += 29.0
    a.check()
    clock.t += 0.3
    assert a.take(block=False) == []  # stable_s (2 s) is not enough: a close was expected
    clock.t += 1.0
    a.check()
    clock.t += 0.3
    assert sorted(names(a.take(block=False))) == ["a.jpg", "empty.jpg"]


def test_labelled_or_deleted_files_are_never_ready(tmp_path):
    a, clock = arrivals(close_events=True, done={"old.jpg"})
    for n in ("old.jpg", "gone.jpg", "sub/x.jpg"):
        (tmp_path / n).parent.mkdir(exist_ok=True)
        (tmp_path / n).write_bytes(b"x")
    assert a.watch("old.jpg", str(tmp_path / "old.jpg"), 2.0) is False
    a.on_event(Event(Kind.MOVED, str(tmp_path / "old.jpg")), "old.jpg")  # already in the ledger
    a.on_event(Event(Kind.CREATED, str(tmp_path / "gone.jpg")), "gone.jpg")
    a.on_event(Event(Kind.MOVED, str(tmp_path / "sub/x.jpg")), "sub/x.jpg")
    a.forget("gone.jpg")
    a.forget("sub")  # a folder moved away takes its files with it
    clock.t += 60
    a.check()
    assert a.take(block=False) == [] and a.waiting() == set()


def test_scope_decides_what_is_an_input(tmp_path):
    root = str(tmp_path)
    scope = Scope(root, recursive=True, excluded_files={f"{root}/labels.csv"}, excluded_dirs=[f"{root}/sorted"])
    assert scope.rel(f"{root}/a.jpg") == "a.jpg" and scope.rel(f"{root}/sub/b.jpg") == "sub/b.jpg"
    for path in ("labels.csv", "sorted/red/a.jpg", "x.jpg.part", ".hidden/a.jpg", "a.tmp", "../outside.jpg"):
        assert scope.rel(f"{root}/{path}") is None, path
    assert Scope(root, recursive=False).rel(f"{root}/sub/b.jpg") is None


def test_catch_up_then_live_arrivals_once_each_across_restarts(inbox, tmp_path, daemon):
    out = tmp_path / "labels.csv"
    for name, colour in [("a.jpg", "red"), ("sub/b.jpg", "green"), ("c.jpg", "blue")]:
        (inbox / name).parent.mkdir(exist_ok=True)
        (inbox / name).write_bytes(jpeg(colour))
    with daemon(inbox):
        wait_for(has_rows(out, "a.jpg", "sub/b.jpg", "c.jpg"), "catch-up rows")
        (inbox / "sub" / "d.jpg").write_bytes(jpeg("blue"))
        (inbox / "new").mkdir()
        (inbox / "new" / "e.jpg").write_bytes(jpeg("red"))
        wait_for(has_rows(out, "sub/d.jpg", "new/e.jpg"), "live rows")
    (inbox / "f.jpg").write_bytes(jpeg("green"))  # arrives while the daemon is down
    with daemon(inbox) as w:
        wait_for(has_rows(out, "f.jpg"), "the file that arrived while stopped")
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    got = {r["path"]: (r["label"], r["status"]) for r in rows(out)}
    assert got == {"a.jpg": ("red", "ok"), "sub/b.jpg": ("green", "ok"), "c.jpg": ("blue", "ok"),
                   "sub/d.jpg": ("blue", "ok"), "new/e.jpg": ("red", "ok"), "f.jpg": ("green", "ok")}
    assert len(paths(out)) == len(got)  # exactly once each
    assert list(rows(out)[0]) == columns_for(1)  # the same schema as `batchcls run`


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_file_written_slowly_in_chunks_is_labelled_once_complete(inbox, tmp_path, daemon, polling):
    out = tmp_path / "labels.csv"
    data = jpeg("green", size=(400, 300), noise=True)
    chunks = [data[i:i + len(data) // 6 + 1] for i in range(0, len(data), len(data) // 6 + 1)]
    with daemon(inbox, polling=polling, poll_interval_s=0.1, stable_s=1.0):
        with open(inbox / "slow.jpg", "wb") as fh:
            for chunk in chunks:  # the writer pauses (each pause < stable_s), holding the file open
                fh.write(chunk)
                fh.flush()
                time.sleep(0.15)
        wait_for(has_rows(out, "slow.jpg"), "the slow file's row")
    (row,) = rows(out)
    assert (row["path"], row["label"], row["status"]) == ("slow.jpg", "green", "ok")


def test_a_burst_of_1000_files_each_labelled_exactly_once(inbox, tmp_path, daemon):
    out = tmp_path / "labels.csv"
    names = list(COLOURS)
    tiny = {c: jpeg(c, size=(8, 8)) for c in names}
    with daemon(inbox, options=RunOptions(workers=2, batch_size=64)) as w:
        for i in range(1000):
            (inbox / f"{i:04d}.jpg").write_bytes(tiny[names[i % 3]])
        wait_for(lambda: len(paths(out)) >= 1000, "1,000 rows", timeout=45)
        wait_for(lambda: not w.waiting(), "nothing left waiting")
        assert w.stats.files == 1000 and w.stats.batches < 1000  # arrivals were batched
    got = rows(out)
    assert Counter(r["path"] for r in got) == Counter(f"{i:04d}.jpg" for i in range(1000))
    assert all(r["label"] == names[int(r["path"][:4]) % 3] for r in got)


def test_renames_and_moves_in_count_temporary_names_never(inbox, tmp_path, daemon):
    out = tmp_path / "labels.csv"
    outside = tmp_path / "staging"
    (outside / "album").mkdir(parents=True)
    with daemon(inbox):
        (inbox / "x.jpg.part").write_bytes(jpeg("red"))
        (inbox / ".hidden.jpg").write_bytes(jpeg("red"))
        (inbox / "upload.tmp").write_bytes(jpeg("red"))
        (inbox / "x.jpg.part").rename(inbox / "x.jpg")  # a download finishing
        (outside / "y.jpg").write_bytes(jpeg("blue"))
        (outside / "y.jpg").rename(inbox / "y.jpg")  # an atomic drop from elsewhere
        (outside / "album" / "z.jpg").write_bytes(jpeg("green"))
        (outside / "album").rename(inbox / "album")  # a whole folder moved in
        wait_for(has_rows(out, "x.jpg", "y.jpg", "album/z.jpg"), "renamed and moved-in files")
    assert sorted(paths(out)) == ["album/z.jpg", "x.jpg", "y.jpg"]
    assert {r["label"] for r in rows(out)} == {"red", "blue", "green"}
    assert [is_temporary(n) for n in ("a.part", "a.tmp", ".a.jpg", "a.jpg", "a~", "a.crdownload")] == \
        [True, True, True, False, True, True]


def test_a_file_deleted_before_processing_gets_no_row(inbox, tmp_path, daemon):
    out = tmp_path / "labels.csv"
    with daemon(inbox) as w:
        fh = open(inbox / "doomed.jpg", "wb")
        fh.write(jpeg("red")[:100])  # still being written: seen, but not ready
        wait_for(lambda: "doomed.jpg" in w.waiting(), "the daemon to see the new file")
        os.unlink(inbox / "doomed.jpg")
        fh.close()
        (inbox / "sentinel.jpg").write_bytes(jpeg("blue"))
        wait_for(has_rows(out, "sentinel.jpg"), "the sentinel")
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    assert paths(out) == ["sentinel.jpg"]


def test_corrupt_files_error_rows_and_moves_without_overwrite(inbox, tmp_path, daemon):
    out, sorted_, errors = tmp_path / "labels.csv", tmp_path / "sorted", tmp_path / "errors"
    (sorted_ / "red").mkdir(parents=True)
    (sorted_ / "red" / "a.jpg").write_bytes(b"an older file with the same name")
    with daemon(inbox, move_to=str(sorted_), errors_to=str(errors)) as w:
        (inbox / "a.jpg").write_bytes(jpeg("red"))
        (inbox / "garbage.jpg").write_bytes(b"this is not an image at all")
        (inbox / "cut.jpg").write_bytes(jpeg("blue", size=(200, 200), noise=True)[:1500])
        (inbox / "notes.txt").write_text("hello")
        wait_for(has_rows(out, "a.jpg", "garbage.jpg", "cut.jpg", "notes.txt"), "rows for all four")
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    got = {r["path"]: r for r in rows(out)}
    assert got["a.jpg"]["status"] == "ok" and got["a.jpg"]["label"] == "red"
    for name in ("garbage.jpg", "cut.jpg", "notes.txt"):
        assert got[name]["status"] == "error" and got[name]["error"], got[name]
        assert (errors / name).is_file()
    assert "not a recognised image" in got["garbage.jpg"]["error"]
    assert (sorted_ / "red" / "a.jpg").read_bytes() == b"an older file with the same name"
    assert (sorted_ / "red" / "a-1.jpg").read_bytes() == jpeg("red")
    assert list(inbox.iterdir()) == []


def test_ledger_and_move_targets_inside_the_folder_are_not_inputs(inbox, tmp_path, colour_bundle):
    out = inbox / "labels.csv"
    cfg = dict(folder=str(inbox), out=str(out), model=str(colour_bundle), stable_s=0.3, max_wait_s=0.05,
               move_to=str(inbox / "sorted"), errors_to=str(inbox / "failed"), options=RunOptions(workers=0))
    (inbox / "a.jpg").write_bytes(jpeg("red"))
    for _ in range(2):  # the second start scans everything again, sorted/ and failed/ included
        with Watcher(WatchConfig(**cfg)) as w:
            (inbox / f"sentinel{_}.txt").write_text("not an image")
            wait_for(has_rows(out, "a.jpg", f"sentinel{_}.txt"), "the rows")
            wait_for(lambda: not w.waiting(), "nothing left waiting")
    assert sorted(paths(out)) == ["a.jpg", "sentinel0.txt", "sentinel1.txt"]
    assert (inbox / "sorted" / "red" / "a.jpg").is_file() and (inbox / "failed" / "sentinel1.txt").is_file()



def test_move_to_keeps_classes_that_share_a_safe_name_apart(inbox, tmp_path):
    """Classes 'a/b' and 'a_b', and a class called '_errors' beside the rows the model declines (--threshold):
    four folders, each file in its own row's. (A class called 'unknown' is refused at load.)"""
    bundle = make_colour_bundle(tmp_path / "clash", classes=["a/b", "a_b", "_errors"])
    out, sorted_ = tmp_path / "labels.csv", tmp_path / "sorted"
    cfg = WatchConfig(folder=str(inbox), out=str(out), model=str(bundle), move_to=str(sorted_), stable_s=0.3,
                      max_wait_s=0.05, options=RunOptions(workers=0, threshold=0.5))
    with Watcher(cfg) as w:
        for name, colour in [("r.jpg", "red"), ("g.jpg", "green"), ("b.jpg", "blue")]:
            (inbox / name).write_bytes(jpeg(colour))
        Image.new("RGB", (40, 30), (128, 128, 128)).save(inbox / "grey.png")  # no colour wins: declined
        wait_for(has_rows(out, "r.jpg", "g.jpg", "b.jpg", "grey.png"), "four rows")
        wait_for(lambda: not w.waiting() and not any(inbox.iterdir()), "every file moved")
    got = {r["path"]: (r["label"], r["model_label"]) for r in rows(out)}
    assert got == {"r.jpg": ("a/b", "a/b"), "g.jpg": ("a_b", "a_b"), "b.jpg": ("_errors", "_errors"),
                   "grey.png": ("unknown", "a/b")}
    placed = {p.relative_to(sorted_).as_posix() for p in sorted_.rglob("*") if p.is_file()}
    assert placed == {"a%2Fb/r.jpg", "a_b/g.jpg", "%5Ferrors/b.jpg", "unknown/grey.png"}
    assert {r["path"]: r["moved_to"] for r in rows(out)} == {name: f"sorted/{where}" for where in placed
                                                               for name in [where.split("/")[1]]}

def test_restart_finishes_cut_moves_and_relabels_a_cut_row(inbox, tmp_path, daemon):
    """The two states a kill -9 can leave behind, built exactly: a row whose move never happened,
    and a last row cut mid-write."""
    out, sorted_ = tmp_path / "labels.csv", tmp_path / "sorted"
    (inbox / "moved_not.jpg").write_bytes(jpeg("red"))
    (inbox / "cut_row.jpg").write_bytes(jpeg("green"))
    ledger = Ledger(str(out), fmt="csv", columns=columns_for(1))  # what the daemon does per batch, up to a kill -9:
    ledger.intend([InputFile(str(inbox / "moved_not.jpg"), "moved_not.jpg")])  # which file is to move
    ledger.write([{"path": "moved_not.jpg", "label": "red", "confidence": 0.9, "status": "ok", "error": ""}])
    ledger.close()  # ...and killed before the move
    with open(out, "a") as fh:
        fh.write("cut_row.jpg,gre")  # no newline: the daemon died mid-row
    with daemon(inbox, move_to=str(sorted_)) as w:
        wait_for(has_rows(out, "cut_row.jpg"), "the cut row redone")
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    assert sorted(paths(out)) == ["cut_row.jpg", "moved_not.jpg"]
    assert (sorted_ / "red" / "moved_not.jpg").is_file() and (sorted_ / "green" / "cut_row.jpg").is_file()
    assert list(inbox.iterdir()) == []
    assert "moved_to" not in rows(out)[0]  # a ledger started without the column goes on without it


def test_the_ledger_says_where_each_file_went_and_report_follows_it(inbox, tmp_path, daemon):
    """After moves (a name clash gives name-1.jpg) `report` used to find none of a watch ledger's images."""
    out, sorted_, failed = tmp_path / "labels.csv", tmp_path / "sorted", tmp_path / "failed"
    (sorted_ / "red").mkdir(parents=True)
    (sorted_ / "red" / "a.jpg").write_bytes(b"an older file with the same name")
    with daemon(inbox, move_to=str(sorted_), errors_to=str(failed)) as w:
        (inbox / "a.jpg").write_bytes(jpeg("red"))
        (inbox / "sub").mkdir()
        (inbox / "sub" / "b.jpg").write_bytes(jpeg("blue"))
        (inbox / "=bad.jpg").write_bytes(b"not an image")
        wait_for(has_rows(out, "a.jpg", "sub/b.jpg", "=bad.jpg"), "three rows")
        wait_for(lambda: not w.waiting() and not list(inbox.glob("*.jpg")), "every file moved")
    got = {r["path"]: r["moved_to"] for r in rows(out)}
    assert got == {"a.jpg": "sorted/red/a-1.jpg", "sub/b.jpg": "sorted/blue/b.jpg", "=bad.jpg": "failed/=bad.jpg"}
    for path, moved in got.items():
        assert (tmp_path / moved).is_file() and not (inbox / path).exists()
    assert (tmp_path / got["a.jpg"]).read_bytes() == jpeg("red")
    r = CliRunner().invoke(cli, ["report", str(out), "--images", str(inbox), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0 and "thumbnails: 2 made" in r.output and "not found" not in r.output, r.output
    page = (tmp_path / "r.html").read_text()
    assert 'href="sorted/red/a-1.jpg"' in page and 'href="failed/%3Dbad.jpg"' in page
    r = CliRunner().invoke(cli, ["review", str(out), "--images", str(inbox), "--below", "1", "--errors", "--to",
                                 str(tmp_path / "rv")])
    assert r.exit_code == 0 and "3 placed" in r.output, r.output
    assert (tmp_path / "rv" / "red" / "a-1.jpg").read_bytes() == jpeg("red")


def test_a_restart_finishes_a_cut_move_to_the_name_its_row_gives(inbox, tmp_path, daemon):
    out, sorted_ = tmp_path / "labels.csv", tmp_path / "sorted"
    (inbox / "x.jpg").write_bytes(jpeg("red"))
    ledger = Ledger(str(out), fmt="csv", columns=columns_for(1), moves=True)  # the daemon's batch, up to a kill -9:
    ledger.intend([InputFile(str(inbox / "x.jpg"), "x.jpg")])
    ledger.write([{"path": "x.jpg", "label": "red", "confidence": 0.9, "status": "ok", "error": "",
                   "moved_to": "sorted/red/x-3.jpg"}])  # the name planned then
    ledger.close()  # ...killed before the rename; meanwhile other files took the names before it
    (sorted_ / "red").mkdir(parents=True)
    (sorted_ / "red" / "x.jpg").write_bytes(b"another x.jpg")
    with daemon(inbox, move_to=str(sorted_)) as w:
        wait_for(lambda: not (inbox / "x.jpg").exists() and not w.waiting(), "the move finished")
    assert (sorted_ / "red" / "x-3.jpg").read_bytes() == jpeg("red") and paths(out) == ["x.jpg"]


@pytest.mark.parametrize("ledger", ["other options", "other columns", "not a ledger"])
def test_a_ledger_watch_cannot_continue_is_refused_with_advice_watch_can_follow(inbox, tmp_path, colour_bundle,
                                                                                 ledger):
    """The refusal used to advise --overwrite, --resume or --probs: options watch does not have."""
    out = tmp_path / "labels.csv"
    if ledger == "other options":
        (inbox / "a.jpg").write_bytes(jpeg("red"))
        r = CliRunner().invoke(cli, ["run", str(inbox), "--out", str(out), "--model", str(colour_bundle),
                                     "--threshold", "0.5"])
        assert r.exit_code == 0, r.output
    else:
        out.write_text("path,label,confidence,status,error,label_2,confidence_2\n" if ledger == "other columns"
                       else "hello\n")
    r = CliRunner().invoke(cli, ["watch", str(inbox), "--out", str(out), "--model", str(colour_bundle)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("Error: "), r.output
    watch_options = {p for param in cli.commands["watch"].params for p in param.opts + param.secondary_opts}
    advised = set(re.findall(r"--[a-z-]+", r.output.split(": ", 2)[-1]))
    assert advised <= watch_options, advised - watch_options
    assert "new --out" in r.output or "another --out" in r.output


def _decode_workers() -> list[int]:
    """The decode workers: children of this process with the worker flag on their command line."""
    out = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):  # exited meanwhile
                if WORKER_FLAG.encode() in Path(f"/proc/{child}/cmdline").read_bytes():
                    out.append(int(child))
    return out


def test_a_killed_decode_worker_costs_no_file(inbox, tmp_path, daemon, monkeypatch):
    # A SIGKILL can also leave a future pending instead of breaking the pool: the decode timeout
    # catches that case, shortened here so the test waits seconds, not a minute.
    monkeypatch.setattr("batchcls.decode_stage.DECODE_TIMEOUT_S", 15.0)  # a busy CI box restarts a pool in seconds
    out = tmp_path / "labels.csv"
    tiny = jpeg("green", size=(8, 8))
    with daemon(inbox, options=RunOptions(workers=1, batch_size=8)) as w:
        for i in range(100):
            (inbox / f"{i:03d}.jpg").write_bytes(tiny)
        wait_for(lambda: paths(out), "the first rows")
        victims = wait_for(_decode_workers, "a decode worker")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        for i in range(100, 200):
            (inbox / f"{i:03d}.jpg").write_bytes(tiny)
        wait_for(lambda: len(paths(out)) >= 200, "all 200 rows", timeout=60)
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    assert Counter(paths(out)) == Counter(f"{i:03d}.jpg" for i in range(200))
    assert {r["status"] for r in rows(out)} == {"ok"}


def test_a_stuck_decode_pool_is_replaced_not_waited_on(inbox, tmp_path, daemon, monkeypatch):
    # A worker SIGKILLed halfway through sending its result leaves the pool waiting forever (seen in CI):
    # the health check must give up after the decode timeout and start a fresh pool.
    monkeypatch.setattr("batchcls.decode_stage.DECODE_TIMEOUT_S", 1.0)
    with daemon(inbox, options=RunOptions(workers=1, batch_size=8)) as w:
        stuck = w.stage.pool
        stuck.submit(time.sleep, 600)  # its only worker never answers again
        start = time.monotonic()
        w.stage.restart()
        assert time.monotonic() - start < 10 and w.stage.pool is not stuck
        assert w.stage.pool.submit(os.getpid).result(timeout=30) > 0
        (inbox / "a.jpg").write_bytes(jpeg("green", size=(8, 8)))
        wait_for(has_rows(tmp_path / "labels.csv", "a.jpg"), "a row from the fresh pool")


def test_move_into_never_overwrites_and_finishes_a_half_done_link_move(tmp_path):
    src, dst_dir = tmp_path / "a.jpg", tmp_path / "out"
    src.write_bytes(b"one")
    dst_dir.mkdir()
    (dst_dir / "a.jpg").write_bytes(b"zero")
    assert move_into(str(src), dst_dir) == dst_dir / "a-1.jpg"
    assert (dst_dir / "a.jpg").read_bytes() == b"zero" and not src.exists()
    src.write_bytes(b"two")
    os.link(src, dst_dir / "a-2.jpg")  # killed between link() and unlink()
    assert move_into(str(src), dst_dir) == dst_dir / "a-2.jpg"
    assert not src.exists() and not (dst_dir / "a-3.jpg").exists()


def test_in_place_writer_keeps_out_valid_and_adopts_a_partial(tmp_path):
    out = tmp_path / "labels.csv"
    row = {"path": "a.jpg", "label": "red", "confidence": 0.5, "status": "ok", "error": ""}
    w = RowWriter(str(out), columns=columns_for(1), in_place=True)
    w.write([row])
    assert [r["path"] for r in read_rows(out)] == ["a.jpg"]  # readable while still open
    w.close()
    assert not out.with_name("labels.csv.partial").exists()
    os.replace(out, out.with_name("labels.csv.partial"))  # as an interrupted `batchcls run` leaves it
    w = RowWriter(str(out), columns=columns_for(1), resume=True, in_place=True)
    assert w.done == {"a.jpg"}
    w.close()
    out.with_name("labels.csv.partial").write_text("path,label,confidence,status,error\n")
    with pytest.raises(OutputError, match="both"):
        RowWriter(str(out), columns=columns_for(1), resume=True, in_place=True)
    with pytest.raises(OutputError, match="parquet"):
        RowWriter(str(tmp_path / "x.parquet"), fmt="parquet", columns=columns_for(1), in_place=True)


def test_cli_errors_are_one_line(inbox, tmp_path, colour_bundle):
    out = tmp_path / "labels.csv"
    out.write_text("path,label,confidence,status,error,label_2,confidence_2\n")
    r = CliRunner().invoke(cli, ["watch", str(inbox), "--out", str(out), "--model", str(colour_bundle)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "--top-k" in r.output
    r = CliRunner().invoke(cli, ["watch", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 1 and "does not exist" in r.output and r.output.count("\n") == 1



@pytest.mark.parametrize("flag", ["--move-to", "--errors-to"])
@pytest.mark.parametrize("where", ["inbox", "inbox/.", "parent", "root"])
def test_a_move_target_that_is_the_inbox_or_holds_it_is_refused_at_start(inbox, tmp_path, colour_bundle, flag, where):
    """The scope skips move targets, so such a daemon would say "watching" and label nothing, forever."""
    target = {"inbox": inbox, "inbox/.": f"{inbox}/.", "parent": inbox.parent, "root": "/"}[where]
    (inbox / "a.jpg").write_bytes(jpeg("red"))
    r = subprocess.run([sys.executable, "-m", "batchcls.cli", "watch", str(inbox), "--out", str(tmp_path / "l.csv"),
                        "--model", str(colour_bundle), flag, str(target)],
                       capture_output=True, text=True, timeout=DEADLINE * 2)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: {flag} {target} is the watched folder or holds it: nothing "
                                             "would ever be labelled; choose a folder outside it, or a sub-folder of it"]
    assert (inbox / "a.jpg").is_file() and not (tmp_path / "l.csv").exists()

# --- the real command in a real process: signals --------------------------------------------------

class Daemon:
    """`batchcls watch` as a subprocess, its stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        # Its own process group, as in a terminal: Ctrl-C reaches the decode workers too.
        self.proc = subprocess.Popen([sys.executable, "-m", "batchcls.cli", "watch", *args],
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_line("watching")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)

    def rest(self) -> list[str]:
        """Every line so far, once the daemon has exited."""
        while True:
            try:
                self.log.append(self.lines.get(timeout=1))
            except queue.Empty:
                return self.log

    def wait_for_line(self, text: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                assert self.proc.poll() is None, "daemon exited:\n" + "".join(self.log)
                continue
            self.log.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} line:\n" + "".join(self.log))


def watch_args(inbox, tmp_path, bundle):
    return [str(inbox), "--out", str(tmp_path / "labels.csv"), "--model", str(bundle),
            "--move-to", str(tmp_path / "sorted"), "--stable-seconds", "0.3", "--batch-size", "8", "--workers", "1"]



@pytest.mark.parametrize("polling, how", [(False, "deleted-then-made"), (False, "replaced"),
                                          (True, "deleted-then-made")])
def test_an_inbox_deleted_and_made_again_is_watched_again_at_once(inbox, tmp_path, colour_bundle, polling, how):
    """The observer's watch dies with the folder; the periodic re-scan (60 s) must not be what finds new files.
    (A polling observer that never saw the folder gone just lists the new one: nothing to notice there.)"""
    out = tmp_path / "labels.csv"
    d = Daemon(str(inbox), "--out", str(out), "--model", str(colour_bundle), "--stable-seconds", "0.3",
               "--workers", "0", *(["--polling"] if polling else []))
    try:
        _delete_and_make_again(d, inbox, out, how)
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    log = d.rest()
    assert sum("the watched folder" in line for line in log) == 1, "".join(log)  # one warning, not one per check
    assert {r["path"]: r["label"] for r in rows(out)} == {"a.jpg": "red", "b.jpg": "green", "c.jpg": "blue"}


def _delete_and_make_again(d: Daemon, inbox: Path, out: Path, how: str) -> None:
    (inbox / "a.jpg").write_bytes(jpeg("red"))
    wait_for(has_rows(out, "a.jpg"), "the first row")
    if how == "replaced":  # made again at once: the new folder may even get the old one's inode number
        shutil.rmtree(inbox)
        inbox.mkdir()
        d.wait_for_line("the watched folder")
    else:
        shutil.rmtree(inbox)
        d.wait_for_line(f"the watched folder {inbox} was deleted")
        inbox.mkdir()
    (inbox / "b.jpg").write_bytes(jpeg("green"))
    wait_for(has_rows(out, "b.jpg"), "the row of a file in the new folder", timeout=20)
    d.wait_for_line("watching")  # the new watch is set: live events again, not only a scan
    (inbox / "c.jpg").write_bytes(jpeg("blue"))
    wait_for(has_rows(out, "c.jpg"), "the row of a live arrival", timeout=20)

def test_sigterm_or_ctrl_c_finishes_the_batch_flushes_and_exits_0(inbox, tmp_path, colour_bundle):
    out = tmp_path / "labels.csv"
    d = Daemon(*watch_args(inbox, tmp_path, colour_bundle))
    for i in range(40):
        (inbox / f"{i:02d}.jpg").write_bytes(jpeg("blue", size=(8, 8)))
    wait_for(lambda: paths(out), "the first rows")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    assert out.read_text().endswith("\n")  # no half row
    labelled = set(paths(out))
    assert labelled and {p.name for p in (tmp_path / "sorted" / "blue").iterdir()} == labelled
    d = Daemon(*watch_args(inbox, tmp_path, colour_bundle))  # the rest on restart
    wait_for(lambda: len(paths(out)) >= 40, "all 40 rows")
    for i in range(40, 80):
        (inbox / f"{i:02d}.jpg").write_bytes(jpeg("blue", size=(8, 8)))
    wait_for(lambda: len(paths(out)) > 40, "rows of the second wave")
    os.killpg(d.proc.pid, signal.SIGINT)  # Ctrl-C: the whole group, decode workers included
    assert d.proc.wait(timeout=DEADLINE) == 0
    d = Daemon(*watch_args(inbox, tmp_path, colour_bundle))
    wait_for(lambda: len(paths(out)) >= 80, "all 80 rows")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    assert Counter(paths(out)) == Counter(f"{i:02d}.jpg" for i in range(80))
    assert {r["status"] for r in rows(out)} == {"ok"}  # no batch was broken by the signals


RACY_STOP = """
import os, signal, sys, threading, time
from batchcls.pipeline import RunOptions
from batchcls.watch import WatchConfig
from batchcls.watch.daemon import log_to_stderr, watch


class RacyEvent(threading.Event):
    \"\"\"A real Event whose first wait() takes the signal while it holds the Event's own lock: the
    instant at which CI once caught `watch` hanging after Ctrl-C (the handler called stop.set()).\"\"\"

    fired = False

    def wait(self, timeout=None):
        if not self.fired:
            self.fired = True
            with self._cond:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs here, in this thread, with the lock held
        return super().wait(timeout)


folder, out, model = sys.argv[1:4]
log_to_stderr()
watch(WatchConfig(folder=folder, out=out, model=model, options=RunOptions(workers=0)), stop=RacyEvent())
print("stopped")
"""


def test_a_signal_landing_inside_the_stop_wait_still_stops_the_daemon(inbox, tmp_path, colour_bundle):
    r = subprocess.run([sys.executable, "-c", RACY_STOP, str(inbox), str(tmp_path / "labels.csv"), str(colour_bundle)],
                       capture_output=True, text=True, timeout=DEADLINE * 2)
    assert r.returncode == 0 and r.stdout == "stopped\n", r.stderr
    assert "SIGINT: finishing the batch in flight" in r.stderr


def test_kill_9_of_watch_leaves_no_process_behind(inbox, tmp_path, colour_bundle):
    from test_decode_stage import group_members

    d = Daemon(*watch_args(inbox, tmp_path, colour_bundle))  # its own process group, as in a terminal
    (inbox / "a.jpg").write_bytes(jpeg("red"))
    wait_for(has_rows(tmp_path / "labels.csv", "a.jpg"), "a row")
    members = group_members(d.proc.pid)
    assert len(members) >= 2, members  # the daemon and its decode worker
    d.proc.kill()
    d.proc.wait()
    wait_for(lambda: not group_members(d.proc.pid), f"the daemon's processes {members} to exit", timeout=15)


def test_kill_9_at_any_moment_then_restart_loses_and_duplicates_nothing(inbox, tmp_path, colour_bundle):
    out, sorted_ = tmp_path / "labels.csv", tmp_path / "sorted"
    names = list(COLOURS)
    tiny = {c: jpeg(c, size=(8, 8)) for c in names}
    expected = {f"{i:03d}.jpg": names[i % 3] for i in range(300)}
    d = Daemon(*watch_args(inbox, tmp_path, colour_bundle))
    for i, name in enumerate(expected):
        (inbox / name).write_bytes(tiny[expected[name]])
        if i == 150:
            wait_for(lambda: paths(out), "the first rows")
            d.proc.kill()  # mid-stream: files still arriving, batches in flight
            d.proc.wait()
    d = Daemon(*watch_args(inbox, tmp_path, colour_bundle))
    wait_for(lambda: len(paths(out)) >= 200, "some rows after the restart")
    d.proc.kill()
    d.proc.wait()
    d = Daemon(*watch_args(inbox, tmp_path, colour_bundle))
    wait_for(lambda: len(paths(out)) >= 300 and not any(inbox.iterdir()), "every row and every move")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    assert Counter(paths(out)) == Counter(list(expected))
    assert {r["path"]: r["label"] for r in rows(out)} == expected
    placed = {p.name: p.parent.name for p in sorted_.glob("*/*")}
    assert placed == expected  # every file moved once, into its label's folder, none lost
