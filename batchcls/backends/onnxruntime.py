"""ONNX Runtime: the CPU backend every install has (and CUDA where onnxruntime-gpu is installed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from batchcls.backends.record import cpu_engine_path
from batchcls.card import ModelCard
from batchcls.errors import ModelError, first_line
from batchcls.machine import default_threads


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelError("onnxruntime has no CUDA provider here: use --device cpu or install onnxruntime-gpu")
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=providers_for(device))
        except Exception as e:  # ORT raises its own untyped errors for corrupt files
            raise ModelError(f"cannot load ONNX model {model_path}: {first_line(e)}") from e
        check_providers(device, self.session.get_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.model_path = model_path

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def providers_for(device: str) -> list:
    """ONNX Runtime's provider list for ``device``: cuda:N puts the CUDA provider on GPU N first."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    index = int(device.partition(":")[2] or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def check_providers(device: str, active: list[str]) -> None:
    """ONNX Runtime drops a provider that fails to start (a missing CUDA/cuDNN library) with only a log
    line and runs on the CPU; asked for a GPU, that is an error here, not a silent CPU run."""
    if device.startswith("cuda") and "CUDAExecutionProvider" not in active:
        raise ModelError(f"onnxruntime could not start its CUDA provider on {device} (it would run on the CPU; "
                         "see its log above, usually a missing CUDA or cuDNN library): fix the install, or use "
                         "--backend cuda or --device cpu")


def cpu_model_path(card: ModelCard) -> Path:
    """The fastest ONNX file the bundle holds for CPU: ``make engine`` may add optimized variants."""
    return cpu_engine_path(card)


def onnx_metadata(path: Path) -> dict[str, str]:
    """The ONNX file's own ``metadata_props`` (class names, preprocessing, temperature when train/ wrote it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only reading, not running
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's untyped errors for corrupt files
        raise ModelError(f"cannot load ONNX model {path}: {first_line(e)}") from e
    return dict(session.get_modelmeta().custom_metadata_map)
