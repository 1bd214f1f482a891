"""The ledger: OUT, appended in place, a row per labelled file; a path in it is never labelled again.

Rows go through the same ``RowWriter`` as ``batchcls run`` (``in_place=True``: OUT stays a valid file
while the daemon runs), flushed and fsynced per batch before any file moves. The writer's lock refuses
a second daemon (or run) on the same OUT, and a write into a ledger deleted or replaced meanwhile stops
the daemon instead of losing rows.

With moves, ``.OUT.moving`` beside OUT lists the files of the batch in flight (device, inode, size,
mtime), written before their rows: after a crash, a labelled name still in the folder is a move cut
short only if it is that very file; any other file under that name is new, and is labelled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from batchcls.fsutil import atomic_write
from batchcls.output import Provenance, RowWriter, read_rows
from batchcls.scan import InputFile


class Ledger:
    def __init__(self, out: str, *, fmt: str, columns: list[str], provenance: Provenance | None = None) -> None:
        self.writer = RowWriter(out, fmt=fmt, columns=columns, resume=True, in_place=True, provenance=provenance)
        self.out = self.writer.out
        self.done: set[str] = self.writer.done  # relative paths already labelled
        self.journal = self.out.with_name(f".{self.out.name}.moving")
        self.moving: dict[str, list[int]] = self._read_journal()  # rel -> identity, moves not yet done

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
        """The last row of each path (a reused name has one row per file that bore it)."""
        return {r["path"]: r for r in read_rows(self.out)}

    def intend(self, files: list[InputFile]) -> None:
        """Before these files' rows are written: remember exactly which files are to move."""
        for f in files:
            ident = _identity(f.path)
            if ident is not None:
                self.moving[f.rel] = ident
        self._write_journal()

    def settle(self, moved: list[str], unmoved: list[str] = ()) -> None:
        """After the moves: forget the files that moved (their names are free for new files) and those
        that were never to move; keep the failed ones for the next start."""
        for rel in [*moved, *unmoved]:
            self.moving.pop(rel, None)
        self.done.difference_update(moved)
        self._write_journal()

    def cut_short(self, rel: str, path: str) -> bool:
        """Whether the labelled name ``rel`` still here is the very file whose move a crash cut short."""
        return self.moving.get(rel) == _identity(path)

    def _read_journal(self) -> dict[str, list[int]]:
        try:
            return {e["rel"]: e["id"] for e in map(json.loads, self.journal.read_text().splitlines())}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError):  # damaged: every labelled name left counts as new
            return {}

    def _write_journal(self) -> None:
        if self.moving:
            atomic_write(self.journal, "".join(json.dumps({"rel": r, "id": i}) + "\n" for r, i in self.moving.items()))
        else:
            Path(self.journal).unlink(missing_ok=True)

    def close(self) -> None:
        self.writer.close()


def _identity(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
