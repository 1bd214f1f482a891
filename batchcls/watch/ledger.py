"""The ledger: OUT, appended in place, a row per labelled file; a path in it is never labelled again.

Rows go through the same ``RowWriter`` as ``batchcls run`` (``in_place=True``: OUT stays a valid file
while the daemon runs), flushed and fsynced per batch before any file moves. The writer's lock refuses
a second daemon (or run) on the same OUT, and a write into a ledger deleted or replaced meanwhile stops
the daemon instead of losing rows.

With moves, ``.OUT.moving`` beside OUT lists the files of the batch in flight (device, inode, size,
mtime), written before their rows: after a crash, a labelled name still in the folder is a move cut
short only if it is that very file; any other file under that name is new, and is labelled. A file that
was to move but could not be placed at all stays, its row says so (an empty ``moved_to``), and its entry
is kept, marked: the name is labelled, not a move to finish.

A ledger with moves records where each file went in a ``moved_to`` column (``label_folders.moved_to_cell``),
so ``report`` and ``review`` can find it. A ledger keeps the columns it was started with: one started
before moves were recorded goes on without the column, one that has it keeps it when moves are turned off.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from batchcls.errors import OutputError
from batchcls.fsutil import atomic_write
from batchcls.label_folders import MOVED_TO, moved_to_cell, moved_to_path
from batchcls.output import Provenance, RowWriter, read_rows
from batchcls.report.labels import declared_columns
from batchcls.scan import InputFile

log = logging.getLogger("batchcls.watch")

# What RowWriter's refusals advise a `batchcls run` to do, and what watch (no --resume, --overwrite or --probs:
# it always continues its ledger) says instead.
_RUN_ADVICE = {
    "--resume would mix the two; pass --overwrite to replace it, or choose another --out":
        "the ledger would mix the two; start watch with the options, model and folder the ledger was started "
        "with, or give it a new --out",
    "use the same --top-k/--threshold/--probs/--format, or a new --out":
        "start watch with the --top-k/--threshold/--format the ledger was started with, or give it a new --out",
    "choose another --out, or --overwrite to replace it": "give watch another --out",
}


def _for_watch(message: str) -> str:
    for run, watch in _RUN_ADVICE.items():
        message = message.replace(run, watch)
    return message


class Ledger:
    def __init__(self, out: str, *, fmt: str, columns: list[str], provenance: Provenance | None = None,
                 moves: bool = False) -> None:
        self.records_moves = _records_moves(out, fmt, moves)
        if moves and not self.records_moves:
            log.warning("%s was started before watch recorded where files move (no %s column): report cannot "
                        "follow the files moved from now on; give watch a new --out to record it", out, MOVED_TO)
        columns = [*columns, MOVED_TO] if self.records_moves else columns
        try:
            self.writer = RowWriter(out, fmt=fmt, columns=columns, resume=True, in_place=True,
                                    provenance=provenance)
        except OutputError as e:
            raise OutputError(_for_watch(str(e))) from None
        self.out = self.writer.out
        self.done: set[str] = self.writer.done  # relative paths already labelled
        self.journal = self.out.with_name(f".{self.out.name}.moving")
        self.staying: set[str] = set()  # of the journal's entries, files that could not be placed: they stay
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

    def record_move(self, row: dict, dest: str | os.PathLike | None) -> None:
        """Put where the row's file goes (None: it stays) in the row, when this ledger records moves."""
        if self.records_moves:
            row[MOVED_TO] = "" if dest is None else moved_to_cell(dest, self.out)

    def recorded_move(self, row: dict) -> Path | None:
        """Where the row says its file went (read back from the ledger), or None."""
        where = moved_to_path(row, self.out)
        return None if where is None else Path(where)

    def intend(self, files: list[InputFile]) -> None:
        """Before these files' rows are written: remember exactly which files are to move."""
        for f in files:
            ident = _identity(f.path)
            if ident is not None:
                self.moving[f.rel] = ident
        self._write_journal()

    def settle(self, moved: list[str], unmoved: list[str] = (), staying: list[str] = ()) -> None:
        """After the moves: forget the files that moved (their names are free for new files) and those
        that were never to move; mark those that stay (no place for them: their rows say so); keep the
        failed ones for the next start."""
        for rel in [*moved, *unmoved]:
            self.moving.pop(rel, None)
            self.staying.discard(rel)
        self.staying.update(rel for rel in staying if rel in self.moving)
        self.done.difference_update(moved)
        self._write_journal()

    def stays(self, rel: str) -> bool:
        """Whether the labelled file ``rel`` could not be placed when it was labelled, and stays."""
        return rel in self.staying

    def cut_short(self, rel: str, path: str) -> bool:
        """Whether the labelled name ``rel`` still here is the very file whose move a crash cut short."""
        return self.moving.get(rel) == _identity(path)

    def _read_journal(self) -> dict[str, list[int]]:
        try:
            entries = list(map(json.loads, self.journal.read_text().splitlines()))
            moving = {e["rel"]: e["id"] for e in entries}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError):  # damaged: every labelled name left counts as new
            return {}
        self.staying = {e["rel"] for e in entries if e.get("stay")}
        return moving

    def _write_journal(self) -> None:
        if self.moving:
            atomic_write(self.journal, "".join(json.dumps({"rel": r, "id": i, **({"stay": True} if r in self.staying
                                                                                  else {})}) + "\n"
                                               for r, i in self.moving.items()))
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


def _records_moves(out: str, fmt: str, moves: bool) -> bool:
    """Whether the ledger has a ``moved_to`` column: as it was started (its header), else as this watch moves."""
    try:
        columns = declared_columns(Path(out), fmt) if os.path.getsize(out) else None
    except (OSError, ValueError, ImportError):  # absent, or not readable as a ledger (RowWriter says why)
        columns = None
    return moves if columns is None else MOVED_TO in columns
