"""Train and eval presets. Eval is the runtime's own ``batchcls.presets.EvalPreset`` + ``normalize``;
the train preset only adds augmentation IN FRONT of that same resize and normalize.

Both presets are built from a ``ModelCard`` (``preprocessing_card``), the single source of truth.
"""
from __future__ import annotations

import io
import os
import random

import numpy as np
import torchvision.transforms as T
from PIL import Image, ImageFilter

from batchcls.card import ModelCard
from batchcls.decode import decode_image
from batchcls.presets import EvalPreset, normalize


def preprocessing_card(*, architecture: str, classes: list[str], input_size: int, mean, std,
                       resize_mode: str = "squash", crop_pct: float = 1.0,
                       interpolation: str = "bilinear", name: str = "simpsons") -> ModelCard:
    """The card the model will ship with (export adds temperature, hashes, metrics)."""
    return ModelCard(name=name, architecture=architecture, classes=list(classes), input_size=input_size,
                     resize_mode=resize_mode, crop_pct=crop_pct, interpolation=interpolation,
                     mean=[float(m) for m in mean], std=[float(s) for s in std], onnx="model.onnx")


class EvalTransform:
    """path -> float32 CHW, exactly as the runtime: decode_image(min_side) -> EvalPreset -> normalize.

    ``downscale`` < 1 shrinks the decoded image (LANCZOS) first: the "small frames" robustness test.
    """

    def __init__(self, card: ModelCard, *, downscale: float = 1.0):
        self.preset = EvalPreset.from_card(card)
        self.mean, self.std, self.downscale = card.mean, card.std, downscale

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        # Draft-decoding is off for the downscaled copy so the 0.5x image is made from full pixels.
        img = decode_image(path, min_side=self.preset.min_decode_side if self.downscale == 1.0 else 0)
        if self.downscale != 1.0:
            w, h = img.size
            img = img.resize((max(1, round(w * self.downscale)), max(1, round(h * self.downscale))),
                             Image.Resampling.LANCZOS)
        return normalize(self.preset(img)[None], self.mean, self.std)[0]


class TrainTransform:
    """path -> float32 CHW with augmentation, then the eval preset's resize and the same normalize.

    Augmentation: rotation +-15 deg, random-resized crop (scale 0.6-1), h-flip, light colour jitter, and
    -- because users send small ~120x160 frames -- a random downscale to 0.35-1.0 of the size
    (with a random resampler) plus occasional blur and JPEG re-encoding.
    """

    def __init__(self, card: ModelCard, *, scale=(0.6, 1.0), rotation: float = 15.0,
                 downscale=(0.35, 1.0), p_downscale: float = 0.5, p_blur: float = 0.2, p_jpeg: float = 0.3):
        self.preset = EvalPreset.from_card(card)
        self.mean, self.std = card.mean, card.std
        fill = tuple(int(m * 255) for m in card.mean)
        self.geometry = T.Compose([
            T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR, fill=fill),
            _Crop(scale, (3 / 4, 4 / 3)),  # RandomResizedCrop's box only: the eval preset resizes
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ])
        self.downscale, self.p_downscale, self.p_blur, self.p_jpeg = downscale, p_downscale, p_blur, p_jpeg

    def degrade(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p_downscale:
            f = random.uniform(*self.downscale)
            w, h = img.size
            resample = random.choice([Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
                                      Image.Resampling.LANCZOS, Image.Resampling.BOX])
            img = img.resize((max(8, round(w * f)), max(8, round(h * f))), resample)
        if random.random() < self.p_blur:
            img = img.filter(ImageFilter.GaussianBlur(random.uniform(0.3, 1.0)))
        if random.random() < self.p_jpeg:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=random.randint(30, 85))
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return img

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        img = decode_image(path)
        img = self.degrade(self.geometry(img))
        return normalize(self.preset(img)[None], self.mean, self.std)[0]


class _Crop:
    """The crop box of RandomResizedCrop without its resize (the eval preset resizes afterwards)."""

    def __init__(self, scale, ratio):
        self.scale, self.ratio = scale, ratio

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        return img.crop((left, top, left + w, top + h))
