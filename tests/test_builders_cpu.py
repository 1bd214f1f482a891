"""The CPU engine build: optimized FP32 and INT8 models, the INT8 gate on macro-F1, the build record, the
split manifest for calibration and validation, and parity on a real EfficientNet-Lite0 bundle."""
from __future__ import annotations

import json

import pytest
from backend_helpers import (
    HAS_CUDA,
    assert_parity,
    colour_folder,
    rows_for,
    sample_files,
)
from bundles import colour_onnx
from click.testing import CliRunner

from batchcls.backends import OnnxRuntimeBackend, load_backend
from batchcls.backends.record import int8_path, onnx_sha256, opt_path, read_record
from batchcls.card import load_card
from batchcls.cli import cli
from batchcls.machine import cpu_has_vnni
from batchcls.scan import labelled_files, scan_dir


def test_cpu_engine_build_keeps_accurate_int8(bundle, tmp_path):
    labelled = colour_folder(tmp_path / "val")
    res = CliRunner().invoke(cli, ["engine", "build", "--model", str(bundle), "--target", "cpu",
                                   "--calib-dir", str(labelled), "--val-dir", str(labelled)])
    assert res.exit_code == 0, res.output
    assert "INT8 kept" in res.output and "built cpu engine" in res.output
    card = load_card(bundle)
    entry = read_record(card)["cpu"]
    assert entry["int8_kept"] is True and entry["source_sha256"] == onnx_sha256(card)
    assert entry["calibration"]["images"] == 12 and entry["validation"]["n"] == 12
    assert entry["validation"]["macro_f1_ref"] == entry["validation"]["macro_f1_candidate"] == 1.0
    backend = load_backend(card, "onnxruntime")
    assert backend.model_path == bundle / "model.int8.onnx"
    if not HAS_CUDA:  # auto on a CPU machine runs the kept INT8 model
        assert load_backend(card).model_path == bundle / "model.int8.onnx"
    rows = rows_for(card, backend, sorted(scan_dir(labelled), key=lambda f: f.rel))
    assert [r["label"] for r in rows] == [r["path"].split("/")[0] for r in rows]

    colour_onnx(card.onnx_path, gain=8.5)  # the model changed after the build: engines are stale
    assert load_backend(load_card(bundle), "onnxruntime").model_path == bundle / "model.onnx"


def test_int8_built_for_vnni_is_not_used_on_other_cpus(bundle, tmp_path):
    """A model quantized without reduce_range saturates on AVX2-only CPUs: only VNNI CPUs run it."""
    from batchcls.backends.record import cpu_engine_path
    from batchcls.builders.record import update_record

    labelled = colour_folder(tmp_path / "val")
    CliRunner().invoke(cli, ["engine", "build", "--model", str(bundle), "--target", "cpu",
                             "--calib-dir", str(labelled), "--val-dir", str(labelled)], catch_exceptions=False)
    card = load_card(bundle)
    entry = read_record(card)["cpu"]
    assert entry["int8_settings"]["reduce_range"] is not cpu_has_vnni()
    update_record(card, "cpu", {**entry, "int8_settings": {**entry["int8_settings"], "reduce_range": False}})
    expect = "model.int8.onnx" if cpu_has_vnni() else "model.opt.onnx"
    assert cpu_engine_path(card) == bundle / expect


def test_cpu_engine_without_validation_images_is_not_kept(bundle, tmp_path):
    labelled = colour_folder(tmp_path / "calib")
    res = CliRunner().invoke(cli, ["engine", "build", "--model", str(bundle), "--target", "cpu",
                                   "--calib-dir", str(labelled)])
    assert res.exit_code == 0, res.output
    entry = read_record(load_card(bundle))["cpu"]
    assert entry["int8_kept"] is False and "--val-dir" in entry["int8_reason"]
    assert load_backend(load_card(bundle), "onnxruntime").model_path == bundle / "model.opt.onnx"


def test_int8_judge_rejects_a_less_accurate_model(bundle, tmp_path):
    """The decision itself: a candidate that loses macro-F1 (here one that swaps green and blue) is refused."""
    from batchcls.builders.cpu import judge_int8

    card = load_card(bundle)
    worse = tmp_path / "worse.onnx"
    colour_onnx(worse)
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(worse))
    w = next(t for t in m.graph.initializer if t.name == "w")
    arr = numpy_helper.to_array(w).copy()
    arr[[1, 2]] = arr[[2, 1]]
    w.CopyFrom(numpy_helper.from_array(arr, "w"))
    onnx.save(m, str(worse))
    kept, judged = judge_int8(card, worse, labelled_files(colour_folder(tmp_path / "val")))
    assert kept is False and judged["f1_drop_points"] > 0.5
    kept, judged = judge_int8(card, card.onnx_path, labelled_files(tmp_path / "val"))
    assert kept is True and judged["f1_drop_points"] == 0.0


def test_split_manifest_paths(bundle, tmp_path):
    from batchcls.builders.cpu import calibration_files
    from batchcls.builders.manifest import load_split

    data = colour_folder(tmp_path / "data")
    manifest = {"root": str(data), "classes": ["red", "green", "blue"],
                "train": [["red/0.png", 0], ["green/0.png", 1]], "val": [["blue/1.png", 2]]}
    (bundle / "split.json").write_text(json.dumps(manifest))
    card_json = json.loads((bundle / "card.json").read_text())
    card_json["training"] = {"split_manifest": "split.json"}
    (bundle / "card.json").write_text(json.dumps(card_json))
    card = load_card(bundle)
    val = load_split(card, "val")
    assert [(f.path, label) for f, label in val] == [(str(data / "blue/1.png"), "blue")]
    files, source = calibration_files(card, None, 300)
    assert [f.rel for f in files] == ["red/0.png", "green/0.png"] and source == "split manifest: train"
    manifest["root"] = str(tmp_path / "moved")
    (bundle / "split.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="pass folders explicitly"):
        load_split(card, "val")


def test_split_manifest_found_by_its_hash(bundle, tmp_path):
    """`make train` records only the manifest's sha256; the manifest is found where train writes it."""
    import hashlib

    from batchcls.builders.manifest import find_manifest, load_split

    data = colour_folder(tmp_path / "data")
    text = json.dumps({"root": str(data), "classes": ["red", "green", "blue"], "train": [], "val": [["red/2.png", 0]]})
    (bundle / "split.json").write_text(text)
    card_json = json.loads((bundle / "card.json").read_text())
    card_json["training"] = {"split_manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
    (bundle / "card.json").write_text(json.dumps(card_json))
    assert find_manifest(load_card(bundle)) == bundle / "split.json"
    assert [label for _, label in load_split(load_card(bundle), "val")] == ["red"]
    card_json["training"] = {"split_manifest_sha256": "0" * 64}  # another split: not ours to use
    (bundle / "card.json").write_text(json.dumps(card_json))
    assert find_manifest(load_card(bundle)) is None and load_split(load_card(bundle), "val") is None


@pytest.mark.slow
def test_cpu_optimized_engine_parity_with_fp32(lite0_engines, lite0_reference):
    """The optimized graph is the same FP32 arithmetic, fused: the parity bar holds on any CPU."""
    card = load_card(lite0_engines)
    assert_parity(lite0_reference, rows_for(card, OnnxRuntimeBackend(opt_path(card)), sample_files()), "model.opt.onnx")


@pytest.mark.slow
def test_cpu_int8_gate_keeps_what_it_measured(lite0_engines):
    """What the INT8 build promises on any CPU: the decision follows the figures it recorded, the figures are
    what the gate measures on this CPU, and runs use INT8 exactly when it was kept. How far INT8 drifts from
    FP32 is not a promise: its kernels round differently on AVX2, AVX-512 and VNNI."""
    from batchcls.builders.cpu import judge_int8, load_split

    card = load_card(lite0_engines)
    entry = read_record(card)["cpu"]
    judged = entry["validation"]
    assert entry["int8_settings"]["reduce_range"] is not cpu_has_vnni()  # 7-bit weights where AVX2 would saturate
    assert judged["f1_drop_points"] == pytest.approx(100 * (judged["macro_f1_ref"] - judged["macro_f1_candidate"]))
    assert entry["int8_kept"] is (judged["f1_drop_points"] <= entry["tolerance_points"]
                                  and judged["accuracy_drop_points"] <= entry["accuracy_tolerance_points"])
    val = load_split(card, "val")
    assert judged["n"] == len(val) and judged["errors"] == 0
    kept, again = judge_int8(card, int8_path(card), val, entry["tolerance_points"], entry["accuracy_tolerance_points"])
    assert kept is entry["int8_kept"]
    assert (again["macro_f1_ref"], again["macro_f1_candidate"]) == (judged["macro_f1_ref"], judged["macro_f1_candidate"])
    expect = int8_path(card) if kept else opt_path(card)
    assert load_backend(card, "onnxruntime").model_path == expect
