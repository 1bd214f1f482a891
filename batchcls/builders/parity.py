"""Compare an engine's rows with the ONNX FP32 reference's rows on the same files.

Used three ways: to decide whether INT8 is kept (macro-F1 on labelled validation images), by the
parity tests (top-1 agreement and confidence difference), and by the benchmark's report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from batchcls.metrics import f1_table

MIN_AGREEMENT = 0.995  # identical top-1 on at least this share of images
MAX_CONF_DIFF = 0.02  # and top-1 confidence within this much on every image


@dataclass(frozen=True)
class Comparison:
    n: int  # files compared (ok in both)
    errors: int  # files that errored in either
    agreement: float  # share of files with the same top-1 label
    max_conf_diff: float  # max |confidence_ref - confidence_candidate|
    p95_conf_diff: float  # its 95th percentile over files
    macro_f1_ref: float | None = None  # only with ground-truth labels
    macro_f1_candidate: float | None = None

    @property
    def parity_ok(self) -> bool:
        return self.n > 0 and self.agreement >= MIN_AGREEMENT and self.max_conf_diff < MAX_CONF_DIFF

    @property
    def f1_drop_points(self) -> float | None:
        """How many macro-F1 points the candidate loses (negative: it gained)."""
        if self.macro_f1_ref is None or self.macro_f1_candidate is None:
            return None
        return 100.0 * (self.macro_f1_ref - self.macro_f1_candidate)

    def to_dict(self) -> dict:
        return {**asdict(self), "parity_ok": self.parity_ok, "f1_drop_points": self.f1_drop_points}


def compare_rows(reference: list[dict], candidate: list[dict], truth: dict[str, str] | None = None) -> Comparison:
    """Rows (as written by ``batchcls run``) of the same files from two engines, matched by path."""
    cand = {r["path"]: r for r in candidate}
    agree, n, errors = 0, 0, 0
    diffs: list[float] = []
    y_true, y_ref, y_cand = [], [], []
    for r in reference:
        c = cand.get(r["path"])
        if c is None or r["status"] != "ok" or c["status"] != "ok":
            errors += 1
        else:
            n += 1
            agree += r["label"] == c["label"]
            diffs.append(abs(float(r["confidence"]) - float(c["confidence"])))
        if truth is not None and r["path"] in truth:
            y_true.append(truth[r["path"]])
            y_ref.append(r["label"] if r["status"] == "ok" else "<error>")
            y_cand.append(c["label"] if c is not None and c["status"] == "ok" else "<error>")
    f1_ref = f1_cand = None
    if y_true:
        f1_ref, f1_cand = f1_table(y_true, y_ref)[0], f1_table(y_true, y_cand)[0]
    return Comparison(n=n, errors=errors, agreement=agree / n if n else 0.0,
                      max_conf_diff=max(diffs, default=0.0),
                      p95_conf_diff=float(np.percentile(diffs, 95)) if diffs else 0.0,
                      macro_f1_ref=f1_ref, macro_f1_candidate=f1_cand)
