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
    def from_card(cls, card: ModelCard) -> "EvalPreset":
        return cls(input_size=card.input_size, resize_mode=card.resize_mode,
                   crop_pct=card.crop_pct, interpolation=card.interpolation)

    @property
    def min_decode_side(self) -> int:
        """Smallest side a JPEG may be draft-decoded to without losing resize quality."""
        if self.resize_mode == "squash":
            return self.input_size
        return int(round(self.input_size / self.crop_pct))

    def resize(self, img: Image.Image) -> Image.Image:
        s = self.input_size
        if self.resize_mode == "squash":
            return img.resize((s, s), self.resample)
        short = int(round(s / self.crop_pct))
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(s, round(w * scale)), max(s, round(h * scale))), self.resample)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        return img.crop((left, top, left + s, top + s))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return np.asarray(self.resize(img), dtype=np.uint8)


def normalize(batch_nhwc: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, (x/255 - mean) / std, done once per batch (vectorised)."""
    scale = np.asarray(std, np.float32) * 255.0
    shift = np.asarray(mean, np.float32) * 255.0
    out = (batch_nhwc.astype(np.float32) - shift) / scale
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
