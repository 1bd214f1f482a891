"""Write result rows as they are produced; finish the file atomically; resume without duplicates.

Rows go to ``OUT.partial`` (flushed per batch, so a crash loses at most the batches in flight)
and the finished file is moved into place with ``os.replace``. One table maps each ``--format``
to its writer.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

from batchcls.errors import OutputError

BASE_COLUMNS = ["path", "label", "confidence", "status", "error"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def columns_for(top_k: int) -> list[str]:
    extra: list[str] = []
    for k in range(2, top_k + 1):
        extra += [f"label_{k}", f"confidence_{k}"]
    return BASE_COLUMNS + extra


def escape_cell(value: str) -> str:
    """Neutralise spreadsheet formulas; a leading quote is escaped too, so unescape is exact."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def unescape_cell(value: str) -> str:
    return value[1:] if value.startswith("'") else value


TEXT_COLUMNS = ("path", "error", "label")


def _is_text(column: str) -> bool:
    return column in TEXT_COLUMNS or column.startswith("label_")


def _csv_cell(column: str, value: Any) -> str:
    """None (no confidence on an error row) is an empty cell; floats keep 6 decimals."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return escape_cell(str(value)) if _is_text(column) else str(value)


class CsvFormat:
    suffix = ".csv"

    @staticmethod
    def header(fh: TextIO, columns: list[str]) -> None:
        csv.writer(fh).writerow(columns)

    @staticmethod
    def append(fh: TextIO, rows: list[dict], columns: list[str]) -> None:
        w = csv.writer(fh)
        for r in rows:
            w.writerow([_csv_cell(c, r.get(c)) for c in columns])

    @staticmethod
    def read_paths(path: Path) -> tuple[list[str], set[str]]:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.reader(fh)
            header = next(reader, None) or []
            if "path" not in header:
                raise OutputError(f"{path} has no 'path' column: it is not a batchcls output")
            i = header.index("path")
            return header, {unescape_cell(row[i]) for row in reader if len(row) > i}


class JsonlFormat:
    suffix = ".jsonl"

    @staticmethod
    def header(fh: TextIO, columns: list[str]) -> None:
        pass

    @staticmethod
    def append(fh: TextIO, rows: list[dict], columns: list[str]) -> None:
        for r in rows:
            fh.write(json.dumps({c: r.get(c, "" if _is_text(c) else None) for c in columns}, ensure_ascii=False) + "\n")

    @staticmethod
    def read_paths(path: Path) -> tuple[list[str], set[str]]:
        done: set[str] = set()
        header: list[str] = []
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a crash mid-write: that file is redone
                    continue
                header = header or list(row)
                done.add(row["path"])
        return header, done


class ParquetFormat(JsonlFormat):
    """Parquet can't be appended to safely, so the partial file is JSON lines, converted at the end."""

    suffix = ".parquet"

    @staticmethod
    def read_paths(path: Path) -> tuple[list[str], set[str]]:
        if path.suffix == ".partial":
            return JsonlFormat.read_paths(path)
        import pyarrow.parquet as pq
        table = pq.read_table(path, columns=["path"])
        return pq.read_schema(path).names, set(table.column("path").to_pylist())

    @staticmethod
    def finalize(partial: Path, out: Path, previous: Path | None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        tables = [pq.read_table(previous)] if previous is not None else []
        with open(partial, encoding="utf-8", errors="surrogateescape") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if rows:
            tables.append(pa.Table.from_pylist(rows))
        table = pa.concat_tables(tables) if tables else pa.table({})
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, out)


FORMATS = {"csv": CsvFormat, "jsonl": JsonlFormat, "parquet": ParquetFormat}


class RowWriter:
    """Appends rows to OUT.partial and completes OUT on close(); '-' writes straight to stdout.

    ``in_place=True`` is for a long-lived writer (the watch daemon): rows are appended to OUT
    itself and fsynced per write, so OUT is always a valid file that readers can tail and the
    ledger of what is done; there is no final rename. Parquet can't be appended, so it is refused.
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
        self._previous_parquet: Path | None = None
        if self.to_stdout:
            if resume:
                raise OutputError("--resume needs an output file, not stdout")
            self.fh: TextIO = sys.stdout
            self.format.header(self.fh, columns)
            return
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        if not self.out.parent.is_dir():
            raise OutputError(f"output folder {self.out.parent} does not exist: create it first")
        if not os.access(self.out.parent, os.W_OK):
            raise OutputError(f"output folder {self.out.parent} is not writable: choose another --out")
        existing = [p for p in (self.out, self.partial) if p.exists()]
        if existing and not (resume or overwrite):
            raise OutputError(f"{existing[0]} already exists: pass --resume to continue it or --overwrite to replace it")
        if overwrite and not resume:
            for p in existing:
                p.unlink()
            existing = []
        if in_place and self.partial.exists():
            self._adopt_partial()
        fresh = not existing
        if resume:
            fresh = self._load_previous()
        target = self.out if in_place else self.partial
        try:
            self.fh = open(target, "a", newline="", encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise OutputError(f"cannot write {target}: {e.strerror}") from None
        if fresh:
            self.format.header(self.fh, columns)
            self.fh.flush()

    def _adopt_partial(self) -> None:
        """In place, an interrupted run's OUT.partial simply becomes OUT; both at once is ambiguous."""
        if self.out.exists():
            raise OutputError(f"both {self.out} and {self.partial} exist: finish the interrupted run with "
                              "`batchcls run --resume` first, or choose another output")
        os.replace(self.partial, self.out)

    def _load_previous(self) -> bool:
        """Collect the paths already written; returns True when nothing was (a fresh file)."""
        if not self.in_place and self.out.exists() and self.partial.exists():
            # Which one is current can't be known; merging could drop or repeat rows.
            raise OutputError(f"both {self.out} and {self.partial} exist: keep the one you trust, "
                              "remove the other, then --resume")
        for p in (self.partial, self.out):
            if not p.exists() or p.stat().st_size == 0:  # 0 bytes: a crash before the header
                continue
            if not (p == self.out and self.format is ParquetFormat):
                # Before reading: a CSV row cut after its path field would otherwise count as done.
                _repair_last_line(p)
            header, done = self.format.read_paths(p)
            if header and header != self.columns:
                raise OutputError(f"{p} has columns {header}, this run writes {self.columns}: "
                                  "use the same --top-k/--format, or a new --out")
            self.done |= done
        if self.in_place:
            pass  # rows keep being appended to OUT itself
        elif self.out.exists() and self.format is ParquetFormat:
            self._previous_parquet = self.out.with_name(self.out.name + ".prev")
            os.replace(self.out, self._previous_parquet)
        elif self.out.exists():
            # A finished output being resumed (new files since): its rows continue in the partial.
            os.replace(self.out, self.partial)
        target = self.out if self.in_place else self.partial
        return not (target.exists() and target.stat().st_size > 0)

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        self.format.append(self.fh, rows, self.columns)
        self.fh.flush()
        if self.in_place:  # the daemon renames files after this: the rows must be on disk first
            os.fsync(self.fh.fileno())
        self.rows_written += len(rows)

    def close(self, complete: bool = True) -> None:
        """complete=False (interrupted) leaves OUT.partial in place for --resume; in place, OUT is already final."""
        if self.to_stdout:
            self.fh.flush()
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if not complete or self.in_place:
            return
        if self.format is ParquetFormat:
            ParquetFormat.finalize(self.partial, self.out, self._previous_parquet)
            self.partial.unlink()
            if self._previous_parquet is not None:
                self._previous_parquet.unlink()
        else:
            os.replace(self.partial, self.out)


def _repair_last_line(path: Path) -> None:
    """A crash can cut the last row mid-way; drop that fragment so the file stays well-formed."""
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            fh.truncate(cut)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read a finished output (any format) back as dicts, undoing the CSV formula escaping."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    for r in rows:
        for k, v in r.items():
            if _is_text(k):
                r[k] = unescape_cell(v)
    return rows
