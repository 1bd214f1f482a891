"""The open-set decision: does an image show one of the model's classes at all?

A classifier names one of its classes for every image, a colour wheel included. This module turns what one
batch gave (calibrated probabilities, logits, features; ``infer.Outputs``) into ``known_score``: a probability,
0-1, that the image shows one of the classes (under even odds of a known and a foreign image). An image is
``unknown`` when its score is below the cut, in the same units.

The score is a logistic model over a few standardised signals, each cheap at inference:

- ``msp``: the largest calibrated probability, as a log-odds;
- ``energy``: the free energy of the logits (Liu et al. 2020);
- ``texture``: the Mahalanobis distance of intermediate-layer "texture" statistics (the per-channel mean and
  spread of two stages) to one Gaussian of training frames: photos, clipart and flat colours sit far out;
- ``maha``: the distance of the penultimate vector to the nearest class mean (Lee et al. 2018).

Statistics depend on what computes them: an INT8 model, a TensorRT plan or test-time augmentation move every
one of these signals. So the bundle holds one fitted decision per served configuration, keyed by the model
file's sha256 and the TTA mode (``Decisions``); the ``Classifier`` picks the one for what it serves and never
runs with another's. ``train/decision.py`` fits them on validation frames at full size and shrunk several
ways, so a user's small frame is not "foreign", and gates each one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchcls.backends.record import file_sha256
from batchcls.errors import ModelError

SIGNALS = ("msp", "energy", "texture", "maha")
FEATURE_SIGNALS = ("texture", "maha")
FIT_COMMAND = "python -m train.decision --bundle {bundle}"  # what fits a missing configuration


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def signals(names: tuple[str, ...], arrays: dict[str, np.ndarray], probs: np.ndarray, logits: np.ndarray | None,
            features: np.ndarray | None, temperature: float) -> np.ndarray:
    """(N, len(names)) raw signals, each higher = more like the training frames."""
    cols = []
    for name in names:
        if name == "msp":
            p = np.clip(probs.max(axis=1).astype(np.float64), 1e-7, 1 - 1e-7)
            cols.append(np.log(p) - np.log1p(-p))
        elif name == "energy":
            if logits is None:
                raise ModelError("the open-set signal 'energy' needs the model's logits")
            cols.append(temperature * _logsumexp(logits.astype(np.float64) / temperature))
        elif features is None:
            raise ModelError(f"the open-set signal {name!r} needs the model's 'features' output, which this backend "
                             "does not give: re-export the bundle, or run with --no-open-set")
        else:
            dim = int(arrays["embed_dim"])  # features = penultimate vector (dim values), then texture statistics
            if name == "texture":
                x = (features[:, dim:].astype(np.float32) - arrays["tex_mean"]) @ arrays["tex_whiten"]
            else:
                w = features[:, :dim].astype(np.float32) @ arrays["whiten"]
                c = arrays["means_w"]
                d = (w * w).sum(1)[:, None] - 2.0 * w @ c.T + (c * c).sum(1)[None, :]
                x = np.sqrt(np.maximum(d.min(axis=1), 0.0))[:, None]
            cols.append(-np.log1p(np.square(x).sum(1).astype(np.float64)))
    return np.stack(cols, axis=1) if cols else np.zeros((len(probs), 0))


@dataclass(frozen=True)
class OpenSet:
    """One fitted decision: for one model file and one TTA mode, ``known_score`` of a batch and the cut."""

    method: str  # the signals, joined by '+'
    cut: float  # below it an image is 'unknown'; a probability like known_score
    temperature: float
    arrays: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the card's entry: model, sha256, tta, gate

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(self.method.split("+"))

    @property
    def needs_features(self) -> bool:
        return any(s in FEATURE_SIGNALS for s in self.signals)

    @property
    def passed(self) -> bool:
        return bool(self.config.get("gate", {}).get("passed", False))

    def known_score(self, probs: np.ndarray, logits: np.ndarray | None = None,
                    features: np.ndarray | None = None) -> np.ndarray:
        """P(the image shows one of the classes): the fitted logistic model over the standardised signals."""
        z = signals(self.signals, self.arrays, probs, logits, features, self.temperature)
        z = (z - self.arrays["sig_mean"]) / self.arrays["sig_std"]
        t = np.clip(z @ self.arrays["coef"] + float(self.arrays["intercept"]), -50, 50)
        return (1.0 / (1.0 + np.exp(-t))).astype(np.float32)


def _check_arrays(method: str, arrays: dict[str, np.ndarray], where: str) -> None:
    """Refuse statistics that cannot describe this decision: wrong shapes, NaN, missing pieces."""
    names = method.split("+")
    need = ["sig_mean", "sig_std", "coef", "intercept"]
    if "texture" in names or "maha" in names:
        need.append("embed_dim")
    if "texture" in names:
        need += ["tex_mean", "tex_whiten"]
    if "maha" in names:
        need += ["whiten", "means_w"]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ModelError(f"{where} lacks {', '.join(missing)}: refit it with `{FIT_COMMAND.format(bundle='BUNDLE')}`")
    for k in ("sig_mean", "sig_std", "coef"):
        if arrays[k].shape != (len(names),) or not np.isfinite(arrays[k]).all():
            raise ModelError(f"{where}: {k} does not fit the method {method!r} (shape {arrays[k].shape}, or not finite)")
    if (arrays["sig_std"] <= 0).any() or not np.isfinite(float(arrays["intercept"])):
        raise ModelError(f"{where}: the standardisation or intercept is not usable")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Decisions:
    """Every fitted decision of a bundle (the card's, plus those ``make engine`` fitted for its local builds),
    looked up by the sha256 of the model file that serves and the TTA mode."""

    def __init__(self, bundle_dir: Path, entries: list[dict[str, Any]], temperature: float) -> None:
        self.bundle_dir, self.entries, self.temperature = Path(bundle_dir), entries, temperature

    @classmethod
    def from_card(cls, card: Any, extra: list[dict[str, Any]] | None = None) -> Decisions | None:
        """The bundle's decisions, or None for a bundle without any; a malformed section is one line."""
        spec = getattr(card, "openset", None)
        if not spec:
            return None
        entries = spec.get("configs") if isinstance(spec, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ModelError(f"the model card of {card.bundle_dir} has an 'openset' section without 'configs' (an "
                             f"older bundle): refit it with `{FIT_COMMAND.format(bundle=card.bundle_dir)}`, or run "
                             "with --no-open-set")
        for i, e in enumerate([*entries, *(extra or [])]):
            where = f"openset config {i} of {card.bundle_dir}"
            if not isinstance(e, dict):
                raise ModelError(f"{where} is not an object: refit the decision")
            for key in ("model_sha256", "tta", "method", "file", "sha256"):
                if not isinstance(e.get(key), str) or not e[key]:
                    raise ModelError(f"{where} has no usable {key!r}: refit the decision")
            if not _number(e.get("cut")) or not 0.0 <= e["cut"] <= 1.0:
                raise ModelError(f"{where} has cut {e.get('cut')!r}: it must be a number from 0 to 1")
            if any(s not in SIGNALS for s in e["method"].split("+")):
                raise ModelError(f"{where} names method {e['method']!r}: its signals must come from {', '.join(SIGNALS)}")
            if Path(e["file"]).name != e["file"]:
                raise ModelError(f"{where} names statistics file {e['file']!r} outside its bundle: refit the decision")
        return cls(Path(card.bundle_dir), [*entries, *(extra or [])], float(card.temperature))

    def find(self, model_sha256: str, tta: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["model_sha256"] == model_sha256 and e["tta"] == tta), None)

    def load(self, model: Path, tta: str) -> OpenSet:
        """The decision fitted for ``model`` (the file that serves) under ``tta``; refuses in one line when none was."""
        sha = file_sha256(model)
        entry = self.find(sha, tta)
        if entry is None:
            raise ModelError(f"the open-set decision was not fitted for {model.name} with --tta {tta}: fit it with "
                             f"`{FIT_COMMAND.format(bundle=self.bundle_dir)}` (it needs the validation split), "
                             "choose another --tta, or run with --no-open-set")
        path = (model.parent if (model.parent / entry["file"]).is_file() else self.bundle_dir) / entry["file"]
        if not path.is_file():
            raise ModelError(f"open-set statistics {path} are missing: reinstall the bundle, or run with --no-open-set")
        if file_sha256(path) != entry["sha256"]:
            raise ModelError(f"{path} does not match the sha256 recorded for it: the bundle was changed; reinstall "
                             "it, or run with --no-open-set")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read open-set statistics {path}: {e}") from None
        _check_arrays(entry["method"], arrays, str(path))
        return OpenSet(method=entry["method"], cut=float(entry["cut"]), temperature=self.temperature,
                       arrays=arrays, config=entry)
