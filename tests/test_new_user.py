"""What a new user ran into, each pinned on the real thing: hints that fit how batchcls was installed and what
was typed, a model card that could not be read right, eval's counting, and the docs against the code."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from bundles import make_colour_bundle
from click.testing import CliRunner
from conftest import REPO, SAMPLES
from PIL import Image

import batchcls
from batchcls.cli import cli
from batchcls.output import columns_for

DOCS = REPO / "docs"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def batchcls_proc(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchcls.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --- hints that fit ---------------------------------------------------------------------------------


def test_a_model_folder_without_a_card_is_told_about_model_not_make_train(tmp_path, colour_images, monkeypatch):
    """Someone who passed --model (maybe with no checkout) was told to "pass --model DIR or run `make train`"."""
    empty = tmp_path / "my-model"
    empty.mkdir()
    r = invoke("run", colour_images, "--out", tmp_path / "o.csv", "--model", empty)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"no model bundle at {empty}" in r.output and "--model takes the folder" in r.output
    assert "make train" not in r.output and "pass --model" not in r.output
    monkeypatch.setenv("BATCHCLS_MODEL", str(empty))
    r = invoke("info")
    assert r.exit_code == 1 and "BATCHCLS_MODEL" in r.output and "make train" not in r.output, r.output


BLOCK_PYARROW = "import sys; sys.modules['pyarrow'] = None; from batchcls.cli import main; main()"


def test_parquet_without_pyarrow_says_what_this_install_needs(tmp_path, colour_images, colour_bundle):
    """The hint follows the install: this checkout is an editable one, so its own extra (not PyPI's name)."""
    from batchcls.extras import install_hint

    hint = install_hint("parquet", "pyarrow")
    checkout = re.fullmatch(r"pip install -e '(.+)\[parquet\]'", hint)  # `make install-dev`'s editable venv
    assert checkout and (Path(checkout[1]) / "pyproject.toml").is_file(), hint
    r = subprocess.run([sys.executable, "-c", BLOCK_PYARROW, "run", str(colour_images), "--out",
                        str(tmp_path / "o.parquet"), "--model", str(colour_bundle)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and hint in r.stderr, r.stderr
    assert not list(tmp_path.glob("o.parquet*"))
    r = invoke("run", colour_images, "--out", tmp_path / "l.parquet", "--model", colour_bundle, "-q")
    assert r.exit_code == 0, r.output
    r = subprocess.run([sys.executable, "-c", BLOCK_PYARROW, "report", str(tmp_path / "l.parquet"), "--images",
                        str(colour_images), "--out", str(tmp_path / "r.html")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and hint in r.stderr, r.stderr


@pytest.mark.parametrize("record, hint", [
    ({"url": "file:///tmp/dist/batchcls-0.1.0-py3-none-any.whl", "archive_info": {}}, "pip install pyarrow"),
    (None, "pip install 'batchcls[parquet]'"),  # from an index: pip writes no record
    ({"url": "file:///src/batch%20cls", "dir_info": {"editable": True}}, "pip install -e '/src/batch cls[parquet]'"),
])
def test_the_install_hint_follows_how_batchcls_was_installed(tmp_path, monkeypatch, record, hint):
    """A wheel installed from a file is on no index: `pip install 'batchcls[parquet]'` would find nothing there."""
    from batchcls.extras import install_hint

    info = tmp_path / "batchcls-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: batchcls\nVersion: 0.1.0\n")
    (info / "INSTALLER").write_text("pip\n")
    if record is not None:
        (info / "direct_url.json").write_text(json.dumps(record))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert install_hint("parquet", "pyarrow") == hint


# --- the model card ----------------------------------------------------------------------------------


def test_a_model_with_a_class_named_unknown_is_refused_at_load(tmp_path, colour_images):
    """Its rows could not be told from the rows the model declines (label 'unknown' either way)."""
    bundle = make_colour_bundle(tmp_path / "clash", classes=["red", "green", "unknown"])
    r = invoke("run", colour_images, "--out", tmp_path / "o.csv", "--model", bundle)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "a class is named 'unknown'" in r.output and "rename the class" in r.output
    assert not (tmp_path / "o.csv").exists()
    with pytest.raises(batchcls.ModelError, match="named 'unknown'"):
        batchcls.load(bundle)


# --- eval ---------------------------------------------------------------------------------------------


def _flat(tmp_path: Path) -> Path:
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (20, 20), (250, 0, 0)).save(flat / "a.png")
    Image.new("RGB", (20, 20), (0, 250, 0)).save(flat / "b.png")
    Image.new("RGB", (20, 20), (0, 0, 250)).save(flat / "c.png")
    return flat


def test_eval_labels_count_one_image_once_however_it_is_spelled(tmp_path, colour_bundle):
    flat = _flat(tmp_path)
    (tmp_path / "l.csv").write_text("path,label\na.png,red\n./a.png,red\nb.png,green\nx/../b.png,green\n")
    r = invoke("eval", flat, "--labels", tmp_path / "l.csv", "--model", colour_bundle, "-q")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("images: 2  errors: 0\naccuracy: 1.0000"), r.output


def test_eval_names_predicted_classes_without_images_instead_of_zero_rows(tmp_path, colour_bundle):
    """A class the folder has no images of used to print as a row of 0.000s, as if the model failed on it."""
    flat = _flat(tmp_path)
    (tmp_path / "l.csv").write_text("path,label\na.png,red\nb.png,green\nc.png,green\n")  # blue filed as green
    r = invoke("eval", flat, "--labels", tmp_path / "l.csv", "--model", colour_bundle, "-q")
    assert r.exit_code == 0, r.output
    table = r.output.split("\n\n")[1].splitlines()
    assert [line.split()[0] for line in table[1:-1]] == ["green", "red"], r.output  # classes with images only
    assert "predicted, with no images here (always wrong): blue (1x)" in r.output


# --- info ---------------------------------------------------------------------------------------------


def test_info_lists_every_class_and_how_the_model_serves(colour_bundle):
    from batchcls.card import load_card

    card = load_card()
    r = invoke("info")
    assert r.exit_code == 0, r.output
    named = set(re.findall(r"[a-z_]+", r.output.split("classes:", 1)[1].split("input:", 1)[0]))
    assert set(card.classes) <= named, set(card.classes) - named
    assert f"serving:     tta {card.tta} (the card's choice" in r.output
    assert max(map(len, r.output.splitlines()[:3])) <= 120  # wrapped, not one line of 42 names
    r = invoke("info", "--model", colour_bundle)
    assert "classes:     3: red, green, blue\n" in r.output and "serving:     tta none" in r.output


# --- the docs against the code ---------------------------------------------------------------------------


def _cli_section(name: str) -> str:
    text = (DOCS / "cli.md").read_text()
    return text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_the_documented_column_order_is_the_written_one():
    rows = re.findall(r"^\| `([^`]+)`(?:, `([^`]+)`)? \|", _cli_section("Output columns"), flags=re.M)
    documented = [c for pair in rows for c in pair if c]
    written = columns_for(2, model_label=True, known_score=True, prob_classes=["<class>"]) + ["moved_to"]
    assert documented == [c.replace("_2", "_k") for c in written]


def test_the_documented_tta_default_is_the_cards_choice():
    row = next(line for line in _cli_section("batchcls run").splitlines() if line.startswith("| `--tta`"))
    assert "`none` (default)" not in row and "the model card's choice" in row, row


def test_the_documented_embeddings_paths_file_is_the_one_written(tmp_path):
    frame = next(SAMPLES.glob("bart_simpson/*.jpg"))
    r = invoke("run", frame, "--out", tmp_path / "o.csv", "--embeddings", tmp_path / "emb.npy", "--no-open-set")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "emb.paths.jsonl").is_file()
    assert "`--embeddings emb.npy` writes `emb.paths.jsonl`" in _cli_section("batchcls run")


def test_the_readme_says_what_make_test_costs():
    readme = (REPO / "README.md").read_text()
    sentence = next(s for s in re.split(r"(?<=\.)\s", readme) if "make test" in s and "minutes" in s)
    assert "18 minutes" in sentence and "6 GB" in sentence and "2 cores" in sentence, sentence


def test_an_editable_install_builds_without_the_setuptools_warning(tmp_path):
    """`make run` (pip install -e .) printed setuptools' "Editable installation ... may take precedence" notice:
    the flat layout made it use an import hook. The package folder as a plain path entry needs none."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "batchcls", src / "batchcls", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    build = ("import os, sys\nfrom setuptools import build_meta\nos.makedirs('out')\n"
             "print(build_meta.build_editable('out'))")
    r = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Editable installation." not in r.stderr and "Warning:" not in r.stderr, r.stderr[-2000:]
    with zipfile.ZipFile(src / "out" / r.stdout.split()[-1]) as z:
        pth = [z.read(n).decode() for n in z.namelist() if n.endswith(".pth")]
    assert pth == [f"{src}\n"], pth  # the checkout's root, where batchcls/ is
