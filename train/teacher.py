"""Soft targets from a teacher bundle, for distilling "two passes" into one.

The teacher's test-time augmentation (the mean of a frame's and its mirror's probabilities, at the teacher's
fitted temperature) is computed once per training image on the clean cached pixels, through ONNX Runtime.
The student then sees each image degraded, cropped and maybe mirrored, and is asked for the teacher's answer on
the clean frame: one pass learns what two passes and a clean input gave.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from batchcls.backends.onnxruntime import OnnxRuntimeBackend
from batchcls.card import load_card
from batchcls.fsutil import atomic_path
from batchcls.infer import softmax
from batchcls.presets import normalize


def teacher_targets(bundle: str | Path, pixels: np.ndarray, classes: list[str], cache_dir: str | Path, *,
                    log: Callable[[str], None] = print) -> np.ndarray:
    """(N, C) float32 probabilities of the teacher for the cached train pixels (uint8 NHWC, any side).

    Cached beside the pixel cache, keyed by the teacher's ONNX sha256 and the pixels' shape and first bytes.
    """
    card = load_card(bundle)
    if list(card.classes) != list(classes):
        raise ValueError(f"teacher {bundle} has other classes than the training data: distil only from a model "
                         "of the same classes")
    key = json.dumps([card.onnx_sha256 or str(card.onnx_path), card.temperature, card.input_size, list(pixels.shape),
                      hashlib.sha256(np.ascontiguousarray(pixels[:8]).tobytes()).hexdigest()]).encode()
    path = Path(cache_dir) / f"teacher-{hashlib.sha256(key).hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    backend = OnnxRuntimeBackend(card.onnx_path)
    side = card.input_size
    out = np.empty((len(pixels), card.num_classes), np.float32)
    for start in range(0, len(pixels), 128):
        chunk = pixels[start:start + 128]
        images = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.Resampling.BILINEAR))
                           for p in chunk])
        views = np.concatenate([images, images[:, :, ::-1]])
        p = softmax(backend.infer(normalize(views, card.mean, card.std)), card.temperature)
        out[start:start + len(chunk)] = 0.5 * (p[:len(chunk)] + p[len(chunk):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
        np.save(f, out)
    log(f"teacher: {bundle} (flip-averaged, T={card.temperature:.3f}) on {len(pixels)} train images -> {path}")
    return out
