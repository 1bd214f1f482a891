"""The model card: the single source of truth for classes and preprocessing.

A bundle is a folder holding ``card.json`` and the ONNX model it names. The runtime refuses
a card with a missing field rather than falling back to any default (e.g. ImageNet mean/std).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchcls.errors import ModelError, first_line
from batchcls.fsutil import atomic_write, confined

CARD_FILE = "card.json"
RESIZE_MODES = ("squash", "center_crop")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
DEFAULT_BUNDLE_NAME = "simpsons"
UNKNOWN_LABEL = "unknown"  # the label of a row whose image the model declines to name (its guess: model_label)
REQUIRED = ("name", "architecture", "classes", "input_size", "resize_mode", "crop_pct",
            "interpolation", "mean", "std", "onnx")


@dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str
    classes: list[str]
    input_size: int  # square side in pixels fed to the network
    resize_mode: str  # "squash": whole frame to input_size²; "center_crop": shorter side, then crop
    crop_pct: float  # center_crop only: crop covers this fraction of the resized shorter side
    interpolation: str
    mean: list[float]
    std: list[float]
    onnx: str  # file name inside the bundle folder
    temperature: float = 1.0  # softmax(logits / T); fitted on validation after training
    onnx_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    openset: dict[str, Any] = field(default_factory=dict)  # the "none of these" decision (batchcls.openset)
    tta: str = "none"  # test-time augmentation that serves by default ("none" or "flip"), chosen on validation
    embedding_dim: int = 0  # the features output starts with the penultimate vector of this length (0: none)
    bundle_dir: Path | None = field(default=None, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def onnx_path(self) -> Path:
        assert self.bundle_dir is not None, "card was not loaded from a bundle"
        return self.bundle_dir / self.onnx

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("bundle_dir")
        return d

    def save(self, bundle_dir: str | os.PathLike) -> Path:
        """Write card.json atomically, so a crash never leaves a half-written card."""
        path = Path(bundle_dir) / CARD_FILE
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 4096  # pixels per side; outside this a card is a typo, not a model


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _problems(data: dict[str, Any]) -> list[str]:
    """Everything wrong with a card's fields, one short phrase each (types first: later checks assume them)."""
    missing = [k for k in REQUIRED if k not in data]
    out = [f"lacks {', '.join(missing)}"] if missing else []
    for key in ("name", "architecture", "onnx"):
        if key in data and not (isinstance(data[key], str) and data[key]):
            out.append(f"{key} must be a non-empty string, not {data[key]!r}")
    onnx = data.get("onnx")
    if isinstance(onnx, str) and onnx and confined(".", onnx) is None:
        out.append(f"onnx {onnx!r} must name a file inside the bundle folder")
    classes = data.get("classes")
    if "classes" in data:
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
            out.append("classes must be a non-empty list of names (strings)")
        elif len(set(classes)) != len(classes):
            out.append("classes must be unique names")
        elif UNKNOWN_LABEL in classes:  # its rows could not be told from the rows the model declines
            out.append(f"a class is named {UNKNOWN_LABEL!r}, the label of images that show none of the classes, "
                       "so its rows could not be told apart (rename the class)")
    size = data.get("input_size")
    if "input_size" in data and not (isinstance(size, int) and not isinstance(size, bool)
                                     and MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE):
        out.append(f"input_size must be a whole number of pixels from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}, "
                   f"not {size!r}")
    if "resize_mode" in data and not (isinstance(data["resize_mode"], str) and data["resize_mode"] in RESIZE_MODES):
        out.append(f"resize_mode {data['resize_mode']!r} is not one of {RESIZE_MODES}")
    if "interpolation" in data and not (isinstance(data["interpolation"], str)
                                        and data["interpolation"] in INTERPOLATIONS):
        out.append(f"interpolation {data['interpolation']!r} is not one of {INTERPOLATIONS}")
    crop = data.get("crop_pct")
    if "crop_pct" in data and not (_number(crop) and 0 < crop <= 1):
        out.append(f"crop_pct must be a number in (0, 1], not {crop!r}")
    for key in ("mean", "std"):
        v = data.get(key)
        if key in data and not (isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)):
            out.append(f"{key} needs 3 numbers (R, G, B), not {v!r}")
        elif key == "std" and key in data and not all(x > 0 for x in v):
            out.append(f"std values must be > 0 (a 0 divides every pixel by zero), not {v!r}")
    t = data.get("temperature", 1.0)
    if not (_number(t) and t > 0):
        out.append(f"temperature must be a number > 0, not {t!r}")
    if not isinstance(data.get("onnx_sha256", ""), str):
        out.append("onnx_sha256 must be a string")
    for key in ("metrics", "training", "openset"):
        if not isinstance(data.get(key, {}), dict):
            out.append(f"{key} must be a JSON object")
    return out


def validate(data: dict[str, Any], source: str) -> None:
    """Refuse a card with any missing or ill-typed field, naming every problem on its own line."""
    problems = _problems(data)
    if len(problems) == 1:
        raise ModelError(f"model card {source} {problems[0]}: re-export the model with train/"
                         if problems[0].startswith("lacks") else
                         f"model card {source}: {problems[0]}: fix the card or re-export the model with train/")
    if problems:
        raise ModelError(f"model card {source} has {len(problems)} problems (fix the card or re-export the model "
                         "with train/):\n" + "\n".join(f"  {p}" for p in problems))


def check_against_model(card: ModelCard, backend: Any) -> None:
    """One forward pass of a blank image: the model must take the card's input size and return one
    score per class of the card. A card from another model would otherwise crash mid-run (more
    classes than outputs) or label every file with the wrong names (fewer)."""
    import numpy as np

    s = card.input_size
    blank = np.zeros((1, 3, s, s), np.float32)
    try:
        logits = np.asarray(backend.infer(blank))
    except Exception as e:  # backends raise their own untyped errors for a wrong input shape
        raise ModelError(f"the model of {card.bundle_dir} does not take the card's {s}x{s} input ({first_line(e)}): "
                         "the card does not belong to this model") from e
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise ModelError(f"the model of {card.bundle_dir} returns shape {tuple(logits.shape)} for one image, "
                         f"not (1, {card.num_classes}): it is not a classifier batchcls can run")
    if logits.shape[1] != card.num_classes:
        raise ModelError(f"the model of {card.bundle_dir} outputs {logits.shape[1]} scores but its card lists "
                         f"{card.num_classes} classes: the card does not belong to this model")


def default_bundle() -> Path:
    """$BATCHCLS_MODEL, else the shipped bundle: ``batchcls/bundles/simpsons``.

    One path for a checkout and a wheel: in the repository it is a symlink to engines/simpsons
    (resolved, so engines and messages name the real folder); the wheel holds it as package data.
    """
    env = os.environ.get("BATCHCLS_MODEL")
    if env:
        return Path(env)
    return (Path(__file__).parent / "bundles" / DEFAULT_BUNDLE_NAME).resolve()


def _no_bundle(bundle: Path, *, given: bool) -> str:
    """Why there is no card, told to whoever chose the folder: --model, BATCHCLS_MODEL, or the install."""
    if given:
        return (f"no model bundle at {bundle} (no {CARD_FILE} there): --model takes the folder that holds a "
                f"model's {CARD_FILE} and its ONNX file; leave it out for the shipped model")
    if os.environ.get("BATCHCLS_MODEL"):
        return (f"no model bundle at {bundle} (no {CARD_FILE} there), the folder BATCHCLS_MODEL names: point it "
                "at a bundle folder, or unset it for the shipped model")
    return (f"the shipped model is missing from {bundle}: reinstall batchcls (in a checkout: "
            "`git checkout engines/simpsons`), or pass --model DIR")


def load_card(path: str | os.PathLike | None = None) -> ModelCard:
    """Load a bundle folder (or its card.json); None means the shipped default."""
    bundle = Path(path) if path is not None else default_bundle()
    card_path = bundle / CARD_FILE if bundle.is_dir() else bundle
    if not card_path.is_file():
        raise ModelError(_no_bundle(bundle, given=path is not None))
    try:
        data = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read model card {card_path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"model card {card_path} is not a JSON object")
    validate(data, str(card_path))
    known = {k: v for k, v in data.items() if k in ModelCard.__dataclass_fields__ and k != "bundle_dir"}
    card = ModelCard(**known, bundle_dir=card_path.parent)
    if not card.onnx_path.is_file():
        raise ModelError(f"model file {card.onnx_path} named by {card_path} is missing")
    return card
