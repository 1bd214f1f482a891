"""``batchcls eval``: score a model on a labelled set with the run pipeline.

A labelled set is a folder per class (``DIR/<class>/<image>``) or, as test sets often come, one flat
folder and a CSV of ``path,label`` rows (paths relative to the folder).
"""
from __future__ import annotations

import csv
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from batchcls.backends import load_backend
from batchcls.card import load_card
from batchcls.errors import InputError
from batchcls.fsutil import confined
from batchcls.infer import UNKNOWN_LABEL, Classifier
from batchcls.metrics import REVIEW_THRESHOLDS, f1_table
from batchcls.pipeline import RunOptions, classify
from batchcls.progress import progress
from batchcls.scan import InputFile, labelled_files


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
    top_k: int = 1
    top_k_accuracy: float | None = None  # the true class among the K most probable (top_k > 1 only)
    open_set: dict | None = None  # unknown_rate, coverage, selective_accuracy, cut (None: decision off)
    predicted_only: dict[str, int] = field(default_factory=dict)  # labels predicted with no image in the set: how often


def labels_from_csv(root: str | os.PathLike, labels: str | os.PathLike) -> list[tuple[InputFile, str]]:
    """(file, class) pairs from a CSV with ``path`` and ``label`` columns, paths relative to ``root``.

    A path that leaves ``root`` is not read (an error row says why); a path listed twice counts once, however
    it is spelled (``a.jpg``, ``./a.jpg``, ``sub/../a.jpg``): a second spelling would score the image twice.
    """
    try:
        with open(labels, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = {(name or "").strip().lower(): name for name in reader.fieldnames or ()}
            if "path" not in fields or "label" not in fields:
                raise InputError(f"{labels} needs a header with 'path' and 'label' columns, "
                                 f"not {', '.join(reader.fieldnames or ()) or 'an empty first line'}")
            pairs: dict[str, tuple[InputFile, str]] = {}
            for row in reader:
                rel, label = (row.get(fields["path"]) or "").strip(), (row.get(fields["label"]) or "").strip()
                rel = posixpath.normpath(rel.replace(os.sep, "/")) if rel else rel
                if not rel or rel in pairs:
                    continue
                if not label:
                    raise InputError(f"{labels}: the row of {rel} has no label: give every path a label")
                where = confined(root, rel)
                pairs[rel] = (InputFile(where, rel) if where else
                              InputFile(rel, rel, error=f"outside {root}: not read"), label)
    except OSError as e:
        raise InputError(f"cannot read labels file {labels}: {e.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"{labels} is not a readable CSV ({e}): expected path,label rows") from None
    if not pairs:
        raise InputError(f"{labels} lists no images: expected path,label rows")
    return list(pairs.values())


def evaluate_folder(root: str | os.PathLike, *, model: str | None = None, backend: str | None = None,
                    device: str | None = None, labels: str | os.PathLike | None = None,
                    options: RunOptions = RunOptions(), quiet: bool = True) -> EvalReport:
    """Score the model on ``root``: its class folders, or its files as ``labels`` (a path,label CSV) names them.

    ``options.top_k`` > 1 also scores top-K accuracy; ``quiet=False`` shows a progress bar on a terminal.
    """
    card = load_card(model)
    options.columns(card)  # a --top-k past the class count is refused here, as in run
    classifier = Classifier(card, load_backend(card, backend, device=device), tta=options.tta,
                            open_set=options.open_set)
    pairs = labels_from_csv(root, labels) if labels is not None else labelled_files(root)
    truth = dict((f.rel, label) for f, label in pairs)
    y_true, y_pred, conf, in_top_k = [], [], [], []
    errors = 0
    bar = progress("evaluating", quiet=quiet, total=len(pairs))
    try:
        for rows in classify([f for f, _ in pairs], classifier, options):
            for r in rows:
                y_true.append(truth[r["path"]])
                ok = r["status"] == "ok"
                errors += not ok
                y_pred.append(r["label"] if ok else "<error>")
                conf.append(r["confidence"] if ok else 0.0)
                top = [r.get("model_label") or r["label"]] + [r.get(f"label_{k}") for k in range(2, options.top_k + 1)]
                in_top_k.append(ok and y_true[-1] in top)
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    macro, micro, per_class = f1_table(y_true, y_pred)
    never_true = Counter(p for p in y_pred if p != "<error>" and p not in truth.values())
    t, p, c = np.asarray(y_true, object), np.asarray(y_pred, object), np.asarray(conf, float)
    open_set = None
    if classifier.open_set is not None:
        unknown = p == UNKNOWN_LABEL
        kept = ~unknown & (p != "<error>")
        open_set = {"cut": options.open_set_cut if options.open_set_cut is not None else classifier.open_set.cut,
                    "unknown_rate": float(unknown.mean()) if len(p) else 0.0,
                    "coverage": float(kept.mean()) if len(p) else 0.0,
                    "selective_accuracy": float((t[kept] == p[kept]).mean()) if kept.any() else float("nan")}
    coverage = []
    for th in REVIEW_THRESHOLDS:
        kept = c >= th
        coverage.append({"threshold": th, "coverage": float(kept.mean()),
                         "accuracy": float((t[kept] == p[kept]).mean()) if kept.any() else float("nan")})
    return EvalReport(n=len(y_true), errors=errors, accuracy=micro, macro_f1=macro, micro_f1=micro,
                      per_class=[row for row in per_class if row["support"] > 0], coverage=coverage,
                      open_set=open_set, predicted_only=dict(sorted(never_true.items())),
                      unknown_classes=sorted(set(y_true) - set(card.classes) - {UNKNOWN_LABEL}), top_k=options.top_k,
                      top_k_accuracy=float(np.mean(in_top_k)) if options.top_k > 1 and in_top_k else None)


def format_report(r: EvalReport) -> str:
    top_k = f"  top-{r.top_k} accuracy: {r.top_k_accuracy:.4f}" if r.top_k_accuracy is not None else ""
    lines = [f"images: {r.n}  errors: {r.errors}",
             f"accuracy: {r.accuracy:.4f}{top_k}  macro-F1: {r.macro_f1:.4f}  micro-F1: {r.micro_f1:.4f}"]
    if r.open_set is not None:
        lines.append(f"open set (cut {r.open_set['cut']:.4f}): unknown {r.open_set['unknown_rate']:.4f}  "
                     f"coverage {r.open_set['coverage']:.4f}  accuracy on kept rows {r.open_set['selective_accuracy']:.4f}"
                     "  (an 'unknown' on a known class counts as wrong above)")
    if r.unknown_classes:
        lines.append(f"classes the model does not know (always wrong): {', '.join(r.unknown_classes)}")
    lines += ["", f"{'label':32} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    lines += [f"{row['label']:32} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:7.3f} {row['support']:8d}"
              for row in r.per_class]
    if r.predicted_only:  # no images of theirs here: no recall or F1 to show, only that the model said them
        lines.append("predicted, with no images here (always wrong): "
                     + ", ".join(f"{label} ({n}x)" for label, n in r.predicted_only.items()))
    lines += ["", "threshold  coverage  accuracy-above"]
    lines += [f"{c['threshold']:9.2f}  {c['coverage']:8.3f}  {c['accuracy']:14.4f}" for c in r.coverage]
    return "\n".join(lines)
