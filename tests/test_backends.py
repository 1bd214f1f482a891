"""The backend factory: which backend `auto` picks on which machine, unknown names and devices refused with the
valid choices, and the CLI's --backend/--device choices matching the factory."""
from __future__ import annotations

import re

import pytest
from backend_helpers import (
    H200,
    HAS_CUDA,
    write_plan,
)
from click.testing import CliRunner
from PIL import Image

from batchcls.backends import BACKENDS, OnnxRuntimeBackend, auto_backends, check_device, load_backend
from batchcls.backends.tensorrt import (
    plan_path,
)
from batchcls.card import load_card
from batchcls.cli import cli
from batchcls.errors import ModelError
from batchcls.machine import MachineFacts


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


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU choice")
def test_auto_without_gpu_is_onnxruntime(bundle):
    backend = load_backend(load_card(bundle))
    assert isinstance(backend, OnnxRuntimeBackend)


@pytest.mark.parametrize("command", ["run", "eval"])
def test_cli_backend_choices_match_factory(command):
    option = next(p for p in cli.commands[command].params if p.name == "backend")
    assert tuple(option.type.choices) == BACKENDS


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
