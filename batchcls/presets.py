"""Eval preprocessing, built from a model card; Pillow + NumPy so the runtime needs no torch.

train/ imports ``EvalPreset`` for validation/test so training and serving see identical arrays;
its train preset only adds augmentation in front of the same resize and ``normalize``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from batchcls.card import ModelCard

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class EvalPreset:
    """RGB Pillow image -> uint8 HWC array of the card's input size."""

    def __init__(self, *, input_size: int, resize_mode: str, crop_pct: float, interpolation: str) -> None:
        self.input_size = input_size
        self.resize_mode = resize_mode
        self.crop_pct = crop_pct
        self.resample = _RESAMPLE[interpolation]

    @classmethod
    def from_card(cls, card: ModelCard) -> EvalPreset:
        return cls(input_size=card.input_size, resize_mode=card.resize_mode,
                   crop_pct=card.crop_pct, interpolation=card.interpolation)

    @property
    def min_decode_side(self) -> int:
        """Smallest side a JPEG may be draft-decoded to without losing resize quality."""
        if self.resize_mode == "squash":
            return self.input_size
        return int(round(self.input_size / self.crop_pct))

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) a w x h image is resized to before the centre crop: the one place this is computed
        (the GPU path's device resize calls it too)."""
        s = self.input_size
        if self.resize_mode == "squash":
            return s, s
        scale = self.min_decode_side / min(w, h)
        return max(s, round(w * scale)), max(s, round(h * scale))

    def crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the input_size square at the centre of a resized w x h image."""
        s = self.input_size
        left, top = (w - s) // 2, (h - s) // 2
        return left, top, left + s, top + s

    def resize(self, img: Image.Image) -> Image.Image:
        img = img.resize(self.resized_size(*img.size), self.resample)
        return img if img.size == (self.input_size,) * 2 else img.crop(self.crop_box(*img.size))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return np.asarray(self.resize(img), dtype=np.uint8)


def normalization(mean: list[float], std: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per channel in pixel units: (x/255 - mean) / std == (x - shift) / scale.

    The one definition of normalisation: ``normalize`` here, the GPU backends' device twin and training's
    batch augmentation all compute with these two vectors.
    """
    return np.asarray(mean, np.float32) * 255.0, np.asarray(std, np.float32) * 255.0


def normalize(batch_nhwc: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, (x/255 - mean) / std, done once per batch (vectorised)."""
    shift, scale = normalization(mean, std)
    out = (batch_nhwc.astype(np.float32) - shift) / scale
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
