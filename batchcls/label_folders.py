"""Where a row's image goes when rows are sorted into folders (``review --to``, ``watch --move-to``).

One folder per class of the model, ``unknown/`` for rows the model declined to name, ``_errors/`` for
rows that could not be classified (review), and ``_manifest.csv`` beside them. The naming is one-to-one:
labels that differ get folders that differ, whatever characters they hold ('a/b' and 'a_b' are apart,
see ``fsutil.safe_name``), and a class whose name is one of those reserved names gets its first character
escaped (a class called '_errors' is '%5Ferrors/'), so it never shares a folder with them.

A watch that moves files records where each went in its ledger's ``moved_to`` column, relative to the
ledger's own folder (the ledger and its --move-to folders usually sit side by side, and move together):
``moved_to_cell`` writes it and ``moved_to_path`` reads it back, for ``report`` and ``review``.
"""
from __future__ import annotations

import os

from batchcls.card import UNKNOWN_LABEL
from batchcls.fsutil import safe_name
from batchcls.output import decode_name, encode_name

ERRORS_DIR = "_errors"  # error rows (review --errors); not a class: empty it before training on the folder
MANIFEST = "_manifest.csv"
MOVED_TO = "moved_to"  # the ledger column of a watch with --move-to/--errors-to; empty: the file stayed
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")  # what a spreadsheet would run, or unescape
RESERVED = frozenset({UNKNOWN_LABEL, ERRORS_DIR, MANIFEST})


def class_folder(label: str) -> str:
    """The folder of the model's class ``label``: its safe name, never a reserved one."""
    name = safe_name(label)
    if name in RESERVED:  # each starts with an ASCII character: one escape of it
        name = f"%{ord(name[0]):02X}{name[1:]}"
    return name


def declined(row: dict) -> bool:
    """The row says 'unknown' because the model declined to name a class (its own top guess is in
    ``model_label``), not because 'unknown' is one of its classes."""
    return row.get("label") == UNKNOWN_LABEL and str(row.get("model_label") or UNKNOWN_LABEL) != UNKNOWN_LABEL


def label_folder(row: dict) -> str:
    """The folder for an ok row: ``unknown`` when the model declined, else its label's class folder."""
    return UNKNOWN_LABEL if declined(row) else class_folder(str(row.get("label", "")))


def moved_to_cell(dest: str | os.PathLike, ledger: str | os.PathLike) -> str:
    """``dest`` as the ledger ``ledger`` records it: relative to the ledger's real folder, '/' separators, a
    name that is not UTF-8 escaped as in ``path``. A file name the cell would start with (a file moved into the
    ledger's own folder) is spelled ``./name``, so a spreadsheet never reads it as a formula."""
    rel = os.path.relpath(os.path.abspath(dest), os.path.dirname(os.path.realpath(ledger))).replace(os.sep, "/")
    return encode_name(f"./{rel}" if rel.startswith(_FORMULA_START) else rel)


def moved_to_path(row: dict, ledger: str | os.PathLike) -> str | None:
    """Where a ledger row says its file went (an absolute path), or None when it was not moved."""
    cell = row.get(MOVED_TO)
    if not isinstance(cell, str) or not cell:
        return None
    return os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(ledger)), decode_name(cell)))
