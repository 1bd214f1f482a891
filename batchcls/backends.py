"""Inference backends behind one factory: ``load_backend(card, kind=None)``.

Every backend maps a float32 NCHW batch to raw logits; softmax and temperature are applied
once, in the pipeline, so all backends give the same probabilities.

``auto`` picks the fastest engine this machine can run: a TensorRT plan built here (tensorrt
package + CUDA GPU + a plan whose recorded GPU/TensorRT facts match), else PyTorch on the GPU,
else ONNX Runtime on the CPU with the best model ``make engine`` vouched for (INT8 if it kept
accuracy, else the optimized graph, else the bundle's ONNX).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from batchcls.card import ModelCard
from batchcls.errors import ModelError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "cuda", "torch")


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
    """The fastest ONNX file the bundle holds for CPU: ``make engine`` may add optimized variants.

    INT8 only when engines.json says it kept accuracy, and only for the ONNX it was built from.
    """
    from batchcls.engines.cpu import cpu_engine_path

    return cpu_engine_path(card)


@dataclass(frozen=True)
class MachineFacts:
    """What ``auto`` decides on; gathered by ``machine_facts()``, built by hand in tests."""

    gpu_name: str | None = None  # None: no usable CUDA GPU (or no CUDA build of torch)
    compute_capability: str | None = None
    tensorrt_version: str | None = None  # None: the tensorrt package is not installed


def _nvidia_driver_present() -> bool:
    """Cheap check before importing torch (seconds) just to learn there is no GPU."""
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version"):
        return True
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def machine_facts() -> MachineFacts:
    if not _nvidia_driver_present():
        return MachineFacts()
    try:
        import torch
    except ImportError:
        return MachineFacts()
    if not torch.cuda.is_available():
        return MachineFacts()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    from batchcls.engines.tensorrt import tensorrt_version

    return MachineFacts(props.name, f"{props.major}.{props.minor}", tensorrt_version())


def auto_backends(card: ModelCard, facts: MachineFacts) -> tuple[list[str], str | None]:
    """Backends for 'auto', best first: TensorRT, then CUDA, then CPU ONNX Runtime (always last).

    The note says why a better backend was passed over when the user can fix it (a plan built
    for another GPU or TensorRT version, with the command that rebuilds it).
    """
    if facts.gpu_name is None:
        return ["onnxruntime"], None
    from batchcls.engines import onnx_sha256
    from batchcls.engines.tensorrt import GpuFacts, plan_path, plan_problem, read_meta, rebuild_command

    meta = read_meta(card) if plan_path(card).is_file() else None
    if meta is None:
        return ["cuda", "onnxruntime"], None
    here = GpuFacts(facts.tensorrt_version, facts.gpu_name, facts.compute_capability or "") \
        if facts.tensorrt_version else None
    problem = plan_problem(meta, here, onnx_sha256(card))
    if problem is None:
        return ["tensorrt", "cuda", "onnxruntime"], None
    return ["cuda", "onnxruntime"], (f"not using the TensorRT plan {plan_path(card)}: {problem}: "
                                     f"rebuild it with `{rebuild_command(card)}`")


def _load(card: ModelCard, kind: str, device: str | None, threads: int | None) -> Backend:
    if kind == "tensorrt":
        from batchcls.engines.tensorrt import TensorRTBackend

        return TensorRTBackend(card, device=device or "cuda")
    if kind == "cuda":
        try:
            from batchcls.engines.cuda import CudaBackend
        except ImportError as e:
            raise ModelError(f"--backend cuda needs PyTorch ({e.name} missing): pip install 'batchcls[train]'") from None
        return CudaBackend(card, device=device or "cuda")
    device = device or "cpu"
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(cpu_model_path(card) if device == "cpu" else card.onnx_path,
                                  device=device, threads=threads)
    return TorchBackend(card, device=device, threads=threads)


def load_backend(card: ModelCard, kind: str | None = None, *, device: str | None = None,
                 threads: int | None = None) -> Backend:
    """None/'auto' means the machine's best available; unknown kinds list the valid ones.

    ``device`` None means the backend's natural device (a GPU for tensorrt/cuda, else the CPU);
    'cpu' keeps 'auto' on ONNX Runtime even when a GPU is present. An 'auto' candidate that
    fails to load (e.g. a graph the cuda backend can't run) gives way to the next, with a warning.
    """
    kind = kind or "auto"
    if kind not in BACKENDS:
        raise ModelError(f"unknown backend {kind!r}: choose one of {', '.join(BACKENDS)}")
    if kind != "auto":
        return _load(card, kind, device, threads)
    candidates, note = (["onnxruntime"], None) if device == "cpu" else auto_backends(card, machine_facts())
    if note:
        print(f"warning: {note}", file=sys.stderr)
    for k in candidates[:-1]:
        try:
            return _load(card, k, device, threads)
        except ModelError as e:
            print(f"warning: backend {k} unavailable ({e}); trying {candidates[candidates.index(k) + 1]}",
                  file=sys.stderr)
    return _load(card, candidates[-1], None if candidates[-1] == "onnxruntime" else device, threads)
