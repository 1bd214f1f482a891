"""Resource limits of one decode: bytes not pixels, Pillow's limit raised when asked, data a header lies about."""
import io
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from batchcls.decode import DecodeError, byte_limit, decode_image, decoded_bytes
from batchcls.presets import EvalPreset

REPO = Path(__file__).resolve().parent.parent
SAMPLES = sorted((REPO / "samples" / "simpsons").glob("*/*.jpg"))


def _lying_jpeg(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header says width x height: libjpeg would pad it with grey, quietly."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def test_a_header_promising_more_than_the_data_holds_is_an_error(tmp_path):
    (tmp_path / "lie.jpg").write_bytes(_lying_jpeg(9000, 9000))
    with pytest.raises(DecodeError, match="truncated image: the header promises 9000x9000"):
        decode_image(tmp_path / "lie.jpg", min_side=128)


def test_a_cut_jpeg_is_an_error(tmp_path):
    data = SAMPLES[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(tmp_path / "cut.jpg")


def test_every_real_sample_and_a_tiny_progressive_one_pass_the_data_check(tmp_path):
    for p in SAMPLES:
        assert decode_image(p, min_side=128).mode == "RGB"
    flat = tmp_path / "flat.jpg"  # as little data per block as JPEG allows: the bound must still hold
    Image.new("RGB", (3000, 3000), (128, 128, 128)).save(flat, progressive=True, quality=1, subsampling=2)
    assert decode_image(flat).size == (3000, 3000)


def test_the_limit_counts_decoded_bytes(tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (1000, 1000), (1, 2, 3, 4)).save(rgba)
    with Image.open(rgba) as img:
        assert decoded_bytes(img) == 4_000_000
    # 1.0 M pixels is under a 1.2 M pixel limit, but 4 MB is over its 3.6 MB
    with pytest.raises(DecodeError, match="over the limit of 1200000 pixels"):
        decode_image(rgba, max_pixels=1_200_000)
    assert decode_image(rgba, max_pixels=1_400_000).size == (1000, 1000)
    gray16 = tmp_path / "g16.png"
    Image.new("I;16", (1000, 1000), 40000).save(gray16)
    with Image.open(gray16) as img:
        assert decoded_bytes(img) == 2_000_000 and byte_limit(700_000) == 2_100_000
    assert decode_image(gray16, max_pixels=700_000).getpixel((0, 0)) == (156, 156, 156)  # 40000/65535*255


def test_max_pixels_above_pillows_own_limit_really_raises_it(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 pixels outright
    Image.new("RGB", (100, 100), (0, 200, 0)).save(tmp_path / "x.png")
    assert decode_image(tmp_path / "x.png", max_pixels=20_000).size == (100, 100)
    with pytest.raises(DecodeError, match="over the limit"):
        decode_image(tmp_path / "x.png", max_pixels=5_000)


BIG16 = """
import resource, sys
import numpy as np
from PIL import Image
arr = np.zeros((9000, 9000), np.uint16)
arr[::7] = 60000
Image.fromarray(arr).save(sys.argv[1])
del arr
limit = 1200 << 20  # address space: the old float64 conversion needed ~2.3 GB for this 170 KB file
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from batchcls.decode import decode_image
img = decode_image(sys.argv[1], min_side=128)
print(img.size, img.getpixel((0, 0)), img.getpixel((0, 1)))
"""


@pytest.mark.slow
def test_a_9000_square_16_bit_png_decodes_in_bounded_memory(tmp_path):
    r = subprocess.run([sys.executable, "-c", BIG16, str(tmp_path / "big16.png")], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(9000, 9000) (233, 233, 233) (0, 0, 0)"


# --- the real peak memory of one decode, whatever the mode -----------------------------------------

# The peak resident memory of this process's own address space (VmHWM): getrusage's ru_maxrss also counts
# the parent's before exec (pytest's, here), and the interpreter's start-up peak would hide small decodes.
# Writing 5 to clear_refs resets the peak to the current size, so what is printed is the decode's alone.
WORKER_PEAK = """
import sys
from batchcls.decode_stage import load_images
from batchcls.presets import EvalPreset
from batchcls.scan import InputFile

def kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

preset = EvalPreset(input_size=224, resize_mode="squash", crop_pct=1.0, interpolation="bilinear")
load_images([], preset)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kb("VmRSS")
batch = load_images([InputFile(sys.argv[1], "x")], preset, max_pixels=int(sys.argv[2]))
assert batch.errors == [None] and batch.images.shape == (1, 224, 224, 3), batch.errors
print(kb("VmHWM") - base)
"""
MAX_PIXELS = 8_000_000  # a 24 MB limit: big enough to dwarf the interpreter's noise, small enough for seconds
# mode, bytes per pixel as counted against the limit, fill, file name, save options
MODES = [("RGB", 3, (200, 30, 30), "rgb.png", {}), ("L", 1, 200, "l.png", {}), ("1", 1, 1, "bit.png", {}),
         ("LA", 4, (200, 100), "la.png", {}), ("RGBA", 4, (200, 30, 30, 100), "rgba.png", {}),
         ("P", 1, 5, "palette_transparent.png", {"transparency": 5}), ("CMYK", 4, (10, 20, 30, 40), "cmyk.jpg", {})]


def at_the_limit(tmp_path: Path, mode: str, bpp: int, fill: object, name: str, options: dict) -> Path:
    """A square image of ``mode`` just under the MAX_PIXELS byte limit (a few KB on disk, as a bomb is)."""
    side = math.isqrt(byte_limit(MAX_PIXELS) // bpp) - 1
    img = Image.new(mode, (side, side), fill)  # type: ignore[arg-type]
    ImageDraw.Draw(img).rectangle((side // 4, side // 4, side // 2, side // 2), fill=0)
    img.save(tmp_path / name, **options)
    with Image.open(tmp_path / name) as check:
        assert check.mode == mode and decoded_bytes(check) <= byte_limit(MAX_PIXELS)
    return tmp_path / name


def test_one_decode_peaks_within_a_small_factor_of_rgb_whatever_the_mode(tmp_path):
    peaks = {}
    for mode, bpp, fill, name, options in MODES:
        path = at_the_limit(tmp_path, mode, bpp, fill, name, options)
        r = subprocess.run([sys.executable, "-c", WORKER_PEAK, str(path), str(MAX_PIXELS)], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[name] = int(r.stdout) / 1024  # MB above the worker's own footprint
    # RGB: the image itself; any other mode may add its RGB result (no full-size RGBA or white background)
    assert all(peak <= 2 * peaks["rgb.png"] for peak in peaks.values()), peaks


def test_an_image_whose_rgb_form_passes_the_limit_is_reduced_not_refused(tmp_path):
    # An L image of 3x the pixels an RGB one may have is under the byte limit; it is box-reduced while
    # converting, and the model sees the same picture as from a full-size conversion.
    side = 2400
    grey = np.add.outer(np.arange(side) // 10, np.arange(side) // 10).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[:, side // 2:] = (0, 0, 255, 255)  # left half transparent: white, right half blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    preset = EvalPreset(input_size=64, resize_mode="squash", crop_pct=1.0, interpolation="bilinear")
    limit = side * side - 1  # pixels: the L image's RGB form (3 bytes a pixel) passes it, its 1 byte does not
    reduced, full = decode_image(tmp_path / "grey.png", max_pixels=limit), decode_image(tmp_path / "grey.png")
    assert reduced.size == (side // 2, side // 2) and full.size == (side, side)
    assert np.abs(preset(reduced).astype(int) - preset(full).astype(int)).max() <= 2
    half = preset(decode_image(tmp_path / "half.png", max_pixels=4 * side * side // 3 + 1))
    assert (half[:, :30] == 255).all() and (half[:, 34:] == (0, 0, 255)).all()
