"""The TensorRT plan build: optimisation profiles from the ONNX input and the card, and the one-line error
where TensorRT is missing."""
from __future__ import annotations

import pytest
from backend_helpers import (
    HAS_CUDA,
)
from click.testing import CliRunner

from batchcls.builders.tensorrt import profile_shapes
from batchcls.cli import cli
from batchcls.errors import ModelError


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


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on machines without TensorRT")
def test_cli_tensorrt_build_without_tensorrt_is_one_line(bundle):
    res = CliRunner().invoke(cli, ["engine", "build", "--model", str(bundle), "--target", "tensorrt"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: building a TensorRT plan needs an NVIDIA GPU and the tensorrt package: pip install 'batchcls[tensorrt]'"]
