"""train/foreign.py: outlier-exposure and measuring sets that share no source package, complete provenance,
seeded output, and one line per package a machine lacks. The builds run on a tiny fake file-system root
(a few images where each package would put them), so they are fast and need no Debian package."""
from __future__ import annotations

import csv
import random
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from train import foreign
from train.foreign import FIELDS, build_sets, halves, packages

MEASURE_SPECS = [*foreign.WALLPAPERS_MEASURE, *foreign.SAMPLES_MEASURE, *foreign.GAMES_MEASURE]
TRAIN_SPECS = [*foreign.WALLPAPERS_TRAIN, *foreign.SAMPLES_TRAIN, *foreign.GAMES_TRAIN]


def blob(path: Path, size: tuple[int, int], colour: tuple[int, int, int], opaque: bool = False) -> None:
    """A coloured ellipse with an outline: on transparency it is a sprite, filled to the edges it is scenery."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", size, (*colour, 255) if opaque else (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((size[0] // 6, size[1] // 6, size[0] * 5 // 6, size[1] * 5 // 6), fill=(*colour[::-1], 255),
                 outline=(0, 0, 0, 255), width=2)
    img.save(path)


@pytest.fixture(scope="module", autouse=True)
def light_synthesis():
    """Fewer and smaller drawn images: the rules under test do not depend on how many there are."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(foreign, "colour_wheel", lambda size, value, wheel=foreign.colour_wheel: wheel(48, value))
        mp.setattr(foreign, "synthetic_train", partial(foreign.synthetic_train, n=20))
        yield


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """Two packages per side where build_sets looks for them: clipart and a game to measure, stamps and a
    game to train on."""
    root = tmp_path_factory.mktemp("root")
    for i in range(4):
        blob(root / f"usr/share/openclipart/png/things/clip{i}.png", (80, 64), (200, 40 * i, 30))
        blob(root / f"usr/share/tuxpaint/stamps/animals/stamp{i}.png", (64, 80), (30, 40 * i, 200))
        blob(root / f"usr/share/games/hedgewars/Data/Themes/T{i}/Sky.png", (320, 240), (90, 150, 40 * i), opaque=True)
        blob(root / f"usr/share/games/hedgewars/Data/Graphics/hog{i}.png", (48, 48), (230, 60 * i, 90))
        blob(root / f"usr/share/games/supertux2/images/background/bg{i}.png", (320, 240), (40 * i, 90, 150), opaque=True)
        blob(root / f"usr/share/games/supertux2/images/creatures/snow{i}.png", (48, 56), (60 * i, 230, 90))
    return root


@pytest.fixture(scope="module")
def built(fake_root, tmp_path_factory) -> tuple[dict[str, Path], list[str]]:
    lines: list[str] = []
    return build_sets(tmp_path_factory.mktemp("sets"), seed=0, log=lines.append, root=fake_root), lines


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "provenance.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_no_source_package_feeds_both_training_and_measuring(built):
    folders, _ = built
    train = {p for r in rows(folders["train"]) for p in packages(r["package"])}
    measure = {p for half in ("val", "test") for r in rows(folders[half]) for p in packages(r["package"])}
    assert {"tuxpaint-stamps-default", "supertux-data"} <= train
    assert {"openclipart-png", "hedgewars-data"} <= measure
    assert not train & measure
    # and the configured packages, whether or not this machine has them
    declared_train = {s.package for s in TRAIN_SPECS}
    declared_measure = {s.package for s in MEASURE_SPECS}
    assert not declared_train & declared_measure
    # both sides get cartoon and game art
    assert {r["kind"] for r in rows(folders["train"])} >= {"cartoon", "synthetic", "clipart"}
    assert "cartoon" in {r["kind"] for half in ("val", "test") for r in rows(folders[half])}


def test_synthetic_recipes_differ_between_the_sides(built):
    folders, _ = built
    train = {r["original_path"] for r in rows(folders["train"]) if r["kind"] == "synthetic"}
    measure = {r["original_path"] for h in ("val", "test") for r in rows(folders[h]) if r["kind"] == "synthetic"}
    assert train and measure
    recipe = lambda original: " ".join(re.sub(r"[\d(),.]", " ", original).split())  # noqa: E731 - the name, no numbers
    assert not {recipe(o) for o in train} & {recipe(o) for o in measure}


def test_provenance_lists_every_file_with_every_column(built):
    folders, _ = built
    for folder in folders.values():
        listed = rows(folder)
        assert list(listed[0]) == FIELDS
        assert {r["file"] for r in listed} == {p.name for p in folder.iterdir() if p.name != "provenance.csv"}
        for row in listed:
            assert all(row[k] for k in FIELDS), row
            with Image.open(folder / row["file"]) as img:
                assert max(img.size) <= foreign.MAX_SIDE
                assert img.mode == "RGB"


def test_the_same_seed_gives_the_same_sets_and_another_seed_other_ones(built, fake_root, tmp_path):
    folders, _ = built
    again = build_sets(tmp_path / "again", seed=0, log=lambda line: None, root=fake_root)
    other = build_sets(tmp_path / "other", seed=1, log=lambda line: None, root=fake_root)
    for name, folder in folders.items():
        assert rows(again[name]) == rows(folder)
        for row in rows(folder):
            assert (again[name] / row["file"]).read_bytes() == (folder / row["file"]).read_bytes(), row["file"]
    frames = lambda f: [(f / r["file"]).read_bytes() for r in rows(f) if r["source"] == "cartoon-frame"]  # noqa: E731
    assert frames(other["train"]) != frames(folders["train"])


def test_a_machine_without_the_packages_still_gets_sets_and_one_line_per_missing_package(tmp_path):
    lines: list[str] = []
    (tmp_path / "empty").mkdir()
    folders = build_sets(tmp_path / "sets", seed=0, log=lines.append, root=tmp_path / "empty")
    for spec in [*MEASURE_SPECS, *TRAIN_SPECS]:
        naming = [line for line in lines if line.startswith("skip") and f"apt-get install {spec.package}`" in line]
        assert len(naming) == 1, (spec.package, lines)
    assert all(line.count("\n") == 0 for line in lines if line.startswith("skip"))
    for name in ("train", "val", "test"):
        assert rows(folders[name]), name  # synthetic images at least


def test_frames_on_one_backdrop_and_crops_of_one_picture_stay_in_one_half():
    listed = []
    for bg in range(9):
        for view in range(3):
            listed.append({"file": f"f{bg}-{view}.jpg", "source": "cartoon-frame", "package": "p",
                           "original_path": f"frame {bg * 3 + view}: /bg{bg}.png + /hog.png", "group": f"/bg{bg}.png"})
    split = halves(listed, seed=0)
    side = {}
    for half, half_rows in split.items():
        for row in half_rows:
            assert side.setdefault(row["group"], half) == half
    assert sorted(len(v) for v in split.values()) == [12, 15]


def test_cartoon_frames_put_figures_on_the_backdrop():
    rng = random.Random(0)
    backdrop = Image.new("RGB", (400, 300), (100, 160, 240))
    figure = Image.new("RGBA", (40, 60), (250, 30, 30, 255))
    frame = foreign._frame(backdrop, None, [figure], rng)
    pixels = np.asarray(frame).reshape(-1, 3)
    assert frame.width == 512
    assert ((pixels[:, 0] > 200) & (pixels[:, 2] < 80)).any()  # the red figure is in it
    assert ((pixels[:, 2] > 200) & (pixels[:, 0] < 130)).mean() > 0.3  # on the blue scenery
