"""One class per ``--format``: the header and rows it writes, the paths it reads back, and ``read_rows``."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from batchcls.errors import OutputError
from batchcls.fsutil import atomic_path
from batchcls.output.columns import is_text
from batchcls.output.names import decode_name, escape_cell, text_cell, unescape_cell
from batchcls.output.records import csv_cut, csv_records, jsonl_cut, jsonl_rows


def _csv_cell(column: str, value: Any) -> str:
    """None (no confidence on an error row) is an empty cell; floats keep 6 decimals."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return escape_cell(text_cell(column, value)) if is_text(column) else str(value)


def _json_value(column: str, value: Any) -> Any:
    if is_text(column):
        return text_cell(column, "" if value is None else value)
    return value


def _csv_line(cells: list[str]) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(cells)
    return buf.getvalue()


class CsvFormat:
    suffix = ".csv"
    cut = staticmethod(csv_cut)

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


class JsonlFormat:
    suffix = ".jsonl"
    cut = staticmethod(jsonl_cut)

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
        for row in jsonl_rows(path.read_bytes()):
            header = header or list(row)
            done.add(decode_name(row["path"]))
        return header, done


def _arrow_schema(columns: list[str]):
    import pyarrow as pa

    return pa.schema([(c, pa.string() if is_text(c) or c == "status" else pa.float64()) for c in columns])


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
        rows = [r for r in jsonl_rows(partial.read_bytes()) if r["path"] not in seen] if partial.exists() else []
        tables.append(pa.Table.from_pylist(rows, schema=schema))
        with atomic_path(out) as tmp:
            pq.write_table(pa.concat_tables(tables), tmp)


FORMATS = {"csv": CsvFormat, "jsonl": JsonlFormat, "parquet": ParquetFormat}


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read a finished output (any format) back as dicts: formula escaping and name escapes undone."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        rows = list(jsonl_rows(path.read_bytes()))
    else:
        csv.field_size_limit(1 << 30)
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            for k, v in row.items():
                if is_text(k) and isinstance(v, str):
                    row[k] = unescape_cell(v)
    for row in rows:
        if isinstance(row.get("path"), str):
            row["path"] = decode_name(row["path"])
    return rows
