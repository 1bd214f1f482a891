"""`batchcls run` end to end through the real CLI, real images and real ONNX Runtime."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from PIL import Image

from batchcls.cli import EXIT_ROW_ERRORS, cli
from batchcls.output import read_rows


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_labels_relative_paths_in_order(colour_images, colour_bundle, tmp_path):
    out = tmp_path / "labels.csv"
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle)
    assert r.exit_code == 0, r.output
    rows = read_rows(out)
    assert [(x["path"], x["label"], x["status"]) for x in rows] == [
        ("a_red.jpg", "red", "ok"), ("b_green.png", "green", "ok"), ("sub/c_blue.jpg", "blue", "ok")]
    assert all(0.5 < float(x["confidence"]) <= 1.0 for x in rows)
    assert "classified 3 files (0 errors)" in r.output
    assert not Path(str(out) + ".partial").exists()


def test_top_k_and_threshold(colour_images, colour_bundle, tmp_path):
    out = tmp_path / "labels.csv"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--top-k", "3").exit_code == 0
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "label", "confidence", "status", "error", "label_2", "confidence_2",
                             "label_3", "confidence_3"]
    for row in rows:
        probs = [float(row["confidence"]), float(row["confidence_2"]), float(row["confidence_3"])]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        assert {row["label"], row["label_2"], row["label_3"]} == {"red", "green", "blue"}
    out2 = tmp_path / "t.csv"
    assert invoke("run", colour_images, "--out", out2, "--model", colour_bundle, "--threshold", "0.999").exit_code == 0
    assert {x["label"] for x in read_rows(out2)} == {"unknown"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_format_writes_the_same_rows(colour_images, colour_bundle, tmp_path, fmt):
    (colour_images / "z_bad.jpg").write_bytes(b"junk")
    out = tmp_path / f"labels.{fmt}"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--format", fmt).exit_code == 0
    rows = read_rows(out)
    assert [(x["path"], x["label"], x["status"]) for x in rows] == [
        ("a_red.jpg", "red", "ok"), ("b_green.png", "green", "ok"), ("sub/c_blue.jpg", "blue", "ok"),
        ("z_bad.jpg", "", "error")]
    assert rows[-1]["confidence"] in ("", None) and rows[-1]["error"]


def test_existing_output_is_not_overwritten(colour_images, colour_bundle, tmp_path):
    out = tmp_path / "labels.csv"
    out.write_text("precious\n")
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle)
    assert r.exit_code == 1 and "already exists" in r.output and "--resume" in r.output
    assert out.read_text() == "precious\n"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--overwrite").exit_code == 0
    assert len(read_rows(out)) == 3


def test_stdout_single_file_and_no_recursive(colour_images, colour_bundle):
    r = invoke("run", colour_images / "a_red.jpg", "--out", "-", "--model", colour_bundle, "--quiet")
    assert r.exit_code == 0
    assert list(csv.reader(r.stdout.splitlines()))[1][:2] == ["a_red.jpg", "red"]
    r = invoke("run", colour_images, "--out", "-", "--model", colour_bundle, "--no-recursive", "-q")
    assert [row[0] for row in csv.reader(r.stdout.splitlines())][1:] == ["a_red.jpg", "b_green.png"]


def test_files_from_stdin_keeps_list_order(colour_images, colour_bundle, tmp_path):
    listing = f"{colour_images / 'sub' / 'c_blue.jpg'}\n\n{colour_images / 'a_red.jpg'}\n{tmp_path / 'missing.jpg'}\n"
    r = invoke("run", "--files-from", "-", "--out", "-", "--model", colour_bundle, "-q", input=listing)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert [x["label"] for x in rows] == ["blue", "red", ""]
    assert rows[2]["status"] == "error" and "not found" in rows[2]["error"]


def test_symlink_loops_end_and_output_inside_input_is_skipped(colour_images, colour_bundle):
    (colour_images / "sub" / "loop").symlink_to(colour_images, target_is_directory=True)
    out = colour_images / "labels.csv"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle).exit_code == 0
    assert [x["path"] for x in read_rows(out)] == ["a_red.jpg", "b_green.png", "sub/c_blue.jpg"]


def test_strict_exit_code_and_one_line_errors(colour_images, colour_bundle, tmp_path):
    (colour_images / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    r = invoke("run", colour_images, "--out", tmp_path / "a.csv", "--model", colour_bundle, "--strict")
    assert r.exit_code == EXIT_ROW_ERRORS
    r = invoke("run", tmp_path / "nope", "--out", tmp_path / "b.csv", "--model", colour_bundle)
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and "does not exist" in r.output
    r = invoke("run", colour_images, "--out", tmp_path / "no_dir" / "c.csv", "--model", colour_bundle)
    assert r.exit_code == 1 and "does not exist" in r.output
    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    (bad_model / "card.json").write_text(json.dumps({"name": "x"}))
    r = invoke("run", colour_images, "--out", tmp_path / "d.csv", "--model", bad_model)
    assert r.exit_code == 1 and "lacks" in r.output and "Traceback" not in r.output
    r = invoke("--verbose", "run", colour_images, "--out", tmp_path / "d.csv", "--model", bad_model)
    assert "Traceback" in r.output


def test_corrupt_onnx_is_one_line(colour_images, colour_bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "card.json").write_text((colour_bundle / "card.json").read_text())
    (broken / "model.onnx").write_bytes(b"not onnx")
    r = invoke("run", colour_images, "--out", tmp_path / "x.csv", "--model", broken)
    assert r.exit_code == 1 and "cannot load ONNX model" in r.output and r.output.count("\n") == 1


def _many_images(root: Path, n: int) -> None:
    root.mkdir()
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    for i in range(n):
        Image.new("RGB", (48, 48), colours[i % 3]).save(root / f"{i:05d}.png")


def _slow_run(tmp_path: Path, bundle: Path, out_name: str, *extra: str) -> tuple[Path, Path, Path, list[str]]:
    """1,500 images classified two at a time in a subprocess: slow enough to interrupt mid-run."""
    root, out = tmp_path / "many", tmp_path / out_name
    _many_images(root, 1500)
    cmd = [sys.executable, "-m", "batchcls.cli", "run", str(root), "--out", str(out), "--model", str(bundle),
           "--batch-size", "2", "--workers", "0", "-q", *extra]
    return root, out, Path(str(out) + ".partial"), cmd


def test_resume_after_kill_has_no_duplicates_and_no_gaps(tmp_path, colour_bundle):
    root, out, partial, cmd = _slow_run(tmp_path, colour_bundle, "labels.csv")
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") > 20:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    killed = not out.exists()
    if killed:
        assert invoke("run", root, "--out", out, "--model", colour_bundle).exit_code == 1  # no silent clobber
        r = invoke("run", root, "--out", out, "--model", colour_bundle, "--resume")
        assert r.exit_code == 0, r.output
    rows = read_rows(out)
    paths = [x["path"] for x in rows]
    assert sorted(paths) == sorted(p.name for p in root.iterdir())
    assert len(paths) == len(set(paths)) == 1500
    assert killed, "the run finished before it could be killed; make the input larger"


def test_sigint_keeps_partial_then_resume(tmp_path, colour_bundle):
    root, out, partial, cmd = _slow_run(tmp_path, colour_bundle, "labels.jsonl", "--format", "jsonl")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (partial.exists() and partial.stat().st_size > 500):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    assert invoke("run", root, "--out", out, "--model", colour_bundle, "--format", "jsonl", "--resume").exit_code == 0
    paths = [x["path"] for x in read_rows(out)]
    assert len(paths) == len(set(paths)) == 1500


def test_resume_of_finished_output_adds_only_new_files(colour_images, colour_bundle, tmp_path):
    out = tmp_path / "labels.csv"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle).exit_code == 0
    Image.new("RGB", (10, 10), (0, 250, 0)).save(colour_images / "z_new.png")
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--resume")
    assert r.exit_code == 0 and "classified 1 files" in r.output
    assert [x["path"] for x in read_rows(out)] == ["a_red.jpg", "b_green.png", "sub/c_blue.jpg", "z_new.png"]


def test_eval_on_a_labelled_folder(tmp_path, colour_bundle):
    for name, rgb in [("red", (250, 0, 0)), ("green", (0, 250, 0)), ("blue", (0, 0, 250))]:
        (tmp_path / "set" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), rgb).save(tmp_path / "set" / name / f"{i}.png")
    Image.new("RGB", (16, 16), (250, 0, 0)).save(tmp_path / "set" / "blue" / "wrong.png")
    r = invoke("eval", tmp_path / "set", "--model", colour_bundle, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "accuracy: 0.9000" in r.output
    assert "threshold" in r.output


def test_info_prints_the_card(colour_bundle):
    r = invoke("info", "--model", colour_bundle, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["classes"] == ["red", "green", "blue"]


def test_default_model_missing_is_one_line(tmp_path, monkeypatch, colour_images):
    monkeypatch.setenv("BATCHCLS_MODEL", str(tmp_path / "nowhere"))
    r = invoke("run", colour_images, "--out", tmp_path / "x.csv")
    assert r.exit_code == 1 and "no model bundle" in r.output


def test_every_command_has_help_and_an_example():
    import click

    def walk(group, prefix=""):
        for name, cmd in group.commands.items():
            yield prefix + name, cmd
            if isinstance(cmd, click.Group):
                yield from walk(cmd, prefix + name + " ")

    for name, cmd in walk(cli):
        assert cmd.help and "Example:" in cmd.help, f"{name} lacks a docstring with an Example"
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("help",):
                assert p.help, f"{name} --{p.name} has no help text"


def test_help_does_not_import_heavy_modules():
    code = "import sys; from batchcls.cli import cli; print(any(m in sys.modules for m in ('onnxruntime','torch','ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_file_listed_twice_gets_one_row(colour_images, colour_bundle):
    listing = f"{colour_images / 'a_red.jpg'}\n{colour_images / 'a_red.jpg'}\n"
    r = invoke("run", "--files-from", "-", "--out", "-", "--model", colour_bundle, "-q", input=listing)
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 2  # header + one row


def test_resume_refuses_when_both_output_and_partial_exist(colour_images, colour_bundle, tmp_path):
    out = tmp_path / "labels.csv"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle).exit_code == 0
    Path(str(out) + ".partial").write_text("path,label,confidence,status,error\n")
    before = out.read_text()
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--resume")
    assert r.exit_code == 1 and "both" in r.output
    assert out.read_text() == before


def test_top_k_past_the_class_count_is_refused_before_any_file(colour_images, colour_bundle, tmp_path):
    out = tmp_path / "labels.csv"
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--top-k", "4")
    assert r.exit_code == 1 and "--top-k 4 is more than the 3 classes" in r.output, r.output
    assert r.output.count("\n") == 1 and not list(tmp_path.glob("labels.csv*"))


def test_tta_flip_is_the_mean_of_the_image_and_its_mirror(tmp_path):
    """The shipped model on real frames: --tta flip's probabilities are the mean of two plain passes."""
    import numpy as np

    import batchcls

    plain, tta = batchcls.load(tta="none"), batchcls.load(tta="flip")  # the card serves flip by default
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("*/*.jpg"))[:8]]
    keys = [f"prob_{c}" for c in plain.classes]
    moved = 0.0
    for frame in frames:
        a, b = plain.predict(frame, probs=True), plain.predict(np.ascontiguousarray(frame[:, ::-1]), probs=True)
        t = tta.predict(frame, probs=True)
        want = np.array([(a[k] + b[k]) / 2 for k in keys])
        got = np.array([t[k] for k in keys])
        assert np.abs(got - want).max() < 1e-5
        assert t["label"] == plain.classes[int(want.argmax())]
        moved = max(moved, float(np.abs(got - np.array([a[k] for k in keys])).max()))
    assert moved > 1e-3  # the mirror really changed something: this test can fail
    out = tmp_path / "tta.csv"
    r = invoke("run", SAMPLES, "--out", out, "--tta", "flip", "--probs")
    assert r.exit_code == 0, r.output
    row = read_rows(out)[0]
    file_row = tta.predict(str(SAMPLES / row["path"]), probs=True)
    assert abs(float(row["confidence"]) - file_row["confidence"]) < 1e-5 and row["label"] == file_row["label"]


def batchcls_proc(*args, cwd=None, input=None) -> subprocess.CompletedProcess:
    """The CLI as a person runs it: a process of its own, arguments as a shell passes them."""
    return subprocess.run([sys.executable, "-m", "batchcls.cli", *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=300)


def _sample_tree(root: Path) -> list[Path]:
    """Four real frames of two characters: imgs/<name>.jpg and imgs/sub/<name>.jpg."""
    frames = [p for d in ("bart_simpson", "homer_simpson") for p in sorted((SAMPLES / d).glob("*.jpg"))[:2]]
    out = []
    for i, src in enumerate(frames):
        dst = root / "imgs" / ("sub" if i >= 2 else "") / f"{src.parent.name}-{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        out.append(dst)
    return out


def test_one_file_spelled_four_ways_gets_one_row(tmp_path):
    x = _sample_tree(tmp_path)[0]
    (tmp_path / "d").mkdir()
    rel = x.relative_to(tmp_path)
    spellings = [rel, f"./{rel}", x, f"d/../{rel}"]
    r = batchcls_proc("run", *spellings, "--out", "-", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert [(row["path"], row["status"]) for row in rows] == [(x.name, "ok")]
    listing = "".join(f"{s}\n" for s in spellings)
    r = batchcls_proc("run", "--files-from", "-", "--out", "-", "-q", cwd=tmp_path, input=listing)
    assert r.returncode == 0, r.stderr
    assert [row["path"] for row in csv.DictReader(r.stdout.splitlines())] == [str(rel)]  # the first spelling


def test_a_shell_glob_of_files_and_folders(tmp_path):
    """`batchcls run imgs/*.jpg imgs/sub`: accepted, rows in argument order, paths as `run imgs` writes them."""
    frames = _sample_tree(tmp_path)
    top = sorted(p for p in frames if p.parent.name == "imgs")
    args = [*(f"imgs/{p.name}" for p in reversed(top)), "imgs/sub"]
    r = batchcls_proc("run", *args, "--out", "several.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "classified 4 files (0 errors)" in r.stderr
    rows = read_rows(tmp_path / "several.csv")
    assert [x["path"] for x in rows] == [p.name for p in reversed(top)] + sorted(
        f"sub/{p.name}" for p in frames if p.parent.name == "sub")
    assert all(x["status"] == "ok" for x in rows)
    assert batchcls_proc("run", "imgs", "--out", "one.csv", cwd=tmp_path).returncode == 0
    assert sorted(x["path"] for x in read_rows(tmp_path / "one.csv")) == sorted(x["path"] for x in rows)


def _colour_set(root: Path) -> Path:
    """Nine solid-colour images in class folders, plus a red one filed under blue: top-1 0.9, top-3 1.0."""
    for name, rgb in [("red", (250, 0, 0)), ("green", (0, 250, 0)), ("blue", (0, 0, 250))]:
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), rgb).save(root / name / f"{i}.png")
    Image.new("RGB", (16, 16), (250, 0, 0)).save(root / "blue" / "wrong.png")
    return root


def test_eval_takes_device_quiet_and_top_k(tmp_path, colour_bundle):
    labelled = _colour_set(tmp_path / "set")
    r = batchcls_proc("eval", labelled, "--model", colour_bundle, "--device", "cpu", "--quiet", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    assert "accuracy: 0.9000  top-3 accuracy: 1.0000" in r.stdout and r.stderr == ""
    r = batchcls_proc("eval", labelled, "--model", colour_bundle, "--top-k", "4")
    assert r.returncode == 1 and "--top-k 4 is more than the 3 classes" in r.stderr and r.stderr.count("\n") == 1


def test_eval_of_a_flat_folder_with_a_labels_csv(tmp_path):
    """The 40 real sample frames in one folder plus path,label rows score as the class folders do."""
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["path,label"]
    for src in sorted(SAMPLES.glob("*/*.jpg")):
        name = f"{src.parent.name}-{src.name}"
        (flat / name).write_bytes(src.read_bytes())
        lines.append(f"{name},{src.parent.name}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    by_folder = batchcls_proc("eval", SAMPLES, "-q", "--top-k", "5")
    by_csv = batchcls_proc("eval", flat, "--labels", tmp_path / "labels.csv", "-q", "--top-k", "5")
    assert by_folder.returncode == by_csv.returncode == 0, by_csv.stderr
    assert by_csv.stdout.startswith("images: 40  errors: 0\naccuracy: ")
    assert by_csv.stdout == by_folder.stdout
    # a row naming a file that is not there, or one outside the folder, is an error, not a crash
    (tmp_path / "labels.csv").write_text("\n".join(lines[:3] + ["gone.jpg,homer_simpson", "../labels.csv,gil"]))
    r = batchcls_proc("eval", flat, "--labels", tmp_path / "labels.csv", "-q")
    assert r.returncode == 0 and r.stdout.startswith("images: 4  errors: 2"), r.stdout + r.stderr
    (tmp_path / "bad.csv").write_text("file;class\nx.jpg;gil\n")
    r = batchcls_proc("eval", flat, "--labels", tmp_path / "bad.csv")
    assert r.returncode == 1 and "'path' and 'label' columns" in r.stderr and r.stderr.count("\n") == 1


def test_info_is_a_short_summary(tmp_path):
    r = batchcls_proc("info")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith(" ")]  # the class list wraps
    assert len(lines) <= 12, r.stdout
    text = r.stdout
    assert "efficientnet_lite0" in text and "42: abraham_grampa_simpson" in text and "160x160" in text
    assert "test_acc" in text and "--json" in text
    assert "open set:    model.onnx --tta none:" in text and "'unknown' below known_score" in text  # per config
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    card = json.loads((SAMPLES.parent.parent / "engines" / "simpsons" / "card.json").read_text())
    card["openset"] = {}
    (bundle / "card.json").write_text(json.dumps(card))
    (bundle / "model.onnx").symlink_to(SAMPLES.parent.parent / "engines" / "simpsons" / "model.onnx")
    r = batchcls_proc("info", "--model", bundle)
    assert r.returncode == 0 and "open set:" not in r.stdout, r.stdout  # a bundle without a decision
    assert json.loads(batchcls_proc("info", "--model", bundle, "--json").stdout)["classes"] == card["classes"]


@pytest.mark.parametrize("how", ["empty folder", "only sub-folders, --no-recursive", "empty list"])
def test_nothing_to_classify_is_said_not_passed_off_as_a_run(tmp_path, colour_bundle, how):
    """An empty or mistyped folder used to end with "classified 0 files ... 0.0 images/s" and exit 0 as if all
    went well; the header-only file stays (a valid output), and a warning says that nothing was found where."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    if how.startswith("only"):
        Image.new("RGB", (8, 8), (250, 0, 0)).save(folder / "sub" / "a.png")
    source = ["--files-from", tmp_path / "list.txt"] if how == "empty list" else [folder]
    (tmp_path / "list.txt").write_text("")
    extra = ["--no-recursive"] if "no-recursive" in how else []
    r = invoke("run", *source, "--out", tmp_path / "o.csv", "--model", colour_bundle, *extra)
    assert r.exit_code == 0, r.output
    warning = next(line for line in r.output.splitlines() if line.startswith("warning:"))
    where = f"in the list {tmp_path / 'list.txt'}" if how == "empty list" else f"in {folder}"
    assert f"no files found {where}" in warning, r.output
    assert ("--no-recursive" in warning) == bool(extra)
    assert read_rows(tmp_path / "o.csv") == []
    Image.new("RGB", (8, 8), (0, 250, 0)).save(folder / "b.png")
    r = invoke("run", folder, "--out", tmp_path / "p.csv", "--model", colour_bundle, *extra)
    assert r.exit_code == 0 and "warning" not in r.output, r.output  # a file to classify: no warning


def test_the_summary_counts_labelled_unknown_and_error_rows_apart(colour_images, colour_bundle, tmp_path):
    (colour_images / "z_bad.jpg").write_bytes(b"junk")
    Image.new("RGB", (30, 30), (128, 128, 128)).save(colour_images / "grey.png")  # no colour wins: under 0.9
    out = tmp_path / "o.csv"
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--threshold", "0.9")
    assert r.exit_code == 0, r.output
    assert "classified 5 files (1 errors)" in r.output and ": 3 labelled, 1 unknown (confidence below 0.9)" in r.output
    labels = [x["label"] for x in read_rows(out)]
    assert (labels.count("unknown"), labels.count("")) == (1, 1)
    Image.new("RGB", (30, 30), (0, 0, 250)).save(colour_images / "zz_blue.png")
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--threshold", "0.9", "--resume")
    assert r.exit_code == 0 and "classified 1 files (0 errors)" in r.output, r.output
    assert "1 labelled, 0 unknown (confidence below 0.9); 5 rows were already there" in r.output
    r = invoke("run", colour_images, "--out", tmp_path / "plain.csv", "--model", colour_bundle)
    assert ": 5 labelled ->" in r.output and "unknown" not in r.output  # no decision: no unknown count


def test_the_summary_gives_the_open_set_cut_in_known_score_units(tmp_path):
    """With the shipped model's decision on, the summary names the cut rows were declined under: the
    classifier's own ``open_set.cut`` (what known_score is compared with), or the --open-set-cut given."""
    from batchcls.backends.onnxruntime import cpu_model_path
    from batchcls.card import load_card
    from batchcls.openset import Decisions

    card = load_card()
    cut = Decisions.from_card(card).load(cpu_model_path(card), card.tta).cut  # the decision of the file that serves
    frames = sorted(SAMPLES.glob("*/*.jpg"))[:2]
    r = invoke("run", *frames, "--out", tmp_path / "o.csv")
    assert r.exit_code == 0, r.output
    unknown = sum(x["label"] == "unknown" for x in read_rows(tmp_path / "o.csv"))
    assert f"{2 - unknown} labelled, {unknown} unknown (known_score below {cut:.4g})" in r.output, r.output
    r = invoke("run", *frames, "--out", tmp_path / "p.csv", "--open-set-cut", "0.3", "--threshold", "0.5")
    assert "unknown (known_score below 0.3 or confidence below 0.5)" in r.output, r.output
