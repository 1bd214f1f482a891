"""Inference backends behind one factory: ``load_backend(card, kind=None)``.

Every backend maps a float32 NCHW batch to raw logits; softmax and temperature are applied
once, in the pipeline, so all backends give the same probabilities.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from batchcls.card import ModelCard
from batchcls.errors import ModelError

BACKENDS = ("auto", "onnxruntime", "torch")


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> float32 logits (N, num_classes)."""


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelError("onnxruntime has no CUDA provider here: use --device cpu or install onnxruntime-gpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=providers)
        except Exception as e:  # ORT raises its own untyped errors for corrupt files
            raise ModelError(f"cannot load ONNX model {model_path}: {str(e).splitlines()[0]}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.model_path = model_path

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


class TorchBackend:
    """PyTorch eager on the bundle's ONNX-equivalent weights (model.pt); needs the train extra."""

    name = "torch"

    def __init__(self, card: ModelCard, *, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import torch
            from train.models import load_for_inference
        except ImportError as e:
            raise ModelError(f"--backend torch needs the training extra ({e.name} missing): "
                             "pip install 'batchcls[train]'") from None
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(device)
        self.model = load_for_inference(card).to(self.device).eval()
        self.model = self.model.to(memory_format=torch.channels_last)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(batch).to(self.device).contiguous(memory_format=self.torch.channels_last)
            return self.model(x).float().cpu().numpy()


def cpu_model_path(card: ModelCard) -> Path:
    """The fastest ONNX file the bundle holds for CPU: ``make engine`` may add optimized variants."""
    return card.onnx_path


def load_backend(card: ModelCard, kind: str | None = None, *, device: str | None = None,
                 threads: int | None = None) -> Backend:
    """None/'auto' means the machine's best available; unknown kinds list the valid ones."""
    kind = kind or "auto"
    if kind not in BACKENDS:
        raise ModelError(f"unknown backend {kind!r}: choose one of {', '.join(BACKENDS)}")
    device = device or "cpu"
    if kind in ("auto", "onnxruntime"):
        return OnnxRuntimeBackend(cpu_model_path(card) if device == "cpu" else card.onnx_path,
                                  device=device, threads=threads)
    return TorchBackend(card, device=device, threads=threads)
