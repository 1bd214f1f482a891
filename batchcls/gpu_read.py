"""The GPU path's part that runs in the decode stage's worker processes: read each file's bytes and decide,
from its header, whether nvJPEG may take it; decode the rest with Pillow.

No torch here: every decode worker imports this module (the work it runs is pickled by reference), and
importing torch in each of them would cost seconds of start-up and hundreds of MB per worker.

nvJPEG (like any decoder) allocates what the JPEG header promises before it reads the data, so a file
goes to the GPU only after the CPU path's own guards passed on its header (``decode.check_header``: the
format, ``--max-pixels``, enough data for the pixels claimed). A file that fails them is decoded here by
the CPU decoder, which refuses it with the same reason a ``--cpu-decode`` run writes.
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass

import numpy as np
from PIL import Image

from batchcls.decode import DEFAULT_MAX_PIXELS, check_header
from batchcls.decode_stage import decode_one
from batchcls.presets import EvalPreset
from batchcls.scan import InputFile

JPEG_MAGIC = b"\xff\xd8\xff"
NVJPEG_MODES = ("RGB", "L")  # CMYK/YCCK (Adobe) JPEGs go to Pillow, which converts them like the CPU path


@dataclass(frozen=True)
class ReadBatch:
    """Per file exactly one of: JPEG bytes for nvJPEG, an image the CPU decoded, or an error."""

    files: list[InputFile]
    blobs: list[bytes | None]
    images: list[np.ndarray | None]  # uint8 HWC, the card's size
    errors: list[str | None]


def needs_cpu(data: bytes) -> bool:
    """Files nvJPEG must not take, from their bytes alone: not JPEG, EXIF (it ignores orientation), or not
    ending in the end-of-image marker (a truncated file could decode to grey instead of an error row)."""
    return not data.startswith(JPEG_MAGIC) or b"Exif" in data[:65536] or not data.rstrip(b"\0").endswith(b"\xff\xd9")


def nvjpeg_may_take(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """True when the GPU may decode ``data``: the checks above, then the CPU path's header and size guards
    (``decode.check_header``) and a colour model nvJPEG converts as Pillow does. False sends the file to the
    CPU decoder, which writes the reason when it is an error."""
    if needs_cpu(data):
        return False
    source = io.BytesIO(data)
    try:
        with Image.open(source) as img:
            check_header(img, source, len(data), max_pixels)
            return img.format in ("JPEG", "MPO") and img.mode in NVJPEG_MODES
    except Exception:  # whatever Pillow makes of a broken header, the CPU decoder names it
        return False


def _jpeg_bytes(f: InputFile, max_pixels: int) -> bytes | None:
    """The file's bytes if nvJPEG may take it; None sends it to the CPU decoder (which gives the reason)."""
    if f.error:
        return None
    try:
        if not stat.S_ISREG(os.stat(f.path).st_mode):  # reading a FIFO would block
            return None
        with open(f.path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return data if nvjpeg_may_take(data, max_pixels) else None


def read_batch(files: list[InputFile], preset: EvalPreset, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReadBatch:
    """Runs in a decode worker: read each file; decode on the CPU the ones nvJPEG must not take."""
    blobs: list[bytes | None] = []
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for f in files:
        data = _jpeg_bytes(f, max_pixels)
        img, err = decode_one(f, preset, max_pixels) if data is None else (None, None)
        blobs.append(data)
        images.append(img)
        errors.append(err)
    return ReadBatch(files, blobs, images, errors)


def failed_read(files: list[InputFile], reason: str) -> ReadBatch:
    n = len(files)
    return ReadBatch(files, [None] * n, [None] * n, [reason] * n)
