"""The Python API (batchcls.load / Model.predict) and rows that lose nothing (--threshold keeps model_label,
--probs adds prob_<class>): against real images, the shipped model and the real CLI's output files."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import batchcls
from batchcls.card import default_bundle
from batchcls.cli import cli
from batchcls.output import RowWriter, columns_for, read_rows

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "simpsons"
SHIPPED = REPO / "engines" / "simpsons"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def model():
    return batchcls.load(device="cpu")


def sample_paths() -> list[str]:
    return sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*") if p.is_file())


def write(rows: list[dict], out: Path, columns: list[str]) -> bytes:
    w = RowWriter(str(out), fmt=out.suffix[1:], columns=columns)
    w.write(rows)
    w.close()
    return out.read_bytes()


def same_result(a: dict, b: dict) -> bool:
    """Equal labels and statuses, confidences equal to float32 rounding (a batch of 5 and one of 1 may differ there)."""
    return a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) if isinstance(b[k], float) else a[k] == b[k]
                                        for k in a if k != "path")


def test_the_shipped_bundle_is_found_through_the_package(monkeypatch, tmp_path):
    # batchcls/bundles/simpsons is what a wheel holds; in the checkout it leads to engines/simpsons
    assert (REPO / "batchcls" / "bundles" / "simpsons").resolve() == SHIPPED.resolve()
    assert default_bundle() == SHIPPED.resolve()
    model = batchcls.load(device="cpu")
    assert model.card.bundle_dir == SHIPPED.resolve() and "homer_simpson" in model.classes
    monkeypatch.setenv("BATCHCLS_MODEL", str(tmp_path / "elsewhere"))
    with pytest.raises(batchcls.ModelError, match="no model bundle at .*elsewhere"):
        batchcls.load()


def test_import_is_light_and_cpu_prediction_never_imports_torch():
    code = ("import sys, batchcls\n"
            "light = not any(m in sys.modules for m in ('numpy', 'PIL', 'onnxruntime', 'batchcls.api'))\n"
            f"row = batchcls.load(device='cpu').predict({str(next(SAMPLES.glob('homer_simpson/*.jpg')))!r})\n"
            "print(light, row['status'], row['label'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert out.split() == ["True", "ok", "homer_simpson", "False"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_file_rows_are_exactly_the_cli_rows(model, tmp_path, monkeypatch, fmt):
    """Same options, same files: the API's rows written by the CLI's writer give the CLI's file, byte for byte."""
    opts = ["--top-k", "3", "--threshold", "0.9", "--probs"]
    cli_out = tmp_path / f"cli.{fmt}"
    r = invoke("run", SAMPLES, "--out", cli_out, "--format", fmt, "--device", "cpu", "-q", *opts)
    assert r.exit_code == 0, r.output
    columns = columns_for(3, model_label=True, known_score=True, prob_classes=model.classes)
    monkeypatch.chdir(SAMPLES)  # paths given relative to the folder are the CLI's relative paths
    rows = model.predict(sample_paths(), top_k=3, threshold=0.9, probs=True)
    assert write(rows, tmp_path / f"api.{fmt}", columns) == cli_out.read_bytes()
    folder_rows = model.predict_folder(SAMPLES, top_k=3, threshold=0.9, probs=True, workers=0)
    assert write(folder_rows, tmp_path / f"folder.{fmt}", columns) == cli_out.read_bytes()
    # the options had something to do: some rows fell under the threshold and kept the model's label
    unknown = [r for r in rows if r["label"] == "unknown"]
    assert unknown and len(unknown) < len(rows)
    for r in rows:
        probs = np.array([r[f"prob_{c}"] for c in model.classes])
        assert r["model_label"] == model.classes[int(probs.argmax())]
        assert r["confidence"] == pytest.approx(probs.max()) and probs.sum() == pytest.approx(1, abs=1e-4)


def test_images_in_memory_give_the_file_rows(model):
    """Bytes, a PIL image (EXIF orientation applied) and an HWC array of the same picture: the file's row."""
    path = next(SAMPLES.glob("lisa_simpson/*.jpg"))
    upright = Image.open(path).convert("RGB")
    # the same picture stored sideways with an EXIF tag saying "rotate 90° to view": the CLI turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "PNG", exif=exif)  # PNG: lossless, so pixels match
    tagged = buf.getvalue()
    want = model.predict(str(path), top_k=2)
    items = [path.read_bytes(), tagged, Image.open(io.BytesIO(tagged)), np.asarray(upright), upright]
    rows = model.predict(items, top_k=2)
    for row in rows:
        assert row["status"] == "ok" and row["path"] == ""
        assert same_result(row, want)
    # without the orientation applied the model sees another picture
    sideways = model.predict(np.asarray(Image.open(io.BytesIO(tagged)).convert("RGB")))
    assert sideways["confidence"] != want["confidence"]


def test_transparency_and_modes_are_decoded_as_the_cli_does(colour_bundle, tmp_path):
    """Transparent red is composited over white (no colour wins), not read as red."""
    model = batchcls.load(colour_bundle)
    clear_red = Image.new("RGBA", (24, 24), (255, 0, 0, 0))
    clear_red.save(tmp_path / "clear_red.png")
    r = invoke("run", tmp_path / "clear_red.png", "--out", tmp_path / "out.csv", "--model", colour_bundle, "-q")
    assert r.exit_code == 0, r.output
    cli_row = read_rows(tmp_path / "out.csv")[0]
    rgba_array = np.zeros((24, 24, 4), np.uint8)
    rgba_array[..., 0] = 255
    rows = model.predict([clear_red, rgba_array, str(tmp_path / "clear_red.png"), clear_red.convert("LA")])
    for row in rows:
        assert row["confidence"] == pytest.approx(1 / 3, abs=1e-6)
        assert (row["label"], f"{row['confidence']:.6f}") == (cli_row["label"], cli_row["confidence"])
    grey = model.predict([np.full((8, 9), 200, np.uint8), np.full((8, 9, 1), 200, np.uint8), Image.new("L", (9, 8), 200)])
    assert len({(g["label"], g["confidence"]) for g in grey}) == 1 and grey[0]["confidence"] == pytest.approx(1 / 3)
    assert model.predict(np.full((8, 8, 3), (10, 200, 10), np.uint8))["label"] == "green"


def test_a_bad_item_is_an_error_row_and_the_rest_are_classified(model, tmp_path):
    good = str(next(SAMPLES.glob("homer_simpson/*.jpg")))
    items = [good, b"not an image", b"", str(tmp_path / "missing.jpg"), np.zeros((4, 4, 3), np.float32),
             np.zeros((4, 4, 2), np.uint8), None, 42, str(tmp_path), good]
    rows = model.predict(items, top_k=2)
    assert [r["status"] for r in rows] == ["ok"] + ["error"] * 8 + ["ok"]
    reasons = [r["error"] for r in rows[1:-1]]
    for reason, want in zip(reasons, ["not a recognised image", "empty file", "file not found", "float32",
                                      "(4, 4, 2)", "unsupported input NoneType", "unsupported input int",
                                      "not a regular file"]):
        assert want in reason, reasons
    # every row has the output's columns, error rows with empty cells
    assert all(list(r) == columns_for(2, known_score=True) for r in rows)  # the shipped bundle decides "unknown"
    assert rows[1]["label_2"] == "" and rows[1]["confidence_2"] is None and rows[1]["confidence"] is None
    assert rows[0] == rows[-1] and rows[0]["path"] == good


def test_one_item_gives_a_dict_a_list_gives_a_list(model):
    path = str(next(SAMPLES.glob("bart_simpson/*.jpg")))
    one = model.predict(path)
    assert isinstance(one, dict) and one["label"] == "bart_simpson"
    assert model.predict([path]) == [one] == model.predict((path,))
    assert model.predict([]) == []
    assert "simpsons" in repr(model) and model.backend == "onnxruntime"


def test_bad_arguments_and_bundles_raise(model, tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        model.predict("x.jpg", top_k=0)
    with pytest.raises(ValueError, match="threshold"):
        model.predict("x.jpg", threshold=1.5)
    with pytest.raises(batchcls.ModelError, match="unknown backend 'nope'"):
        batchcls.load(backend="nope")
    with pytest.raises(batchcls.ModelError, match="no model bundle"):
        batchcls.load(tmp_path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_threshold_keeps_model_label_and_probs_add_every_class(colour_bundle, tmp_path, fmt):
    """batchcls run --threshold --probs, in every format: an 'unknown' row still says what the model thought."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16), (230, 10, 10)).save(root / "a_red.png")  # p(red) ~ 0.99
    Image.new("RGB", (16, 16), (180, 120, 60)).save(root / "b_brown.png")  # p(red) ~ 0.77
    (root / "c_broken.jpg").write_bytes(b"nope")
    out = tmp_path / f"labels.{fmt}"
    r = invoke("run", root, "--out", out, "--format", fmt, "--model", colour_bundle, "--threshold", "0.9", "--probs", "-q")
    assert r.exit_code == 0, r.output
    rows = {r["path"]: r for r in read_rows(out)}
    assert list(rows["a_red.png"]) == columns_for(1, model_label=True, prob_classes=["red", "green", "blue"])
    red, brown, broken = rows["a_red.png"], rows["b_brown.png"], rows["c_broken.jpg"]
    assert (red["label"], red["model_label"]) == ("red", "red")
    assert (brown["label"], brown["model_label"]) == ("unknown", "red")
    for row in (red, brown):
        probs = [float(row[f"prob_{c}"]) for c in ("red", "green", "blue")]
        assert sum(probs) == pytest.approx(1, abs=1e-5) and max(probs) == pytest.approx(float(row["confidence"]), abs=1e-6)
    assert float(brown["prob_red"]) == pytest.approx(0.77, abs=0.02)
    assert broken["status"] == "error" and broken["model_label"] == "" and broken["prob_red"] in ("", None)
    # without the options the columns are what they always were
    plain = tmp_path / f"plain.{fmt}"
    assert invoke("run", root, "--out", plain, "--format", fmt, "--model", colour_bundle, "-q").exit_code == 0
    assert list(read_rows(plain)[0]) == columns_for(1) == ["path", "label", "confidence", "status", "error"]


def test_readme_python_example_runs(tmp_path):
    """The README's Python API example, run as written (from a folder holding a frame.jpg)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    (tmp_path / "frame.jpg").write_bytes(next(SAMPLES.glob("marge_simpson/*.jpg")).read_bytes())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "marge_simpson" in out.stdout


# --- the API in a plain script, a `python -c`, a forked child: no __main__ guard, the body runs once ---------

PLAIN_SCRIPT = """\
import os, sys
import batchcls
with open(sys.argv[2], "a") as f:  # one line per run of this body, in whatever process runs it
    f.write(f"{os.getpid()}\\n")
print("body", flush=True)
model = batchcls.load(device="cpu")
rows = model.predict_folder(sys.argv[1], workers=2) + model.predict(sys.argv[3:], top_k=2)
print(len(rows), sum(r["status"] == "ok" for r in rows))
"""


def twice_the_samples(root: Path) -> tuple[Path, list[str]]:
    """80 real frames (the 40 samples under two names each): more than one batch, so decode workers start."""
    for p in SAMPLES.rglob("*.jpg"):
        for copy in ("a", "b"):
            (root / "frames" / p.parent.name).mkdir(parents=True, exist_ok=True)
            (root / "frames" / p.parent.name / f"{copy}_{p.name}").write_bytes(p.read_bytes())
    files = sorted(str(p) for p in (root / "frames").rglob("*.jpg"))
    assert len(files) >= 64
    return root / "frames", files


@pytest.mark.parametrize("how", ["script", "-c"])
def test_a_plain_script_without_a_main_guard_runs_once_and_every_row_is_ok(tmp_path, how):
    folder, files = twice_the_samples(tmp_path)
    runs = tmp_path / "runs.txt"
    script = tmp_path / "label_them.py"
    script.write_text(PLAIN_SCRIPT)
    cmd = [sys.executable, str(script)] if how == "script" else [sys.executable, "-c", PLAIN_SCRIPT]
    out = subprocess.run([*cmd, str(folder), str(runs), *files], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n") == ["body", f"{2 * len(files)} {2 * len(files)}", ""], out.stdout + out.stderr
    assert len(runs.read_text().split()) == 1, "the script's body ran in more than one process"
    assert "Traceback" not in out.stderr and "decode worker" not in out.stderr, out.stderr


FORKED = """\
import os, sys
import batchcls

if __name__ == "__main__":  # this test is about the fork, not about the guard
    model = batchcls.load(device="cpu")
    files = sys.argv[1:]
    before = sum(r["status"] == "ok" for r in model.predict(files))  # the parent used decode workers already
    pid = os.fork()
    if pid == 0:
        try:
            rows = model.predict(files)
            print("child", sum(r["status"] == "ok" for r in rows), flush=True)
        except BaseException as e:
            print("child raised", repr(e), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("parent", before, sum(r["status"] == "ok" for r in model.predict(files)), flush=True)
"""


def test_predict_in_a_forked_child_returns_rows(tmp_path):
    _, files = twice_the_samples(tmp_path)
    out = subprocess.run([sys.executable, "-c", FORKED, *files], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    n = len(files)
    assert out.stdout.split("\n") == [f"child {n}", f"parent {n} {n}", ""], out.stdout + out.stderr


def test_any_iterable_of_items_gives_one_row_each_and_an_image_array_stays_one(colour_bundle, colour_images):
    """A generator, a map, a set or a NumPy array of path strings used to come back as one error dict."""
    model = batchcls.load(colour_bundle)
    files = [str(colour_images / "a_red.jpg"), str(colour_images / "b_green.png")]
    want = model.predict(files)
    assert [r["label"] for r in want] == ["red", "green"]
    assert model.predict(f for f in files) == want
    assert model.predict(map(str, files)) == want
    assert model.predict(np.array(files)) == want and all(type(r["path"]) is str for r in want)
    assert sorted(model.predict(set(files)), key=lambda r: r["path"]) == want
    assert model.predict(iter([])) == []
    image = np.full((8, 8, 3), (10, 200, 10), np.uint8)  # one picture, not 8 rows of pixels
    assert model.predict(image)["label"] == "green"
    assert [r["label"] for r in model.predict(iter([image, Image.open(files[0])]))] == ["green", "red"]
    with pytest.raises(ValueError, match="open_set"):
        model.predict(files, open_set=False, open_set_cut=0.2)
