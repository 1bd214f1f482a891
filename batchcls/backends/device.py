"""Torch-side helpers shared by the GPU backends (torch and TensorRT) and the nvJPEG path."""
from __future__ import annotations

import torch

from batchcls.card import ModelCard
from batchcls.errors import GpuFailure
from batchcls.presets import normalization

# Messages of CUDA errors that poison the process's context: every later CUDA call fails the same way.
_STICKY = ("CUDA error", "cudaError", "CUDA driver error", "illegal memory access", "device-side assert",
           "unspecified launch failure", "CUBLAS_STATUS", "CUDNN_STATUS", "misaligned address")


class DeviceNormalize:
    """uint8 NCHW on the device -> float32 normalized: ``presets.normalize`` done where the pixels are."""

    def __init__(self, card: ModelCard, device: torch.device) -> None:
        shift, scale = normalization(card.mean, card.std)
        self.shift = torch.from_numpy(shift).to(device).reshape(1, 3, 1, 1)
        self.scale = torch.from_numpy(scale).to(device).reshape(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) / self.scale


def gpu_failure(e: BaseException, device: torch.device | str) -> GpuFailure | None:
    """The run-stopping form of ``e`` when it is out-of-memory or a sticky CUDA error, else None.

    Either one would fail every following batch too: written as error rows, ``--resume`` would take those
    files as done. One line says what happened and what to do.
    """
    if isinstance(e, GpuFailure):
        return e
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return GpuFailure(f"{device} ran out of memory ({first}): the run stopped; rerun with a smaller "
                          "--batch-size and --resume (the rows written so far are kept)")
    if type(e).__name__ == "AcceleratorError" or any(m in first for m in _STICKY):
        return GpuFailure(f"{device} is in a CUDA error state ({first}): the run stopped; check the GPU "
                          "(nvidia-smi, the kernel log), then rerun with --resume (the rows written so far are kept)")
    return None


def device_broken(device: torch.device) -> GpuFailure | None:
    """After an unexplained failure on ``device``: a GpuFailure if the device itself no longer works."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as e:  # the context's sticky error surfaces at the next synchronisation
        return gpu_failure(e, device) or GpuFailure(f"{device} failed ({type(e).__name__}: {e}): the run stopped; "
                                                    "rerun with --resume (the rows written so far are kept)")
    return None


def raise_gpu_failure(e: BaseException, device: torch.device | str) -> None:
    """Re-raise ``e`` as a GpuFailure when it is one; otherwise return and let the caller handle ``e``."""
    failure = gpu_failure(e, device)
    if failure is not None and failure is not e:
        raise failure from e
    if failure is not None:
        raise failure
