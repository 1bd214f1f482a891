"""Reading an output's bytes back as records, and finding where a crash cut the last one.

Any prefix of a file that a crash (kill -9, a full disk) can leave is repaired exactly: CSV by parsing
records (a quoted name may hold a newline, so the last newline is not a record boundary), JSON lines
at the last newline (JSON escapes newlines).
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from batchcls.errors import OutputError


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


def csv_cut(data: bytes, source: Path) -> int:
    end = 0
    for _, record_end in csv_records(data, source):
        end = record_end
    return end


def jsonl_cut(data: bytes, source: Path) -> int:
    return data.rfind(b"\n") + 1  # JSON escapes newlines, so every newline ends a record


def jsonl_rows(data: bytes) -> Iterator[dict]:
    for line in data.split(b"\n"):  # not splitlines(): U+2028 or NEL inside a name is not a line end
        if line.strip():
            yield json.loads(line.decode("utf-8", "surrogateescape"))
