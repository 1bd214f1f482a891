"""TensorRT at run time: check that a plan built here fits this machine, then run it.

A serialized plan only runs on the GPU model and TensorRT version that built it, so ``model.plan.json``
beside it records the TensorRT version, GPU name and compute capability (and the hash of the ONNX it
came from). ``check_plan`` compares those facts with this machine before deserializing and, on a
mismatch, says which fact differs and the command that rebuilds. Building the plan is
``batchcls.builders.tensorrt``'s job.

Only ``TensorRTBackend`` touches ``tensorrt``; everything else is plain Python so the tests cover it
on machines without a GPU, and so do the rules TensorRT sets for what it is handed (a tested major version,
256-byte aligned addresses, never a default stream: ``check_tensorrt_version``, ``binding``,
``stream_handle``). Written against the TensorRT 10 Python API: I/O is addressed by tensor name
(``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``); outputs are bound by name
(``logits``, and ``features`` where the model has it).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchcls.backends.record import onnx_sha256
from batchcls.card import ModelCard
from batchcls.errors import GpuFailure, ModelError
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


def plan_precision(meta: dict) -> str:
    """'fp16' or 'fp32': the precision a plan was built in, as its metadata records it."""
    return "fp16" if meta.get("fp16") else "fp32"


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


# --- the rules TensorRT sets for what it is handed: checked here, in plain Python --------------------

TESTED_TENSORRT_MAJOR = 10  # the API written against and tested (pyproject's tensorrt extra pins it)
TRT_ALIGNMENT = 256  # bytes: TensorRT's required alignment of every I/O tensor address
_DEFAULT_STREAMS = (0, 1, 2)  # legacy default, cudaStreamLegacy, cudaStreamPerThread


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT major this code was not tested with: TensorRT 11 removed the weak-typing
    builder flags (FP16 among them), so an untested major could build or run something else than asked."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise ModelError(f"cannot read the TensorRT version {version!r}: {INSTALL_HINT}") from None
    if major != TESTED_TENSORRT_MAJOR:
        raise ModelError(f"TensorRT {version} is installed, batchcls is tested with TensorRT {TESTED_TENSORRT_MAJOR}.x: "
                         f"{INSTALL_HINT} (it pins tensorrt>={TESTED_TENSORRT_MAJOR},<{TESTED_TENSORRT_MAJOR + 1})")


def aligned(address: int) -> bool:
    return address % TRT_ALIGNMENT == 0


def binding(view, staging):
    """The tensor whose address TensorRT gets for ``view``'s rows: ``view`` itself when it is contiguous and
    its address 256-byte aligned, else the first rows of ``staging`` (a buffer of its own, which the
    allocator aligns), through which the caller copies. A slice of a batch starts at rows x row bytes,
    which for some batch sizes and class counts is not a multiple of 256."""
    if view.is_contiguous() and aligned(view.data_ptr()):
        return view
    if not aligned(staging.data_ptr()):
        raise ModelError(f"a TensorRT staging buffer is not {TRT_ALIGNMENT}-byte aligned")
    return staging[:len(view)]


def stream_handle(stream) -> int:
    """The CUDA stream to enqueue on, never a default stream: TensorRT synchronises the whole device
    around an enqueue there. Backends enqueue on streams they created."""
    handle = int(stream.cuda_stream)
    if handle in _DEFAULT_STREAMS:
        raise ValueError("TensorRT must not enqueue on a default CUDA stream: use a stream of the backend's own")
    return handle


def output_names(names: list[str]) -> tuple[str, str | None]:
    """(logits, features or None) among a plan's outputs, bound by name: 'logits' and 'features' as
    train/export names them; a plan from a one-output model has its only output as logits."""
    if not names:
        raise ModelError("the TensorRT plan has no output")
    logits = "logits" if "logits" in names else names[0]
    features = "features" if "features" in names and logits != "features" else None
    return logits, features


class _Slot:
    """One execution context with its own stream and pinned/device buffers (double buffering)."""

    def __init__(self, engine, torch, device, in_shape, out_shapes: dict, in_dtype, out_dtypes: dict) -> None:
        self.context = engine.create_execution_context()
        if self.context is None:  # TensorRT returns None, not an exception, when it can't allocate one
            raise GpuFailure(f"TensorRT could not create an execution context on {device} (out of GPU memory?): "
                             "free the GPU or rebuild the plan with a smaller --max-batch")
        self.stream = torch.cuda.Stream(device)
        self.host_in = torch.empty(in_shape, dtype=in_dtype).pin_memory()
        self.dev_in = torch.empty(in_shape, dtype=in_dtype, device=device)
        self.dev_out = {k: torch.empty(v, dtype=out_dtypes[k], device=device) for k, v in out_shapes.items()}
        self.host_out = {k: torch.empty(v, dtype=out_dtypes[k]).pin_memory() for k, v in out_shapes.items()}
        self.rows: tuple[int, int] | None = None  # output rows in flight on this slot


class TensorRTBackend:
    """Runs a checked plan: float32 NCHW in, logits (and features) out, copies overlapping compute.

    Every enqueue is on one of the backend's own streams, with 256-byte aligned addresses (``binding``).
    Calls are serialised by a lock: the two slots' contexts and buffers belong to one call at a time, and
    the call's own chunks already keep the GPU busy. ``infer_images`` / ``embed_images`` take uint8 NCHW
    images on the device; ``embed_uint8`` takes uint8 NHWC host images and mirrors and normalises them on
    the device. ``has_features``: the plan has a ``features`` output.

    ``decision_model`` names the model file whose open-set statistics apply: the plan file itself
    (``model.plan``), not the ONNX it was built from, because a plan computes other activations than that
    ONNX. Its bytes (and so its sha256) are those of one precision, GPU and TensorRT version; ``precision``
    says which precision (``plan_precision``).
    """

    name = "tensorrt"

    def __init__(self, card: ModelCard, *, device: str = "cuda") -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError:
            raise ModelError(f"--backend tensorrt needs the tensorrt package: {INSTALL_HINT}") from None
        if torch.device(device).type != "cuda":
            raise ModelError(f"--backend tensorrt runs on a CUDA GPU, not on {device!r}: use --device cuda or another backend")
        check_tensorrt_version(trt.__version__)
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
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_name, self.features_name = output_names(self.outputs)
        self.has_features = self.features_name is not None
        self.decision_model = plan_path(card).name
        self.precision = plan_precision(meta)
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.in_shape = tuple(int(d) for d in max_shape)
        self.max_batch = self.in_shape[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.in_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
        out_dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in self.outputs}
        self.out_dtype = out_dtypes[self.output_name]
        out_shapes = {}
        for n in self.outputs:  # the plan's own widths: TensorRT writes that many values per row, whatever the card says
            width = int(self.engine.get_tensor_shape(n)[-1])
            if width < 1 and n == self.output_name:
                width = card.num_classes
            if width < 1:
                raise PlanMismatch(f"the plan's output {n!r} has no fixed width: rebuild it with `{rebuild_command(card)}`")
            out_shapes[n] = (self.max_batch, width)
        self.out_shapes = out_shapes
        self.slots = [_Slot(self.engine, torch, self.device, self.in_shape, out_shapes, self.in_dtype, out_dtypes)
                      for _ in range(2)]
        from batchcls.backends.device import DeviceNormalize

        self.normalize = DeviceNormalize(card, self.device)
        self.meta = meta
        self.lock = threading.Lock()

    def _enqueue(self, slot: _Slot, dev_in, dev_out: dict, n: int) -> None:
        """One chunk of ``n`` rows on ``slot``'s stream; inputs/outputs are aligned (see ``binding``)."""
        ctx = slot.context
        ok = ctx.set_input_shape(self.input_name, (n, *self.in_shape[1:]))
        ok &= ctx.set_tensor_address(self.input_name, dev_in.data_ptr())
        for name, t in dev_out.items():
            ok &= ctx.set_tensor_address(name, t.data_ptr())
        if not ok or not ctx.execute_async_v3(stream_handle(slot.stream)):
            raise RuntimeError(f"TensorRT failed to enqueue a batch of {n}")

    def _failed(self, e: Exception) -> None:
        """Out of memory or a broken device stop the run; anything else is this batch's error."""
        from batchcls.backends.device import device_broken, raise_gpu_failure

        raise_gpu_failure(e, self.device)
        broken = device_broken(self.device)
        if broken is not None:
            raise broken from e

    def _collect(self, slot: _Slot, out: dict[str, np.ndarray]) -> None:
        if slot.rows is not None:
            slot.stream.synchronize()
            a, b = slot.rows
            for name, arr in out.items():
                arr[a:b] = slot.host_out[name][:b - a].float().numpy()
            slot.rows = None

    def _run_host(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Chunks alternate between two slots: chunk k+1 uploads while chunk k computes."""
        torch = self.torch
        n = len(batch)
        out = {k: np.empty((n, self.out_shapes[k][1]), np.float32) for k in names}
        step = chunk_size(n, self.max_batch)
        for k, a in enumerate(range(0, n, step)):
            b = min(a + step, n)
            slot = self.slots[k % 2]
            self._collect(slot, out)  # its previous chunk must be done before its buffers are reused
            m = b - a
            slot.host_in[:m].copy_(torch.from_numpy(batch[a:b]))
            with torch.cuda.stream(slot.stream):
                slot.dev_in[:m].copy_(slot.host_in[:m], non_blocking=True)
                self._enqueue(slot, slot.dev_in, slot.dev_out, m)
                for name in names:
                    slot.host_out[name][:m].copy_(slot.dev_out[name][:m], non_blocking=True)
            slot.rows = (a, b)
        for slot in self.slots:
            self._collect(slot, out)
        return out

    def _host(self, batch: np.ndarray, features: bool) -> dict[str, np.ndarray]:
        names = [self.output_name] + ([self.features_name] if features and self.features_name else [])
        with self.lock:
            try:
                return self._run_host(batch, names)
            except Exception as e:
                for slot in self.slots:
                    slot.rows = None
                self._failed(e)
                raise

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._host(batch, features=False)[self.output_name]

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._host(batch, features=True)
        return out[self.output_name], out.get(self.features_name) if self.features_name else None

    def embed_device(self, x):  # torch float NCHW already on the GPU -> (logits, features or None) on the GPU
        with self.lock:
            try:
                return self._run_device(x)
            except Exception as e:
                self._failed(e)
                raise

    def _run_device(self, x):
        torch = self.torch
        slot = self.slots[0]
        current = torch.cuda.current_stream(self.device)
        x = x.to(self.in_dtype).contiguous()
        n = len(x)
        outs = {k: torch.empty((n, shape[1]), dtype=slot.dev_out[k].dtype, device=self.device)
                for k, shape in self.out_shapes.items()}
        slot.stream.wait_stream(current)  # x and the outputs were made on the caller's stream
        with torch.cuda.stream(slot.stream):
            for a in range(0, n, self.max_batch):
                b = min(a + self.max_batch, n)
                dev_in = binding(x[a:b], slot.dev_in)
                if dev_in.data_ptr() != x[a:b].data_ptr():
                    dev_in.copy_(x[a:b])
                views = {k: o[a:b] for k, o in outs.items()}
                bound = {k: binding(v, slot.dev_out[k]) for k, v in views.items()}
                self._enqueue(slot, dev_in, bound, b - a)
                for k, t in bound.items():
                    if t.data_ptr() != views[k].data_ptr():
                        views[k].copy_(t)
        current.wait_stream(slot.stream)
        x.record_stream(slot.stream)
        logits = outs[self.output_name].float()
        features = outs[self.features_name].float() if self.features_name else None
        return logits, features

    def infer_device(self, x):  # torch float NCHW already on the GPU -> logits
        return self.embed_device(x)[0]

    def infer_images(self, images):  # torch uint8 NCHW on the GPU -> logits
        return self.infer_device(self.normalize(images))

    def embed_images(self, images):
        return self.embed_device(self.normalize(images))

    def embed_uint8(self, images: np.ndarray, *, views: int = 1,
                    features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 NHWC host images -> host (logits, features or None) of every view, view-major (see
        ``backends.device.images_to_arrays``)."""
        from batchcls.backends.device import images_to_arrays

        return images_to_arrays(self, images, views=views, features=features)
