"""`batchcls review` on real runs: what it selects, and the manifest a person traces corrections with."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLES

from batchcls.cli import cli
from batchcls.output import read_rows
from batchcls.review import review

FOREIGN = REPO / "tests" / "fixtures" / "foreign"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped model, its open-set decision on, over four frames and four images that show no character."""
    images = tmp_path_factory.mktemp("images")
    for src in sorted(SAMPLES.glob("*/*.jpg"))[:4]:
        shutil.copy(src, images / f"{src.parent.name}-{src.name}")
    for name in ("colour_wheel.png", "flat_yellow.png", "text_page.jpg", "photo_coffee.jpg"):
        shutil.copy(FOREIGN / name, images / name)
    out = images.parent / "labels.csv"
    r = invoke("run", images, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert any(x["label"] == "unknown" for x in read_rows(out)), "the decision should decline some foreign images"
    return out, images


def test_unknown_alone_needs_no_below(shipped_run, tmp_path):
    """`review --unknown` used to require --below as well (people typed --below 0)."""
    labels, images = shipped_run
    declined = [x for x in read_rows(labels) if x["label"] == "unknown"]
    r = invoke("review", labels, "--images", images, "--unknown", "--to", tmp_path / "rv")
    assert r.exit_code == 0, r.output
    placed = sorted(p.relative_to(tmp_path / "rv").as_posix() for p in (tmp_path / "rv").rglob("*")
                    if p.is_file() and p.name != "_manifest.csv")
    assert placed == sorted(f"unknown/{x['path']}" for x in declined)
    assert review(labels, tmp_path / "rv2", images=images, errors=True).selected == 0  # no error rows here


def test_the_manifest_keeps_the_models_guess_and_its_known_score(shipped_run, tmp_path):
    labels, images = shipped_run
    rows = {x["path"]: x for x in read_rows(labels)}
    r = invoke("review", labels, "--images", images, "--below", 1, "--unknown", "--to", tmp_path / "rv")
    assert r.exit_code == 0, r.output
    manifest = read_rows(tmp_path / "rv" / "_manifest.csv")
    assert list(manifest[0]) == ["file", "path", "label", "confidence", "error", "model_label", "known_score"]
    assert len(manifest) == len(rows)
    for m in manifest:
        row = rows[m["path"]]
        assert (m["label"], m["model_label"]) == (row["label"], row["model_label"]) and m["model_label"]
        assert float(m["known_score"]) == pytest.approx(float(row["known_score"]), abs=1e-6)
        assert m["file"].split("/")[0] == ("unknown" if row["label"] == "unknown" else row["label"])
