"""The open-set decision: does an image show one of the model's classes at all?

A classifier names one of its classes for every image, a colour wheel included. This module turns the
network's features (and logits) into ``known_score``: the share of correctly classified validation frames whose
raw score is at or below this image's, so 0.3 reads "scores like the lowest 30 % of real frames" and 0 "lower
than every real frame seen". An image is ``unknown`` when its score is below the cut: the card's operating
point, chosen on validation so that at most 1 in 200 correctly classified frames and 1 in 100 of all frames
are flagged, at full size and 2x downscaled.

Everything that runs at inference travels in the bundle as ``openset.npz`` (its sha256 in the card): the
per-class feature means and a whitening matrix for the Mahalanobis distance (Lee et al. 2018, with the
"relative" background term of Ren et al. 2021 when selected), or a bank of normalised training features for
k-nearest-neighbour distance (Sun et al. 2022), or one Gaussian of intermediate-layer "texture" statistics
(the per-channel mean and spread of two EfficientNet stages, after Lee et al.'s feature ensemble), and the
validation quantiles that map a raw score to ``known_score``. The method is chosen on validation by ``train/openset.py``; every backend and runner scores
through ``OpenSet.known_score`` here, so the decision is one implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchcls.backends.record import file_sha256
from batchcls.errors import ModelError

OPENSET_FILE = "openset.npz"
METHODS = ("msp", "energy", "maha", "relmaha", "knn", "maha+energy", "texture", "texture+msp")
FEATURE_METHODS = ("maha", "relmaha", "knn", "maha+energy", "texture", "texture+msp")
DEFAULT_FLAG_RATE = 0.005  # the default cut flags at most this share of correctly classified validation frames


def _energy(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    m = z.max(axis=1)
    return temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def _msp(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def _min_sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distance of each row of ``x`` to its nearest row of ``centres`` (both whitened)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.maximum(d.min(axis=1), 0.0)


def raw_score(method: str, arrays: dict[str, np.ndarray], logits: np.ndarray, features: np.ndarray | None,
              temperature: float) -> np.ndarray:
    """Higher = more like the training classes. ``arrays`` holds the fitted statistics (see train/openset.py)."""
    if method == "msp":
        return _msp(logits, temperature)
    if method == "energy":
        return _energy(logits, temperature)
    if features is None:
        raise ModelError(f"open-set method {method!r} needs the model's 'features' output, and this model has none")
    dim = int(arrays["embed_dim"])  # features = penultimate vector (dim values), then texture statistics
    f, tex = features[:, :dim].astype(np.float32), features[:, dim:].astype(np.float32)
    if method in ("texture", "texture+msp"):
        # one Gaussian of the training frames' texture statistics: photos, clipart and flat colours sit far out
        score = -np.square((tex - arrays["tex_mean"]) @ arrays["tex_whiten"]).sum(1).astype(np.float64)
        if method == "texture+msp":  # both on one scale: standardised on correct validation frames
            mix = arrays["mix"]
            score = (score - mix[0]) / mix[1] + (_msp(logits, temperature) - mix[2]) / mix[3]
        return score
    if method == "knn":
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        sims = f @ arrays["bank"].astype(np.float32).T  # cosine similarity to the normalised training features
        k = int(arrays["k"])
        return np.partition(sims, -k, axis=1)[:, -k]  # the k-th nearest neighbour's similarity
    w = arrays["whiten"].astype(np.float32)
    score = -_min_sq_dist(f @ w, arrays["means_w"].astype(np.float32))
    if method == "relmaha":  # minus the distance to one Gaussian of all training features: what is merely unusual
        bg = (f - arrays["bg_mean"].astype(np.float32)) @ arrays["bg_whiten"].astype(np.float32)
        score = score + np.square(bg).sum(1)
    if method == "maha+energy":
        # the two scores on one scale: each standardised by its spread on correct validation frames
        e = _energy(logits, temperature)
        score = (score - arrays["mix"][0]) / arrays["mix"][1] + (e - arrays["mix"][2]) / arrays["mix"][3]
    return score.astype(np.float64)


@dataclass(frozen=True)
class OpenSet:
    """The fitted decision of one bundle: ``known_score`` for a batch, and the default cut."""

    method: str
    cut: float  # default operating point on known_score: below it an image is 'unknown'
    temperature: float
    arrays: dict[str, Any]

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def known_score(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """Map the raw score through the validation quantiles: share of correct val frames scoring lower."""
        raw = raw_score(self.method, self.arrays, logits, features, self.temperature)
        q_values, q_levels = self.arrays["q_values"], self.arrays["q_levels"]
        return np.interp(raw, q_values, q_levels, left=0.0, right=1.0).astype(np.float32)

    @classmethod
    def from_card(cls, card: Any) -> OpenSet | None:
        """The bundle's decision, or None for a bundle without one; a tampered statistics file is refused."""
        spec = getattr(card, "openset", None)
        if not spec:
            return None
        path = Path(card.bundle_dir) / spec.get("file", OPENSET_FILE)
        if not path.is_file():
            raise ModelError(f"the model card names open-set statistics {path.name} but {path} is missing: "
                             "reinstall the bundle, or run with --no-open-set")
        if spec.get("sha256") and file_sha256(path) != spec["sha256"]:
            raise ModelError(f"{path} does not match the sha256 in the model card: the bundle was changed; "
                             "reinstall it, or run with --no-open-set")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        method = spec.get("method", "")
        if method not in METHODS:
            raise ModelError(f"unknown open-set method {method!r} in the model card: choose one of {', '.join(METHODS)}")
        return cls(method=method, cut=float(spec["cut"]), temperature=float(card.temperature), arrays=arrays)
