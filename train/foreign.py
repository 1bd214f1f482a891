"""Foreign images: pictures that are not frames of the known classes, for outlier exposure and for measuring.

Two uses, two disjoint sets. Outlier exposure (Hendrycks et al., 2019) trains the classifier to spread its
belief on images from no class; the open-set "none of these" decision is then tuned and measured on other
foreign images. If the same package fed both, the measured rate would reward memorising that package's
look, so every source package goes wholly to one side: ``train/`` (outlier exposure) or the measuring side,
which is halved per package into ``val/`` (choosing) and ``test/`` (reporting).

Every source is shipped by a Debian or PyPI package that may be used offline, or synthesised here, so the sets
rebuild on any machine without a download; each file carries its origin, licence and kind in provenance.csv.
A missing package is skipped with one line naming it, so the function still works, smaller, on a machine that
has none of them (synthetic images and the PyPI sample data remain).

    from train.foreign import build_sets
    build_sets(Path("OUT"))          # OUT/train, OUT/val, OUT/test, each with provenance.csv
"""

from __future__ import annotations

import colorsys
import csv
import importlib.util
import math
import random
import re
import shutil
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

MAX_SIDE = 512  # the model squashes to ~160 px; keep the folders small without losing detail
CROPS_PER_WALLPAPER = 3  # plus the whole wallpaper: four views of each
CLIPART_COUNT = 160
FONT_DIRS = ["usr/share/fonts/truetype/dejavu", "usr/share/fonts/truetype/liberation"]
FIELDS = ["file", "source", "package", "original_path", "licence", "kind"]
OURS = "made by train/foreign.py (project licence)"
Log = Callable[[str], None]


@dataclass
class Item:
    """One image to write, with where it came from.

    ``group`` ties views of one picture (a wallpaper and its crops, frames on one background) so the
    val/test halving never puts them on both sides; empty means the original path is the group.
    """

    source: str
    image: Image.Image
    package: str
    original: str
    licence: str
    kind: str = "synthetic"
    group: str = field(default="")


@dataclass
class Context:
    """What every source reads: the file-system root its package paths live under, and where to log."""

    root: Path
    log: Log

    def path(self, relative: str) -> Path:
        return self.root / relative.lstrip("/")

    def missing(self, source: str, install: str) -> None:
        self.log(f"skip {source}: not installed here; install it with `{install}`")


def on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, as clipart and icons appear on a page."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")


def files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Image files under root, sorted, symlinks to the same file counted once."""
    if not root.is_dir():
        return []
    seen: dict[Path, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in suffixes and path.is_file():
            seen.setdefault(path.resolve(), path)
    return sorted(seen.values())


def load(path: Path, keep_alpha: bool = False) -> Image.Image | None:
    """Open a picture small (JPEG draft decoding), or None when it is not a readable image."""
    try:
        with warnings.catch_warnings():
            # some packaged wallpapers pass PIL's pixel limit: trusted files, shrunk right after
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            if opened.format == "JPEG":
                opened.draft("RGB", (2 * MAX_SIDE, 2 * MAX_SIDE))  # decode at a fraction of the size
            opened.load()
            if keep_alpha:
                return opened.convert("RGBA")
            return on_white(opened)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def crops(img: Image.Image, rng: random.Random, n: int, low: float = 0.3, high: float = 0.7) -> list[Image.Image]:
    """n random square crops, each a fraction of the short side."""
    out = []
    for _ in range(n):
        side = max(1, int(min(img.size) * rng.uniform(low, high)))
        x, y = rng.randrange(img.width - side + 1), rng.randrange(img.height - side + 1)
        out.append(img.crop((x, y, x + side, y + side)))
    return out


# --- synthesised -----------------------------------------------------------------------------------


def synthetic(rng: random.Random) -> Iterator[Item]:
    """Measuring recipes: flat colours, linear gradients, colour wheels, noise, stripes and checkerboards."""
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


def synthetic_train(rng: random.Random, n: int = 160) -> Iterator[Item]:
    """Training recipes, none of which the measuring side uses: radial gradients, smooth colour fields
    (plasma), random flat shapes (the look of flat-shaded cartoon art without any character), angled stripes,
    and flat colours drawn from another seed."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731 - a one-line helper used below
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    for i in range(n):
        recipe = i % 5
        if recipe == 0:
            cx, cy = rng.random(), rng.random()
            t = np.clip(np.hypot(xx - cx, yy - cy) / rng.uniform(0.4, 1.2), 0, 1)[..., None]
            a, b = np.array(colour(), float), np.array(colour(), float)
            img = Image.fromarray((a + (b - a) * t).astype(np.uint8))
            what = "radial gradient"
        elif recipe == 1:
            field_ = nrng.normal(size=(8, 8, 3))
            small = Image.fromarray(((field_ - field_.min()) / np.ptp(field_) * 255).astype(np.uint8))
            img = small.resize((256, 256), Image.Resampling.BICUBIC)
            what = "smooth colour field"
        elif recipe == 2:
            img = Image.new("RGB", (256, 256), colour())
            draw = ImageDraw.Draw(img)
            for _ in range(rng.randrange(3, 12)):
                x0, y0 = rng.randrange(-40, 256), rng.randrange(-40, 256)
                x1, y1 = x0 + rng.randrange(20, 160), y0 + rng.randrange(20, 160)
                shape = rng.choice(["ellipse", "rectangle", "polygon"])
                outline = (0, 0, 0) if rng.random() < 0.5 else None
                if shape == "polygon":
                    pts = [(rng.randrange(x0, x1), rng.randrange(y0, y1)) for _ in range(rng.randrange(3, 7))]
                    draw.polygon(pts, fill=colour(), outline=outline)
                else:
                    getattr(draw, shape)((x0, y0, x1, y1), fill=colour(), outline=outline, width=rng.choice([1, 3]))
            what = "flat shapes"
        elif recipe == 3:
            angle, period = rng.uniform(0, math.pi), rng.uniform(0.03, 0.25)
            phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
            mask = (np.floor(phase) % 2 == 0)[..., None]
            img = Image.fromarray(np.where(mask, np.array(colour(), np.uint8), np.array(colour(), np.uint8)))
            what = "angled stripes"
        else:
            img = Image.new("RGB", (256, 256), colour())
            img = Image.fromarray(np.clip(np.asarray(img, float) + nrng.normal(0, rng.choice([0, 4, 12]), (256, 256, 3)),
                                          0, 255).astype(np.uint8))
            what = "flat colour with grain"
        yield Item("synthetic-train", img, "-", f"{what} {i}", OURS, "synthetic")


# --- text pages ------------------------------------------------------------------------------------


def _pages(rng: random.Random, texts: list[Path], fonts: list[Path], n: int, seed_base: int) -> Iterator[tuple[Image.Image, Path, Path, int]]:
    """Scanned-looking pages: text set in a font on off-white paper, tilted, with grain."""
    for i in range(n):
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
        grain = np.random.default_rng(seed_base + i).normal(0, 6, (820, 640, 1))
        page = Image.fromarray(np.clip(np.asarray(page, float) + grain, 0, 255).astype(np.uint8))
        yield page, text_path, font_path, i


def text_pages(rng: random.Random, ctx: Context) -> Iterator[Item]:
    """Measuring pages: licence texts from base-files set in DejaVu/Liberation fonts."""
    texts = files(ctx.path("usr/share/common-licenses"), ("",))
    # DejaVu Math (fonts-dejavu-extra) is a maths font under another licence: text fonts only
    fonts = [f for d in FONT_DIRS for f in files(ctx.path(d), (".ttf",)) if "Math" not in f.name]
    if not texts or not fonts:
        ctx.missing("text pages", "apt-get install base-files fonts-dejavu-core")
        return
    for page, text_path, font_path, i in _pages(rng, texts, fonts, 20, 0):
        liberation = "liberation" in str(font_path)
        package = "base-files + " + ("fonts-liberation" if liberation else "fonts-dejavu-core/-extra")
        font_licence = "GPL-2 with font exception" if liberation else "Bitstream Vera licence"
        lic = f"text: verbatim copies permitted; font: {font_licence}"
        original = f"page {i}: /{text_path.relative_to(ctx.root)} in {font_path.name}"
        yield Item("textpage", page, package, original, lic, "text")


def text_pages_train(rng: random.Random, ctx: Context, n: int = 60) -> Iterator[Item]:
    """Training pages: Python's own standard-library sources and docs set in GNU FreeFont, so neither the
    text nor the fonts are those of the measuring pages."""
    import sysconfig  # the running interpreter's library: present wherever this code runs

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)
    fonts = files(ctx.path("usr/share/fonts/truetype/freefont"), (".ttf",))
    if not texts or not fonts:
        ctx.missing("training text pages", "apt-get install fonts-freefont-ttf")
        return
    for page, text_path, font_path, i in _pages(rng, texts, fonts, n, 10_000):
        original = f"page {i}: {text_path.name} (Python standard library) in {font_path.name}"
        yield Item("textpage-train", page, "python3-stdlib + fonts-freefont-ttf", original,
                   "text: PSF licence; font: GPL-3+ with font exception", "text")


# --- shipped by packages ---------------------------------------------------------------------------


def skimage_data(ctx: Context) -> Iterator[Item]:
    """Sample images that scikit-image ships on disk (not the ones it would download)."""
    roots = []
    spec = importlib.util.find_spec("skimage")  # its data folder, found without importing the package
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent / "data")
    roots.append(ctx.path("usr/lib/python3/dist-packages/skimage/data"))
    root = next((r for r in roots if files(r, (".png", ".jpg"))), None)
    if root is None:
        ctx.missing("scikit-image data", "apt-get install python3-skimage")
        return
    for path in files(root, (".png", ".jpg", ".jpeg")):
        img = load(path)  # the folder also holds deliberately broken files for skimage's own tests
        if img is not None and min(img.size) >= 64:  # and tiny test patterns that are not pictures
            lic = "BSD-3-Clause (Debian copyright); upstream: public domain / CC0 per image"
            yield Item("skimage", img, "python3-skimage", f"skimage/data/{path.name}", lic, "photo")


MPL_SAMPLES = {
    "grace_hopper.jpg": ("public domain (US Navy photograph)", "photo"),
    "Minduka_Present_Blue_Pack.png": ("public domain (Open Clip Art Library)", "clipart"),
    "logo2.png": ("Matplotlib licence (PSF-style)", "drawing"),
}


def matplotlib_samples(ctx: Context) -> Iterator[Item]:
    """The picture files in matplotlib's sample_data."""
    try:
        import matplotlib  # optional source: imported only here
    except ImportError:
        ctx.missing("matplotlib sample_data", "pip install matplotlib")
        return
    root = Path(matplotlib.get_data_path()) / "sample_data"
    for name, (lic, kind) in MPL_SAMPLES.items():
        img = load(root / name) if (root / name).is_file() else None
        if img is not None:
            yield Item("matplotlib", img, "matplotlib (PyPI)", f"mpl-data/sample_data/{name}", lic, kind)


@dataclass(frozen=True)
class Wallpapers:
    """Desktop backgrounds of one package: each whole plus random square crops."""

    package: str
    folder: str
    pattern: str
    licence: str
    crops: int = CROPS_PER_WALLPAPER
    limit: int = 0  # 0: every picture; else a seeded sample of that many


# Only raster files: SVG wallpapers would need a rasteriser.
# desktop-base's theme wallpapers are SVG; their GRUB backgrounds are the same picture as a PNG.
WALLPAPERS_MEASURE = [
    Wallpapers("gnome-backgrounds", "usr/share/backgrounds/gnome", "*.webp", "CC-BY-SA 2.0/3.0, CC-BY 2.0 (debian/copyright)"),
    Wallpapers("mate-backgrounds", "usr/share/backgrounds/mate", "*/*.[jp][pn]g", "GPL-2+, CC-BY-SA 4.0 (debian/copyright)"),
    Wallpapers("desktop-base", "usr/share/desktop-base", "*-theme/grub/grub-16x9.png", "GPL-2+ / GPL-2 (debian/copyright)"),
]
WALLPAPERS_TRAIN = [
    Wallpapers("plasma-workspace-wallpapers", "usr/share/wallpapers", "*/contents/images/*.[jp][pn]g",
               "GPL-2+ (debian/copyright)"),
]


def wallpapers(spec: Wallpapers, rng: random.Random, ctx: Context) -> Iterator[Item]:
    """Each desktop background whole, plus spec.crops random square crops."""
    found = sorted(ctx.path(spec.folder).glob(spec.pattern))
    if not found:
        ctx.missing(spec.package, f"apt-get install {spec.package}")
        return
    pictures: dict[str, Path] = {}
    for path in found:
        base = path.with_name(re.sub(r"_\d+x\d+$", "", path.stem) + path.suffix)
        if base != path and base.exists():  # the same picture at another resolution
            continue
        # plasma ships one picture per folder at several sizes: keep the landscape one nearest full HD
        key = str(path.parent) if "contents/images" in str(path) else str(path)
        if key in pictures and _size_rank(path) >= _size_rank(pictures[key]):
            continue
        pictures[key] = path
    chosen = sorted(pictures.values())
    if spec.limit:
        chosen = sorted(rng.sample(chosen, min(spec.limit, len(chosen))))
    for path in chosen:
        img = load(path)
        if img is None or min(img.size) < 200:  # placeholders (a 1-pixel VNC background), not pictures
            continue
        original = f"/{path.relative_to(ctx.root)}"
        yield Item("wallpaper", img, spec.package, original, spec.licence, "wallpaper", original)
        for crop in crops(img, rng, spec.crops):
            yield Item("wallpaper", crop, spec.package, f"{original} crop", spec.licence, "wallpaper", original)


def _size_rank(path: Path) -> float:
    """Lower is better: landscape files named WxH, nearest 1920 wide; others last."""
    match = re.match(r"(\d+)x(\d+)", path.stem)
    if not match or int(match[1]) < int(match[2]):
        return math.inf
    return abs(int(match[1]) - 1920)


@dataclass(frozen=True)
class Sample:
    """A seeded sample of one package's pictures, each flattened on white (clipart, stamps, icons)."""

    source: str
    package: str
    folders: tuple[str, ...]
    licence: str
    kind: str
    count: int
    suffixes: tuple[str, ...] = (".png",)
    exclude: str = ""  # a regex on the path: variants that are not pictures (symbolic icons, masks)
    min_side: int = 0  # smaller pictures are left out: fragments among stamps and icons


SAMPLES_MEASURE = [
    Sample("clipart", "openclipart-png", ("usr/share/openclipart/png",), "public domain (Open Clip Art Library)",
           "clipart", CLIPART_COUNT),
    Sample("icon", "adwaita-icon-theme", ("usr/share/icons/Adwaita/512x512", "usr/share/icons/Adwaita/256x256"),
           "CC-BY-SA 3.0 or LGPL-3 (debian/copyright)", "icon", 10_000, exclude="symbolic"),
]
SAMPLES_TRAIN = [
    Sample("stamp", "tuxpaint-stamps-default", ("usr/share/tuxpaint/stamps",),
           "GPL-2 (debian/copyright)", "clipart", 500, exclude=r"_(mirror|flip)|/rcc/", min_side=48),
    Sample("icon-train", "oxygen-icon-theme", ("usr/share/icons/oxygen/base/256x256",),
           "LGPL-3+ (debian/copyright)", "icon", 250, min_side=48),
]


def sample(spec: Sample, rng: random.Random, ctx: Context) -> Iterator[Item]:
    """spec.count pictures drawn at random from the package's folders."""
    exclude = re.compile(spec.exclude) if spec.exclude else None
    found = [p for folder in spec.folders for p in files(ctx.path(folder), spec.suffixes)
             if not (exclude and exclude.search(str(p)))]
    if not found:
        ctx.missing(spec.source, f"apt-get install {spec.package}")
        return
    for path in sorted(rng.sample(found, min(spec.count, len(found)))):
        img = load(path)
        if img is not None and min(img.size) >= spec.min_side:
            yield Item(spec.source, img, spec.package, f"/{path.relative_to(ctx.root)}", spec.licence, spec.kind)


# --- cartoon and game art --------------------------------------------------------------------------


@dataclass(frozen=True)
class GameArt:
    """One game's raster art: its scenery (opaque pictures), its layers (wide cut-outs: hills, skylines,
    terrain strips) and its sprites (cut-out characters and objects).

    "Cartoon frames" put a few of the game's sprites on a crop of its scenery (or on a sky with one of its
    layers along the bottom), so they look like a frame from a cartoon of another world: flat colours,
    outlines, a character in a place. Plain scenery crops and plain sprites on white go in too.
    """

    package: str
    folders: tuple[str, ...]
    licence: str
    frames: int
    scenery: int
    sprites: int
    exclude: str = ""  # a regex on the path, on top of EXCLUDE_ART: this game's atlases, UI and text
    scenery_hint: str = ""  # a regex on the path: pictures that are backdrops even when they carry alpha


# Fonts, UI, HUD, icons, flags and particles are not a world's art; screenshots with text are not frames.
EXCLUDE_ART = r"(?i)font|/ui/|/gui/|/hud|icon|button|cursor|/editor/|arrow|digit|particle|flag|/help/|/l10n/|/lobby/"
GAMES_MEASURE = [
    GameArt("hedgewars-data", ("usr/share/games/hedgewars/Data",), "GPL-2 (code, themes) / GFDL-1.3 (graphics, several themes) per file (debian/copyright)",
            frames=120, scenery=40, sprites=60, exclude=r"/Missions/|/Maps/.*(map|mask)\.png|Graphics/(AmmoMenu|Graves)|Border|Chunk|Girder",
            scenery_hint=r"Themes/[^/]+/(Sky|horizont|LandBackTex)\.png|/Maps/[^/]+/preview"),
    GameArt("frozen-bubble-data", ("usr/share/games/frozen-bubble",), "GPL-2 (debian/copyright)",
            frames=60, scenery=20, sprites=40, exclude=r"panel|hiscore|key_shortcuts|level_editor|/flags/|back_(hiscores|paused|netgame)",
            scenery_hint=r"gfx/(back|intro/back)"),
    # teeworlds' characters are grey part atlases coloured at run time: its scenery only
    GameArt("teeworlds-data", ("usr/share/games/teeworlds/data",), "CC-BY-SA 3.0 (debian/copyright)",
            frames=0, scenery=30, sprites=0,
            exclude=r"mapres/.*(main|deathtiles|unhook|lamps|shadows|easter|doodads|entities)|emoticons|game\.png|deadtee|race_flag|/skins/",
            scenery_hint=r"mapres/.*(background|bg_cloud|mountains|sun)"),
    GameArt("flare-game", ("usr/share/games/flare/mods",), "CC-BY-SA 3.0+ (art) / GPL-3+ (debian/copyright)",
            frames=70, scenery=20, sprites=40,
            exclude=r"/avatar/|/loot/|/powers/|/enemies/|/books/|/cursors/|/logo/|/credits/|/parallax/(fog|rain|snow)|/menus/(?!backgrounds/)|/tilesets/|/npcs/",
            scenery_hint=r"/cutscenes/|/menus/backgrounds/|/parallax/space"),
]
GAMES_TRAIN = [
    GameArt("supertux-data", ("usr/share/games/supertux2",), "GPL-2+ / GPL-3+ / CC-BY-SA / public domain per file (debian/copyright)",
            frames=300, scenery=100, sprites=150, exclude=r"/tiles/|/worldmap/|/engine/|/decal/",
            scenery_hint=r"images/background/"),
    GameArt("pingus-data", ("usr/share/games/pingus/data",), "GPL-2+ (debian/copyright)",
            frames=150, scenery=50, sprites=60, exclude=r"/core/|/story/|/entrances/|/groundpieces/",
            scenery_hint=r"images/textures/"),
    GameArt("freeciv-data", ("usr/share/games/freeciv",), "GPL-2+ (debian/copyright)",
            frames=60, scenery=20, sprites=80, exclude=r"/nuke|/grid|/select|/explosion|overlays|/misc/"),
    GameArt("lincity-ng-data", ("usr/share/games/lincity-ng",), "GPL-2+ (debian/copyright)",
            frames=40, scenery=20, sprites=40),
    GameArt("tuxmath-data", ("usr/share/tuxmath",), "GPL-3+ / CC-BY-SA-3.0 / public domain per file (debian/copyright)",
            frames=60, scenery=20, sprites=30, scenery_hint=r"backgrounds/"),
    GameArt("wesnoth-1.16-data", ("usr/share/games/wesnoth/1.16/data",), "GPL-2 / GPL-2+ (debian/copyright)",
            frames=300, scenery=80, sprites=150,
            exclude=r"/themes/|/halo/|/misc/|/attacks/|/masks/|/projectiles/|/terrain/|/maps/.*\.map|/campaigns/[^/]+/images/(misc|maps/.*(image|flag|dot))",
            scenery_hint=r"/story/|/maps/"),
    GameArt("freedroidrpg-data", ("usr/share/freedroidrpg/data/graphics",), "GPL-2+ / GPL-3 per file (debian/copyright)",
            frames=100, scenery=30, sprites=80, exclude=r"/blasts/|/floor_tiles/|/tux_motion_parts/|/items/|/light_radius|/skill_icons/|/bullets/|/radial_spells/|backgrounds/(Skill|inventory|item_browser|character|conversation|console)",
            scenery_hint=r"backgrounds/|/story/"),
    GameArt("tuxtype-data", ("usr/share/tuxtype",), "GPL-2 (debian/copyright)",
            frames=40, scenery=20, sprites=30, scenery_hint=r"backgrounds/"),
]
LARGE_ALPHA_CHECKS = 300  # big transparent files decoded per game to tell backdrops from cut-outs
# top and bottom colours of the skies drawn behind a game's layers: day, dusk, night, haze, meadow
SKY = [((120, 180, 255), (220, 240, 255)), ((40, 60, 140), (250, 170, 90)), ((10, 10, 40), (60, 40, 110)),
       ((170, 220, 250), (250, 250, 220)), ((90, 160, 90), (200, 230, 150))]


def _classify(spec: GameArt, rng: random.Random, ctx: Context) -> tuple[list[Path], list[Path], list[Path]]:
    """Scenery, layer and sprite candidates of one game, from the files' headers and, for big transparent
    files, their alpha: a PNG with an alpha channel is often an opaque backdrop all the same."""
    exclude = re.compile(EXCLUDE_ART + (f"|{spec.exclude}" if spec.exclude else ""))
    hint = re.compile(spec.scenery_hint) if spec.scenery_hint else None
    paths = [p for folder in spec.folders for p in files(ctx.path(folder), (".png", ".jpg", ".jpeg"))
             if not exclude.search("/" + str(p.relative_to(ctx.root)))]
    scenery, layers, sprites, large = [], [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                w, h, mode, transparent = img.width, img.height, img.mode, "transparency" in img.info
        except (OSError, ValueError):
            continue
        alpha = mode in ("RGBA", "LA", "PA") or transparent
        hinted = bool(hint and hint.search(str(path)))
        if min(w, h) >= 200 and max(w, h) <= 6 * min(w, h) and (not alpha or hinted):
            scenery.append(path)
        elif alpha and min(w, h) >= 120:
            large.append(path)
        elif alpha and 24 <= min(w, h):
            sprites.append(path)
    for path in sorted(rng.sample(large, min(len(large), LARGE_ALPHA_CHECKS))):
        img = load(path, keep_alpha=True)
        if img is None:
            continue
        cover = (np.asarray(img.getchannel("A")) > 16).mean()
        if cover > 0.99 and min(img.size) >= 200:
            scenery.append(path)
        elif img.width >= 1.8 * img.height and img.width >= 300 and 0.15 <= cover <= 0.9:
            layers.append(path)
        elif max(img.size) <= 1200:
            sprites.append(path)
    return sorted(scenery), sorted(layers), sorted(sprites)


def _cutout(path: Path, rng: random.Random) -> Image.Image | None:
    """One sprite, trimmed to its visible pixels; one frame of a strip when the file is an animation strip."""
    img = load(path, keep_alpha=True)
    if img is None:
        return None
    w, h = img.size
    if w >= 2 * h:  # a horizontal strip of square-ish frames
        k = rng.randrange(w // h)
        img = img.crop((k * h, 0, k * h + h, h))
    elif h >= 2 * w:
        k = rng.randrange(h // w)
        img = img.crop((0, k * w, w, k * w + w))
    alpha = np.asarray(img)[..., 3]
    covered = (alpha > 16).mean()
    if not 0.08 <= covered <= 0.97:  # an empty cell or an opaque tile, not a figure
        return None
    box = img.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    img = img.crop(box) if box else img
    if min(img.size) < 16 or np.asarray(on_white(img)).std() < 12:  # a speck, or a pale puff lost on white
        return None
    return img


def _sky(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A vertical two-colour gradient: the sky a game's layers stand against."""
    top, bottom = (np.array(c, float) for c in rng.choice(SKY))
    t = np.linspace(0, 1, size[1])[:, None, None]
    return Image.fromarray(np.broadcast_to(top + (bottom - top) * t, (size[1], size[0], 3)).astype(np.uint8))


def _frame(background: Image.Image, layer: Image.Image | None, figures: list[Image.Image],
           rng: random.Random) -> Image.Image:
    """A 4:3 or 16:9 crop of the scenery, a layer along its bottom if given, and the figures standing in it."""
    aspect = rng.choice([4 / 3, 16 / 9])
    bw, bh = background.size
    h = max(1, int(min(bh, bw / aspect) * rng.uniform(0.6, 1.0)))
    w = max(1, int(h * aspect))
    x, y = rng.randrange(max(1, bw - w + 1)), rng.randrange(max(1, bh - h + 1))
    frame = background.crop((x, y, x + w, y + h)).resize((512, int(512 / aspect)), Image.Resampling.LANCZOS)
    frame = frame.convert("RGBA")
    fw, fh = frame.size
    if layer is not None:
        lh = max(8, int(layer.height * fw / layer.width))
        strip = layer.resize((fw, lh), Image.Resampling.LANCZOS)
        frame.alpha_composite(strip, (0, max(0, fh - lh)))
    for fig in figures:
        scale = fh * rng.uniform(0.2, 0.6) / fig.height
        size = (max(8, int(fig.width * scale)), max(8, int(fig.height * scale)))
        if size[0] > fw * 0.8:
            size = (int(fw * 0.8), max(8, int(size[1] * fw * 0.8 / size[0])))
        fig = fig.resize(size, Image.Resampling.NEAREST if scale > 2 else Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            fig = ImageOps.mirror(fig)
        px = rng.randrange(-fig.width // 4, max(1, fw - fig.width * 3 // 4))
        py = fh - fig.height - rng.randrange(0, max(1, fh // 3))  # standing in the lower part, as characters do
        frame.alpha_composite(fig, (min(max(0, px), max(0, fw - 8)), max(0, py)))
    return frame.convert("RGB")


def game_art(spec: GameArt, rng: random.Random, ctx: Context) -> Iterator[Item]:
    """Cartoon frames, scenery crops and plain sprites of one game."""
    scenery, layer_paths, sprites = _classify(spec, rng, ctx)
    if not scenery and not sprites:
        ctx.missing(spec.package, f"apt-get install {spec.package}")
        return
    rel = lambda p: f"/{p.relative_to(ctx.root)}"  # noqa: E731 - a one-line helper used below
    backgrounds: dict[str, Image.Image] = {}
    for path in sorted(rng.sample(scenery, min(len(scenery), 60))):
        img = load(path, keep_alpha=True)
        if img is not None:
            img.thumbnail((1024, 1024))
            if (np.asarray(img.getchannel("A")) < 250).mean() > 0.01:  # a backdrop with holes: put sky behind it
                sky = _sky(rng, img.size).convert("RGBA")
                sky.alpha_composite(img)
                img = sky
            backgrounds[rel(path)] = img.convert("RGB")
    layers = {rel(p): img for p in layer_paths[:40] if (img := load(p, keep_alpha=True)) is not None}
    if layers and len(backgrounds) < 12:  # few backdrops: skies behind the game's own hills and skylines
        for name, layer in sorted(layers.items())[:12]:
            sky = _sky(rng, (1024, 576)).convert("RGBA")
            lh = int(layer.height * 1024 / layer.width)
            sky.alpha_composite(layer.resize((1024, lh)), (0, max(0, 576 - lh)))
            backgrounds[f"sky + {name}"] = sky.convert("RGB")
    figures: list[tuple[str, Image.Image]] = []
    for path in sorted(rng.sample(sprites, min(len(sprites), 300))):
        fig = _cutout(path, rng)
        if fig is not None:
            figures.append((rel(path), fig))
    keys = sorted(backgrounds)
    if keys and figures:
        for i in range(min(spec.frames, 10 * len(keys))):  # at most ten frames on one backdrop
            bg = keys[i % len(keys)]
            layer_name = rng.choice(sorted(layers)) if layers and rng.random() < 0.3 else None
            chosen = [figures[rng.randrange(len(figures))] for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))]
            img = _frame(backgrounds[bg], layers.get(layer_name) if layer_name else None, [f for _, f in chosen], rng)
            parts = [bg] + ([layer_name] if layer_name else []) + [name for name, _ in chosen]
            yield Item("cartoon-frame", img, spec.package, f"frame {i}: " + " + ".join(parts), spec.licence,
                       "cartoon", bg)
    for i in range(min(spec.scenery, 3 * len(keys))):
        bg = keys[i % len(keys)]
        img = crops(backgrounds[bg], rng, 1, 0.4, 1.0)[0]
        yield Item("scenery", img, spec.package, f"{bg} crop", spec.licence, "cartoon", bg)
    for name, fig in sorted(rng.sample(figures, min(spec.sprites, len(figures))), key=lambda f: f[0]):
        page = Image.new("RGBA", (fig.width + 16, fig.height + 16), (255, 255, 255, 255))
        page.alpha_composite(fig, (8, 8))
        yield Item("sprite", page.convert("RGB"), spec.package, name, spec.licence, "cartoon")


# --- the sides -------------------------------------------------------------------------------------


def measure_sources(seed: int, ctx: Context) -> list[Iterator[Item]]:
    """The measuring side: the packages the published open-set figures were measured on, plus game art
    that the training side never sees."""
    r = lambda name: random.Random(f"{seed}-{name}")  # noqa: E731 - a one-line helper used below
    return [
        synthetic(r("synthetic")),
        text_pages(r("text"), ctx),
        skimage_data(ctx),
        matplotlib_samples(ctx),
        *(wallpapers(s, r(f"wallpaper-{s.package}"), ctx) for s in WALLPAPERS_MEASURE),
        *(sample(s, r(f"sample-{s.package}"), ctx) for s in SAMPLES_MEASURE),
        *(game_art(g, r(f"game-{g.package}"), ctx) for g in GAMES_MEASURE),
    ]


def train_sources(seed: int, ctx: Context) -> list[Iterator[Item]]:
    """The outlier-exposure side: other packages, other recipes."""
    r = lambda name: random.Random(f"{seed}-train-{name}")  # noqa: E731 - a one-line helper used below
    return [
        synthetic_train(r("synthetic")),
        text_pages_train(r("text"), ctx),
        *(wallpapers(s, r(f"wallpaper-{s.package}"), ctx) for s in WALLPAPERS_TRAIN),
        *(sample(s, r(f"sample-{s.package}"), ctx) for s in SAMPLES_TRAIN),
        *(game_art(g, r(f"game-{g.package}"), ctx) for g in GAMES_TRAIN),
    ]


def packages(package: str) -> set[str]:
    """The source packages named in a provenance row ("base-files + fonts-liberation" names two)."""
    return {p.strip() for p in package.split("+")} - {"-", ""}


# --- writing ---------------------------------------------------------------------------------------


def write_items(folder: Path, items: Iterator[Item]) -> list[dict[str, str]]:
    """Write every item into folder; return the provenance rows (with their group, not written)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    counts: Counter[str] = Counter()
    for item in items:
        counts[item.source] += 1
        img = item.image
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        # photos, pages and cartoon frames as JPEG: the known classes are JPEG frames, so the compression
        # must not tell foreign from known
        jpeg = item.kind in ("photo", "wallpaper", "text") or item.source in ("cartoon-frame", "scenery") \
            or item.original.lower().endswith((".jpg", ".jpeg"))
        name = f"{item.source}-{counts[item.source]:04d}.{'jpg' if jpeg else 'png'}"
        if jpeg:
            img.convert("RGB").save(folder / name, quality=90)
        else:
            img.save(folder / name)
        rows.append({"file": name, "source": item.source, "package": item.package, "original_path": item.original,
                     "licence": item.licence, "kind": item.kind, "group": item.group or item.original})
    return rows


def write_provenance(folder: Path, rows: list[dict[str, str]]) -> None:
    with open(folder / "provenance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def halves(rows: list[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Halve each (source, package) stratum into val and test at random.

    The unit is the original picture (its ``group``), so the crops of one wallpaper or the frames drawn on
    one background never land on both sides. Odd strata alternate which half gets the extra picture, so the
    halves stay even overall.
    """
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in rows:
        key = (row["source"], row["package"], row.get("group") or row["original_path"].removesuffix(" crop"))
        groups.setdefault(key, []).append(row)
    out: dict[str, list[dict[str, str]]] = {"val": [], "test": []}
    for n, stratum in enumerate(sorted({k[:2] for k in groups})):
        keys = sorted(k for k in groups if k[:2] == stratum)
        random.Random(f"{seed}-split-{stratum}").shuffle(keys)
        for i, key in enumerate(keys):
            out["val" if (i + n) % 2 == 0 else "test"].extend(groups[key])
    return out


def summary(rows: list[dict[str, str]]) -> str:
    """Counts per kind and per (source, package): what a reader checks first."""
    kinds = Counter(r["kind"] for r in rows)
    by_pkg = Counter((r["source"], r["package"]) for r in rows)
    lines = ["  kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))]
    lines += [f"  {source:15s} {package:40s} {n:5d}" for (source, package), n in sorted(by_pkg.items())]
    return "\n".join(lines)


def build_sets(out: Path, *, seed: int = 0, log: Log = print, root: Path = Path("/")) -> dict[str, Path]:
    """Write out/train (outlier exposure), out/val and out/test (measuring halves), each with provenance.csv.

    ``root`` is where the Debian packages' paths are looked up: tests point it at a small or empty folder.
    The same seed and the same package versions give the same files.
    """
    ctx = Context(root, log)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".measure-all"
    folders = {name: out / name for name in ("train", "val", "test")}
    for folder in [*folders.values(), staging]:
        if folder.exists():
            shutil.rmtree(folder)  # a rebuild must not keep files from an older one
    train_rows = write_items(folders["train"], (i for s in train_sources(seed, ctx) for i in s))
    write_provenance(folders["train"], train_rows)
    measure_rows = write_items(staging, (i for s in measure_sources(seed, ctx) for i in s))
    for half, half_rows in halves(measure_rows, seed).items():
        folders[half].mkdir(parents=True)
        for row in half_rows:
            shutil.move(staging / row["file"], folders[half] / row["file"])
        write_provenance(folders[half], half_rows)
    shutil.rmtree(staging)
    overlap = {p for r in train_rows for p in packages(r["package"])} & \
              {p for r in measure_rows for p in packages(r["package"])}
    if overlap:  # the rule the measured rate's honesty rests on
        raise RuntimeError(f"packages on both sides: {sorted(overlap)}")
    for name, folder in folders.items():
        rows = read_provenance(folder)
        for line in [f"{name}: {len(rows)} images -> {folder}", *summary(rows).splitlines()]:
            log(line)
    return folders


def read_provenance(folder: Path) -> list[dict[str, str]]:
    with open(folder / "provenance.csv", newline="") as f:
        return list(csv.DictReader(f))
