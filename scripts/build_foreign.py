"""Build a folder of "foreign" images: real pictures that are not frames of The Simpsons.

The open-set "none of these" decision is tuned and measured on images far from the training
distribution: photos, clipart, icons, wallpapers, scanned-looking text pages, flat colours, a colour
wheel, noise. Every source is either shipped by a Debian or PyPI package that may be used offline, or
synthesised here, so the set can be rebuilt on any machine without a download and each file carries its
origin and licence in provenance.csv.

Usage:
    python scripts/build_foreign.py OUT            # writes OUT/all/ and OUT/all/provenance.csv
    python scripts/build_foreign.py OUT --split    # also OUT/val/ and OUT/test/, half of each source

The script installs nothing: a missing source is skipped with one line naming the package to install.
It is deterministic for a given --seed and the same package versions.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import math
import random
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

MAX_SIDE = 512  # the model squashes to ~160 px; keep the folder small without losing detail
CROPS_PER_WALLPAPER = 3  # plus the whole wallpaper: four views of each
CLIPART_COUNT = 160
FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation")]


@dataclass
class Item:
    """One image to write, with where it came from."""

    source: str
    image: Image.Image
    package: str
    original: str
    licence: str


def on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, as clipart and icons appear on a page."""
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")


def files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Image files under root, sorted, symlinks to the same file counted once."""
    seen: dict[Path, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in suffixes and path.is_file():
            seen.setdefault(path.resolve(), path)
    return sorted(seen.values())


def missing(source: str, install: str) -> None:
    print(f"skip {source}: not installed here; install it with `{install}`", file=sys.stderr)


# --- synthesised -----------------------------------------------------------------------------------


def synthetic(rng: random.Random) -> Iterator[Item]:
    """Flat colours, gradients, colour wheels, noise and patterns, made here."""
    lic = "made by this script (project licence)"
    nrng = np.random.default_rng(rng.randrange(2**32))
    named = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0), (0, 255, 0), (0, 0, 255),
             (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 217, 15)]  # the last: Simpsons-skin yellow
    for rgb in named + [tuple(rng.randrange(256) for _ in range(3)) for _ in range(14)]:
        yield Item("synthetic", Image.new("RGB", (256, 256), rgb), "-", f"flat colour {rgb}", lic)
    for i in range(16):
        a, b = (np.array([rng.randrange(256) for _ in range(3)], float) for _ in range(2))
        t = np.linspace(0, 1, 256)[:, None, None]
        grad = np.broadcast_to(a + (b - a) * t, (256, 256, 3))
        img = Image.fromarray(grad.astype(np.uint8))
        yield Item("synthetic", img.rotate(rng.choice([0, 45, 90])) if i % 2 else img, "-", f"linear gradient {i}", lic)
    for value in (1.0, 0.6):
        yield Item("synthetic", colour_wheel(384, value), "-", f"HSV colour wheel, value {value}", lic)
    for i in range(10):
        shape = (256, 256, 3) if i % 2 else (256, 256, 1)
        noise = nrng.integers(0, 256, shape, dtype=np.uint8).repeat(3 // shape[2], axis=2)
        img = Image.fromarray(noise)
        if i >= 6:  # smooth noise looks like texture, not static
            img = img.filter(ImageFilter.GaussianBlur(rng.choice([3, 8])))
        yield Item("synthetic", img, "-", f"uniform noise {i}" + (" (blurred)" if i >= 6 else ""), lic)
    for i in range(8):
        cell = rng.choice([8, 16, 32, 64])
        yy, xx = np.mgrid[0:256, 0:256]
        mask = ((xx // cell + yy // cell) % 2 == 0) if i % 2 else (xx // cell % 2 == 0)
        a, b = (np.array([rng.randrange(256) for _ in range(3)], np.uint8) for _ in range(2))
        img = Image.fromarray(np.where(mask[..., None], a, b))
        yield Item("synthetic", img, "-", f"{'checkerboard' if i % 2 else 'stripes'} {i}", lic)


def colour_wheel(size: int, value: float) -> Image.Image:
    """A hue/saturation disc on white: every hue at once, including the Simpsons' yellows."""
    yy, xx = np.mgrid[0:size, 0:size]
    dx, dy = xx - size / 2, yy - size / 2
    radius = np.hypot(dx, dy) / (size / 2)
    hue = (np.arctan2(dy, dx) / (2 * math.pi)) % 1.0
    to_rgb = np.vectorize(lambda h, s: colorsys.hsv_to_rgb(h, min(s, 1.0), value), otypes=[float, float, float])
    r, g, b = to_rgb(hue, radius)
    rgb = np.stack([r, g, b], axis=-1) * 255
    rgb[radius > 1] = 255
    return Image.fromarray(rgb.astype(np.uint8))


def text_pages(rng: random.Random) -> Iterator[Item]:
    """Scanned-looking pages: licence texts from base-files set in DejaVu/Liberation fonts."""
    texts = files(Path("/usr/share/common-licenses"), ("",))
    # DejaVu Math (fonts-dejavu-extra) is a maths font under another licence: text fonts only
    fonts = [f for d in FONT_DIRS if d.is_dir() for f in files(d, (".ttf",)) if "Math" not in f.name]
    if not texts or not fonts:
        missing("text pages", "apt-get install base-files fonts-dejavu-core")
        return
    for i in range(20):
        text_path, font_path = rng.choice(texts), rng.choice(fonts)
        lines = text_path.read_text(errors="replace").splitlines()
        start = rng.randrange(max(1, len(lines) - 60))
        size = rng.choice([14, 16, 18, 22])
        font = ImageFont.truetype(str(font_path), size)
        paper = tuple(rng.randrange(225, 256) for _ in range(3))
        page = Image.new("RGB", (640, 820), paper)
        draw = ImageDraw.Draw(page)
        y = 40
        for line in lines[start:]:
            for part in textwrap.wrap(line, width=int(560 / (size * 0.55))) or [""]:
                draw.text((40, y), part, fill=(20, 20, 20), font=font)
                y += int(size * 1.4)
            if y > 780:
                break
        # a scanner's slight tilt and grain
        page = page.rotate(rng.uniform(-2, 2), resample=Image.Resampling.BICUBIC, fillcolor=paper)
        grain = np.random.default_rng(i).normal(0, 6, (820, 640, 1))
        page = Image.fromarray(np.clip(np.asarray(page, float) + grain, 0, 255).astype(np.uint8))
        liberation = "liberation" in str(font_path)
        package = "base-files + " + ("fonts-liberation" if liberation else "fonts-dejavu-core/-extra")
        font_licence = "GPL-2 with font exception" if liberation else "Bitstream Vera licence"
        lic = f"text: verbatim copies permitted; font: {font_licence}"
        yield Item("textpage", page, package, f"page {i}: {text_path} in {font_path.name}", lic)


# --- shipped by packages ---------------------------------------------------------------------------


def skimage_data() -> Iterator[Item]:
    """Sample images that scikit-image ships on disk (not the ones it would download)."""
    roots = []
    try:
        import skimage  # optional source: imported only here

        roots.append(Path(skimage.__file__).parent / "data")
    except ImportError:
        pass
    roots.append(Path("/usr/lib/python3/dist-packages/skimage/data"))
    root = next((r for r in roots if r.is_dir() and files(r, (".png", ".jpg"))), None)
    if root is None:
        missing("scikit-image data", "apt-get install python3-skimage")
        return
    for path in files(root, (".png", ".jpg", ".jpeg")):
        try:
            with Image.open(path) as opened:
                img = on_white(opened)
        except OSError:  # the folder also holds deliberately broken files for skimage's own tests
            continue
        if min(img.size) >= 64:  # and tiny test patterns that are not pictures
            lic = "BSD-3-Clause (Debian copyright); upstream: public domain / CC0 per image"
            yield Item("skimage", img, "python3-skimage", str(path), lic)


MPL_SAMPLES = {
    "grace_hopper.jpg": "public domain (US Navy photograph)",
    "Minduka_Present_Blue_Pack.png": "public domain (Open Clip Art Library)",
    "logo2.png": "Matplotlib licence (PSF-style)",
}


def matplotlib_samples() -> Iterator[Item]:
    """The picture files in matplotlib's sample_data."""
    try:
        import matplotlib  # optional source: imported only here
    except ImportError:
        missing("matplotlib sample_data", "pip install matplotlib")
        return
    root = Path(matplotlib.get_data_path()) / "sample_data"
    for name, lic in MPL_SAMPLES.items():
        if (root / name).is_file():
            with Image.open(root / name) as img:
                yield Item("matplotlib", on_white(img), "matplotlib (PyPI)", f"mpl-data/sample_data/{name}", lic)


# (package, folder, glob, licence). Only raster files: SVG wallpapers would need a rasteriser.
# desktop-base's theme wallpapers are SVG; their GRUB backgrounds are the same picture as a PNG.
WALLPAPERS = [
    ("gnome-backgrounds", "/usr/share/backgrounds/gnome", "*.webp", "CC-BY-SA 2.0/3.0, CC-BY 2.0 (debian/copyright)"),
    ("mate-backgrounds", "/usr/share/backgrounds/mate", "*/*.[jp][pn]g", "GPL-2+, CC-BY-SA 4.0 (debian/copyright)"),
    ("desktop-base", "/usr/share/desktop-base", "*-theme/grub/grub-16x9.png", "GPL-2+ / GPL-2 (debian/copyright)"),
]


def wallpapers(rng: random.Random) -> Iterator[Item]:
    """Each desktop background whole, plus CROPS_PER_WALLPAPER random square crops."""
    for package, root, pattern, lic in WALLPAPERS:
        found = sorted(Path(root).glob(pattern))
        if not found:
            missing(package, f"apt-get install {package}")
            continue
        for path in found:
            base = path.with_name(re.sub(r"_\d+x\d+$", "", path.stem) + path.suffix)
            if base != path and base.exists():  # the same picture at another resolution
                continue
            with Image.open(path) as opened:
                img = on_white(opened)
            if min(img.size) < 200:  # placeholders (a 1-pixel VNC background), not pictures
                continue
            yield Item("wallpaper", img, package, str(path), lic)
            for _ in range(CROPS_PER_WALLPAPER):
                side = int(min(img.size) * rng.uniform(0.3, 0.7))
                x, y = rng.randrange(img.width - side + 1), rng.randrange(img.height - side + 1)
                yield Item("wallpaper", img.crop((x, y, x + side, y + side)), package, f"{path} crop", lic)


def clipart(rng: random.Random) -> Iterator[Item]:
    """A seeded sample of the Open Clip Art Library's PNG renderings."""
    root = Path("/usr/share/openclipart/png")
    found = files(root, (".png",)) if root.is_dir() else []
    if not found:
        missing("clipart", "apt-get install openclipart-png")
        return
    for path in sorted(rng.sample(found, min(CLIPART_COUNT, len(found)))):
        with Image.open(path) as img:
            yield Item("clipart", on_white(img), "openclipart-png", str(path), "public domain (Open Clip Art Library)")


def icons() -> Iterator[Item]:
    """Full-colour Adwaita icons (the large sizes; the symbolic ones are monochrome glyphs)."""
    roots = [Path("/usr/share/icons/Adwaita/512x512"), Path("/usr/share/icons/Adwaita/256x256")]
    found = [p for r in roots if r.is_dir() for p in files(r, (".png",)) if "symbolic" not in p.name]
    if not found:
        missing("icons", "apt-get install adwaita-icon-theme")
        return
    for path in found:
        with Image.open(path) as img:
            yield Item("icon", on_white(img), "adwaita-icon-theme", str(path), "CC-BY-SA 3.0 or LGPL-3 (debian/copyright)")


# --- writing ---------------------------------------------------------------------------------------


def build(out: Path, seed: int) -> list[dict[str, str]]:
    """Write every source's images into out and return the provenance rows."""
    out.mkdir(parents=True, exist_ok=True)
    sources = [
        synthetic(random.Random(f"{seed}-synthetic")),
        text_pages(random.Random(f"{seed}-text")),
        skimage_data(),
        matplotlib_samples(),
        wallpapers(random.Random(f"{seed}-wallpaper")),
        clipart(random.Random(f"{seed}-clipart")),
        icons(),
    ]
    rows: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    for items in sources:
        for item in items:
            n = counts[item.source] = counts.get(item.source, 0) + 1
            img = item.image
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
            photo_like = item.source in ("wallpaper", "textpage") or item.original.endswith(".jpg")
            name = f"{item.source}-{n:04d}.{'jpg' if photo_like else 'png'}"
            if photo_like:
                img.save(out / name, quality=90)
            else:
                img.save(out / name)
            rows.append({"file": name, "source": item.source, "package": item.package,
                         "original_path": item.original, "licence": item.licence})
    write_provenance(out, rows)
    for source, n in counts.items():
        print(f"{source:10s} {n:4d}")
    print(f"{'total':10s} {len(rows):4d}  -> {out}")
    return rows


def write_provenance(folder: Path, rows: list[dict[str, str]]) -> None:
    with open(folder / "provenance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "source", "package", "original_path", "licence"])
        writer.writeheader()
        writer.writerows(rows)


def halves(rows: list[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Halve each (source, package) stratum into val and test at random.

    The unit is the original picture, so the crops of one wallpaper never land on both sides.
    Odd strata alternate which half gets the extra picture, so the halves stay even overall.
    """
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in rows:
        key = (row["source"], row["package"], row["original_path"].removesuffix(" crop"))
        groups.setdefault(key, []).append(row)
    out: dict[str, list[dict[str, str]]] = {"val": [], "test": []}
    for n, stratum in enumerate(sorted({k[:2] for k in groups})):
        keys = sorted(k for k in groups if k[:2] == stratum)
        random.Random(f"{seed}-split-{stratum}").shuffle(keys)
        for i, key in enumerate(keys):
            out["val" if (i + n) % 2 == 0 else "test"].extend(groups[key])
    return out


def split(out: Path, rows: list[dict[str, str]], seed: int) -> None:
    """Copy the images of OUT/all into OUT/val and OUT/test, each with its provenance.csv."""
    for half, half_rows in halves(rows, seed).items():
        folder = out / half
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for row in half_rows:
            shutil.copy2(out / "all" / row["file"], folder / row["file"])
        write_provenance(folder, half_rows)
        print(f"{half:10s} {len(half_rows):4d}  -> {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder; images go to OUT/all")
    parser.add_argument("--split", action="store_true", help="also write OUT/val and OUT/test, half of each source")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    all_dir = args.out / "all"
    if all_dir.exists():
        shutil.rmtree(all_dir)  # a rebuild must not keep files from an older one
    rows = build(all_dir, args.seed)
    if args.split:
        split(args.out, rows, args.seed)


if __name__ == "__main__":
    main()
