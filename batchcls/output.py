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


def _fmt(v: Any) -> Any:
    return f"{v:.6f}" if isinstance(v, float) else v


class CsvFormat:
    suffix = ".csv"

    @staticmethod
    def header(fh: TextIO, columns: list[str]) -> None:
        csv.writer(fh).writerow(columns)

    @staticmethod
    def append(fh: TextIO, rows: list[dict], columns: list[str]) -> None:
        w = csv.writer(fh)
        for r in rows:
            w.writerow([escape_cell(str(_fmt(r.get(c, "")))) if c in ("path", "error", "label") or
                        str(c).startswith("label_") else _fmt(r.get(c, "")) for c in columns])

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
            fh.write(json.dumps({c: r.get(c, "") for c in columns}, ensure_ascii=False) + "\n")

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
    """Appends rows to OUT.partial and completes OUT on close(); '-' writes straight to stdout."""

    def __init__(self, out: str, *, fmt: str = "csv", columns: list[str], resume: bool = False,
                 overwrite: bool = False) -> None:
        if fmt not in FORMATS:
            raise OutputError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise OutputError("--format parquet needs pyarrow: pip install 'batchcls[parquet]'") from None
        self.format = FORMATS[fmt]
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
        fresh = not existing
        if resume:
            fresh = self._load_previous()
        try:
            self.fh = open(self.partial, "a", newline="", encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise OutputError(f"cannot write {self.partial}: {e.strerror}") from None
        if fresh:
            self.format.header(self.fh, columns)
            self.fh.flush()

    def _load_previous(self) -> bool:
        """Collect the paths already written; returns True when nothing was (a fresh file)."""
        for p in (self.partial, self.out):
            if not p.exists():
                continue
            header, done = self.format.read_paths(p)
            if header and header != self.columns:
                raise OutputError(f"{p} has columns {header}, this run writes {self.columns}: "
                                  "use the same --top-k/--format, or a new --out")
            self.done |= done
        if self.out.exists() and self.format is ParquetFormat:
            self._previous_parquet = self.out.with_name(self.out.name + ".prev")
            os.replace(self.out, self._previous_parquet)
        elif self.out.exists():
            # A finished output being resumed (new files since): its rows continue in the partial.
            if self.partial.exists():
                self.out.unlink()
            else:
                os.replace(self.out, self.partial)
        if self.partial.exists() and self.partial.stat().st_size > 0:
            _repair_last_line(self.partial)
            return False
        return True

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        self.format.append(self.fh, rows, self.columns)
        self.fh.flush()
        self.rows_written += len(rows)

    def close(self, complete: bool = True) -> None:
        """complete=False (interrupted) leaves OUT.partial in place for --resume."""
        if self.to_stdout:
            self.fh.flush()
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if not complete:
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
            if k in ("path", "error", "label") or k.startswith("label_"):
                r[k] = unescape_cell(v)
    return rows
