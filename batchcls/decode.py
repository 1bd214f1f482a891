"""Decode one image file into an RGB Pillow image, robustly.

Formats are detected by content (a PNG named .jpg works); every failure becomes a
``DecodeError`` whose message is the reason written to the output row.
"""
from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold (~ 9459²), applied as a hard limit

# We enforce the limit ourselves with a clear message; Pillow's warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DecodeError(Exception):
    """The file could not be turned into an image; str(e) is the row's reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; transparency is composited over white so it can't turn black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def upright_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB: what every decoded image goes through (the API's PIL inputs too)."""
    return _to_rgb(ImageOps.exif_transpose(img))


def decode_image(path: str | os.PathLike | bytes, *, min_side: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` (or a file's encoded bytes) as an upright RGB image.

    ``min_side`` lets JPEGs decode at reduced DCT scale (Pillow draft) while every side stays
    >= min_side, which is most of the decode cost for large photos.
    """
    try:
        if isinstance(path, (bytes, bytearray, memoryview)):
            size, source = len(path), io.BytesIO(path)
        else:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # opening a FIFO or device would block or never end
                raise DecodeError("not a regular file")
            size, source = st.st_size, path
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        with Image.open(source) as img:
            if img.format not in ALLOWED_FORMATS:
                raise DecodeError(f"unsupported image format {img.format}")
            if img.width * img.height > max_pixels:
                raise DecodeError(f"image is {img.width}x{img.height} pixels, over the limit of "
                                  f"{max_pixels} (decompression-bomb guard; raise --max-pixels to allow)")
            if min_side and img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))
            img.seek(0)  # first frame of animations
            img.load()
            return upright_rgb(img)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("file not found (deleted or moved after scanning)") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except IsADirectoryError:
        raise DecodeError("is a directory, not a file") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression-bomb guard: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's corrupt-data errors
        raise DecodeError(f"corrupt image: {e}") from None
