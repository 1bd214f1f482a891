"""What users' tools do to a frame: shrink it with some resampling filter, re-encode it as JPEG, blur it.

One module for both sides of the same question, so they cannot drift apart:

- ``Degrade``: training augmentation. Each image of a uint8 batch is, at random, shrunk to 0.3-1.0 of its side
  with one of five resampling filters and scaled back up, re-encoded as JPEG at quality 30-95, blurred, given
  sensor noise and a colour shift. A model trained on it has seen whatever a user's tool does to a frame.
- ``CONDITIONS`` / ``degraded_bytes``: the fixed copies of validation and test frames that every choice is
  checked on (half size with several filters and JPEG qualities), made as a user would make them: from the
  file on disk, shrunk, saved as a JPEG, then read by the runtime like any other file.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

FILTERS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Condition:
    """One way a frame reaches the model: its side scaled by ``scale`` with ``filter``, saved at JPEG ``quality``
    (``scale`` 1 and ``quality`` 0: the file as it is)."""

    name: str
    scale: float = 1.0
    filter: str = "bilinear"
    quality: int = 0


# Every decision is fitted and gated on all of these; the tables in docs/ report each.
CONDITIONS = (
    Condition("full"),
    Condition("half-bilinear-q90", 0.5, "bilinear", 90),
    Condition("half-box-q70", 0.5, "box", 70),
    Condition("half-lanczos-q85", 0.5, "lanczos", 85),
    Condition("half-bicubic-q60", 0.5, "bicubic", 60),
    Condition("half-nearest-q80", 0.5, "nearest", 80),
)
CONDITION_NAMES = tuple(c.name for c in CONDITIONS)


def by_name(name: str) -> Condition:
    for c in CONDITIONS:
        if c.name == name:
            return c
    raise ValueError(f"unknown condition {name!r}: choose one of {', '.join(CONDITION_NAMES)}")


def shrink(image: Image.Image, scale: float, resample: int) -> Image.Image:
    w, h = image.size
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def degraded_bytes(path: str, condition: Condition) -> bytes:
    """The encoded file a user would send under ``condition``: read, shrunk, saved as JPEG (or as it is)."""
    if condition.scale == 1.0 and not condition.quality:
        with open(path, "rb") as f:
            return f.read()
    with Image.open(path) as im:
        im = im.convert("RGB")
        if condition.scale != 1.0:
            im = shrink(im, condition.scale, FILTERS[condition.filter])
        return jpeg(im, condition.quality or 95)


class Degrade:
    """Random degradations of a uint8 NHWC batch, image by image (Pillow), for training.

    ``p``: the share of images degraded at all; each step then happens with its own probability. The output
    has the input's shape, so the geometric augmentation that follows (``train.presets.BatchAugment``) is
    unchanged.
    """

    def __init__(self, p: float = 0.8, *, scale=(0.3, 1.0), quality=(30, 95), p_jpeg: float = 0.7,
                 p_blur: float = 0.2, p_noise: float = 0.2, p_colour: float = 0.5) -> None:
        self.p, self.scale, self.quality = p, scale, quality
        self.p_jpeg, self.p_blur, self.p_noise, self.p_colour = p_jpeg, p_blur, p_noise, p_colour

    def image(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One HxWx3 uint8 image, degraded."""
        im = Image.fromarray(pixels)
        w, h = im.size
        if rng.random() < 0.85:  # shrink with a random filter, then back up as the runtime's resize does
            s = rng.uniform(*self.scale)
            im = shrink(im, s, list(FILTERS.values())[rng.integers(len(FILTERS))])
            up = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[rng.integers(2)]
            im = im.resize((w, h), up)
        if rng.random() < self.p_colour:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                im = enhance(im).enhance(float(rng.uniform(0.75, 1.25)))
        if rng.random() < self.p_blur:
            im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
        if rng.random() < self.p_jpeg:
            im = Image.open(io.BytesIO(jpeg(im, int(rng.integers(self.quality[0], self.quality[1] + 1)))))
        out = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if rng.random() < self.p_noise:
            noise = rng.normal(0.0, rng.uniform(2.0, 8.0), out.shape)
            out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        return out

    def __call__(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.array(batch, copy=True)
        for i in range(len(out)):
            if rng.random() < self.p:
                out[i] = self.image(out[i], rng)
        return out
