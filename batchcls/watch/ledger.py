"""The ledger: OUT, appended in place, a row per labelled file; a path in it is never labelled again.

Rows go through the same ``RowWriter`` as ``batchcls run`` (``in_place=True``: OUT stays a valid file
while the daemon runs), flushed and fsynced per batch before any file moves.
"""
from __future__ import annotations

import os

from batchcls.output import RowWriter, columns_for, read_rows


class Ledger:
    def __init__(self, out: str, *, fmt: str, top_k: int) -> None:
        self.writer = RowWriter(out, fmt=fmt, columns=columns_for(top_k), resume=True, in_place=True)
        self.out = self.writer.out
        self.done: set[str] = self.writer.done  # relative paths already labelled

    @property
    def files(self) -> set[str]:
        """OUT and its partial twin, spelled as real paths: never inputs, even inside the folder."""
        return {os.path.realpath(p) for p in (self.writer.out, self.writer.partial)}

    def __contains__(self, rel: str) -> bool:
        return rel in self.done

    def write(self, rows: list[dict]) -> None:
        if rows:
            self.writer.write(rows)  # flushed + fsynced: a row on disk before its file moves
            self.done.update(r["path"] for r in rows)

    def rows(self) -> dict[str, dict]:
        return {r["path"]: r for r in read_rows(self.out)}

    def close(self) -> None:
        self.writer.close()
