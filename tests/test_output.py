"""Output files and the file-system primitives under them: name escaping, crash repair, the one-writer lock,
atomic writes, safe names and confined paths. Real files in tmp_path; other processes where a lock is judged."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchcls.errors import OutputError
from batchcls.fsutil import FileLock, LockHeld, atomic_open, atomic_write, confined, lock_path, open_long, safe_name
from batchcls.output import (
    CsvFormat,
    JsonlFormat,
    RowWriter,
    columns_for,
    csv_records,
    decode_name,
    encode_name,
    read_rows,
    repair,
    unescape_cell,
)

HOSTILE = ["plain.jpg", "new\nline.jpg", "cr\rname.jpg", "crlf\r\nboth.jpg", os.fsdecode(b"latin1-\xe9t\xe9.jpg"),
           os.fsdecode(b"\xff\xfe\x80.jpg"), "back\\slash\\x80.jpg", "=SUM(A1).jpg", "'quoted.jpg", '"dq",.jpg',
           "caf\u00e9.jpg", "line\u2028sep\x85nel.jpg", "tab\tname.jpg", "x" * 251 + ".jpg", "\\"]


def _rows(names):
    return [{"path": n, "label": "red", "confidence": 0.25 + i / 100, "status": "ok", "error": ""}
            for i, n in enumerate(names)]


def _resume_and_add(out, name: str) -> None:
    """--resume after a cut: the complete rows are done, the cut one is written again, the file reads back whole."""
    w = RowWriter(str(out), columns=columns_for(1), resume=True)
    assert w.done == {"a.jpg"}
    w.write(_rows([name]))
    w.close()
    assert [r["path"] for r in read_rows(out)] == ["a.jpg", name]


@pytest.mark.parametrize("name", HOSTILE)
def test_name_escape_round_trips_and_is_utf8(name):
    text = encode_name(name)
    text.encode("utf-8")  # strict: every format can hold it
    assert decode_name(text) == name
    assert os.fsencode(decode_name(text)) == os.fsencode(name)


def test_name_escape_is_the_documented_one():
    assert encode_name(os.fsdecode(b"a\xffb")) == "a\\xffb"
    assert encode_name("a\\b") == "a\\\\b"
    assert encode_name("new\nline\r") == "new\nline\r"  # written as themselves; CSV quotes them
    assert decode_name("C:\\photos\\a.jpg") == "C:\\photos\\a.jpg"  # a lone backslash stays a backslash


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_reader_parses_hostile_names_in_every_format(tmp_path, fmt):
    pd = pytest.importorskip("pandas")
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"labels.{fmt}"
    w = RowWriter(str(out), fmt=fmt, columns=columns_for(1))
    w.write(_rows(HOSTILE))
    w.close()
    assert [r["path"] for r in read_rows(out)] == HOSTILE
    frame = {"csv": pd.read_csv, "jsonl": lambda p: pd.read_json(p, lines=True), "parquet": pd.read_parquet}[fmt](out)
    cells = [unescape_cell(p) if fmt == "csv" else p for p in frame["path"]]
    assert [decode_name(c) for c in cells] == HOSTILE
    if fmt == "csv":
        with open(out, newline="", encoding="utf-8") as fh:  # strict UTF-8: the file is valid text
            got = [decode_name(unescape_cell(r["path"])) for r in csv.DictReader(fh)]
        assert got == HOSTILE
    elif fmt == "jsonl":
        out.read_bytes().decode("utf-8")  # strict: valid text


@pytest.mark.parametrize("fmt", [CsvFormat, JsonlFormat])
def test_every_crash_prefix_is_repaired_to_the_last_whole_row(tmp_path, fmt):
    """A crash can leave any prefix of the bytes; repair must keep exactly the rows whose bytes are all there."""
    suffix = fmt.suffix
    out = tmp_path / f"full{suffix}"
    w = RowWriter(str(out), fmt=suffix[1:], columns=columns_for(1))
    w.write(_rows(HOSTILE))
    w.close()
    data = out.read_bytes()
    ends = [0] + ([e for _, e in csv_records(data)] if fmt is CsvFormat
                  else [i + 1 for i, b in enumerate(data) if b == ord("\n")])
    cut = tmp_path / f"cut{suffix}.partial"
    for k in range(len(data) + 1):
        cut.write_bytes(data[:k])
        repair(cut, fmt)
        assert cut.read_bytes() == data[:max(e for e in ends if e <= k)], k


def test_a_cut_inside_a_quoted_newline_is_not_taken_for_a_row_end(tmp_path):
    out = tmp_path / "o.csv"
    w = RowWriter(str(out), columns=columns_for(1))
    w.write(_rows(["a.jpg", "two\nlines.jpg"]))
    w.close()
    data = out.read_bytes()
    inside = data.index(b"two\n") + 4  # just after the newline inside the quotes
    partial = tmp_path / "o.csv.partial"
    out.unlink()
    partial.write_bytes(data[:inside])
    _resume_and_add(out, "two\nlines.jpg")


def test_nothing_is_created_before_the_first_row(tmp_path):
    out = tmp_path / "labels.csv"
    w = RowWriter(str(out), columns=columns_for(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".labels.csv.lock"]
    w.close(complete=False)  # a run that failed at start
    assert list(tmp_path.iterdir()) == []
    w = RowWriter(str(out), columns=columns_for(1))  # the corrected command is not refused
    w.close()
    assert out.read_bytes() == b"path,label,confidence,status,error\r\n"  # a run with no rows: header only


def test_a_writer_dropped_without_close_lets_go(tmp_path):
    out = tmp_path / "labels.csv"
    w = RowWriter(str(out), columns=columns_for(1))
    del w
    assert list(tmp_path.iterdir()) == []
    RowWriter(str(out), columns=columns_for(1)).close()


def test_overwrite_deletes_nothing_until_the_first_row(tmp_path):
    out = tmp_path / "labels.csv"
    out.write_text("path,label,confidence,status,error\r\nold.jpg,red,0.5,ok,\r\n")
    w = RowWriter(str(out), columns=columns_for(1), overwrite=True)
    w.close(complete=False)
    assert "old.jpg" in out.read_text()
    w = RowWriter(str(out), columns=columns_for(1), overwrite=True)
    w.write(_rows(["new.jpg"]))
    w.close()
    assert [r["path"] for r in read_rows(out)] == ["new.jpg"]


HOLD = """
import sys, time
from batchcls.output import RowWriter, columns_for
w = RowWriter(sys.argv[1], columns=columns_for(1), resume=True, in_place=sys.argv[2] == "1")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("in_place", [False, True])
def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, in_place):
    out = tmp_path / "labels.csv"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "1" if in_place else "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for kw in ({}, {"resume": True}, {"overwrite": True}, {"resume": True, "in_place": True}):
            with pytest.raises(OutputError, match=f"another batchcls process \\(PID {holder.pid}\\)"):
                RowWriter(str(out), columns=columns_for(1), **kw)
    finally:
        holder.kill()
        holder.wait()
    # kill -9 leaves the lock file, but the kernel dropped the lock: the next writer goes ahead
    assert lock_path(out).exists()
    RowWriter(str(out), columns=columns_for(1), resume=True).close()


def test_two_writers_in_one_process_are_refused_too(tmp_path):
    out = tmp_path / "labels.csv"
    w = RowWriter(str(out), columns=columns_for(1))
    with pytest.raises(OutputError, match=f"PID {os.getpid()}"):
        RowWriter(str(out), columns=columns_for(1), overwrite=True)
    w.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_ledger_deleted_or_replaced_under_the_writer_stops_it(tmp_path, how):
    out = tmp_path / "labels.csv"
    w = RowWriter(str(out), columns=columns_for(1), resume=True, in_place=True)
    w.write(_rows(["a.jpg"]))
    if how == "deleted":
        out.unlink()
    else:
        out.with_name("other").write_text("path,label,confidence,status,error\r\n")
        os.replace(out.with_name("other"), out)
    with pytest.raises(OutputError, match=f"{how}"):
        w.write(_rows(["b.jpg"]))
    w.close()


def test_parquet_resume_merges_by_path_after_a_crash_in_finalize(tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "labels.parquet"
    w = RowWriter(str(out), fmt="parquet", columns=columns_for(1))
    w.write(_rows(["a.jpg", "b.jpg"]))
    w.close()
    # The state a crash between writing OUT and removing OUT.partial leaves: rows in both.
    Path(str(out) + ".partial").write_text(JsonlFormat.render(_rows(["b.jpg", "c.jpg"]), columns_for(1)))
    w = RowWriter(str(out), fmt="parquet", columns=columns_for(1), resume=True)
    assert w.done == {"a.jpg", "b.jpg", "c.jpg"}
    w.write([{"path": "d.jpg", "label": "", "confidence": None, "status": "error", "error": "corrupt"}])
    w.close()
    assert [r["path"] for r in read_rows(out)] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


class _FillsUp:
    """The file a full disk gives: it takes ``room`` more bytes, then refuses with ENOSPC."""

    def __init__(self, fh, room):
        self.fh, self.room = fh, room

    def write(self, data):
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        n = self.fh.write(data[:self.room])
        self.room -= n
        return n

    def fileno(self):
        return self.fh.fileno()

    def close(self):
        self.fh.close()


def test_a_full_disk_mid_row_is_one_error_and_resume_repairs_it(tmp_path):
    out = tmp_path / "labels.csv"
    w = RowWriter(str(out), columns=columns_for(1))
    w.write(_rows(["a.jpg"]))
    w.fh = _FillsUp(w.fh, 12)  # room for 12 bytes of the next row: it is cut inside the quoted newline
    with pytest.raises(OutputError, match="No space left on device.*--resume"):
        w.write(_rows(["bb\nbbbbbbbbbbbbbbbbbbbbbbbbb.jpg"]))
    w.close(complete=False)
    _resume_and_add(out, "bb\nbbbbbbbbbbbbbbbbbbbbbbbbb.jpg")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "card.json"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]
    os.umask(old := os.umask(0o022))
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o666 & ~old


def test_lock_release_and_reacquire(tmp_path):
    a, b = FileLock(tmp_path / ".x.lock"), FileLock(tmp_path / ".x.lock")
    a.acquire()
    with pytest.raises(LockHeld) as e:
        b.acquire()
    assert e.value.pid == os.getpid()
    a.release()
    assert not (tmp_path / ".x.lock").exists()
    with b:
        assert b.held


@pytest.mark.parametrize("label, want", [
    ("homer_simpson", "homer_simpson"), ("../../etc", "%2E.%2F..%2Fetc"), ("..", "%2E."), (".", "%2E"), ("", "%"),
    ("a/b\\c\0d", "a%2Fb%5Cc%00d"), ("new\nline", "new%0Aline"), ("  spaced  ", "%20 spaced %20"),
    ("a_b", "a_b"), ("a%2Fb", "a%252Fb"), ("\udcff", "%ED%B3%BF"),
])
def test_safe_name(label, want):
    assert safe_name(label) == want


def test_safe_name_is_one_component_and_one_to_one():
    labels = ["a/b", "a_b", "a%2Fb", "a\\b", ".a", "%2Ea", " a", "a ", "a", "", "%", "..", ".", "é" * 200,
              "é" * 199 + "e", "x" * 300, "x" * 299 + "y", "new\nline", "\0"]
    names = [safe_name(label) for label in labels]
    assert len(set(names)) == len(labels), names
    for name in names:
        assert "/" not in name and name not in (".", "..") and not name.startswith(".")
        assert 0 < len(name.encode()) <= 255 and name == name.strip()


@pytest.mark.parametrize("rel, ok", [
    ("a.jpg", True), ("sub/a.jpg", True), ("sub/../a.jpg", True), ("../a.jpg", False), ("../../../../etc/passwd", False),
    ("/etc/shadow", False), ("", False), (".", False), ("a\0b", False), ("sub/../../x", False),
])
def test_confined(tmp_path, rel, ok):
    got = confined(tmp_path, rel)
    assert (got is not None) == ok
    if ok:
        assert got.startswith(str(tmp_path) + "/")
    assert confined(tmp_path, str(tmp_path / "in.jpg")) == str(tmp_path / "in.jpg")  # absolute but inside


def test_open_long_reads_past_path_max(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    parts = []
    for _ in range(24):  # 24 x 201 bytes: past PATH_MAX (4096)
        os.mkdir("d" * 200, dir_fd=fd)
        nxt = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        parts.append("d" * 200)
    f = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(f, b"deep")
    os.close(f)
    os.close(fd)
    path = "/".join([str(tmp_path), *parts, "deep.jpg"])
    assert len(path) > 4096
    with pytest.raises(OSError):
        open(path, "rb")
    fd = open_long(path, os.O_RDONLY)
    assert os.read(fd, 10) == b"deep"
    os.close(fd)


def test_a_ledger_deleted_before_the_first_new_row_stops_the_writer(tmp_path):
    out = tmp_path / "labels.csv"
    w = RowWriter(str(out), columns=columns_for(1), resume=True, in_place=True)
    w.write(_rows(["a.jpg"]))
    w.close()
    w = RowWriter(str(out), columns=columns_for(1), resume=True, in_place=True)  # a restarted daemon
    assert w.done == {"a.jpg"}
    out.unlink()  # its rows are what w.done says is labelled: a fresh file would silently lose them
    with pytest.raises(OutputError, match="deleted or replaced"):
        w.write(_rows(["b.jpg"]))
    w.close(complete=False)
