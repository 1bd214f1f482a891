"""One class per ``--format``: the header and rows it writes, the paths it reads back, and ``read_rows``."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
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


@dataclass
class Found:
    """What a resume finds in an output file: its paths, where its last complete row ends, and the paths of its
    ok rows in file order (what an ``--embeddings`` sidecar holds vectors for)."""

    done: set[str]
    end: int
    ok: list[str]
    data: bytes | None = None  # the bytes read (a text file), for the cut of a crash's last row

    def add(self, path: str, ok: bool) -> None:
        self.done.add(path)
        if ok:
            self.ok.append(path)


def not_ours(path: Path, why: str) -> OutputError:
    return OutputError(f"{path} is not a batchcls output ({why}): it was left as it is; "
                       "choose another --out, or --overwrite to replace it")


def _check_header(header: list[str], columns: list[str], path: Path) -> None:
    if header == columns:
        return
    if "path" not in header:
        raise not_ours(path, "no 'path' column")
    raise OutputError(f"{path} has columns {header}, this run writes {columns}: "
                      "use the same --top-k/--threshold/--probs/--format, or a new --out")


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
    def check(data: bytes, path: Path, columns: list[str]) -> Found:
        """The paths ``data`` holds and where its last complete row ends, if it is provably a batchcls CSV
        with ``columns``: the header exactly, every complete row as wide with a status. Reads only."""
        header = _csv_line(columns).encode()
        if header.startswith(data):
            return Found(set(), 0, [])  # nothing, or a crash inside the header
        records = csv_records(data, path)
        first = next(records, None)
        if first is None:
            raise not_ours(path, "no header line")
        _check_header(first[0], columns, path)
        found, status = Found(set(), first[1], []), columns.index("status")
        for n, (record, record_end) in enumerate(records, 2):
            if len(record) != len(columns) or record[status] not in ("ok", "error"):
                raise not_ours(path, f"record {n} does not fit its header")
            found.add(decode_name(unescape_cell(record[0])), record[status] == "ok")
            found.end = record_end
        return found


_JSONL_START = b'{"path": '  # every row JsonlFormat writes starts so: path is always the first column


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
    def check(data: bytes, path: Path, columns: list[str]) -> Found:
        """As ``CsvFormat.check``: every complete line a JSON object with exactly ``columns``, and what
        follows the last newline the start of such a line. Reads only."""
        end = jsonl_cut(data, path)
        tail = data[end:]
        if not (tail.startswith(_JSONL_START) or _JSONL_START.startswith(tail)):
            raise not_ours(path, "its last line is not a row")
        found = Found(set(), end, [])
        for n, line in enumerate(data[:end].split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", "surrogateescape"))
            except ValueError:
                raise not_ours(path, f"line {n} is not JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise not_ours(path, f"line {n} is not a row with a path")
            _check_header(list(row), columns, path)
            found.add(decode_name(row["path"]), row.get("status") == "ok")
        return found


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
    def check_finished(path: Path, columns: list[str]) -> Found:
        """The paths of a finished Parquet OUT, if it is one with ``columns``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            _check_header(names, columns, path)
            table = pq.read_table(path, columns=["path", "status"])
        except (pa.ArrowException, OSError) as e:
            raise not_ours(path, f"not a Parquet file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        found = Found(set(), 0, [])
        for p, status in zip(table.column("path").to_pylist(), table.column("status").to_pylist()):
            found.add(decode_name(p), status == "ok")
        return found

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
STDOUT = "-"


def output_format(out: str, fmt: str | None = None, *, resume: bool = False) -> str:
    """The format ``out`` is written in: ``fmt`` when given, else the one its extension names; an output
    that cannot work as asked is an OutputError, one line (the CLI reports it as wrong usage)."""
    if not out:
        raise OutputError("--out is empty: name a file (labels.csv, labels.jsonl, labels.parquet) or '-' for stdout")
    if fmt is not None and fmt not in FORMATS:
        raise OutputError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if out == STDOUT:
        if resume:
            raise OutputError("--resume (and watch, which always continues its --out) needs a file, not stdout ('-')")
        if fmt == "parquet":
            raise OutputError("parquet can't be streamed to stdout: name a .parquet file with --out, "
                              "or stream csv or jsonl")
        return fmt or "csv"
    if fmt is not None:
        return fmt
    by_suffix = {cls.suffix: name for name, cls in FORMATS.items()}
    suffix = Path(out).suffix.lower()
    if suffix not in by_suffix:
        raise OutputError(f"cannot tell the format of --out {out} from its extension: name it "
                          f"{', '.join('*' + s for s in by_suffix)}, or pass --format")
    return by_suffix[suffix]


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
