"""--resume adds rows only from the same bundle, identified by everything that shapes its rows (not its ONNX file
alone), and never gives a file a second row, whatever route reaches it this time."""
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from batchcls.card import load_card
from batchcls.cli import cli
from batchcls.errors import OutputError
from batchcls.output import Provenance, read_rows
from batchcls.output.provenance import check_meta, write_meta
from batchcls.pipeline import RunOptions


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def copy_bundle(src: Path, dst: Path, **changes) -> Path:
    """The same ONNX file (linked, byte for byte the same) under another card."""
    dst.mkdir()
    card = json.loads((src / "card.json").read_text())
    card.update(changes)
    (dst / "card.json").write_text(json.dumps(card))
    (dst / "model.onnx").symlink_to(src / "model.onnx")
    return dst


def colour_tree(root: Path, n: int) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (12, 12), [(230, 10, 10), (10, 220, 10), (10, 10, 240)][i % 3]).save(root / f"{i:03d}.png")


@pytest.mark.parametrize("changes, what", [
    ({"temperature": 2.0}, "the card's temperature 1.0, now 2.0"),
    ({"tta": "flip"}, "the card's tta none, now flip"),
    ({"input_size": 48}, "the card's input_size 32, now 48"),
    ({"classes": ["blue", "green", "red"]}, "the card's classes"),
])
def test_a_bundle_with_the_same_onnx_but_another_card_is_refused(tmp_path, colour_bundle, colour_images, changes,
                                                                 what):
    out = tmp_path / "labels.csv"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--workers", "0").exit_code == 0
    before = out.read_bytes()
    other = copy_bundle(colour_bundle, tmp_path / "other", **changes)
    r = invoke("run", colour_images, "--out", out, "--model", other, "--workers", "0", "--resume")
    assert r.exit_code == 1 and "written by another run" in r.output and what in r.output, r.output
    assert "model sha256" not in r.output  # the ONNX file is the same: the card is what differs
    assert out.read_bytes() == before


def _openset_bundle(tmp_path: Path, colour_bundle: Path, section: dict, files: dict[str, bytes]) -> Path:
    bundle = copy_bundle(colour_bundle, tmp_path / "bundle", openset=section)
    for name, data in files.items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data)
    return bundle


# Not today's layout on purpose: several configurations, each with its statistics file, nested in a list.
SECTION = {"method": "texture+msp", "cut": 0.01,
           "configs": [{"tta": "none", "file": "stats/none.npz", "sha256": "x"},
                       {"tta": "flip", "file": "stats/flip.npz", "sha256": "y"}]}
FILES = {"stats/none.npz": b"statistics, no TTA", "stats/flip.npz": b"statistics, flip", "notes.txt": b"notes"}


@pytest.mark.parametrize("change, refused", [
    ("cut", True),  # a moved operating point
    ("refit", True),  # a statistics file with other bytes (its card entry unchanged)
    ("file not named", False),  # a bundle file the section does not name shapes no row
    ("decision off", False),  # without the decision no row depends on its statistics
])
def test_an_open_set_refit_or_a_moved_cut_is_another_producer(tmp_path, colour_bundle, change, refused):
    bundle = _openset_bundle(tmp_path, colour_bundle, SECTION, FILES)
    out, columns = tmp_path / "labels.csv", ["path", "label", "confidence", "status", "error"]
    options = RunOptions(open_set=change != "decision off")
    write_meta(out, Provenance.of(load_card(bundle), options, source=tmp_path), columns, "csv")
    if change == "cut":
        card = json.loads((bundle / "card.json").read_text())
        card["openset"]["cut"] = 0.02
        (bundle / "card.json").write_text(json.dumps(card))
    elif change == "file not named":
        (bundle / "notes.txt").write_bytes(b"other notes")
    else:
        (bundle / "stats" / "flip.npz").write_bytes(b"statistics, flip, refitted")
    now = Provenance.of(load_card(bundle), options, source=tmp_path)
    if refused:
        with pytest.raises(OutputError, match="the card's open-set section or statistics"):
            check_meta(out, now, columns, "csv")
    else:
        check_meta(out, now, columns, "csv")


def test_the_model_file_actually_run_is_part_of_the_identity(tmp_path, colour_bundle):
    card = load_card(colour_bundle)
    out, columns = tmp_path / "labels.csv", ["path", "label", "confidence", "status", "error"]
    int8 = tmp_path / "model.int8.onnx"
    int8.write_bytes(b"another model file")
    write_meta(out, Provenance.of(card, RunOptions(), source=tmp_path, served=card.onnx_path), columns, "csv")
    with pytest.raises(OutputError, match=r"model file model\.onnx \(sha256 \w+\), now model\.int8\.onnx"):
        check_meta(out, Provenance.of(card, RunOptions(), source=tmp_path, served=int8), columns, "csv")
    check_meta(out, Provenance.of(card, RunOptions(), source=tmp_path), columns, "csv")  # not known here: Ray


def test_an_output_recorded_before_bundles_were_identified_resumes(tmp_path, colour_bundle, colour_images):
    out = tmp_path / "labels.csv"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--workers", "0").exit_code == 0
    meta = tmp_path / ".labels.csv.meta.json"
    record = json.loads(meta.read_text())
    del record["bundle"], record["embeddings"]
    record["batchcls_output"] = 1
    meta.write_text(json.dumps(record))
    Image.new("RGB", (10, 10), (0, 250, 0)).save(colour_images / "z_new.png")
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--workers", "0", "--resume")
    assert r.exit_code == 0 and "classified 1 files" in r.output, r.output
    assert "bundle" in json.loads(meta.read_text())


# --- one row per file, whatever the route ----------------------------------------------------------

@pytest.mark.parametrize("how", ["sources in another order", "a folder link added", "a list spelled otherwise"])
def test_a_file_reached_by_another_route_gets_no_second_row(tmp_path, colour_bundle, how, monkeypatch):
    root = tmp_path / "root"
    colour_tree(root / "A", 30)
    colour_tree(root / "B", 30)
    out = tmp_path / "labels.csv"
    run = ["--out", out, "--model", colour_bundle, "--workers", "0"]
    if how == "sources in another order":
        (root / "A" / "zlink").symlink_to(root / "B", target_is_directory=True)  # A reaches B's files too
        first, again = [root / "B", root / "A"], [root / "A", root / "B"]
    elif how == "a folder link added":
        first, again = [root], [root]
    else:
        monkeypatch.chdir(tmp_path)
        names = sorted(p.relative_to(tmp_path) for p in root.rglob("*.png"))
        (tmp_path / "first.txt").write_text("".join(f"{n}\n" for n in names))
        (tmp_path / "again.txt").write_text("".join(f"./root/A/../{n.relative_to('root')}\n" for n in names))
        first, again = ["--files-from", "first.txt"], ["--files-from", "again.txt"]
    assert invoke("run", *first, *run).exit_code == 0
    if how == "a folder link added":
        (root / "A" / "alink").symlink_to(root / "B", target_is_directory=True)  # sorts before A's files
    r = invoke("run", *again, *run, "--resume")
    assert r.exit_code == 0 and "classified 0 files" in r.output, r.output
    paths = [x["path"] for x in read_rows(out)]
    assert len(paths) == len(set(paths)) == 60


def test_a_file_renamed_since_is_a_new_file_and_a_moved_folder_keeps_nothing(tmp_path, colour_bundle):
    """Identity is the folder and the name: a renamed file is another key and another identity (its row is
    new), which is what a resume after a rename must do; nothing here is guessed from content."""
    root = tmp_path / "root"
    colour_tree(root, 4)
    out = tmp_path / "labels.csv"
    run = [root, "--out", out, "--model", colour_bundle, "--workers", "0"]
    assert invoke("run", *run).exit_code == 0
    os.rename(root / "000.png", root / "renamed.png")
    r = invoke("run", *run, "--resume")
    assert r.exit_code == 0 and "classified 1 files" in r.output, r.output
    shutil.rmtree(root)
    colour_tree(root, 2)  # the same names in a folder made anew: the rows are kept, nothing is added
    r = invoke("run", *run, "--resume")
    assert r.exit_code == 0 and "classified 0 files" in r.output, r.output
