"""Torch-side helpers shared by the GPU backends (torch and TensorRT) and the nvJPEG path: normalising,
mirroring and copying back on the device, and telling a run-stopping GPU failure from a bad batch."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
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


# --- images in, arrays out: what the GPU path and the host paths share ------------------------------

def with_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """uint8 NCHW images, followed by their mirrors when ``views`` is 2: view-major, the order
    ``infer.mean_of_views`` averages back. Mirroring on the device spares the host a copy of every batch."""
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    return torch.cat([images, images.flip(3)]) if views == 2 else images  # NCHW: the mirror flips W


def run_views(backend: Any, images: torch.Tensor, *, views: int, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, features or None) of every view of uint8 NCHW device ``images``, still on the device and
    queued, not waited for. ``backend`` is a GPU backend: ``infer_images`` / ``embed_images`` normalise there."""
    x = with_views(images, views)
    if features:
        return backend.embed_images(x)
    return backend.infer_images(x), None


def upload(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC host images -> uint8 NCHW on ``device``: a quarter of the bytes float32 would move, and
    the same normalisation as ``presets.normalize``, done there (``DeviceNormalize``)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)


@functools.cache
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for copies back to the host, so a copy never queues behind later inference."""
    return torch.cuda.Stream(device)


class HostCopy:
    """Device tensors on their way to host memory: the copy starts when this is made, ``wait`` waits for
    that copy alone.

    On a CUDA device the copy runs on ``copy_stream`` after the work the caller's stream had queued when
    this was made (the batch's inference), into pinned memory (a pageable copy would make the host wait
    for the whole device). Work queued later (the next batch) is not waited for: the host reads one
    batch's results while the GPU runs the next. Elsewhere the copy is a plain one, made at once.
    """

    def __init__(self, tensors: list[torch.Tensor | None], device: torch.device) -> None:
        self.done: torch.cuda.Event | None = None
        if device.type != "cuda":
            self.host = [None if t is None else t.detach().cpu() for t in tensors]
            return
        stream = copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # after the inference that writes them
        self.host = []
        with torch.cuda.stream(stream):
            for t in tensors:
                if t is None:
                    self.host.append(None)
                    continue
                t.record_stream(stream)  # the caller may drop t while the copy still reads it
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                self.host.append(host)
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def wait(self) -> list[np.ndarray | None]:
        """The arrays, once this copy (and the inference before it) finished."""
        if self.done is not None:
            self.done.synchronize()
        return [None if h is None else h.numpy() for h in self.host]


def images_to_arrays(backend: Any, images: np.ndarray, *, views: int = 1,
                     features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NHWC host images -> (logits, features or None) of every view as float32 host arrays, with
    the upload, the mirror and the normalisation on ``backend.device``: what ``backend.embed(normalize(...))``
    gives for the same views, from a fraction of the host work and of the bytes moved."""
    device = backend.device
    try:
        logits, feats = run_views(backend, upload(images, device), views=views, features=features)
        logits, feats = HostCopy([logits.float(), None if feats is None else feats.float()], device).wait()
    except Exception as e:  # an asynchronous CUDA error surfaces at the copy back
        raise_gpu_failure(e, device)
        raise
    return logits, feats  # type: ignore[return-value]
