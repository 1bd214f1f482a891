"""The TensorRT backend: plan metadata against this machine, the rebuild command in every mismatch, batch
chunking, and (marked ``gpu``, skipped without CUDA or the tensorrt package) a real plan's parity."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from backend_helpers import (
    H200,
    gpu,
    gpu_bundle,
    sample_files,
    write_plan,
)
from bundles import colour_onnx
from route_parity import BAND_NVJPEG, BAND_SAME_PIXELS, NVJPEG_CONF_DIFF, compare_routes

from batchcls.backends import OnnxRuntimeBackend, auto_backends, load_backend
from batchcls.backends.tensorrt import (
    PlanMismatch,
    check_plan,
    chunk_size,
    meta_path,
    plan_problem,
)
from batchcls.builders.parity import MAX_CONF_DIFF
from batchcls.card import load_card
from batchcls.errors import ModelError
from batchcls.infer import Classifier
from batchcls.pipeline import RunOptions, classify


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


def test_tensorrt_backend_without_plan_says_how_to_build(bundle):
    card = load_card(bundle)
    with pytest.raises(ModelError) as e:
        load_backend(card, "tensorrt")
    assert "pip install 'batchcls[tensorrt]'" in str(e.value) or "batchcls engine build" in str(e.value)


@pytest.fixture(scope="session")
def trt_bundle(request, tmp_path_factory) -> Path:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (pip install 'batchcls[tensorrt]')")
    from batchcls.builders.tensorrt import build_plan

    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(gpu_bundle(request), bundle,
                    ignore=shutil.ignore_patterns("*.plan", "*.plan.json", "*.cache"))
    build_plan(load_card(bundle), max_batch=16, log=lambda m: None)
    return bundle


def _plan_rows(card, backend, files, *, batch_size: int, gpu_decode: bool) -> list[dict]:
    """Rows of the network alone (a plan's open-set statistics are its own: ``decision_model``), with every
    class's probability for tests/route_parity.py."""
    options = RunOptions(batch_size=batch_size, workers=0, gpu_decode=gpu_decode, open_set=False, probs=True)
    return [r for rows in classify(files, Classifier(card, backend, open_set=False), options) for r in rows]


@pytest.mark.gpu
@gpu
def test_tensorrt_plan_parity_and_metadata(trt_bundle):
    """The strict bar on the same pixels (Pillow decodes for both: ``gpu_decode=False``); through nvJPEG,
    whose pixels differ, with nvJPEG's tolerance."""
    from batchcls.backends.tensorrt import TensorRTBackend, current_facts

    card = load_card(trt_bundle)
    meta = json.loads(meta_path(card).read_text())
    facts = current_facts()
    assert (meta["gpu_name"], meta["compute_capability"], meta["tensorrt_version"]) == \
        (facts.gpu_name, facts.compute_capability, facts.tensorrt_version)
    assert meta["profile"]["min"][0] == 1 and meta["profile"]["max"][0] == 16
    backend = load_backend(card)  # auto must pick the plan
    assert isinstance(backend, TensorRTBackend) and backend.decision_model == "model.plan"
    files = sample_files()
    ref = _plan_rows(card, OnnxRuntimeBackend(card.onnx_path), files, batch_size=16, gpu_decode=False)
    same_pixels = _plan_rows(card, backend, files, batch_size=37, gpu_decode=False)  # chunks of 16 + 16 + 5, then 3
    cmp = compare_routes(ref, same_pixels, card.classes, conf_diff=MAX_CONF_DIFF, band=BAND_SAME_PIXELS, cut=None,
                         what="tensorrt")
    assert not cmp.problems, cmp.problems
    nvjpeg = _plan_rows(card, backend, files, batch_size=37, gpu_decode=True)
    cmp = compare_routes(ref, nvjpeg, card.classes, conf_diff=NVJPEG_CONF_DIFF, band=BAND_NVJPEG, cut=None,
                         what="tensorrt-nvjpeg")
    assert not cmp.problems, cmp.problems


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
