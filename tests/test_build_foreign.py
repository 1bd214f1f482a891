"""The foreign-image set builder: its seeded split and synthesised images, and the committed fixtures."""
from __future__ import annotations

import random
from pathlib import Path

from build_foreign import halves, synthetic

FIXTURES = Path(__file__).parent / "fixtures" / "foreign"


def rows_for(pictures: dict[tuple[str, str], int], crops: int) -> list[dict[str, str]]:
    """Provenance rows: for each (source, package), that many pictures, each with `crops` crops."""
    rows = []
    for (source, package), n in pictures.items():
        for i in range(n):
            original = f"/usr/share/{package}/{i}.jpg"
            for view in [original] + [f"{original} crop"] * crops:
                rows.append({"file": f"{source}-{len(rows):04d}.jpg", "source": source, "package": package,
                             "original_path": view, "licence": "x"})
    return rows


def test_split_keeps_each_picture_on_one_side_and_halves_each_package():
    rows = rows_for({("wallpaper", "gnome-backgrounds"): 7, ("wallpaper", "mate-backgrounds"): 9,
                     ("clipart", "openclipart-png"): 11}, crops=3)
    split = halves(rows, seed=0)
    side = {row["original_path"].removesuffix(" crop"): half for half, hs in split.items() for row in hs}
    for half, half_rows in split.items():
        for row in half_rows:
            assert side[row["original_path"].removesuffix(" crop")] == half  # crops follow their picture
    for package, n in [("gnome-backgrounds", 7), ("mate-backgrounds", 9), ("openclipart-png", 11)]:
        in_val = {r["original_path"] for r in split["val"] if r["package"] == package and "crop" not in r["original_path"]}
        assert len(in_val) in (n // 2, n - n // 2)
    # three odd strata: the extra picture goes to alternating halves, so the totals differ by one picture
    assert abs(len(split["val"]) - len(split["test"])) == 4
    assert sorted(len(v) for v in split.values()) == [52, 56]
    assert halves(rows, seed=0) == split
    assert halves(rows, seed=1) != split


def test_synthetic_images_are_seeded_and_each_has_its_own_origin():
    first = list(synthetic(random.Random("0-synthetic")))
    again = list(synthetic(random.Random("0-synthetic")))
    other = list(synthetic(random.Random("1-synthetic")))
    assert [i.image.tobytes() for i in first] == [i.image.tobytes() for i in again]
    assert [i.image.tobytes() for i in first] != [i.image.tobytes() for i in other]
    # the split groups views by original: two different pictures must not share one
    assert len({i.original for i in first}) == len(first)


def test_every_fixture_is_small_and_has_its_provenance():
    provenance = (FIXTURES / "PROVENANCE.md").read_text()
    images = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".png", ".jpg"))
    assert 5 <= len(images) <= 8
    for path in images:
        assert path.stat().st_size < 30_000, path.name
        assert f"| {path.name} |" in provenance, path.name
