"""Running a model: inference backends behind one factory, ``load_backend(card, kind=None)``.

Every backend maps a float32 NCHW batch to raw logits; softmax and temperature are applied once, in
``batchcls.infer``, so all backends give the same probabilities. Building engines is another job, in
``batchcls.builders``; this package only reads what a build left beside the card, and never imports it.

- ``onnxruntime``: ONNX Runtime, the CPU backend every install has (``onnxruntime.py``), running the
  best CPU model ``make engine`` vouched for (``record.py``);
- ``cuda`` / ``torch``: the bundle's ``model.pt2`` in PyTorch (``pytorch.py``), on a GPU / the CPU by default;
- ``tensorrt``: a TensorRT plan built on this machine (``tensorrt.py``).

``auto`` picks the fastest this machine can run: a TensorRT plan whose recorded GPU/TensorRT facts match,
else PyTorch on the GPU, else ONNX Runtime on the CPU.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from typing import Protocol

import numpy as np

from batchcls.backends.onnxruntime import OnnxRuntimeBackend, cpu_model_path
from batchcls.backends.record import onnx_sha256
from batchcls.card import ModelCard
from batchcls.errors import ModelError
from batchcls.machine import MachineFacts, machine_facts, nvidia_driver_present

BACKENDS = ("auto", "onnxruntime", "tensorrt", "cuda", "torch")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")

__all__ = ["BACKENDS", "Backend", "OnnxRuntimeBackend", "auto_backends", "check_device", "load_backend"]


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> float32 logits (N, num_classes)."""


def check_device(device: str | None, facts: MachineFacts | None = None) -> None:
    """A device that does not exist here is an error in one line, never a silent run on the CPU."""
    if device is None or device == "cpu":
        return
    if not _DEVICE.match(device):
        raise ModelError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    facts = facts if facts is not None else machine_facts()
    if facts.gpu_name is None:
        why = ("no NVIDIA driver" if not nvidia_driver_present() else
               "PyTorch is not installed" if importlib.util.find_spec("torch") is None else "PyTorch sees no CUDA GPU")
        raise ModelError(f"--device {device}: this machine has no usable CUDA GPU ({why}): use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index > 0:
        import torch

        if index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             "numbered from cuda:0")


def auto_backends(card: ModelCard, facts: MachineFacts) -> tuple[list[str], str | None]:
    """Backends for 'auto', best first: TensorRT, then CUDA, then CPU ONNX Runtime (always last).

    The note says why a better backend was passed over when the user can fix it (a plan built
    for another GPU or TensorRT version, with the command that rebuilds it).
    """
    if facts.gpu_name is None:
        return ["onnxruntime"], None
    from batchcls.backends.tensorrt import GpuFacts, plan_path, plan_problem, read_meta, rebuild_command

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
        from batchcls.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(card, device=device or "cuda")
    if kind in ("cuda", "torch"):
        try:
            from batchcls.backends.pytorch import TorchBackend
        except ImportError as e:
            raise ModelError(f"--backend {kind} needs PyTorch ({e.name} missing): pip install 'batchcls[train]'") from None
        return TorchBackend(card, device=device or ("cuda" if kind == "cuda" else "cpu"), threads=threads)
    device = device or "cpu"
    return OnnxRuntimeBackend(cpu_model_path(card) if device == "cpu" else card.onnx_path,
                              device=device, threads=threads)


def load_backend(card: ModelCard, kind: str | None = None, *, device: str | None = None,
                 threads: int | None = None) -> Backend:
    """None/'auto' means the machine's best available; unknown kinds list the valid ones.

    ``device`` None means the backend's natural device (a GPU for tensorrt/cuda, else the CPU);
    'cpu' keeps 'auto' on ONNX Runtime even when a GPU is present; a GPU device that is not here is an
    error. An 'auto' candidate that fails to load gives way to the next, with a warning.
    """
    kind = kind or "auto"
    if kind not in BACKENDS:
        raise ModelError(f"unknown backend {kind!r}: choose one of {', '.join(BACKENDS)}")
    if not (kind == "onnxruntime" and device and _DEVICE.match(device)):  # onnxruntime-gpu needs no torch:
        check_device(device)  # its own provider check says whether CUDA is here
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
