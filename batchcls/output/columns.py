"""The columns of an output: which a run writes, and which of them hold text."""
from __future__ import annotations

from collections.abc import Sequence

BASE_COLUMNS = ["path", "label", "confidence", "status", "error"]
TEXT_COLUMNS = ("path", "error", "label", "model_label")


def columns_for(top_k: int, *, model_label: bool = False, known_score: bool = False,
                prob_classes: Sequence[str] = ()) -> list[str]:
    """The columns of a run: ``model_label`` (with --threshold or the open-set decision) keeps the top label an
    'unknown' row replaced; ``known_score`` is the open-set score; ``prob_classes`` (with --probs) adds one
    ``prob_<class>`` column per class, in card order."""
    extra: list[str] = ["model_label"] if model_label or known_score else []
    extra += ["known_score"] if known_score else []
    for k in range(2, top_k + 1):
        extra += [f"label_{k}", f"confidence_{k}"]
    return BASE_COLUMNS + extra + [f"prob_{c}" for c in prob_classes]


def is_text(column: str) -> bool:
    """Whether ``column`` holds text (names, labels, reasons) rather than numbers."""
    return column in TEXT_COLUMNS or column.startswith("label_")
