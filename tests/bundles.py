"""Build small, real model bundles for tests without torch: a colour classifier in pure ONNX.

The network averages each channel over the image and maps (R, G, B) through an identity
layer, so a red picture is 'red' — real inference whose right answer a test can know. With
``program=True`` (needs torch) the bundle also gets the same network as ``model.pt2``, written by
train/'s exporter, for the torch backend.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from batchcls.card import ModelCard

COLOURS = ["red", "green", "blue"]


def colour_onnx(path: Path, gain: float = 3.0) -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, None, None])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    w = numpy_helper.from_array((np.eye(3) * gain).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "colour", [x], [y], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def colour_program(folder: Path, gain: float = 3.0, input_size: int = 32) -> None:
    """model.pt2 of the colour network, exported beside folder/model.onnx as `make train` does."""
    import hashlib

    import torch

    from train.export import export_program

    class ColourMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(3) * gain)
                self.fc.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=(2, 3)))

    sha = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    export_program(ColourMean(), input_size, folder / "model.pt2", source_onnx_sha256=sha)


def make_colour_bundle(folder: Path, *, input_size: int = 32, temperature: float = 1.0,
                       program: bool = False, classes: list[str] = COLOURS) -> Path:
    """``classes`` names the outputs for red, green and blue (names that clash as folders, say)."""
    folder.mkdir(parents=True, exist_ok=True)
    colour_onnx(folder / "model.onnx")
    ModelCard(name="colours", architecture="colour-mean", classes=list(classes), input_size=input_size,
              resize_mode="squash", crop_pct=1.0, interpolation="bilinear", mean=[0.5, 0.5, 0.5],
              std=[0.5, 0.5, 0.5], onnx="model.onnx", temperature=temperature).save(folder)
    if program:
        colour_program(folder, input_size=input_size)
    return folder
