"""What this machine offers: CPU threads and the GPU probe, in one place.

``machine_facts()`` is the only code that asks whether a CUDA GPU (and TensorRT) is here. It looks for
the NVIDIA driver before importing torch, because importing torch costs seconds just to learn there is
no GPU; tests build ``MachineFacts`` by hand instead.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass


def default_threads() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def max_decode_workers() -> int:
    """The most decode processes worth starting: two per core. Decoding is CPU work; a second process per
    core covers reads that wait on storage; more only add memory (each may hold one image at the
    --max-pixels limit) and switching."""
    return 2 * default_threads()


@dataclass(frozen=True)
class MachineFacts:
    """What ``auto`` decides on: gathered by ``machine_facts()``, built by hand in tests."""

    gpu_name: str | None = None  # None: no usable CUDA GPU (or no CUDA build of torch)
    compute_capability: str | None = None  # "9.0" for Hopper
    tensorrt_version: str | None = None  # None: the tensorrt package is not installed


def nvidia_driver_present() -> bool:
    """Cheap check before importing torch (seconds) just to learn there is no GPU."""
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def machine_facts(device_index: int | None = None) -> MachineFacts:
    """The GPU (``device_index``, default the current one) and TensorRT here; empty facts without a GPU."""
    if not nvidia_driver_present():
        return MachineFacts()
    try:
        import torch
    except ImportError:
        return MachineFacts()
    if not torch.cuda.is_available():
        return MachineFacts()
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device_index is None else device_index)
    return MachineFacts(props.name, f"{props.major}.{props.minor}", tensorrt_version())


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI / AVX-VNNI multiply u8 x s8 without the 16-bit saturation of plain AVX2."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags or " amx_int8" in flags
