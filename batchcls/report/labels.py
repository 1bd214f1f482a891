"""The labels file ``report`` and ``review`` read: a batchcls output, or a one-line refusal.

Someone else's CSV that happens to have a ``path`` column (or a file holding only that word) would otherwise
become a page of error rows, or an empty page, and exit 0. An output of ``run`` or ``watch`` is told by its
header, which is exactly one of the layouts ``output.columns_for`` makes (plus ``moved_to`` in the ledger of a
watch that moves files), and by every row being as wide with a status of ``ok`` or ``error``: the rule
``--resume`` applies before it adds to a file. A JSON-lines output with no rows is an empty file, which is ours
only when its provenance sidecar (``.OUT.meta.json``) says so.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from batchcls.errors import InputError
from batchcls.label_folders import MOVED_TO
from batchcls.output import columns_for, meta_path, read_rows

STATUSES = ("ok", "error")


def is_output_header(columns: list[str]) -> bool:
    """Whether ``columns`` is exactly a header batchcls writes (``columns_for``'s, a watch ledger's ``moved_to``)."""
    body = columns[:-1] if columns[-1:] == [MOVED_TO] else columns
    top_k = 1 + sum(c.startswith("label_") for c in body)
    made = columns_for(top_k, model_label="model_label" in body, known_score="known_score" in body,
                       prob_classes=[c.removeprefix("prob_") for c in body if c.startswith("prob_")])
    return body == made


def read_labels(labels: str | os.PathLike) -> list[dict]:
    """The rows of ``labels`` (CSV, JSON lines or Parquet, by extension as ``read_rows`` reads them) if it is a
    batchcls output; InputError, one line, for any other file."""
    path = Path(labels)
    csv_file = path.suffix not in (".jsonl", ".parquet")
    try:
        header = declared_columns(path)
        if header is not None and not is_output_header(header):
            raise _not_ours(path, f"its columns are {', '.join(header[:8])}{', ...' if len(header) > 8 else ''}")
        if csv_file and header is not None:  # a row wider or narrower than the header, before read_rows sees it
            _check_widths(path, len(header))
        rows = read_rows(path)
    except ImportError:
        from batchcls.extras import install_hint

        raise InputError(f"reading {path} (Parquet) needs pyarrow, which is not installed: "
                         f"{install_hint('parquet', 'pyarrow')}") from None
    except (ValueError, csv.Error, KeyError) as e:  # json, csv and pyarrow all say 'not this format' so
        raise _not_ours(path, f"it does not parse: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if header is None:
        if rows or not _recorded_empty(path):
            raise _not_ours(path, "it is empty" if not rows else "no header")
        return []
    for n, row in enumerate(rows, 1):
        if list(row) != header or row.get("status") not in STATUSES:
            raise _not_ours(path, f"row {n} does not fit its header")
    return rows


def _check_widths(path: Path, width: int) -> None:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for n, record in enumerate(csv.reader(fh)):
            if len(record) != width:
                raise _not_ours(path, f"row {n} does not fit its header")


def declared_columns(path: Path, fmt: str | None = None) -> list[str] | None:
    """The columns the file declares (None: it is empty): the CSV header line, the first JSON line's keys, the
    Parquet schema. ``fmt`` (csv, jsonl, parquet) or else the extension says which; ValueError if it does not parse."""
    fmt = fmt or {".parquet": "parquet", ".jsonl": "jsonl"}.get(path.suffix, "csv")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            first = next((line for line in fh if line.strip()), None)
        if first is None:
            return None
        row = json.loads(first.decode("utf-8", "surrogateescape"))
        if not isinstance(row, dict):
            raise ValueError("a line is not a JSON object")
        return list(row)
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        try:
            return next(csv.reader(fh), None)
        except csv.Error as e:
            raise ValueError(str(e)) from None


def _recorded_empty(path: Path) -> bool:
    """An empty file is a JSON-lines output without rows only when its sidecar records it as one."""
    try:
        record = json.loads(meta_path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "batchcls_output" in record and record.get("format") == "jsonl"


def _not_ours(path: Path, why: str) -> InputError:
    return InputError(f"{path} is not an output of batchcls run or watch ({why}): "
                      "give the file they wrote (--out)")
