"""INT8 on the CPU: the recipe on the real shipped model and real frames, the gate, the shipped INT8 model and
its check at load. Quantizing the real model takes about half a minute, so the builds are shared per module."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLES

from batchcls.backends import OnnxRuntimeBackend, load_backend
from batchcls.backends.onnxruntime import checks_cache, cpu_model_path
from batchcls.backends.record import shipped_int8_path, shipped_probe_path, shipped_record_path
from batchcls.card import load_card
from batchcls.decode_stage import load_images
from batchcls.presets import EvalPreset, normalize
from batchcls.scan import scan_dir

onnx = pytest.importorskip("onnx")
pytest.importorskip("ml_dtypes")
pytest.importorskip("sympy")

SHIPPED = REPO / "engines" / "simpsons"


def copy_bundle(dst: Path, *, open_set: bool = False) -> Path:
    """The shipped model's card and ONNX (logits + features), not its built or shipped engines; without its
    open-set decision unless ``open_set`` (the FP32 model's decisions, which describe no INT8 file)."""
    dst.mkdir(parents=True)
    shutil.copy(SHIPPED / "model.onnx", dst)
    card = json.loads((SHIPPED / "card.json").read_text())
    if open_set:
        for c in card["openset"]["configs"]:
            shutil.copy(SHIPPED / c["file"], dst)
    else:
        card["openset"] = {}
    (dst / "card.json").write_text(json.dumps(card))
    return dst


def sample_batch(card) -> np.ndarray:
    files = sorted(scan_dir(str(SAMPLES)), key=lambda f: f.rel)
    return normalize(load_images(files, EvalPreset.from_card(card)).images, card.mean, card.std)


def outputs(model: Path, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    session = OnnxRuntimeBackend(model).session
    return session.run(names, {session.get_inputs()[0].name: x})


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def shipped_build(tmp_path_factory) -> Path:
    """The shipped INT8 model of a copy of the real bundle, calibrated and gated on the sample frames.

    The gate's limits are opened: on 40 frames one changed label is 2.5 points, so the real limits would make
    the mechanism below depend on a single frame; what the decision follows is checked on the record."""
    from batchcls.builders.cpu import build_cpu_engines

    bundle = copy_bundle(tmp_path_factory.mktemp("ship") / "bundle")
    build_cpu_engines(load_card(bundle), calib_dir=str(SAMPLES), val_dir=str(SAMPLES), ship=True,
                      tolerance_points=5.0, acc_tolerance_points=5.0, log=lambda m: None)
    return bundle


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> dict:
    """A user cache of INT8 checks of its own (the process and its children read $XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_freezing_shape_arithmetic_keeps_the_model_exact():
    """The export computes "same" padding from Shape() at run time; frozen, it is constants, the same logits."""
    from batchcls.builders.cpu import freeze_shape_math

    card = load_card(SHIPPED)
    model = onnx.load(str(card.onnx_path))
    assert any(n.op_type == "Shape" for n in model.graph.node)
    frozen = freeze_shape_math(model)
    ops = {n.op_type for n in frozen.graph.node}
    assert not ops & {"Shape", "Cast", "Ceil", "Div"}, ops
    x = sample_batch(card)
    import onnxruntime as ort

    got = ort.InferenceSession(frozen.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, outputs(card.onnx_path, x, ["logits"])[0], atol=1e-4)


@pytest.mark.slow
def test_int8_follows_fp32_on_real_frames(shipped_build):
    """Every layer in INT8 but the shape arithmetic: logits within a few percent of FP32 on real frames, and the
    same top-1 on nearly all. Quantizing the padding arithmetic shifted feature maps by a pixel (logits 60% off)."""
    card = load_card(shipped_build)
    int8 = shipped_int8_path(card)
    q = onnx.load(str(int8))
    assert not any(n.op_type == "Shape" for n in q.graph.node)
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 40  # the convs themselves are quantized
    x = sample_batch(card)
    ref, got = outputs(card.onnx_path, x, ["logits"])[0], outputs(int8, x, ["logits"])[0]
    assert rel_error(got, ref) < 0.15
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.slow
def test_shipped_int8_records_its_gate(shipped_build):
    card = load_card(shipped_build)
    entry = json.loads(shipped_record_path(card).read_text())
    assert entry["int8_settings"]["reduce_range"] is True  # one file for AVX2 and VNNI alike
    v = entry["validation"]
    assert v["n"] == len(list(SAMPLES.glob("*/*.jpg"))) and v["errors"] == 0
    assert entry["int8_kept"] is (v["accuracy_drop_points"] <= entry["accuracy_tolerance_points"]
                                  and v["f1_drop_points"] <= entry["tolerance_points"])
    assert entry["int8_kept"], entry["int8_reason"]
    assert v["agreement"] >= 0.975  # at most one of the 40 frames changed its label
    assert len(entry["probe"]["logits"]) == len(np.load(shipped_probe_path(card)))


@pytest.mark.slow
def test_run_uses_the_shipped_int8_after_checking_it_once(shipped_build, fresh_cache, tmp_path):
    """A fresh install runs the shipped INT8 model with no build step: the first run at a terminal checks its probe
    on this CPU and says so in one line; later runs read the answer from the user cache and say nothing."""
    from terminal import run_in_terminal

    def run(out: str) -> str:
        code, screen = run_in_terminal(sys.executable, "-m", "batchcls.cli", "run", SAMPLES, "--model", shipped_build,
                                       "--out", tmp_path / out, "-q", env=fresh_cache)
        assert code == 0, screen
        return screen

    lines = [ln for ln in run("a.csv").splitlines() if "shipped INT8" in ln]
    assert len(lines) == 1 and "using it" in lines[0], lines
    assert checks_cache().is_file()
    assert "shipped INT8" not in run("b.csv")
    card = load_card(shipped_build)
    assert load_backend(card, "onnxruntime").model_path == shipped_int8_path(card)


@pytest.mark.slow
def test_shipped_int8_whose_probe_disagrees_runs_fp32(shipped_build, fresh_cache, tmp_path, capsys):
    """Logits off those the gate measured (another CPU family's kernels, another ONNX Runtime) mean its figures
    do not hold here: FP32 runs, with one line saying why."""
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped_build, bundle)
    record = shipped_record_path(load_card(bundle))
    entry = json.loads(record.read_text())
    entry["probe"]["logits"] = (np.asarray(entry["probe"]["logits"]) * 1.2).tolist()
    record.write_text(json.dumps(entry))
    card = load_card(bundle)
    assert cpu_model_path(card) == card.onnx_path
    assert "off what its gate measured" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_int8_of_another_model_or_rejected_is_not_used(shipped_build, fresh_cache, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped_build, bundle)
    card = load_card(bundle)
    record = shipped_record_path(card)
    entry = json.loads(record.read_text())
    record.write_text(json.dumps({**entry, "int8_kept": False}))
    assert cpu_model_path(card) == card.onnx_path
    record.write_text(json.dumps({**entry, "source_sha256": "0" * 64}))  # built from an earlier model
    assert cpu_model_path(card) == card.onnx_path
    record.write_text(json.dumps(entry))
    assert cpu_model_path(card) == shipped_int8_path(card)


@pytest.mark.slow
def test_a_local_build_comes_before_the_shipped_int8(shipped_build, fresh_cache, tmp_path):
    """make engine gated INT8 on this very CPU: its decision wins, kept or not."""
    from batchcls.backends.record import int8_path, opt_path
    from batchcls.builders.cpu import build_cpu_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(shipped_build, bundle)
    card = load_card(bundle)
    entry = build_cpu_engines(card, calib_dir=str(SAMPLES), val_dir=str(SAMPLES), log=lambda m: None)
    assert cpu_model_path(card) == (int8_path(card) if entry["int8_kept"] else opt_path(card))


@pytest.mark.slow
def test_two_output_model_keeps_features_in_fp32(tmp_path):
    """The served model returns ``features`` beside the logits: the gate compares logits and records how far the
    features drift; the features output is pooled in FP32, not read back from an 8-bit copy."""
    from batchcls.builders.cpu import build_cpu_engines

    bundle = copy_bundle(tmp_path / "bundle")
    card = load_card(bundle)
    entry = build_cpu_engines(card, calib_dir=str(SAMPLES), val_dir=str(SAMPLES), log=lambda m: None)
    v = entry["validation"]
    assert v["features_cosine_mean"] > 0.99 and v["agreement"] >= 0.95
    from batchcls.backends.record import int8_path

    q = onnx.load(str(int8_path(card)))
    producer = {o: n for n in q.graph.node for o in n.output}
    assert [o.name for o in q.graph.output] == ["logits", "features"]
    assert producer["features"].op_type == "Concat"  # penultimate + texture statistics, a float output
    assert q.graph.output[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = sample_batch(card)
    ref_logits, ref_feat = outputs(card.onnx_path, x, ["logits", "features"])
    got_logits, got_feat = outputs(int8_path(card), x, ["logits", "features"])
    assert got_feat.shape == ref_feat.shape and ref_feat.shape[1] > card.embedding_dim > 0
    assert rel_error(got_logits, ref_logits) < 0.15


@pytest.mark.slow
def test_int8_is_not_used_where_its_decision_was_not_fitted(shipped_build, fresh_cache, tmp_path):
    """INT8 moves every signal the decision reads: a bundle with decisions fitted on model.onnx only runs
    model.onnx, even with a kept and checked shipped INT8 beside it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped_build, bundle)
    assert cpu_model_path(load_card(bundle)).name == "shipped-int8.onnx"  # without a decision: INT8
    card = json.loads((SHIPPED / "card.json").read_text())
    configs = [c for c in card["openset"]["configs"] if c["model"] == "model.onnx"]
    for c in configs:
        shutil.copy(SHIPPED / c["file"], bundle)
    data = json.loads((bundle / "card.json").read_text())
    data["openset"] = {"configs": configs}
    (bundle / "card.json").write_text(json.dumps(data))
    assert cpu_model_path(load_card(bundle)) == load_card(bundle).onnx_path
