"""Write result rows as they are produced; finish the file atomically; resume without duplicates.

Rows go to ``OUT.partial`` (flushed per batch, so a crash loses at most the batches in flight)
and the finished file is moved into place with ``os.replace``. One table maps each ``--format``
to its writer.

Crash safety: any prefix of a file that a crash (kill -9, a full disk) can leave is repaired
exactly on ``--resume``: CSV by parsing records (a quoted name may hold a newline, so the last
newline is not a record boundary), JSON lines at the last newline (JSON escapes newlines). One
writer per output: ``.OUT.lock`` beside OUT is held (``fcntl.flock``) from before anything is
renamed or deleted until the file is finished. Nothing is created until the first row (or the end
of a run with no rows), so a command that fails at start leaves no file behind.

File names: a path is any byte string but CSV, JSON and Parquet hold text, so the ``path`` column
holds the name as UTF-8 with two escapes, identical in every format: each byte that is not valid
UTF-8 is written ``\\xNN`` (two lowercase hex digits) and a backslash is written ``\\\\``. Every
other character, newline and CR included, is written as itself (CSV quotes it). ``read_rows``
undoes the escapes, so its paths are the ``str`` that ``os.fsencode`` turns back into the original
bytes; ``decode_name`` does the same for a value read by pandas or csv.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from batchcls.errors import OutputError
from batchcls.fsutil import FileLock, LockHeld, atomic_path, fsync_dir, lock_path

BASE_COLUMNS = ["path", "label", "confidence", "status", "error"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def columns_for(top_k: int, *, model_label: bool = False, prob_classes: Sequence[str] = ()) -> list[str]:
    """The columns of a run: ``model_label`` (with --threshold) keeps the top label an 'unknown' row
    replaced; ``prob_classes`` (with --probs) adds one ``prob_<class>`` column per class, in card order."""
    extra: list[str] = ["model_label"] if model_label else []
    for k in range(2, top_k + 1):
        extra += [f"label_{k}", f"confidence_{k}"]
    return BASE_COLUMNS + extra + [f"prob_{c}" for c in prob_classes]


def escape_cell(value: str) -> str:
    """Neutralise spreadsheet formulas; a leading quote is escaped too, so unescape is exact."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def unescape_cell(value: str) -> str:
    return value[1:] if value.startswith("'") else value


TEXT_COLUMNS = ("path", "error", "label", "model_label")


def _is_text(column: str) -> bool:
    return column in TEXT_COLUMNS or column.startswith("label_")


def encode_name(name: str) -> str:
    """A file name as the text every format stores (see the module docstring): reversible, valid UTF-8."""
    if "\\" not in name and (name.isascii() or _utf8_ok(name)):
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":  # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        else:
            out.append(ch)
    return "".join(out)


_ESCAPE = re.compile(r"\\(\\|x[89a-fA-F][0-9a-fA-F])")


def decode_name(text: str) -> str:
    """Inverse of ``encode_name``; a lone backslash not starting an escape stays as it is."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xdc00 + int(m.group(1)[1:], 16)), text)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _text(column: str, value: Any) -> str:
    """A text cell as valid UTF-8: the path reversibly, other text (reasons) with surrogates spelled out."""
    s = str(value)
    if column == "path":
        return encode_name(s)
    return s if _utf8_ok(s) else s.encode("utf-8", "backslashreplace").decode("utf-8")


def _csv_cell(column: str, value: Any) -> str:
    """None (no confidence on an error row) is an empty cell; floats keep 6 decimals."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return escape_cell(_text(column, value)) if _is_text(column) else str(value)


def _json_value(column: str, value: Any) -> Any:
    if _is_text(column):
        return _text(column, "" if value is None else value)
    return value


class _LineEnd:
    """Feeds csv.reader one line at a time and remembers where the last one it took ends."""

    def __init__(self, data: bytes) -> None:
        self.data, self.end, self.eof, self.whole = data, 0, False, True

    def __iter__(self) -> Iterator[str]:
        data, pos = self.data, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            line, pos = data[pos:end], end
            self.end, self.whole = end, line.endswith(b"\n")
            yield line.decode("utf-8", "surrogateescape")
        self.eof = True


def csv_records(data: bytes, source: str | os.PathLike = "") -> Iterator[tuple[list[str], int]]:
    """The complete CSV records in ``data``, each with the byte offset just past it.

    A record a crash cut short is not yielded: one whose last line has no newline, or whose quoted
    field is still open at the end of the data (a newline inside a quoted name is not the end).
    """
    csv.field_size_limit(1 << 30)  # a path in a very deep tree can pass csv's 128 KiB default
    lines = _LineEnd(data)
    try:
        for record in csv.reader(lines):
            if lines.eof or not lines.whole:
                return
            yield record, lines.end
    except csv.Error as e:
        raise OutputError(f"{source} is not a well-formed CSV ({e}) near byte {lines.end}: "
                          "it was not written by batchcls, or was edited; choose another --out") from None


def _csv_cut(data: bytes, source: Path) -> int:
    end = 0
    for _, record_end in csv_records(data, source):
        end = record_end
    return end


def _jsonl_cut(data: bytes, source: Path) -> int:
    return data.rfind(b"\n") + 1  # JSON escapes newlines, so every newline ends a record


def _jsonl_rows(data: bytes) -> Iterator[dict]:
    for line in data.split(b"\n"):  # not splitlines(): U+2028 or NEL inside a name is not a line end
        if line.strip():
            yield json.loads(line.decode("utf-8", "surrogateescape"))


class CsvFormat:
    suffix = ".csv"
    cut = staticmethod(_csv_cut)

    @staticmethod
    def header(columns: list[str]) -> str:
        return _csv_line(columns)

    @staticmethod
    def render(rows: list[dict], columns: list[str]) -> str:
        return "".join(_csv_line([_csv_cell(c, r.get(c)) for c in columns]) for r in rows)

    @staticmethod
    def read_paths(path: Path) -> tuple[list[str], set[str]]:
        records = csv_records(path.read_bytes(), path)
        header = next(records, ([], 0))[0]
        if "path" not in header:
            raise OutputError(f"{path} has no 'path' column: it is not a batchcls output")
        i = header.index("path")
        return header, {decode_name(unescape_cell(rec[i])) for rec, _ in records if len(rec) > i}


def _csv_line(cells: list[str]) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(cells)
    return buf.getvalue()


class JsonlFormat:
    suffix = ".jsonl"
    cut = staticmethod(_jsonl_cut)

    @staticmethod
    def header(columns: list[str]) -> str:
        return ""

    @staticmethod
    def render(rows: list[dict], columns: list[str]) -> str:
        return "".join(json.dumps({c: _json_value(c, r.get(c)) for c in columns}, ensure_ascii=False) + "\n"
                       for r in rows)

    @staticmethod
    def read_paths(path: Path) -> tuple[list[str], set[str]]:
        header: list[str] = []
        done: set[str] = set()
        for row in _jsonl_rows(path.read_bytes()):
            header = header or list(row)
            done.add(decode_name(row["path"]))
        return header, done


def _arrow_schema(columns: list[str]):
    import pyarrow as pa

    return pa.schema([(c, pa.string() if _is_text(c) or c == "status" else pa.float64()) for c in columns])


class ParquetFormat(JsonlFormat):
    """Parquet can't be appended to safely, so the partial file is JSON lines, converted at the end.

    The end merges OUT (a resumed finished run) and OUT.partial by path, OUT's row winning; a crash
    anywhere in that step leaves files the next --resume merges again to the same result.
    """

    suffix = ".parquet"

    @staticmethod
    def read_paths(path: Path) -> tuple[list[str], set[str]]:
        if path.suffix == ".partial":
            return JsonlFormat.read_paths(path)
        import pyarrow.parquet as pq
        table = pq.read_table(path, columns=["path"])
        return pq.read_schema(path).names, {decode_name(p) for p in table.column("path").to_pylist()}

    @staticmethod
    def finalize(partial: Path, out: Path, columns: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _arrow_schema(columns)
        tables, seen = [], set()
        if out.exists():
            previous = pq.read_table(out).cast(schema)
            seen = set(previous.column("path").to_pylist())
            tables.append(previous)
        rows = [r for r in _jsonl_rows(partial.read_bytes()) if r["path"] not in seen] if partial.exists() else []
        tables.append(pa.Table.from_pylist(rows, schema=schema))
        with atomic_path(out) as tmp:
            pq.write_table(pa.concat_tables(tables), tmp)


FORMATS = {"csv": CsvFormat, "jsonl": JsonlFormat, "parquet": ParquetFormat}


class RowWriter:
    """Appends rows to OUT.partial and completes OUT on close(); '-' writes straight to stdout.

    ``in_place=True`` is for a long-lived writer (the watch daemon): rows are appended to OUT
    itself and fsynced per write, so OUT is always a valid file that readers can tail and the
    ledger of what is done; there is no final rename. Parquet can't be appended, so it is refused.

    The lock is taken in the constructor, before any file is touched, and held until ``close``
    (or the process ends). Files are created at the first ``write`` (or at ``close(complete=True)``
    of a run without rows); a write finds out when its file was deleted or replaced under it.
    """

    def __init__(self, out: str, *, fmt: str = "csv", columns: list[str], resume: bool = False,
                 overwrite: bool = False, in_place: bool = False) -> None:
        if fmt not in FORMATS:
            raise OutputError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise OutputError("--format parquet needs pyarrow: pip install 'batchcls[parquet]'") from None
        self.format = FORMATS[fmt]
        if in_place and self.format is ParquetFormat:
            raise OutputError("parquet files can't be appended to in place: use csv or jsonl")
        self.in_place = in_place
        self.columns = columns
        self.done: set[str] = set()
        self.to_stdout = out == "-"
        self.rows_written = 0
        self.fh: BinaryIO | None = None  # unbuffered: a failed write leaves no bytes behind to flush later
        if self.to_stdout:
            if resume:
                raise OutputError("--resume needs an output file, not stdout")
            sys.stdout.write(self.format.header(columns))
            return
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.lock_file = lock_path(self.out)
        if not self.out.parent.is_dir():
            raise OutputError(f"output folder {self.out.parent} does not exist: create it first")
        if not os.access(self.out.parent, os.W_OK):
            raise OutputError(f"output folder {self.out.parent} is not writable: choose another --out")
        self._lock = FileLock(self.lock_file)
        # A writer dropped without close() (a command that failed early) still lets go of the lock and
        # removes the lock file, at garbage collection or interpreter exit.
        weakref.finalize(self, self._lock.release)
        try:
            self._lock.acquire()
        except LockHeld as e:
            raise OutputError(f"{self.out} is being written by another batchcls process (PID "
                              f"{e.pid if e.pid is not None else 'unknown'}): wait for it to finish or stop it, "
                              "or choose another --out") from None
        except OSError as e:
            raise OutputError(f"cannot lock {self.lock_file}: {e.strerror}: choose another --out") from None
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self._lock.release()
            raise

    @property
    def target(self) -> Path:
        """The file rows are appended to."""
        return self.out if self.in_place else self.partial

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        existing = [p for p in (self.out, self.partial) if p.exists()]
        if existing and not (resume or overwrite):
            raise OutputError(f"{existing[0]} already exists: pass --resume to continue it or --overwrite to replace it")
        self._clear = overwrite and not resume  # done at the first write: a failed start deletes nothing
        self._continue_out = False  # a finished text OUT being resumed: its rows go on in OUT.partial
        self._expect: os.stat_result | None = None  # the file whose rows are in self.done, as read
        if resume:
            self._load_previous()

    def _load_previous(self) -> None:
        """Repair what a crash left, then collect the paths already written."""
        if self.in_place and self.partial.exists():
            # An interrupted `batchcls run`'s OUT.partial simply becomes the ledger; both at once is ambiguous.
            if self.out.exists():
                raise OutputError(f"both {self.out} and {self.partial} exist: finish the interrupted run with "
                                  "`batchcls run --resume` first, or choose another output")
            os.replace(self.partial, self.out)
        both = self.out.exists() and self.partial.exists()
        if both and self.format is not ParquetFormat:
            # Which one is current can't be known; merging could drop or repeat rows.
            raise OutputError(f"both {self.out} and {self.partial} exist: keep the one you trust, "
                              "remove the other, then --resume")
        for p in (self.partial, self.out):
            if not p.exists() or p.stat().st_size == 0:  # 0 bytes: a crash before the header
                continue
            if not (p == self.out and self.format is ParquetFormat):
                # Before reading: a CSV row cut after its path field would otherwise count as done.
                repair(p, self.format)
            header, done = self.format.read_paths(p)
            if header and header != self.columns:
                raise OutputError(f"{p} has columns {header}, this run writes {self.columns}: "
                                  "use the same --top-k/--threshold/--probs/--format, or a new --out")
            self.done |= done
        self._continue_out = not self.in_place and self.format is not ParquetFormat and self.out.exists()
        kept = self.out if self._continue_out else self.target
        self._expect = kept.stat() if kept.exists() else None

    def _open(self) -> BinaryIO:
        """Create (or continue) the file rows go to; called at the first write."""
        try:
            if self._expect is not None:
                self._identity = self._expect
                self._check_still_ours(self.out if self._continue_out else self.target)
            if self._clear:
                for p in (self.out, self.partial):
                    p.unlink(missing_ok=True)
            elif self._continue_out:
                os.replace(self.out, self.partial)
            fh = open(self.target, "ab", buffering=0)
            self._identity = os.fstat(fh.fileno())
            if self._identity.st_size == 0:
                _write_all(fh, self.format.header(self.columns))
        except OSError as e:
            raise OutputError(f"cannot write {self.target}: {e.strerror}: free the space (or fix the cause), "
                              "then run the same command again") from None
        self._clear = self._continue_out = False
        return fh

    def _check_still_ours(self, path: Path | None = None) -> None:
        """Rows written into a file someone deleted or replaced would be lost without a word: stop instead."""
        path = path or self.target
        try:
            same = os.path.samestat(os.stat(path), self._identity)
        except FileNotFoundError:
            same = False
        if not same:
            raise OutputError(f"{path} was deleted or replaced while this process was writing it: "
                              "stopping so no row is lost; restore it, or rerun with a new --out")

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.to_stdout:
            sys.stdout.write(self.format.render(rows, self.columns))
            sys.stdout.flush()
            self.rows_written += len(rows)
            return
        if self.fh is None:
            self.fh = self._open()
        else:
            self._check_still_ours()
        try:
            _write_all(self.fh, self.format.render(rows, self.columns))
            if self.in_place:  # the daemon renames files after this: the rows must be on disk first
                os.fsync(self.fh.fileno())
        except OSError as e:
            raise OutputError(f"cannot write {self.target}: {e.strerror}: free the space (or fix the cause), "
                              "then rerun with --resume") from None
        self.rows_written += len(rows)

    def close(self, complete: bool = True) -> None:
        """complete=False (interrupted) leaves OUT.partial in place for --resume; in place, OUT is already final."""
        if self.to_stdout:
            sys.stdout.flush()
            return
        if not self._lock.held:
            return  # closed already
        try:
            if self.fh is None and complete:
                self.fh = self._open()  # a run with no rows still ends with a (header-only) output
            if self.fh is not None:
                fh, self.fh = self.fh, None
                try:
                    os.fsync(fh.fileno())
                finally:
                    fh.close()
            if not complete or self.in_place:
                return
            if self.format is ParquetFormat:
                ParquetFormat.finalize(self.partial, self.out, self.columns)
                self.partial.unlink()
            else:
                os.replace(self.partial, self.out)
            fsync_dir(self.out.parent)
        finally:
            self._lock.release()


def _write_all(fh: BinaryIO, text: str) -> None:
    """All of ``text`` as UTF-8, or an OSError; a full disk leaves a prefix that ``repair`` cuts back."""
    data = memoryview(text.encode("utf-8", "backslashreplace"))
    while data:
        data = data[fh.write(data):]


def repair(path: Path, fmt: type = CsvFormat) -> None:
    """Cut a crash's fragment (an incomplete last record) off ``path`` so the file is well-formed again."""
    with open(path, "rb+") as fh:
        data = fh.read()
        end = fmt.cut(data, path)
        if end != len(data):
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read a finished output (any format) back as dicts: formula escaping and name escapes undone."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        rows = list(_jsonl_rows(path.read_bytes()))
    else:
        csv.field_size_limit(1 << 30)
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            for k, v in row.items():
                if _is_text(k) and isinstance(v, str):
                    row[k] = unescape_cell(v)
    for row in rows:
        if isinstance(row.get("path"), str):
            row["path"] = decode_name(row["path"])
    return rows
