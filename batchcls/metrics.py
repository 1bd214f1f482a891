"""Classification metrics shared by `batchcls eval`, engine builds and training, so all report the same macro-F1."""
from __future__ import annotations

import numpy as np

# Confidence cuts a person might review below: `batchcls eval` prints the coverage and accuracy above each,
# `batchcls report` how many rows fall under each, so the two tables line up.
REVIEW_THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[true, pred] counts over integer labels 0..num_classes-1."""
    return np.bincount(np.asarray(y_true) * num_classes + np.asarray(y_pred),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def macro_f1_of(cm: np.ndarray) -> float:
    """Mean F1 over the classes that have true examples.

    A class never true (an ``<error>`` pseudo-label, or a class the evaluated folder lacks) has no recall to
    judge; wrong predictions into it still cost the true class its recall. On a split where every class has
    test images this equals sklearn's average="macro".
    """
    scored = cm.sum(1) > 0
    return float(per_class(cm)["f1"][scored].mean()) if scored.any() else 0.0


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    return macro_f1_of(confusion(y_true, y_pred, num_classes))


def f1_table(y_true: list[str], y_pred: list[str]) -> tuple[float, float, list[dict]]:
    """(macro-F1, micro-F1, per-class rows for every label seen in truth or prediction), over label names."""
    labels = sorted(set(y_true) | set(y_pred))
    index = {lab: i for i, lab in enumerate(labels)}
    cm = confusion([index[t] for t in y_true], [index[p] for p in y_pred], len(labels))
    scores = per_class(cm)
    rows = [{"label": lab, "precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
             "f1": float(scores["f1"][i]), "support": int(scores["support"][i])} for i, lab in enumerate(labels)]
    micro = float(np.trace(cm) / cm.sum()) if len(y_true) else 0.0
    return macro_f1_of(cm), micro, rows
