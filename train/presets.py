"""Train and eval presets. Eval is the runtime's own ``batchcls.presets.EvalPreset`` + ``normalize``;
the train preset decodes once into a uint8 pixel cache (the eval preset at 1.25x the side) and augments
whole batches from it with torch (``BatchAugment``).

Both presets are built from a ``ModelCard`` (``preprocessing_card``), the single source of truth.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from batchcls.card import ModelCard
from batchcls.decode import decode_image
from batchcls.presets import EvalPreset, normalization, normalize


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


def cache_preset(card: ModelCard, side: int) -> EvalPreset:
    """The eval preset at a larger ``side``: what the training pixel cache stores (decoded once, uint8).

    Augmentation then crops/rotates from it down to the card's input size, so a crop at scale 1 with no
    rotation is the eval preset (up to one extra bilinear resample).
    """
    return EvalPreset(input_size=side, resize_mode=card.resize_mode, crop_pct=card.crop_pct,
                      interpolation=card.interpolation)


def cache_side(card: ModelCard) -> int:
    """Cached pixels are 1.25x the input side: random crops down to ~64% of the area still downsample."""
    return int(round(card.input_size * 1.25))


class BatchAugment:
    """uint8 NHWC batch (cached pixels) -> normalized float NCHW of the card's input size, augmented.

    The reference system's augmentation -- random rotation (+-``rotation`` deg), scale (random-resized crop:
    area ``scale``, aspect ``ratio``) and horizontal flips -- as ONE affine resample per batch (grid_sample),
    plus, because users send small ~120x160 frames, a random downscale-and-back of ``p_downscale`` of the
    images to ``downscale`` of the side. Runs in the training process on whole batches (on the GPU when
    training there): no per-image PIL work, so the CPU cores go to the network.
    Normalization happens first, so the zero padding of rotated corners is the mean colour.
    """

    def __init__(self, card: ModelCard, *, scale=(0.65, 1.0), ratio=(3 / 4, 4 / 3), rotation: float = 10.0,
                 flip: bool = True, p_downscale: float = 0.3, downscale=(0.5, 1.0)):
        self.size, self.mean, self.std = card.input_size, card.mean, card.std
        self.scale, self.ratio, self.rotation, self.flip = scale, ratio, rotation, flip
        self.p_downscale, self.downscale = p_downscale, downscale

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None, *,
                 size: int = 0) -> torch.Tensor:
        """``size`` overrides the card's input side (progressive resizing trains early epochs smaller)."""
        n, dev, size = pixels.shape[0], pixels.device, size or self.size
        shift, scale = (torch.from_numpy(v).to(dev).view(1, 3, 1, 1) for v in normalization(self.mean, self.std))
        x = (pixels.permute(0, 3, 1, 2).float() - shift) / scale  # the runtime's normalize, on torch tensors

        def uniform(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)

        area = uniform(*self.scale)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w, h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # crop, 1 = full side
        cx, cy = uniform(-1, 1) * (1 - w), uniform(-1, 1) * (1 - h)  # crop centre, inside the image
        angle = uniform(-self.rotation, self.rotation) * (math.pi / 180)
        sign = torch.where(torch.rand(n, generator=generator, device=dev) < 0.5, -1.0, 1.0) if self.flip \
            else torch.ones(n, device=dev)
        cos, sin = angle.cos(), angle.sin()
        # output (u, v) in [-1, 1]^2 -> input centre + R(angle) @ diag(sign * w, h) @ (u, v)
        theta = torch.stack([torch.stack([sign * w * cos, -h * sin, cx], 1),
                             torch.stack([sign * w * sin, h * cos, cy], 1)], 1)
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        small = torch.rand(n, generator=generator, device=dev) < self.p_downscale
        factors = uniform(*self.downscale)
        for i in small.nonzero().flatten().tolist():
            side = max(8, round(size * float(factors[i])))
            shrunk = F.interpolate(out[i:i + 1], size=(side, side), mode="bilinear", antialias=True)
            out[i:i + 1] = F.interpolate(shrunk, size=(size, size), mode="bilinear")
        return out
