"""The infer stage: uint8 images -> calibrated probabilities -> result rows, for any backend.

Every backend maps a float32 NCHW batch to raw logits; normalisation before it and softmax with the
card's temperature after it happen here, once, so all backends give the same probabilities and rows.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from batchcls.backends import Backend
from batchcls.backends.record import read_record
from batchcls.card import UNKNOWN_LABEL, ModelCard, check_against_model
from batchcls.decode_stage import DecodedBatch
from batchcls.errors import GpuFailure, ModelError, first_line
from batchcls.openset import Decisions, OpenSet
from batchcls.presets import EvalPreset, normalize

TTA_MODES = ("none", "flip")  # flip: the mean of the image's and its mirror's probabilities; None: the card's choice


def mean_of_views(p: np.ndarray, views: int) -> np.ndarray:
    """Probabilities of ``views`` stacked copies of a batch (view-major) averaged back to one per image."""
    if views == 1:
        return p
    return p.reshape(views, -1, p.shape[1]).mean(axis=0).astype(np.float32)


class Outputs(NamedTuple):
    """What one batch gives: calibrated probabilities, and the raw logits and penultimate features (mean over
    TTA views) that the open-set decision and ``--embeddings`` read; features are None for a one-output model."""

    probs: np.ndarray
    logits: np.ndarray | None = None
    features: np.ndarray | None = None


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def served_model(card: ModelCard, backend: Backend) -> Path:
    """The model file whose numbers ``backend`` computes: the decision's statistics are fitted per file.

    A backend that runs the bundle's weights another way (PyTorch's model.pt2) names the file it matches in
    ``decision_model``; ONNX Runtime runs ``model_path`` itself."""
    name = getattr(backend, "decision_model", None)
    if name:
        return Path(card.bundle_dir) / name
    path = getattr(backend, "model_path", None)
    return Path(path) if path else card.onnx_path


def load_decision(card: ModelCard, backend: Backend, tta: str) -> OpenSet | None:
    """The open-set decision fitted for what serves (model file x TTA), or None for a bundle without one.

    Decisions ``make engine`` fitted for this machine's own builds live in its record beside the card."""
    extra = read_record(card).get("openset", []) if card.bundle_dir else []
    decisions = Decisions.from_card(card, extra=extra if isinstance(extra, list) else [])
    if decisions is None:
        return None
    oset = decisions.load(served_model(card, backend), tta)
    if not oset.passed:
        print(f"warning: the open-set decision for {oset.config.get('model')} with --tta {tta} did not pass its gate "
              f"({oset.config.get('gate', {}).get('reason', 'no gate recorded')}): its unknown labels are less "
              "reliable", file=sys.stderr)
    return oset


class Classifier:
    """A card and a backend: uint8 images in, calibrated probabilities and result rows out."""

    def __init__(self, card: ModelCard, backend: Backend, *, tta: str | None = None, open_set: bool = True) -> None:
        check_against_model(card, backend)  # a card from another model fails here, not mid-run
        tta = card.tta if tta is None else tta  # what serves was chosen on validation (train/serving.py)
        if tta not in TTA_MODES:
            raise ModelError(f"unknown test-time augmentation {tta!r}: choose one of {', '.join(TTA_MODES)}")
        self.card = card
        self.backend = backend
        self.preset = EvalPreset.from_card(card)
        self.tta = tta
        self.open_set = load_decision(card, backend, tta) if open_set else None  # None: off, or none in the bundle
        if self.open_set is not None and self.open_set.needs_features and not getattr(backend, "has_features", hasattr(backend, "embed")):
            raise ModelError(f"the open-set decision of {card.bundle_dir} reads the model's 'features' output, which "
                             f"backend {getattr(backend, 'name', backend)} does not give: re-export the bundle, or "
                             "run with --no-open-set")

    def outputs(self, images: np.ndarray, *, features: bool = False) -> Outputs:
        """Probabilities (and with ``features``, logits and features) of uint8 NHWC images; with tta='flip',
        the mean over each image and its mirror (one batch of 2N through the backend)."""
        if len(images) == 0:
            n = self.card.num_classes
            return Outputs(np.empty((0, n), np.float32), np.empty((0, n), np.float32), None)
        views = 2 if self.tta == "flip" else 1
        on_gpu = getattr(getattr(self.backend, "device", None), "type", None) == "cuda"
        if on_gpu and hasattr(self.backend, "embed_uint8"):  # uint8 up, mirrored and normalised on the device
            logits, feats = self.backend.embed_uint8(images, views=views, features=features)
        else:
            if views == 2:
                images = np.concatenate([images, images[:, :, ::-1]])
            x = normalize(images, self.card.mean, self.card.std)
            if features and hasattr(self.backend, "embed"):
                logits, feats = self.backend.embed(x)
            else:
                logits, feats = self.backend.infer(x), None
        p = mean_of_views(softmax(logits, self.card.temperature), views)
        return Outputs(p, mean_of_views(logits, views), None if feats is None else mean_of_views(feats, views))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of uint8 NHWC images (see ``outputs``)."""
        return self.outputs(images).probs

    def wants_features(self, open_set: bool, embeddings: bool = False) -> bool:
        return embeddings or (open_set and self.open_set is not None and self.open_set.needs_features)

    def rows(self, batch: DecodedBatch, *, top_k: int = 1, threshold: float | None = None, probs: bool = False,
             open_set: bool = True, open_set_cut: float | None = None,
             probabilities: Callable[[], np.ndarray | Outputs] | None = None,
             embeddings: bool = False) -> list[dict]:
        """One row per file of ``batch``; ``probabilities`` collects work already launched (GPU path).

        With ``threshold`` an ok row also has ``model_label``, the top label even when the row says
        'unknown'; ``probs`` adds ``prob_<class>`` for every class (see ``output.columns_for``). With
        ``open_set`` and a bundle that has the decision, every ok row gets ``known_score`` and ``model_label``,
        and ``label`` is 'unknown' when the score is below ``open_set_cut`` (default: the card's cut).
        With ``embeddings`` every row gets ``embedding``: the penultimate-layer vector (float32), None on an
        error row; it is no output column (writers pick their columns), ``--embeddings`` and the API read it.
        """
        decide = open_set and self.open_set is not None
        want = self.wants_features(open_set, embeddings)
        if embeddings and not getattr(self.backend, "has_features", hasattr(self.backend, "embed")):
            raise ModelError("this model has no 'features' output, which embeddings need: re-export the bundle "
                             "with train/ (python -m train.export)")
        try:
            out = probabilities() if probabilities is not None else self.outputs(batch.images, features=want)
            out = out if isinstance(out, Outputs) else Outputs(out)
            known = self.open_set.known_score(out.probs, out.logits, out.features) if decide else None  # type: ignore[union-attr]
            infer_error = None
        except GpuFailure:  # out of memory or a CUDA error state: every later batch would fail too
            raise
        except Exception as e:  # an inference failure becomes error rows, not a crash
            out, known = None, None
            infer_error = f"inference failed: {first_line(e)}"
        cut = (open_set_cut if open_set_cut is not None else self.open_set.cut) if decide else None  # type: ignore[union-attr]
        rows, i = [], 0
        for f, err in zip(batch.files, batch.errors):
            row: dict = {"path": f.rel, "label": "", "confidence": None, "status": "error", "error": err or ""}
            if embeddings:
                row["embedding"] = None
            if err is None:
                if out is None:
                    row["error"] = infer_error
                else:
                    p = out.probs[i]
                    order = np.argsort(-p, kind="stable")[:max(top_k, 1)]
                    top = float(p[order[0]])
                    label = self.card.classes[order[0]]
                    declined = known is not None and known[i] < cut
                    unknown = declined or (threshold is not None and top < threshold)
                    # a declined row's confidence is that of its label: P(none of the classes) = 1 - known_score
                    confidence = float(1.0 - known[i]) if declined else top  # type: ignore[index]
                    row.update(label=UNKNOWN_LABEL if unknown else label, confidence=confidence, status="ok")
                    if threshold is not None or known is not None:
                        row["model_label"] = label
                    if known is not None:
                        row["known_score"] = float(known[i])
                    for k, j in enumerate(order[1:], start=2):
                        row[f"label_{k}"], row[f"confidence_{k}"] = self.card.classes[j], float(p[j])
                    if probs:
                        row.update({f"prob_{c}": float(v) for c, v in zip(self.card.classes, p)})
                    if embeddings:
                        dim = self.card.embedding_dim or out.features.shape[1]
                        row["embedding"] = out.features[i, :dim].astype(np.float32)
                i += 1
            rows.append(row)
        return rows
