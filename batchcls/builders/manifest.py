"""Where a bundle's images come from: the split manifest its training run wrote, found by the sha256 its card
records. The INT8 gate, its calibration and the open-set decision all read validation and train frames from it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from batchcls.card import ModelCard
from batchcls.errors import InputError
from batchcls.scan import InputFile

MANIFEST_KEYS = ("split_manifest", "manifest", "split")  # where train/ may record the split file
REPO = Path(__file__).resolve().parents[2]  # a checkout: runs/train/split.json is where `make train` writes


def _resolve(p: str, bases: list[Path]) -> Path:
    path = Path(p)
    if path.is_absolute():
        return path
    for base in bases:
        if (base / path).exists():
            return base / path
    return path


def find_manifest(card: ModelCard) -> Path | None:
    """The split manifest train/ used: named in the card, or found where the training targets write it
    (runs/<run>/split.json: make train, train-more, train-long) and matched by the sha256 the card records."""
    assert card.bundle_dir is not None
    ref = next((card.training[k] for k in MANIFEST_KEYS if isinstance(card.training.get(k), str)), None)
    if ref is not None:
        return _resolve(ref, [card.bundle_dir, Path.cwd(), REPO])
    sha = card.training.get("split_manifest_sha256")
    if not sha:
        return None
    runs = [p for base in dict.fromkeys((Path.cwd(), REPO)) for p in sorted((base / "runs").glob("*/split.json"))]
    for path in [card.bundle_dir / "split.json", *runs]:
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
            return path
    return None


def load_split(card: ModelCard, split: str) -> list[tuple[InputFile, str]] | None:
    """(file, true label) for a split of the manifest train/ used, or None when it can't be found."""
    path = find_manifest(card)
    if path is None:
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the split manifest {path} named by the card: {e}") from e
    root = _resolve(manifest.get("root", "."), [path.parent, Path.cwd(), REPO])
    classes = manifest.get("classes", card.classes)
    pairs = [(InputFile(str(root / rel), rel), classes[idx]) for rel, idx in manifest.get(split, [])]
    if pairs and not os.path.exists(pairs[0][0].path):
        raise InputError(f"the {split} images of {path} are not under {root}: pass folders explicitly "
                         "(--val-dir / --calib-dir)")
    return pairs
