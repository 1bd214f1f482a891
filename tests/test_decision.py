"""Fitting the "none of these" decision per served configuration (batchcls.builders.decision), on real images:
the committed sample frames as a tiny split of the shipped model's classes, the foreign fixtures as the
foreign sets, and the shipped ONNX model through the runtime's own Classifier."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from faults import run_cli

from batchcls.backends.record import file_sha256
from batchcls.builders import decision as D
from batchcls.builders.conditions import CONDITIONS, degraded_bytes
from batchcls.card import load_card
from batchcls.decode import decode_image
from batchcls.openset import Decisions
from batchcls.output import read_rows

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "simpsons"
FOREIGN = REPO / "tests" / "fixtures" / "foreign"
SHIPPED = REPO / "engines" / "simpsons"


def test_the_logistic_fit_separates_and_is_calibrated_under_even_odds():
    rng = np.random.default_rng(0)
    z = np.r_[rng.normal(2, 1, 500), rng.normal(-2, 1, 50)][:, None]  # unbalanced on purpose
    y = np.r_[np.ones(500), np.zeros(50)]
    coef, intercept = D.logistic(z, y)
    p = 1 / (1 + np.exp(-(z[:, 0] * coef[0] + intercept)))
    assert coef[0] > 0 and abs(1 / (1 + np.exp(-intercept)) - 0.5) < 0.05  # the midpoint sits between the two
    assert (p[:500] > 0.5).mean() > 0.95 and (p[500:] < 0.5).mean() > 0.95


def test_a_condition_makes_the_file_a_user_would_send(tmp_path):
    frame = next(SAMPLES.glob("homer_simpson/*.jpg"))
    full = decode_image(frame)
    for c in CONDITIONS[1:]:
        img = decode_image(degraded_bytes(str(frame), c))
        assert img.size == (round(full.size[0] * c.scale), round(full.size[1] * c.scale)), c
    assert degraded_bytes(str(frame), CONDITIONS[0]) == frame.read_bytes()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A copy of the shipped bundle with its decision refitted on the sample frames and the foreign fixtures."""
    root = tmp_path_factory.mktemp("decision")
    bundle = root / "bundle"
    shutil.copytree(SHIPPED, bundle, ignore=shutil.ignore_patterns("model.pt2", "results", "*.opt.onnx",
                                                                   "engines.json", "shipped-int8*"))
    classes = load_card(bundle).classes
    items = [[p.relative_to(SAMPLES).as_posix(), classes.index(p.parent.name)] for p in sorted(SAMPLES.glob("*/*.jpg"))]
    manifest = {"root": str(SAMPLES), "classes": classes, "train": items[0::2], "val": items[1::2], "test": items[1::2]}
    (root / "split.json").write_text(json.dumps(manifest))
    for side in ("train", "val", "test"):
        shutil.copytree(FOREIGN, root / "foreign" / side)
    result = D.fit_decision(bundle, manifest=root / "split.json", foreign=root / "foreign", cache=root / "cache",
                            log=lambda m: None)
    assert len(result["configs"]) == 2  # model.onnx x (none, flip)
    return bundle


def test_every_tta_mode_of_the_model_file_gets_its_own_statistics(fitted):
    card = load_card(fitted)
    decisions = Decisions.from_card(card)
    sha = file_sha256(fitted / "model.onnx")
    entries = [decisions.find(sha, t) for t in ("none", "flip")]
    assert all(entries) and entries[0]["file"] != entries[1]["file"]
    for e in entries:
        assert (fitted / e["file"]).is_file() and file_sha256(fitted / e["file"]) == e["sha256"]
        assert set(e["gate"]["flagged"]) == {c.name for c in CONDITIONS}  # every condition measured
        assert isinstance(e["gate"]["passed"], bool) and e["gate"]["reason"]


def test_the_fitted_decision_serves_and_the_run_uses_the_configuration_it_serves(fitted, tmp_path):
    for tta in ("none", "flip"):
        out = tmp_path / f"{tta}.csv"
        r = run_cli("run", SAMPLES, "--out", out, "--model", fitted, "--tta", tta, "--quiet")
        assert r.returncode == 0, r.stderr.decode()
        rows = read_rows(out)
        assert len(rows) == 40 and all(0.0 <= float(row["known_score"]) <= 1.0 for row in rows)


def test_a_decision_for_another_model_file_is_never_used(fitted, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(fitted, bundle)
    onnx = bundle / "model.onnx"
    import onnx as onnx_lib

    model = onnx_lib.load(str(onnx))
    model.doc_string = "changed"  # the same network, another file: its statistics were never fitted
    onnx_lib.save(model, str(onnx))
    data = json.loads((bundle / "card.json").read_text())
    data["onnx_sha256"] = file_sha256(onnx)
    (bundle / "card.json").write_text(json.dumps(data))
    r = run_cli("run", SAMPLES, "--out", tmp_path / "x.csv", "--model", bundle)
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "train.decision" in err, err
    assert run_cli("run", SAMPLES, "--out", tmp_path / "y.csv", "--model", bundle, "--no-open-set").returncode == 0


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["openset"]["configs"][0].update(cut="high"), "cut"),
    (lambda c: c["openset"]["configs"][0].update(cut=float("nan")), "cut"),
    (lambda c: c["openset"]["configs"][0].update(file="../../etc/passwd"), "outside"),
    (lambda c: c["openset"]["configs"][0].pop("sha256"), "sha256"),
    (lambda c: c["openset"]["configs"][0].update(method="msp+magic"), "method"),
    (lambda c: c.update(openset={"method": "msp", "cut": 0.1}), "configs"),
])
def test_a_malformed_openset_section_is_one_line(fitted, tmp_path, edit, words):
    bundle = tmp_path / "b"
    shutil.copytree(fitted, bundle)
    data = json.loads((bundle / "card.json").read_text())
    edit(data)
    (bundle / "card.json").write_text(json.dumps(data))
    r = run_cli("run", SAMPLES, "--out", tmp_path / "x.csv", "--model", bundle)
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and words in err, err


def test_statistics_that_do_not_fit_the_method_are_refused(fitted, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(fitted, bundle)
    card = load_card(bundle)
    entry = Decisions.from_card(card).find(file_sha256(bundle / "model.onnx"), card.tta)
    with np.load(bundle / entry["file"]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coef"] = np.r_[arrays["coef"], np.nan]
    np.savez(bundle / entry["file"], **arrays)
    data = json.loads((bundle / "card.json").read_text())
    for c in data["openset"]["configs"]:
        if c["file"] == entry["file"]:
            c["sha256"] = file_sha256(bundle / entry["file"])  # a consistent but wrong file
    (bundle / "card.json").write_text(json.dumps(data))
    r = run_cli("run", SAMPLES, "--out", tmp_path / "x.csv", "--model", bundle)
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "coef" in err, err
