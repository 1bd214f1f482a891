"""TensorRT at run time: check that a plan built here fits this machine, then run it.

A serialized plan only runs on the GPU model and TensorRT version that built it, so ``model.plan.json``
beside it records the TensorRT version, GPU name and compute capability (and the hash of the ONNX it
came from). ``check_plan`` compares those facts with this machine before deserializing and, on a
mismatch, says which fact differs and the command that rebuilds. Building the plan is
``batchcls.builders.tensorrt``'s job.

Only ``TensorRTBackend`` touches ``tensorrt``; everything else is plain Python so the tests cover it
on machines without a GPU. Written against the TensorRT 10 Python API: I/O is addressed by tensor name
(``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchcls.backends.record import onnx_sha256
from batchcls.card import ModelCard
from batchcls.errors import ModelError
from batchcls.machine import machine_facts

INSTALL_HINT = "pip install 'batchcls[tensorrt]'"


@dataclass(frozen=True)
class GpuFacts:
    """What a plan is tied to: checked at load, recorded at build."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0" for Hopper


class PlanMismatch(ModelError):
    """The plan exists but can't run here; the message holds the rebuild command."""


def current_facts(device_index: int = 0) -> GpuFacts | None:
    """This machine's facts, or None without the tensorrt package or a CUDA GPU."""
    facts = machine_facts(device_index)
    if facts.gpu_name is None or facts.tensorrt_version is None:
        return None
    return GpuFacts(facts.tensorrt_version, facts.gpu_name, facts.compute_capability or "")


def plan_path(card: ModelCard) -> Path:
    assert card.bundle_dir is not None
    return card.bundle_dir / (Path(card.onnx).stem + ".plan")


def meta_path(card: ModelCard) -> Path:
    return plan_path(card).with_suffix(".plan.json")


def rebuild_command(card: ModelCard) -> str:
    return f"batchcls engine build --model {card.bundle_dir} --target tensorrt"


def plan_problem(meta: dict, facts: GpuFacts | None, source_sha256: str) -> str | None:
    """Why the plan described by ``meta`` can't run here, or None when it can."""
    if facts is None:
        return f"this machine has no CUDA GPU or no tensorrt package ({INSTALL_HINT})"
    built = f"{meta.get('gpu_name')} (compute {meta.get('compute_capability')})"
    here = f"{facts.gpu_name} (compute {facts.compute_capability})"
    if meta.get("tensorrt_version") != facts.tensorrt_version:
        return f"it was built with TensorRT {meta.get('tensorrt_version')}, this machine has TensorRT {facts.tensorrt_version}"
    if (meta.get("gpu_name"), meta.get("compute_capability")) != (facts.gpu_name, facts.compute_capability):
        return f"it was built for {built}, this machine has {here}"
    if meta.get("source_sha256") != source_sha256:
        return "it was built from another version of the bundle's ONNX model"
    return None


def read_meta(card: ModelCard) -> dict | None:
    path = meta_path(card)
    if not plan_path(card).is_file() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanMismatch(f"cannot read {path}: {e}: rebuild it with `{rebuild_command(card)}`") from e


def check_plan(card: ModelCard, facts: GpuFacts | None) -> dict:
    """The plan's metadata if it can run here; else PlanMismatch saying why and how to rebuild."""
    meta = read_meta(card)
    if meta is None:
        raise PlanMismatch(f"no TensorRT plan in {card.bundle_dir}: build one with `{rebuild_command(card)}`")
    problem = plan_problem(meta, facts, onnx_sha256(card))
    if problem:
        raise PlanMismatch(f"TensorRT plan {plan_path(card)} can't run here: {problem}: "
                           f"rebuild it with `{rebuild_command(card)}`")
    return meta


def chunk_size(n: int, max_batch: int, min_chunk: int = 16) -> int:
    """Rows per enqueue: at most the profile max, and at least two chunks for a big batch, so
    the second chunk's upload overlaps the first one's compute."""
    if n >= 2 * min_chunk:
        n = -(-n // 2)
    return max(1, min(n, max_batch))
class _Slot:
    """One execution context with its own stream and pinned/device buffers (double buffering)."""

    def __init__(self, engine, torch, device, in_shape, out_shape, in_dtype, out_dtype) -> None:
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(device)
        self.host_in = torch.empty(in_shape, dtype=in_dtype).pin_memory()
        self.dev_in = torch.empty(in_shape, dtype=in_dtype, device=device)
        self.dev_out = torch.empty(out_shape, dtype=out_dtype, device=device)
        self.host_out = torch.empty(out_shape, dtype=out_dtype).pin_memory()
        self.rows: tuple[int, int] | None = None  # output rows in flight on this slot


class TensorRTBackend:
    """Runs a checked plan: float32 NCHW in, logits out, copies overlapping compute."""

    name = "tensorrt"

    def __init__(self, card: ModelCard, *, device: str = "cuda") -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError:
            raise ModelError(f"--backend tensorrt needs the tensorrt package: {INSTALL_HINT}") from None
        if torch.device(device).type != "cuda":
            raise ModelError(f"--backend tensorrt runs on a CUDA GPU, not on {device!r}: use --device cuda or another backend")
        self.torch = torch
        self.device = torch.device(device)
        index = self.device.index or 0
        meta = check_plan(card, current_facts(index))
        torch.cuda.set_device(index)
        self.logger = trt.Logger(trt.Logger.WARNING)  # logger and runtime must outlive the engine
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path(card).read_bytes())
        if self.engine is None:
            raise PlanMismatch(f"TensorRT could not deserialize {plan_path(card)}: rebuild it with `{rebuild_command(card)}`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.in_shape = tuple(int(d) for d in max_shape)
        self.max_batch = self.in_shape[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.in_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
        self.out_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]
        out_shape = (self.max_batch, card.num_classes)
        self.slots = [_Slot(self.engine, torch, self.device, self.in_shape, out_shape, self.in_dtype, self.out_dtype)
                      for _ in range(2)]
        from batchcls.backends.device import DeviceNormalize

        self.normalize = DeviceNormalize(card, self.device)
        self.meta = meta

    def _enqueue(self, slot: _Slot, dev_in, dev_out, n: int, stream) -> None:
        ctx = slot.context
        ok = ctx.set_input_shape(self.input_name, (n, *self.in_shape[1:]))
        ok &= ctx.set_tensor_address(self.input_name, dev_in.data_ptr())
        ok &= ctx.set_tensor_address(self.output_name, dev_out.data_ptr())
        if not ok or not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue a batch of {n}")

    def _collect(self, slot: _Slot, out: np.ndarray) -> None:
        if slot.rows is not None:
            slot.stream.synchronize()
            a, b = slot.rows
            out[a:b] = slot.host_out[:b - a].float().numpy()
            slot.rows = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Chunks alternate between two slots: chunk k+1 uploads while chunk k computes."""
        torch = self.torch
        n = len(batch)
        out = np.empty((n, self.slots[0].dev_out.shape[1]), np.float32)
        step = chunk_size(n, self.max_batch)
        for k, a in enumerate(range(0, n, step)):
            b = min(a + step, n)
            slot = self.slots[k % 2]
            self._collect(slot, out)  # its previous chunk must be done before its buffers are reused
            m = b - a
            slot.host_in[:m].copy_(torch.from_numpy(batch[a:b]))
            with torch.cuda.stream(slot.stream):
                slot.dev_in[:m].copy_(slot.host_in[:m], non_blocking=True)
                self._enqueue(slot, slot.dev_in, slot.dev_out, m, slot.stream)
                slot.host_out[:m].copy_(slot.dev_out[:m], non_blocking=True)
            slot.rows = (a, b)
        for slot in self.slots:
            self._collect(slot, out)
        return out

    def infer_device(self, x):  # torch float NCHW already on the GPU -> logits
        torch = self.torch
        stream = torch.cuda.current_stream(self.device)
        x = x.to(self.in_dtype).contiguous()
        out = torch.empty((len(x), self.slots[0].dev_out.shape[1]), dtype=self.out_dtype, device=self.device)
        for a in range(0, len(x), self.max_batch):
            b = min(a + self.max_batch, len(x))
            self._enqueue(self.slots[0], x[a:b], out[a:b], b - a, stream)
        return out.float()

    def infer_images(self, images):  # torch uint8 NCHW on the GPU -> logits
        return self.infer_device(self.normalize(images))
