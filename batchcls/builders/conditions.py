"""The fixed ways a user's tool turns a frame into the file batchcls reads: shrunk with some resampling filter,
re-encoded as JPEG. Every open-set decision is fitted and gated under all of them (``builders.decision``), and
training's random degradations (``train/degrade.py``) draw from the same filters, so the two cannot drift apart.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

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
