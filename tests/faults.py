"""Fault injectors shared by tests/test_faults.py and `make soak` (scripts/soak.py).

Each injector does something real to a real ``batchcls`` process or file (kill -9, a full tmpfs, a
second writer, a torn last row) and ``check_output`` says what, if anything, was lost: a file without
its row, a row twice, or a file that csv, pandas or ``read_rows`` can't parse.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = sorted((REPO / "samples" / "simpsons").glob("*/*.jpg"))
CLI = [sys.executable, "-m", "batchcls.cli"]

# Names a file system allows and a CSV/JSON/Parquet writer can trip on (bytes: some are not UTF-8).
HOSTILE = [b"plain.jpg", b"new\nline.jpg", b"cr\rname.jpg", b"crlf\r\nboth.jpg", b"\xff\xfe not utf8.jpg",
           b"latin1 caf\xe9.jpg", "caf\u00e9 \u00fcn\u00ef.jpg".encode(), b"back\\slash\\x41.jpg",
           b"=HYPERLINK(\"x\").jpg", b"'quote.jpg", b'"double", comma.jpg', b"tab\tname.jpg", b" lead space.jpg",
           b"-minus.jpg", b"x" * 251 + b".jpg", "line\u2028sep.jpg".encode()]


def tiny_jpeg(i: int, side: int = 48) -> bytes:
    """Sample frame i scaled down: a real photo that decodes in a millisecond."""
    buf = io.BytesIO()
    Image.open(SAMPLES[i % len(SAMPLES)]).convert("RGB").resize((side, side)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_tree(root: Path, *, copies: int = 1, names: list[bytes] = HOSTILE, extras: bool = True) -> set[str]:
    """Files named ``names`` (``copies`` folders of them) under root; returns the row paths a run must write.

    ``extras`` adds files that must become error rows: junk bytes, an empty file, a JPEG whose header
    promises 9000x9000 but holds 16x16 of data.
    """
    expected = set()
    broot = os.fsencode(root)
    os.makedirs(broot, exist_ok=True)
    for c in range(copies):
        folder = broot if c == 0 else broot + b"/copy%03d\nsub" % c
        os.makedirs(folder, exist_ok=True)
        for i, name in enumerate(names):
            with open(folder + b"/" + name, "wb") as fh:
                fh.write(tiny_jpeg(i + c))
            expected.add(os.fsdecode(os.path.relpath(folder + b"/" + name, broot)))
    if extras:
        lie = bytearray(tiny_jpeg(0, 16))
        sof = lie.find(b"\xff\xc0")
        lie[sof + 5:sof + 9] = (9000).to_bytes(2, "big") * 2
        for name, data in [(b"junk.jpg", b"not an image"), (b"empty.png", b""), (b"lie 9000x9000.jpg", bytes(lie))]:
            with open(broot + b"/" + name, "wb") as fh:
                fh.write(data)
            expected.add(os.fsdecode(name))
    return expected


def run_cli(*args: str | os.PathLike, timeout: float = 300, preexec: list[str] | None = None,
            **kw) -> subprocess.CompletedProcess:
    cmd = [*(preexec or []), *CLI, *map(os.fspath, args)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=REPO, **kw)


def start_cli(*args: str | os.PathLike) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(os.fspath, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)


def check_output(out: Path, expected: set[str], fmt: str = "csv") -> list[str]:
    """What was lost or broken in ``out`` (empty list: nothing); every reader must parse it."""
    from batchcls.output import decode_name, read_rows, unescape_cell

    problems = []
    if not out.exists():
        return [f"{out.name} does not exist"]
    for leftover in (out.with_name(out.name + ".partial"),):
        if leftover.exists():
            problems.append(f"{leftover.name} left behind")
    try:
        paths = [r["path"] for r in read_rows(out)]
    except Exception as e:  # any failure to read is the finding
        return problems + [f"read_rows failed: {type(e).__name__}: {e}"]
    dupes = len(paths) - len(set(paths))
    if dupes:
        problems.append(f"{dupes} duplicate rows")
    if missing := expected - set(paths):
        problems.append(f"{len(missing)} files without a row, e.g. {sorted(missing)[0]!r}")
    if extra := set(paths) - expected:
        problems.append(f"{len(extra)} rows for no input file, e.g. {sorted(extra)[0]!r}")
    try:  # csv / json with strict UTF-8: the file is plain valid text for any tool
        if fmt == "csv":
            with open(out, newline="", encoding="utf-8") as fh:
                cells = [r["path"] for r in csv.DictReader(fh)]
            cells = [unescape_cell(c) for c in cells]
        elif fmt == "jsonl":
            cells = [json.loads(line)["path"] for line in out.read_bytes().decode("utf-8").split("\n") if line]
        else:
            cells = None
        if cells is not None and sorted(decode_name(c) for c in cells) != sorted(paths):
            problems.append(f"the {fmt} module reads other paths than read_rows")
    except Exception as e:
        problems.append(f"{fmt} reader failed: {type(e).__name__}: {e}")
    try:
        import pandas as pd
    except ImportError:
        return problems
    try:
        frame = {"csv": pd.read_csv, "jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
                 "parquet": pd.read_parquet}[fmt](out)
        if len(frame) != len(paths):
            problems.append(f"pandas reads {len(frame)} rows, read_rows {len(paths)}")
    except Exception as e:
        problems.append(f"pandas failed: {type(e).__name__}: {e}")
    return problems


def check_embeddings(out: Path, emb: Path) -> list[str]:
    """What is wrong with an ``--embeddings`` sidecar beside a finished ``out`` (empty list: nothing): it must
    hold one vector per ok row, in row order, with the same paths, and no hole (a vector of zeros)."""
    from batchcls.embeddings import read_embeddings
    from batchcls.output import read_rows

    problems = [f"{p.name} left behind" for p in (emb.with_name(emb.name + ".partial"),
                                                  emb.with_name(emb.stem + ".paths.jsonl.partial")) if p.exists()]
    try:
        vectors, paths = read_embeddings(emb)
        ok = [r["path"] for r in read_rows(out) if r["status"] == "ok"]
    except Exception as e:  # any failure to read is the finding
        return problems + [f"read_embeddings failed: {type(e).__name__}: {e}"]
    if paths != ok:
        problems.append(f"its paths are not the ok rows ({len(paths)} paths, {len(ok)} ok rows)")
    if len(vectors) != len(paths):
        problems.append(f"{len(vectors)} vectors for {len(paths)} paths")
    if len(vectors) and not vectors.any(axis=1).all():
        problems.append(f"{int((~vectors.any(axis=1)).sum())} vectors are all zeros")
    return problems


def kill_rounds(args: list[str], rounds: int, rng: random.Random, span: float = 2.0) -> list[str]:
    """Start ``batchcls run ARGS`` (with --resume after the first), kill -9 it after a random delay, ``rounds``
    times; returns what each kill hit ('before any row', 'mid-run', 'finished first'). The delay's range
    follows how long a whole run takes, so kills land from start-up to the final rename: it shrinks to a run
    that finished first, and grows after a kill before any row (a slow or busy machine starts slowly)."""
    hits = []
    out = Path(args[args.index("--out") + 1])
    partial = out.with_name(out.name + ".partial")
    for i in range(rounds):
        proc = start_cli("run", *args, *(["--resume"] if i else []))
        t0 = time.monotonic()
        deadline = t0 + rng.uniform(0, span)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            hits.append("mid-run" if partial.exists() else "before any row")
            if hits[-1] == "before any row":
                span = min(2 * span, 60.0)
        else:
            proc.wait()
            err = proc.stderr.read().decode(errors="replace")
            if proc.returncode != 0:
                raise AssertionError(f"an unkilled run failed ({proc.returncode}): {err}")
            span = max(0.3, time.monotonic() - t0)
            hits.append("finished first")
        proc.stderr.close()
    return hits


def tear_last_rows(out: Path, rng: random.Random, fmt: str = "csv") -> int:
    """Turn a finished OUT into the OUT.partial a crash could leave: cut at a random byte of its last quarter
    (a torn write: part of a row, maybe inside a quoted newline). Returns the cut offset."""
    data = out.read_bytes()
    cut = rng.randrange(len(data) * 3 // 4, len(data))
    out.unlink()
    out.with_name(out.name + ".partial").write_bytes(data[:cut])
    return cut


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs at ``path`` (a full disk on demand); raises PermissionError where mounting isn't allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def wait_for_lock(out: Path, pid: int, timeout: float = 60) -> bool:
    """True once process ``pid`` holds OUT's lock (its PID is in the lock file)."""
    from batchcls.fsutil import lock_path

    lock, deadline = lock_path(out), time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(pid):
                return True
        time.sleep(0.01)
    return False


def watch_kill_round(work: Path, rng: random.Random, files: int = 12) -> list[str]:
    """A real `batchcls watch --move-to` daemon killed -9 at a random moment while files arrive (dropped by
    rename, as a camera or rsync does), then restarted until the inbox is empty. Returns what was lost:
    each file must have exactly one row and sit in sorted/<its row's label>/."""
    from batchcls.label_folders import label_folder
    from batchcls.output import read_rows

    inbox, sorted_, ledger = work / "inbox", work / "sorted", work / "ledger.csv"
    inbox.mkdir()
    names = [f"frame {i:03d}\n{'x' * rng.randint(0, 40)}.jpg" for i in range(files)]
    args = ["watch", inbox, "--out", ledger, "--move-to", sorted_, "--workers", "0", "--stable-seconds", "0.2",
            "--max-wait", "0.05", "-q"]
    proc = start_cli(*args)
    t0, kill_at = time.monotonic(), rng.uniform(0.5, 4.0)
    for i, name in enumerate(names):
        staged = work / f".staged{i}"
        staged.write_bytes(tiny_jpeg(i))
        os.replace(staged, inbox / name)  # complete on arrival
        time.sleep(rng.uniform(0, 0.15))
        if proc.poll() is None and time.monotonic() - t0 > kill_at:
            proc.send_signal(signal.SIGKILL)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    proc = start_cli(*args)  # the restart: catch-up, finish cut-short moves
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (any(inbox.iterdir()) or not ledger.exists()
                                                or len(read_rows(ledger)) < files):
            if proc.poll() is not None:
                return [f"the restarted daemon exited {proc.returncode}: {proc.stderr.read().decode()[-300:]}"]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stderr.close()
    problems = check_output(ledger, set(names))
    if problems:
        return problems
    for row in read_rows(ledger):
        where = sorted_ / label_folder(row) / row["path"]
        if row["status"] != "ok" or not where.is_file():
            problems.append(f"{row['path']!r} is not in sorted/{row['label']}/")
    if left := list(inbox.iterdir()):
        problems.append(f"{len(left)} files left in the inbox")
    return problems
