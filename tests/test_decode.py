"""Every kind of bad or unusual input gives its own row; the run always finishes."""
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import real_jpegs
from PIL import Image

from batchcls.decode import DecodeError, decode_image
from batchcls.output import read_rows


def _png_with_header_size(path: Path, width: int, height: int) -> None:
    """A tiny real PNG whose IHDR claims width x height (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length+type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def make_bad_folder(root: Path) -> dict[str, str]:
    """Name -> expected status for each awkward file."""
    root.mkdir(parents=True, exist_ok=True)
    jpeg = real_jpegs(1)[0].read_bytes()
    expected = {}

    (root / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "error"
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    expected["truncated.jpg"] = "error"
    (root / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    expected["random.jpg"] = "error"
    (root / "notes.txt").write_text("not an image\n")
    expected["notes.txt"] = "error"
    Image.new("RGB", (30, 20), (200, 30, 30)).save(root / "png_named.jpg", format="PNG")
    expected["png_named.jpg"] = "ok"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    expected["cmyk.jpg"] = "ok"
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(root / "sixteen.png")
    expected["sixteen.png"] = "ok"
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    expected["palette_alpha.png"] = "ok"
    frames = [Image.new("RGB", (20, 20), c) for c in [(0, 0, 250), (250, 0, 0)]]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expected["animated.gif"] = "ok"
    _png_with_header_size(root / "bomb.png", 20000, 20000)
    expected["bomb.png"] = "error"
    for name in ["with,comma.jpg", 'with"quote.jpg', "with\nnewline.jpg", "ünïcödé_猫.jpg", "=cmd|' -C calc'!A0.jpg",
                 "+plus.jpg", "'quote_start.jpg"]:
        (root / name).write_bytes(jpeg)
        expected[name] = "ok"
    os.mkfifo(root / "a_fifo")
    expected["a_fifo"] = "error"
    (root / "dangling.jpg").symlink_to(root / "does_not_exist.jpg")
    expected["dangling.jpg"] = "error"
    (root / ".hidden.jpg").write_bytes(jpeg)  # skipped: no row
    return expected


def test_every_bad_input_gets_its_row(tmp_path, colour_bundle):
    from click.testing import CliRunner

    from batchcls.cli import cli

    expected = make_bad_folder(tmp_path / "in")
    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "in"), "--out", str(out), "--model", str(colour_bundle),
                                      "--workers", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert [r["path"] for r in rows] == sorted(expected)  # one row each, input order, hidden skipped
    got = {r["path"]: r for r in rows}
    for name, status in expected.items():
        assert got[name]["status"] == status, (name, got[name])
        assert (got[name]["error"] == "") == (status == "ok"), got[name]
    assert "decompression-bomb" in got["bomb.png"]["error"]
    assert "empty" in got["empty.jpg"]["error"]
    assert "not a regular file" in got["a_fifo"]["error"]
    assert "not found" in got["dangling.jpg"]["error"]
    assert got["png_named.jpg"]["label"] == "red"
    assert got["palette_alpha.png"]["label"] == "red" or got["palette_alpha.png"]["status"] == "ok"
    assert got["animated.gif"]["label"] == "blue"  # first frame
    # The raw CSV neutralises formulas for spreadsheets.
    raw = out.read_text(encoding="utf-8")
    assert "\n\"'=cmd" in raw or "\n'=cmd" in raw
    assert "\n'+plus.jpg" in raw


def test_file_deleted_after_scanning(tmp_path, colour_bundle):
    from batchcls.backends import load_backend
    from batchcls.card import load_card
    from batchcls.pipeline import Classifier, RunOptions, classify
    from batchcls.scan import scan_dir

    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (250, 0, 0)).save(root / f"{i}.jpg")

    def scan_then_delete():
        for f in scan_dir(root):
            if f.rel == "1.jpg":
                os.unlink(f.path)
            yield f

    card = load_card(colour_bundle)
    rows = [r for batch in classify(scan_then_delete(), Classifier(card, load_backend(card)), RunOptions(workers=0))
            for r in batch]
    assert [(r["path"], r["status"]) for r in rows] == [("0.jpg", "ok"), ("1.jpg", "error"), ("2.jpg", "ok")]
    assert "deleted" in rows[1]["error"]


DROP_ROOT_READ = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv can read anything")
def test_unreadable_file(tmp_path, colour_bundle):
    """chmod 000 stops an ordinary user; as root the CLI runs without the capability to bypass it."""
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (10, 10), (0, 0, 250)).save(root / "ok.jpg")
    Image.new("RGB", (10, 10), (0, 0, 250)).save(root / "locked.jpg")
    (root / "locked.jpg").chmod(0)
    out = tmp_path / "labels.csv"
    cmd = [sys.executable, "-m", "batchcls.cli", "run", str(root), "--out", str(out), "--model", str(colour_bundle),
           "--workers", "0"]
    proc = subprocess.run((DROP_ROOT_READ if os.geteuid() == 0 else []) + cmd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = {r["path"]: r for r in read_rows(out)}
    assert got["ok.jpg"]["status"] == "ok"
    assert got["locked.jpg"]["status"] == "error" and "permission denied" in got["locked.jpg"]["error"]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert decode_image(tmp_path / "rot.jpg").size == (20, 40)


@pytest.mark.parametrize("mode,value", [("L", 128), ("LA", (128, 255)), ("RGBA", (0, 0, 255, 0)), ("I;16", 65535),
                                        ("1", 1), ("CMYK", (0, 0, 0, 0))])
def test_any_mode_becomes_rgb(tmp_path, mode, value):
    fmt = {"CMYK": "JPEG", "I;16": "PNG"}.get(mode, "PNG" if mode != "1" else "BMP")
    Image.new(mode, (8, 8), value).save(tmp_path / "x", format=fmt)
    img = decode_image(tmp_path / "x")
    assert img.mode == "RGB"
    px = img.getpixel((0, 0))
    if mode == "RGBA":
        assert px == (255, 255, 255)  # fully transparent composites to white, not black
    if mode == "I;16":
        assert px == (255, 255, 255)


def test_large_jpeg_decodes_at_reduced_scale(tmp_path):
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(tmp_path / "big.jpg")
    small = decode_image(tmp_path / "big.jpg", min_side=160)
    assert 160 <= min(small.size) < 400  # draft mode picked a 1/8 DCT scale
    assert decode_image(tmp_path / "big.jpg").size == (4000, 3000)


def test_pixel_limit_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "x.png")
    with pytest.raises(DecodeError, match="over the limit of 5000"):
        decode_image(tmp_path / "x.png", max_pixels=5000)
