"""Decode one image file into an RGB Pillow image, robustly.

Formats are detected by content (a PNG named .jpg works); every failure becomes a
``DecodeError`` whose message is the reason written to the output row. The file's bytes come through
``reader.read_file`` (a helper process with a deadline), so a file on a hung mount is one error row and
never a process that Ctrl-C and kill -9 cannot end.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from batchcls.reader import READ_STALL_S, NotRegular, StalledRead, TooLarge, read_file

ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# File names that mean "an image" where a name must decide (train/ lists its dataset by them): the
# extensions Pillow registers for exactly the formats above, so the two lists can't drift apart.
IMAGE_EXTS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in ALLOWED_FORMATS))
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold (~ 9459²); the limit is this many 8-bit RGB pixels' bytes

# We enforce the limit ourselves with a clear message; Pillow's warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DecodeError(Exception):
    """The file could not be turned into an image; str(e) is the row's reason."""


def _gray8(img: Image.Image) -> Image.Image:
    """16/32-bit gray to 8-bit 'L', a band of rows at a time: whole-image float64 temporaries
    would need ~28 bytes per pixel (2.25 GB for one 9000x9000 16-bit PNG)."""
    arr = np.asarray(img)
    peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    out = np.empty(arr.shape, np.uint8)
    step = max(1, _BAND_PIXELS // max(1, arr.shape[1]))
    for y in range(0, arr.shape[0], step):
        band = arr[y:y + step].astype(np.float64)
        out[y:y + step] = np.clip(band / peak * 255.0 + 0.5, 0, 255)
    return Image.fromarray(out, "L")


_BAND_PIXELS = 1 << 18  # pixels per band in _gray8 (2 MB of float64) and _to_rgb (4 MB of RGBA and RGB)


def _to_rgb(img: Image.Image, max_bytes: int | None = None) -> Image.Image:
    """Any mode to 8-bit RGB; transparency is composited over white so it can't turn black.

    Converted a band of rows at a time, so no full-size RGBA copy (nor a white background) is made beside
    the image: peak memory is the image plus its RGB result. ``max_bytes`` bounds that result too: a grey,
    1-bit or palette image holds up to 3x the pixels of an RGB one under the same byte limit, and its
    full-size RGB form would be 3x the limit; such an image is box-reduced band by band, by the smallest
    integer factor that brings its RGB form under ``max_bytes`` (the model sees a few hundred pixels a
    side anyway). An image whose RGB form fits is converted at full size, pixel for pixel as before.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _gray8(img)
    if img.mode == "RGB":
        return img
    alpha = img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa")
    w, h = img.size
    factor = 1
    while max_bytes is not None and 3 * _ceil(w, factor) * _ceil(h, factor) > max_bytes and factor < max(w, h):
        factor += 1
    rows = max(1, _BAND_PIXELS // max(1, w)) // factor * factor or factor  # whole reduction boxes per band
    out = None if rows >= h else Image.new("RGB", (_ceil(w, factor), _ceil(h, factor)))
    for y in range(0, h, rows):
        band = img if out is None else img.crop((0, y, w, min(h, y + rows)))
        if alpha:
            band = band.convert("RGBA")
            band = Image.alpha_composite(Image.new("RGBA", band.size, (255, 255, 255, 255)), band).convert("RGB")
        else:
            band = band.convert("RGB")
        if factor > 1:
            band = band.reduce(factor)
        if out is None:
            return band
        out.paste(band, (0, y // factor))
    assert out is not None
    return out


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> what makes the image upright


def decoded_bytes(img: Image.Image) -> int:
    """Bytes of the image once decoded: pixels x channels x bytes per sample (16-bit counts 2, 32-bit 4);
    Pillow keeps a 2-band image (LA, PA) in 4 bytes a pixel, so it counts 4."""
    sample = 2 if img.mode.startswith("I;16") else 4 if img.mode in ("I", "F") else 1
    bands = 4 if img.mode in ("LA", "PA", "La") else len(img.getbands())
    return img.width * img.height * bands * sample


def byte_limit(max_pixels: int) -> int:
    """--max-pixels in bytes: what an 8-bit RGB image of that many pixels decodes to."""
    return max_pixels * 3


_SOF_HUFFMAN = {0xC0, 0xC1, 0xC2, 0xC3}  # baseline, extended, progressive, lossless; not arithmetic/hierarchical


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_too_short(fp: BinaryIO, size: int) -> str | None:
    """Why a JPEG can't hold the pixels its header promises, else None.

    libjpeg fills missing data with grey and only warns (Pillow keeps quiet), so a 16x16 file whose
    header says 9000x9000 would decode "fine". Every 8x8 block of every component costs at least one
    bit of Huffman-coded data (its DC code), so fewer bits than blocks after the first scan header
    proves the data is missing. A sound bound: it never refuses a whole file.
    """
    pos = fp.tell()
    try:
        fp.seek(0)
        if fp.read(2) != b"\xff\xd8":
            return None
        sof = None
        while True:
            head = fp.read(4)
            if len(head) < 4 or head[0] != 0xFF:
                return None
            marker, length = head[1], int.from_bytes(head[2:4], "big")
            if marker == 0xFF:  # fill byte
                fp.seek(-3, 1)
                continue
            body = fp.read(length - 2)
            if marker in _SOF_HUFFMAN | {0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}:
                sof = (marker, body)
            if marker == 0xDA:
                data_bytes = size - fp.tell()
                break
        if sof is None or sof[0] not in _SOF_HUFFMAN or len(sof[1]) < 6:
            return None
        body = sof[1]
        height, width, n = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
        comps = [(body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(n) if 8 + 3 * i <= len(body)]
        if not comps or not height or not width:
            return None
        hmax, vmax = max(h for h, _ in comps) or 1, max(v for _, v in comps) or 1
        blocks = sum(_ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8) for h, v in comps)
        if data_bytes * 8 < blocks:
            return (f"truncated image: the header promises {width}x{height} pixels but only {max(data_bytes, 0)} "
                    "bytes of image data follow")
        return None
    finally:
        fp.seek(pos)


def check_header(img: Image.Image, source: BinaryIO, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The guards every decoder needs before it allocates what the header promises: an allowed format, the
    decoded size within ``max_pixels``, and (JPEG) enough data for the pixels the header claims.

    ``img`` is opened but not loaded (only its header is parsed). Pillow's decode here and nvJPEG's in
    ``batchcls.gpu`` both trust the header for their allocation, so both paths call this first.
    """
    if img.format not in ALLOWED_FORMATS:
        raise DecodeError(f"unsupported image format {img.format}")
    if decoded_bytes(img) > byte_limit(max_pixels):
        raise DecodeError(f"image is {img.width}x{img.height} {img.mode} ({decoded_bytes(img)} bytes decoded), "
                          f"over the limit of {max_pixels} pixels ({byte_limit(max_pixels)} bytes, 3 per "
                          "pixel; decompression-bomb guard: raise --max-pixels to allow)")
    if img.format in ("JPEG", "MPO") and (short := _jpeg_too_short(source, size)):
        raise DecodeError(short)


def upright_rgb(img: Image.Image, max_bytes: int | None = None) -> Image.Image:
    """8-bit RGB (see ``_to_rgb`` for ``max_bytes``), then EXIF orientation applied: what every decoded image
    goes through (the API's PIL inputs too). Rotating the RGB result, not the source, saves a full-size copy
    (ImageOps.exif_transpose copies even an upright image)."""
    method = _TRANSPOSE.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    rgb = _to_rgb(img, max_bytes)
    return rgb.transpose(method) if method is not None else rgb


def file_limit(max_pixels: int) -> int:
    """The most bytes a file may hold to be read at all: twice the largest decoded image ``max_pixels`` allows
    (16-bit samples, stored uncompressed) and room for metadata. A bigger file is refused by its size, unread."""
    return 2 * byte_limit(max_pixels) + (16 << 20)


def read_bytes(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The file's bytes through the stall-proof reader; every failure a DecodeError with the row's reason."""
    try:
        return read_file(path, limit=file_limit(max_pixels))
    except StalledRead:
        raise DecodeError(f"read stalled: no data for {READ_STALL_S:g} s (a hung mount or device?); the file was "
                          "given up, so --resume tries it again") from None
    except NotRegular:
        raise DecodeError("not a regular file") from None
    except TooLarge as e:
        raise DecodeError(f"file is {e.size} bytes, more than an image under --max-pixels {max_pixels} can take "
                          f"({file_limit(max_pixels)} bytes): raise --max-pixels to read it") from None
    except FileNotFoundError:
        raise DecodeError("file not found (deleted or moved after scanning)") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as e:
        raise DecodeError(f"cannot open: {e.strerror}") from None


def decode_image(path: str | os.PathLike | bytes, *, min_side: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` (or a file's encoded bytes) as an upright RGB image.

    ``min_side`` lets JPEGs decode at reduced DCT scale (Pillow draft) while every side stays
    >= min_side, which is most of the decode cost for large photos. ``max_pixels`` bounds the
    memory of one decode: an image is refused before decoding when its decoded bytes
    (``decoded_bytes``) pass ``byte_limit(max_pixels)``; above Pillow's own limit it raises Pillow's.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut file is an error row, never silently grey
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < byte_limit(max_pixels):
        Image.MAX_IMAGE_PIXELS = byte_limit(max_pixels)  # ours is the guard; Pillow's must not undercut it
    source: BinaryIO | None = None
    try:
        data = path if isinstance(path, (bytes, bytearray, memoryview)) else read_bytes(path, max_pixels)
        size, source = len(data), io.BytesIO(data)
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        with Image.open(source) as img:
            check_header(img, source, size, max_pixels)
            if min_side and img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))
            img.seek(0)  # first frame of animations
            img.load()
            return upright_rgb(img, byte_limit(max_pixels))
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression-bomb guard: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's corrupt-data errors
        raise DecodeError(f"corrupt image: {e}") from None
    finally:
        if source is not None:
            source.close()
