"""``batchcls eval``: score a model on a folder-per-class labelled set with the run pipeline."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from batchcls.backends import load_backend
from batchcls.card import load_card
from batchcls.infer import Classifier
from batchcls.metrics import REVIEW_THRESHOLDS, f1_table
from batchcls.pipeline import RunOptions, classify
from batchcls.scan import labelled_files


@dataclass
class EvalReport:
    n: int
    errors: int
    accuracy: float
    macro_f1: float
    micro_f1: float
    per_class: list[dict]  # label, precision, recall, f1, support
    coverage: list[dict] = field(default_factory=list)  # threshold, coverage, accuracy
    unknown_classes: list[str] = field(default_factory=list)


def evaluate_folder(root: str | os.PathLike, *, model: str | None = None, backend: str | None = None,
                    options: RunOptions = RunOptions()) -> EvalReport:
    card = load_card(model)
    classifier = Classifier(card, load_backend(card, backend), tta=options.tta)
    pairs = labelled_files(root)
    truth = dict((f.rel, label) for f, label in pairs)
    y_true, y_pred, conf = [], [], []
    errors = 0
    for rows in classify([f for f, _ in pairs], classifier, options):
        for r in rows:
            y_true.append(truth[r["path"]])
            ok = r["status"] == "ok"
            errors += not ok
            y_pred.append(r["label"] if ok else "<error>")
            conf.append(r["confidence"] if ok else 0.0)
    macro, micro, per_class = f1_table(y_true, y_pred)
    t, p, c = np.asarray(y_true, object), np.asarray(y_pred, object), np.asarray(conf, float)
    coverage = []
    for th in REVIEW_THRESHOLDS:
        kept = c >= th
        coverage.append({"threshold": th, "coverage": float(kept.mean()),
                         "accuracy": float((t[kept] == p[kept]).mean()) if kept.any() else float("nan")})
    return EvalReport(n=len(y_true), errors=errors, accuracy=micro, macro_f1=macro, micro_f1=micro,
                      per_class=per_class, coverage=coverage,
                      unknown_classes=sorted(set(y_true) - set(card.classes)))


def format_report(r: EvalReport) -> str:
    lines = [f"images: {r.n}  errors: {r.errors}",
             f"accuracy: {r.accuracy:.4f}  macro-F1: {r.macro_f1:.4f}  micro-F1: {r.micro_f1:.4f}"]
    if r.unknown_classes:
        lines.append(f"classes the model does not know (always wrong): {', '.join(r.unknown_classes)}")
    lines += ["", f"{'label':32} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    lines += [f"{row['label']:32} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:7.3f} {row['support']:8d}"
              for row in r.per_class]
    lines += ["", "threshold  coverage  accuracy-above"]
    lines += [f"{c['threshold']:9.2f}  {c['coverage']:8.3f}  {c['accuracy']:14.4f}" for c in r.coverage]
    return "\n".join(lines)
