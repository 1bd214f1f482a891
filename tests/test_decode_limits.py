"""Resource limits of one decode: bytes not pixels, Pillow's limit raised when asked, data a header lies about."""
import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from batchcls.decode import DecodeError, byte_limit, decode_image, decoded_bytes

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
