"""JPEGs that a decoder trusting its input gets wrong, made from the real sample frames.

- progressive: a valid progressive-scan JPEG (a different decode path in every decoder);
- cmyk: a valid 4-component (Adobe) JPEG: Pillow converts it to RGB, nvJPEG must not be handed it;
- lying_header: a 213x160 frame whose SOF header claims 9000x9000: a decoder that allocates from the
  header makes a 243 MB grey image out of 13 kB (the CPU path refuses it: not enough data for the pixels);
- corrupt_with_eoi: the entropy-coded data broken in the middle, the file still ending in the end-of-image
  marker (so no check of the file's end catches it).
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "simpsons"  # also imported by scripts

HOSTILE = ("progressive", "cmyk", "lying_header", "corrupt_with_eoi")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _segment(data: bytes, markers: set[int]) -> int:
    """Offset of the first marker segment among ``markers`` (a baseline JPEG's segments, in order)."""
    i = 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in markers:
            return i
        i += 2 + length


def claim_size(data: bytes, height: int, width: int) -> bytes:
    """The same JPEG with its SOF header claiming ``height`` x ``width``."""
    i = _segment(data, {0xC0, 0xC1, 0xC2})
    return data[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9:]


def hostile_bytes(kind: str, source: Path | None = None) -> bytes:
    img = Image.open(source or sorted(SAMPLES.glob("*/*.jpg"))[0]).convert("RGB")
    base = _jpeg(img, quality=90)
    if kind == "progressive":
        return _jpeg(img, quality=90, progressive=True)
    if kind == "cmyk":
        return _jpeg(img.convert("CMYK"), quality=90)
    if kind == "lying_header":
        return claim_size(base, 9000, 9000)
    if kind == "corrupt_with_eoi":
        sos = _segment(base, {0xDA})
        start = sos + 2 + int.from_bytes(base[sos + 2:sos + 4], "big") + 100
        junk = b"\xff\xc8" + bytes(range(250)) * 3  # a reserved marker, then bytes no Huffman table expects
        return base[:start] + junk + base[start + len(junk):]
    raise ValueError(kind)


def variant(source: Path, i: int) -> bytes:
    """Frame ``source`` rescaled and re-encoded by ``i``: distinct files (sizes, quantisation) from few frames,
    so agreement over a thousand of them is not 40 frames counted 25 times."""
    img = Image.open(source).convert("RGB")
    scale = 0.7 + (i % 7) * 0.1
    img = img.resize((max(16, round(img.width * scale)), max(16, round(img.height * scale))), Image.BICUBIC)
    return _jpeg(img, quality=70 + (i % 6) * 5)


def mixed_folder(root: Path, n: int, every: int = 97, vary: bool = False) -> Path:
    """``n`` JPEGs: the sample frames cycled (each a distinct variant with ``vary``), with the hostile JPEGs
    at every ``every``-th place."""
    root.mkdir(parents=True)
    samples = sorted(SAMPLES.glob("*/*.jpg"))
    k = 0
    for i in range(n):
        name = root / f"{i:05d}.jpg"
        source = samples[i % len(samples)]
        if i % every == every // 2:
            name.write_bytes(hostile_bytes(HOSTILE[k % len(HOSTILE)], source))
            k += 1
        elif vary:
            name.write_bytes(variant(source, i // len(samples)))
        else:
            shutil.copy(source, name)
    return root
