"""Rows of one route compared with the reference route's rows the way the GPU tests hold them, so that a test
fails only when the code is wrong, not when a number moves by what fp16 or another JPEG decoder moves it:

- the same files in the same order, and every error row identical, reason included;
- what the network says (``model_label``, the label before the open-set decision): the same top-1, except
  where the reference's top two probabilities are closer than twice the confidence tolerance (a near tie
  that the tolerated drift may turn over);
- the top-1 confidence (from the ``prob_<class>`` columns, so a row the decision declined is compared too)
  within the tolerance;
- the open-set decision (``unknown`` or not): the same wherever the reference's ``known_score`` is more than
  ``band`` from the cut; a frame that close to the cut may go either way.

Rows must have been made with ``RunOptions(probs=True)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from batchcls.card import UNKNOWN_LABEL

NVJPEG_CONF_DIFF = 0.08  # nvJPEG's pixels are not Pillow's: its largest measured confidence drift was 0.056

# known_score is the share of correct validation frames scoring lower; the decision is compared only where
# the reference scores further than this from the cut. Same pixels (fp16 against FP32) move it least.
BAND_SAME_PIXELS = 0.005
BAND_NVJPEG = 0.01  # nvJPEG's other pixels move confidences by up to ~0.06 (docs/engines.md), scores with them


@dataclass
class RouteComparison:
    what: str
    files: int
    errors: int
    errors_identical: bool
    agreement: float  # share of ok rows with the same model_label
    max_conf_diff: float
    p95_conf_diff: float
    near_tie_flips: int  # model_label flips where the reference's top two were within 2 x the tolerance
    decisions_compared: int  # rows whose known_score is further than the band from the cut
    decisions_near_cut_differ: int  # decisions that differ within the band (allowed, reported)
    max_known_diff: float
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _probs(row: dict, classes: list[str]) -> np.ndarray:
    return np.array([row[f"prob_{c}"] for c in classes], np.float64)


def compare_routes(ref: list[dict], got: list[dict], classes: list[str], *, conf_diff: float, band: float,
                   cut: float | None, what: str) -> RouteComparison:
    """``ref`` and ``got``: rows of the same files; ``cut``: the decision's cut (None without a decision)."""
    problems: list[str] = []
    if [r["path"] for r in got] != [r["path"] for r in ref]:
        problems.append("the rows are not the same files in the same order")
    same_errors = [(r["status"], r["error"]) for r in got] == [(r["status"], r["error"]) for r in ref]
    if not same_errors:
        problems.append("the error rows differ")
    agree = n = flips = compared = near_cut = 0
    diffs: list[float] = []
    known_diffs: list[float] = []
    for r, g in zip(ref, got):
        if r["status"] != "ok" or g["status"] != "ok":
            continue
        n += 1
        p, q = _probs(r, classes), _probs(g, classes)
        diff = abs(float(p.max()) - float(q.max()))
        diffs.append(diff)
        if diff >= conf_diff:
            problems.append(f"{r['path']}: top-1 confidence {p.max():.4f} -> {q.max():.4f}")
        label_ref, label_got = r.get("model_label", r["label"]), g.get("model_label", g["label"])
        if label_ref == label_got:
            agree += 1
        else:
            top2 = np.sort(p)[-2:]
            if top2[1] - top2[0] < 2 * conf_diff:
                flips += 1
            else:
                problems.append(f"{r['path']}: {label_ref} ({top2[1]:.3f}, next {top2[0]:.3f}) -> {label_got}")
        if cut is None or "known_score" not in r:
            continue
        known_diffs.append(abs(r["known_score"] - g["known_score"]))
        unknown_ref, unknown_got = r["label"] == UNKNOWN_LABEL, g["label"] == UNKNOWN_LABEL
        if abs(r["known_score"] - cut) > band:
            compared += 1
            if unknown_ref != unknown_got:
                problems.append(f"{r['path']}: known_score {r['known_score']:.4f} -> {g['known_score']:.4f} "
                                f"(cut {cut}) turned the decision over")
        elif unknown_ref != unknown_got:
            near_cut += 1
    return RouteComparison(
        what=what, files=len(ref), errors=sum(r["status"] != "ok" for r in ref), errors_identical=same_errors,
        agreement=agree / n if n else 0.0, max_conf_diff=max(diffs, default=0.0),
        p95_conf_diff=float(np.percentile(diffs, 95)) if diffs else 0.0, near_tie_flips=flips,
        decisions_compared=compared, decisions_near_cut_differ=near_cut, max_known_diff=max(known_diffs, default=0.0),
        problems=problems)
