"""The infer stage: uint8 images -> calibrated probabilities -> result rows, for any backend.

Every backend maps a float32 NCHW batch to raw logits; normalisation before it and softmax with the
card's temperature after it happen here, once, so all backends give the same probabilities and rows.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from batchcls.backends import Backend
from batchcls.card import UNKNOWN_LABEL, ModelCard, check_against_model
from batchcls.decode_stage import DecodedBatch
from batchcls.errors import GpuFailure, ModelError, first_line
from batchcls.presets import EvalPreset, normalize

TTA_MODES = (None, "flip")  # flip: the mean of the image's and its mirror's probabilities


def mean_of_views(p: np.ndarray, views: int) -> np.ndarray:
    """Probabilities of ``views`` stacked copies of a batch (view-major) averaged back to one per image."""
    if views == 1:
        return p
    return p.reshape(views, -1, p.shape[1]).mean(axis=0).astype(np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Classifier:
    """A card and a backend: uint8 images in, calibrated probabilities and result rows out."""

    def __init__(self, card: ModelCard, backend: Backend, *, tta: str | None = None) -> None:
        check_against_model(card, backend)  # a card from another model fails here, not mid-run
        if tta not in TTA_MODES:
            raise ModelError(f"unknown test-time augmentation {tta!r}: choose one of {', '.join(map(str, TTA_MODES))}")
        self.card = card
        self.backend = backend
        self.preset = EvalPreset.from_card(card)
        self.tta = tta

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of uint8 NHWC images; with tta='flip', the mean over each image and
        its mirror (one batch of 2N through the backend)."""
        if len(images) == 0:
            return np.empty((0, self.card.num_classes), np.float32)
        if self.tta == "flip":
            images = np.concatenate([images, images[:, :, ::-1]])
        p = softmax(self.backend.infer(normalize(images, self.card.mean, self.card.std)), self.card.temperature)
        return mean_of_views(p, 2 if self.tta == "flip" else 1)

    def rows(self, batch: DecodedBatch, *, top_k: int = 1, threshold: float | None = None, probs: bool = False,
             probabilities: Callable[[], np.ndarray] | None = None) -> list[dict]:
        """One row per file of ``batch``; ``probabilities`` collects work already launched (GPU path).

        With ``threshold`` an ok row also has ``model_label``, the top label even when the row says
        'unknown'; ``probs`` adds ``prob_<class>`` for every class (see ``output.columns_for``).
        """
        try:
            batch_probs = probabilities() if probabilities is not None else self.probabilities(batch.images)
            infer_error = None
        except GpuFailure:  # out of memory or a CUDA error state: every later batch would fail too
            raise
        except Exception as e:  # an inference failure becomes error rows, not a crash
            batch_probs, infer_error = None, f"inference failed: {first_line(e)}"
        rows, i = [], 0
        for f, err in zip(batch.files, batch.errors):
            row: dict = {"path": f.rel, "label": "", "confidence": None, "status": "error", "error": err or ""}
            if err is None:
                if batch_probs is None:
                    row["error"] = infer_error
                else:
                    p = batch_probs[i]
                    order = np.argsort(-p, kind="stable")[:max(top_k, 1)]
                    top = float(p[order[0]])
                    label = self.card.classes[order[0]]
                    row.update(label=UNKNOWN_LABEL if threshold is not None and top < threshold else label,
                               confidence=top, status="ok")
                    if threshold is not None:
                        row["model_label"] = label
                    for k, j in enumerate(order[1:], start=2):
                        row[f"label_{k}"], row[f"confidence_{k}"] = self.card.classes[j], float(p[j])
                    if probs:
                        row.update({f"prob_{c}": float(v) for c, v in zip(self.card.classes, p)})
                i += 1
            rows.append(row)
        return rows
