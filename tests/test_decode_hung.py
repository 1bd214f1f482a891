"""A file whose read never returns (a hung NFS, SMB or FUSE mount) costs that file one error row, on every path
that decodes: in-process (a run smaller than one batch, --workers 0, the API), in decode workers, and the other
files of its batch still decode. Ctrl-C and kill -9 end a run that waits on it.

The hung mount is real: ``hung_mount.HungMount``, a FUSE file system that never answers the OPEN of stuck.jpg or
the READ of slow.jpg (so a process waiting on them is beyond Ctrl-C, and after the server took the request beyond
kill -9, until the mount is aborted). Skipped where FUSE cannot be mounted (not root, no /dev/fuse).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import REPO, tiny_jpeg
from hung_mount import HungMount
from procs import wait_for

from batchcls.output import read_rows
from batchcls.reader import NotRegular, TooLarge, read_file

GOOD = [f"good{i:02d}.jpg" for i in range(10)]
HUNG = {"stuck.jpg": "its open", "slow.jpg": "its read"}
STALL_S = 2.0


@pytest.fixture
def mount(tmp_path):
    """The mount point, and a list to put started processes in: they are ended after the mount is aborted."""
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(GOOD + list(HUNG)):
        (src / name).write_bytes(tiny_jpeg(i))
    try:
        m = HungMount(tmp_path / "mnt", src, hang_open=["stuck.jpg"], hang_read=["slow.jpg"])
    except PermissionError as e:
        pytest.skip(f"no FUSE mount here: {e}")
    procs: list[subprocess.Popen] = []
    try:
        yield m.mountpoint, procs
    finally:
        m.close()  # first: a process stuck on the mount can only end once its requests fail
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def start(procs: list, *args: str | os.PathLike, stall: float = STALL_S) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "batchcls.cli", *map(os.fspath, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "BATCHCLS_READ_STALL_S": str(stall)})
    procs.append(proc)
    return proc


def ended(proc: subprocess.Popen, timeout: float) -> int:
    """Its exit status, or a failure after ``timeout`` without waiting on it (it may be unkillable)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"still running after {timeout:.0f} s: stuck on the hung mount")
        time.sleep(0.05)
    return proc.returncode


def only_the_hung_files_failed(out: Path) -> None:
    rows = {r["path"]: r for r in read_rows(out)}
    assert sorted(rows) == sorted(GOOD + list(HUNG))
    for name in GOOD:
        assert rows[name]["status"] == "ok", rows[name]
    for name in HUNG:
        assert rows[name]["status"] == "error" and rows[name]["error"].startswith("read stalled: no data for 2 s"), \
            rows[name]


@pytest.mark.parametrize("how", [["--workers", "0"], [], ["--workers", "2", "--batch-size", "4"]],
                         ids=["workers 0", "smaller than a batch", "in decode workers"])
def test_a_hung_file_is_one_error_row_and_the_run_ends(mount, tmp_path, colour_bundle, how):
    mnt, procs = mount
    out = tmp_path / "labels.csv"
    proc = start(procs, "run", mnt, "--out", out, "--model", colour_bundle, *how)
    assert ended(proc, 60) == 0, proc.stderr.read()
    only_the_hung_files_failed(out)


@pytest.mark.parametrize("signals, stall", [([signal.SIGINT, signal.SIGINT], 600), ([signal.SIGKILL], 600),
                                            ([signal.SIGTERM], 3)], ids=["ctrl-c twice", "kill -9", "sigterm"])
def test_a_run_waiting_on_a_hung_file_can_be_stopped(mount, tmp_path, colour_bundle, signals, stall):
    """A second Ctrl-C (the user insisting) and kill -9 end it at once; one Ctrl-C or SIGTERM stops at the next
    batch, which comes once the stuck file is given up."""
    mnt, procs = mount
    out = tmp_path / "labels.csv"
    proc = start(procs, "run", mnt, "--out", out, "--model", colour_bundle, "--workers", "0", "--batch-size", "1",
                 stall=stall)
    partial = tmp_path / "labels.csv.partial"
    # The header and all good rows but the last, which waits on the look-ahead's decode of slow.jpg (the first
    # hung file in name order).
    wait_for(lambda: partial.exists() and partial.read_bytes().count(b"\n") == len(GOOD), "the good rows",
             timeout=60)
    time.sleep(0.5)
    for sig in signals:
        os.kill(proc.pid, sig)
        time.sleep(0.3)
    code = ended(proc, 15 + (stall if signals == [signal.SIGTERM] else 0))
    assert code == (-9 if signals == [signal.SIGKILL] else 130), proc.stderr.read()


def test_the_api_gives_a_hung_file_its_error_row(mount, colour_bundle):
    mnt, procs = mount
    script = ("import sys, batchcls; m = batchcls.load(sys.argv[1]); "
              "print([(r['status'], r['error'][:12]) for r in m.predict(sys.argv[2:])])")
    proc = subprocess.Popen([sys.executable, "-c", script, colour_bundle, mnt / "stuck.jpg", mnt / "good00.jpg"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BATCHCLS_READ_STALL_S": str(STALL_S)})
    procs.append(proc)
    assert ended(proc, 60) == 0, proc.stderr.read()
    assert proc.stdout.read().strip() == "[('error', 'read stalled'), ('ok', '')]"


# --- the reader alone ---------------------------------------------------------------------------------

def test_the_reader_gives_bytes_and_the_reasons_of_open(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 3_000_000)  # several chunks
    assert read_file(tmp_path / "a.bin", limit=3_000_000) == b"x" * 3_000_000
    with pytest.raises(TooLarge):
        read_file(tmp_path / "a.bin", limit=2_999_999)
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "gone.jpg", limit=100)
    os.mkfifo(tmp_path / "fifo.jpg")  # no writer ever: opened without waiting, and not read
    with pytest.raises(NotRegular):
        read_file(tmp_path / "fifo.jpg", limit=100)
    with pytest.raises(NotRegular):
        read_file(tmp_path, limit=100)
    assert read_file(tmp_path / "a.bin", limit=3_000_000)[:3] == b"xxx"  # the helper still serves


def test_a_killed_reader_is_replaced(tmp_path):
    from batchcls.reader import _Helper

    (tmp_path / "a.bin").write_bytes(b"abc")
    assert read_file(tmp_path / "a.bin", limit=10) == b"abc"
    helper = _Helper.current()
    helper.proc.kill()
    helper.proc.wait()
    assert read_file(tmp_path / "a.bin", limit=10) == b"abc"
    assert _Helper.current() is not helper
