"""The open-set decision ("none of these"), on by default: real foreign images (tests/fixtures/foreign: a colour
wheel, photos, clipart, an icon, a text page, flat colours) next to real frames, through the shipped model, the
CLI's three formats, the Python API, eval and the bundle checks."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from faults import run_cli

import batchcls
from batchcls.backends.record import file_sha256
from batchcls.card import load_card
from batchcls.openset import Decisions
from batchcls.output import read_rows

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "simpsons"
FOREIGN = REPO / "tests" / "fixtures" / "foreign"
SHIPPED = REPO / "engines" / "simpsons"
FOREIGN_FILES = sorted(p.name for p in FOREIGN.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """The 40 sample frames in their class folders, plus the foreign images in foreign/."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(SAMPLES, root, dirs_exist_ok=True)
    (root / "foreign").mkdir()
    for name in FOREIGN_FILES:
        shutil.copy(FOREIGN / name, root / "foreign" / name)
    return root


@pytest.fixture(scope="module")
def model():
    return batchcls.load(device="cpu")


def shipped_cut(tta: str | None = None) -> float:
    """The cut of the decision that serves here: the CPU backend's model file (FP32, or the shipped INT8 where
    this CPU computes what its gate measured) under the card's TTA."""
    from batchcls.backends.onnxruntime import cpu_model_path

    card = load_card(SHIPPED)
    return Decisions.from_card(card).load(cpu_model_path(card), tta or card.tta).cut


def test_the_shipped_bundle_carries_a_gated_decision_for_every_tta_mode():
    card = load_card(SHIPPED)
    decisions = Decisions.from_card(card)
    for tta in ("none", "flip"):
        oset = decisions.load(card.onnx_path, tta)  # keyed by the model file's sha256 and the mode
        assert 0 < oset.cut < 1 and oset.passed, oset.config["gate"]
        gate = oset.config["gate"]
        assert max(gate["flagged"].values()) <= 0.01 and gate["foreign_flagged"] >= 0.95
        assert len(gate["flagged"]) >= 4  # full size and half size made several ways


def test_a_model_file_without_its_own_decision_is_refused_in_one_line(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED, bundle, ignore=shutil.ignore_patterns("model.pt2", "results", "*.opt.onnx", "engines.json"))
    card = load_card(bundle)
    other = bundle / "other.onnx"
    other.write_bytes((bundle / "model.onnx").read_bytes() + b"\0")  # another file: another sha256
    with pytest.raises(batchcls.ModelError, match="not fitted for other.onnx.*train.decision"):
        Decisions.from_card(card).load(other, "none")


def test_foreign_images_are_unknown_and_real_frames_keep_their_label(mixed, tmp_path):
    out = tmp_path / "labels.csv"
    r = run_cli("run", mixed, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr.decode()
    rows = {row["path"]: row for row in read_rows(out)}
    assert len(rows) == 40 + len(FOREIGN_FILES)
    cut = shipped_cut()
    foreign = {name: rows[f"foreign/{name}"] for name in FOREIGN_FILES}
    for name, row in foreign.items():  # the decision and its score agree, and the model's guess is kept
        assert (row["label"] == "unknown") == (float(row["known_score"]) < cut), (name, row)
        assert row["model_label"] not in ("", "unknown")
    unknown = {name for name, row in foreign.items() if row["label"] == "unknown"}
    # the held-out far-OOD half is flagged ~99 % of the time; these eight span the kinds users send
    assert {"colour_wheel.png", "flat_yellow.png", "text_page.jpg", "wallpaper_flower_crop.jpg"} <= unknown, foreign
    assert len(unknown) >= len(FOREIGN_FILES) - 2, foreign
    frames = [row for path, row in rows.items() if not path.startswith("foreign/")]
    right = sum(row["label"] == row["path"].split("/")[0] for row in frames)
    assert right >= 38, [(r["path"], r["label"], r["known_score"]) for r in frames if r["label"] != r["path"].split("/")[0]]
    assert all(row["model_label"] == row["label"] for row in frames if row["label"] != "unknown")


def test_no_open_set_gives_the_plain_top_class_and_no_score_column(mixed, tmp_path):
    out = tmp_path / "plain.csv"
    assert run_cli("run", mixed, "--out", out, "--quiet", "--no-open-set").returncode == 0
    rows = read_rows(out)
    assert "known_score" not in rows[0] and "model_label" not in rows[0]
    assert not any(r["label"] == "unknown" for r in rows)


def test_the_cut_moves_the_operating_point(mixed, tmp_path):
    def unknowns(cut: str) -> int:
        out = tmp_path / f"cut{cut}.jsonl"
        assert run_cli("run", mixed, "--out", out, "--format", "jsonl", "--quiet", "--open-set-cut", cut,
                       "--overwrite").returncode == 0
        return sum(r["label"] == "unknown" for r in read_rows(out))
    assert unknowns("0") == 0
    assert unknowns("0.99") >= unknowns("0.5") > 0  # a higher cut declines more
    r = run_cli("run", mixed, "--out", tmp_path / "bad.csv", "--open-set-cut", "1.5")
    assert r.returncode == 2 and b"1.5" in r.stderr


def test_csv_jsonl_parquet_and_the_api_decide_the_same(mixed, tmp_path, model):
    pytest.importorskip("pyarrow")
    got = {}
    for fmt in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"labels.{fmt}"
        assert run_cli("run", mixed, "--out", out, "--format", fmt, "--quiet").returncode == 0
        got[fmt] = {r["path"]: (r["label"], r["model_label"], float(r["known_score"])) for r in read_rows(out)}
    api = {r["path"]: (r["label"], r["model_label"], float(r["known_score"])) for r in model.predict_folder(mixed)}
    for other in (got["jsonl"], got["parquet"], api):
        assert other.keys() == got["csv"].keys()
        for path, (label, top, score) in got["csv"].items():
            assert other[path][:2] == (label, top) and other[path][2] == pytest.approx(score, abs=1e-6), path


def test_an_in_memory_foreign_image_is_unknown_through_the_api(model):
    from PIL import Image

    wheel = Image.open(FOREIGN / "colour_wheel.png")
    row = model.predict(wheel)
    assert row["label"] == "unknown" and row["known_score"] < shipped_cut()
    assert row["confidence"] == pytest.approx(1 - row["known_score"])  # the confidence of the row's own label
    assert model.predict(wheel, open_set=False)["label"] != "unknown"


def test_eval_reports_coverage_and_accuracy_on_the_rows_it_keeps(tmp_path):
    r = run_cli("eval", SAMPLES)
    assert r.returncode == 0, r.stderr.decode()
    line = next(ln for ln in r.stdout.decode().splitlines() if ln.startswith("open set"))
    coverage = float(line.split("coverage ")[1].split()[0])
    assert 0.9 <= coverage <= 1.0 and "accuracy on kept rows" in line


def test_a_changed_statistics_file_is_refused_in_one_line(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED, bundle, ignore=shutil.ignore_patterns("model.pt2", "results", "*.opt.onnx", "engines.json"))
    from batchcls.backends.onnxruntime import cpu_model_path

    card = load_card(bundle)
    stats = bundle / Decisions.from_card(card).find(file_sha256(cpu_model_path(card)), card.tta)["file"]
    with np.load(stats) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coef"] = -arrays["coef"]
    np.savez(stats, **arrays)
    r = run_cli("run", SAMPLES, "--out", tmp_path / "x.csv", "--model", bundle)
    assert r.returncode == 1
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "sha256" in err and "--no-open-set" in err
    assert run_cli("run", SAMPLES, "--out", tmp_path / "y.csv", "--model", bundle, "--no-open-set").returncode == 0


def test_the_model_describes_its_two_outputs_for_other_runtimes():
    import onnxruntime as ort

    sess = ort.InferenceSession(str(SHIPPED / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert "features" in meta["output"]
    card = json.loads((SHIPPED / "card.json").read_text())
    assert all(c["sha256"] and c["model_sha256"] for c in card["openset"]["configs"])


def test_watch_moves_a_foreign_image_to_unknown_and_a_frame_to_its_class(tmp_path):
    import signal

    from procs import wait_for
    from test_watch import Daemon

    inbox, sorted_, ledger = tmp_path / "inbox", tmp_path / "sorted", tmp_path / "ledger.csv"
    inbox.mkdir()
    daemon = Daemon(str(inbox), "--out", str(ledger), "--move-to", str(sorted_))  # returns once it is watching
    try:
        frame = next(SAMPLES.glob("homer_simpson/*.jpg"))
        for src, name in ((FOREIGN / "colour_wheel.png", "wheel.png"), (frame, "frame.jpg")):
            shutil.copy(src, tmp_path / name)
            (tmp_path / name).rename(inbox / name)  # arrives whole, as a writer that renames in does
        rows = wait_for(lambda: ledger.exists() and len(r := read_rows(ledger)) == 2 and r, "both rows", timeout=120)
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(timeout=60)
    by_path = {r["path"]: r for r in rows}
    assert by_path["wheel.png"]["label"] == "unknown" and by_path["wheel.png"]["model_label"]
    wait_for(lambda: (sorted_ / "unknown" / "wheel.png").is_file(), "the wheel in unknown/", timeout=30)
    assert (sorted_ / by_path["frame.jpg"]["label"] / "frame.jpg").is_file()


def test_embeddings_from_the_cli_equal_the_apis(tmp_path, model):
    from batchcls.embeddings import read_embeddings

    out, emb = tmp_path / "labels.csv", tmp_path / "emb.npy"
    r = run_cli("run", SAMPLES, "--out", out, "--quiet", "--embeddings", emb)
    assert r.returncode == 0, r.stderr.decode()
    vectors, paths = read_embeddings(emb)
    rows = read_rows(out)
    assert paths == [row["path"] for row in rows if row["status"] == "ok"]
    assert vectors.shape == (len(paths), model.card.embedding_dim) and vectors.dtype == np.float16
    api = model.predict([str(SAMPLES / p) for p in paths[:5]], embeddings=True)
    for i, row in enumerate(api):
        assert row["embedding"].shape == (model.card.embedding_dim,)
        np.testing.assert_allclose(vectors[i], row["embedding"], rtol=2e-3, atol=2e-3)  # float16 in the file
    assert not (tmp_path / "emb.npy.partial").exists()
    again = run_cli("run", SAMPLES, "--out", tmp_path / "b.csv", "--embeddings", emb)
    assert again.returncode == 1 and b"--overwrite" in again.stderr
