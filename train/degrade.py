"""What users' tools do to a frame, as random training augmentation.

- ``Degrade``: training augmentation. Each image of a uint8 batch is, at random, shrunk to 0.3-1.0 of its side
  with one of five resampling filters and scaled back up, re-encoded as JPEG at quality 30-95, blurred, given
  sensor noise and a colour shift. A model trained on it has seen whatever a user's tool does to a frame.
- ``batchcls.builders.conditions``: the fixed copies of validation and test frames that every choice is checked
  on (half size with the same filters and several JPEG qualities), made as a user would make them.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from batchcls.builders.conditions import FILTERS, jpeg, shrink


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
