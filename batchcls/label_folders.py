"""Where a row's image goes when rows are sorted into folders (``review --to``, ``watch --move-to``).

One folder per class of the model, ``unknown/`` for rows the model declined to name, ``_errors/`` for
rows that could not be classified (review), and ``_manifest.csv`` beside them. The naming is one-to-one:
labels that differ get folders that differ, whatever characters they hold ('a/b' and 'a_b' are apart,
see ``fsutil.safe_name``), and a class whose name is one of those reserved names gets its first character
escaped (a class called 'unknown' is '%75nknown/'), so it never shares a folder with them.
"""
from __future__ import annotations

from batchcls.card import UNKNOWN_LABEL
from batchcls.fsutil import safe_name

ERRORS_DIR = "_errors"  # error rows (review --errors); not a class: empty it before training on the folder
MANIFEST = "_manifest.csv"
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
