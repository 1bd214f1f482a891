"""The model card: the single source of truth for classes and preprocessing.

A bundle is a folder holding ``card.json`` and the ONNX model it names. The runtime refuses
a card with a missing field rather than falling back to any default (e.g. ImageNet mean/std).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchcls.errors import ModelError

CARD_FILE = "card.json"
RESIZE_MODES = ("squash", "center_crop")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
DEFAULT_BUNDLE_NAME = "simpsons"
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
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


def validate(data: dict[str, Any], source: str) -> None:
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ModelError(f"model card {source} lacks {', '.join(missing)}: re-export the model with train/")
    if data["resize_mode"] not in RESIZE_MODES:
        raise ModelError(f"model card {source}: resize_mode {data['resize_mode']!r} is not one of {RESIZE_MODES}")
    if data["interpolation"] not in INTERPOLATIONS:
        raise ModelError(f"model card {source}: interpolation {data['interpolation']!r} is not one of {INTERPOLATIONS}")
    if len(data["mean"]) != 3 or len(data["std"]) != 3:
        raise ModelError(f"model card {source}: mean and std need 3 values each")
    if not data["classes"] or len(set(data["classes"])) != len(data["classes"]):
        raise ModelError(f"model card {source}: classes must be a non-empty list of unique names")
    if float(data.get("temperature", 1.0)) <= 0:
        raise ModelError(f"model card {source}: temperature must be > 0")


def default_bundle() -> Path:
    """$BATCHCLS_MODEL, else the shipped bundle: ``batchcls/bundles/simpsons``.

    One path for a checkout and a wheel: in the repository it is a symlink to engines/simpsons
    (resolved, so engines and messages name the real folder); the wheel holds it as package data.
    """
    env = os.environ.get("BATCHCLS_MODEL")
    if env:
        return Path(env)
    return (Path(__file__).parent / "bundles" / DEFAULT_BUNDLE_NAME).resolve()


def load_card(path: str | os.PathLike | None = None) -> ModelCard:
    """Load a bundle folder (or its card.json); None means the shipped default."""
    bundle = Path(path) if path is not None else default_bundle()
    card_path = bundle / CARD_FILE if bundle.is_dir() else bundle
    if not card_path.is_file():
        raise ModelError(f"no model bundle at {bundle} (expected {CARD_FILE}): pass --model DIR or run `make train`")
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
