"""PyTorch: the bundle's ``model.pt2`` (a ``torch.export`` program) on the CPU or a CUDA GPU.

``train/export.py`` writes the program beside ``model.onnx`` from the same weights, with a dynamic
batch; it loads in a process without timm or ``train/`` and matches ONNX Runtime to ~1e-6. On a GPU it
runs in fp16 and channels_last, its forward captured as CUDA graphs (one per padded batch size) and replayed
per batch; on a CPU it runs plain fp32 (the benchmark's PyTorch-eager baseline). ``--backend cuda`` and ``--backend
torch`` are this one backend; they differ only in the default device.
"""
from __future__ import annotations

import contextlib
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from batchcls.backends.device import DeviceNormalize, images_to_arrays, raise_gpu_failure
from batchcls.backends.record import onnx_sha256
from batchcls.card import ModelCard
from batchcls.errors import ModelError, first_line

PROGRAM_META = "batchcls.json"  # extra file inside model.pt2: what the program was exported beside


def program_path(card: ModelCard) -> Path:
    """model.pt2 beside the card's ONNX file (same stem)."""
    return card.onnx_path.with_suffix(".pt2")


def load_program(card: ModelCard) -> torch.nn.Module:
    """The bundle's exported program as a module; refuses one exported beside another ONNX model."""
    path = program_path(card)
    if not path.is_file():
        raise ModelError(f"{path} is missing: the torch backends run the bundle's torch.export program; "
                         "re-export the bundle with train/ (python -m train.export) or use --backend onnxruntime")
    extra = {PROGRAM_META: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # torch's untyped errors for corrupt or foreign files
        raise ModelError(f"cannot load {path}: {first_line(e)}") from e
    try:
        meta = json.loads(extra[PROGRAM_META] or "{}")
    except ValueError:
        meta = {}
    if meta.get("source_onnx_sha256") != onnx_sha256(card):
        raise ModelError(f"{path} was not exported beside this {card.onnx} (another version of the model): "
                         "re-export the bundle, or use --backend onnxruntime")
    return program.module()


MAX_GRAPH_BATCH = 1024  # rows per replay; a bigger batch replays the largest graph several times


def graph_batch(n: int, max_batch: int = MAX_GRAPH_BATCH) -> int:
    """The batch size a graph is captured and replayed at for ``n`` rows: the next power of two, at most
    ``max_batch``. A run's batches (512 by default) get a graph of their own size; the one-image model check,
    a last partial batch or a watch daemon's small batches get small graphs instead of replaying one
    captured at whatever size came first."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    return min(max_batch, 1 << (n - 1).bit_length())


def graph_chunks(n: int, max_batch: int = MAX_GRAPH_BATCH) -> list[tuple[int, int, int]]:
    """(start, stop, graph size) per replay for a batch of ``n`` rows: full ``max_batch`` chunks, then the
    rest padded up to its ``graph_batch``."""
    out = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        out.append((start, stop, graph_batch(stop - start, max_batch)))
    return out


Outputs = tuple[torch.Tensor, ...]


def as_outputs(out: torch.Tensor | tuple | list) -> Outputs:
    """A program's result as a tuple of tensors: (logits,) or (logits, features)."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


class _Graph:
    """One captured forward: its static input and outputs, for one batch size; ``replay`` runs it on
    whatever ``static_in`` holds and leaves the result in ``static_out``."""

    def __init__(self, model: Callable, like: torch.Tensor, size: int, memory_format: torch.memory_format) -> None:
        self.static_in = torch.zeros((size, *like.shape[1:]), dtype=like.dtype, device=like.device) \
            .contiguous(memory_format=memory_format)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs advises
            for _ in range(3):
                model(self.static_in)
        torch.cuda.current_stream(like.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (its host-to-device copy, say) must not abort this capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = as_outputs(model(self.static_in))

    def replay(self) -> None:
        self.graph.replay()


Capture = Callable[[Callable, torch.Tensor, int, torch.memory_format], _Graph]


class GraphedForward:
    """The model's forward captured as CUDA graphs, one per padded batch size (``graph_chunks``), replayed
    per batch.

    Eager PyTorch launches a few hundred small kernels from Python per batch; a replay launches them all at
    once. A graph's input and output buffers are shared by every call at its size, so a lock makes copy-in,
    replay and copy-out one step, on this object's own stream: two threads can't read each other's logits.
    If capture fails (an op that syncs the host, say), it says so once and runs eagerly; out-of-memory or a
    CUDA error state is not a capture problem and stops the run (``GpuFailure``).

    ``capture`` makes the graphs (``_Graph`` by default); the stream handling applies to CUDA tensors only,
    so the locking and padding run on the CPU too, with a stand-in capture (tests/test_gpu_path.py).
    """

    def __init__(self, model: Callable, max_batch: int = MAX_GRAPH_BATCH,
                 memory_format: torch.memory_format = torch.contiguous_format, capture: Capture = _Graph) -> None:
        self.model = model
        self.max_batch = max_batch
        self.memory_format = memory_format
        self.capture = capture
        self.graphs: dict[tuple, _Graph] = {}  # (batch size, sample shape, dtype) -> graph
        self.failed = False
        self.lock = threading.Lock()
        self.stream: torch.cuda.Stream | None = None

    def _graph(self, x: torch.Tensor, size: int) -> _Graph | None:
        key = (size, tuple(x.shape[1:]), x.dtype)
        graph = self.graphs.get(key)
        if graph is None and not self.failed:
            try:
                graph = self.graphs[key] = self.capture(self.model, x, size, self.memory_format)
            except Exception as e:  # fall back, never fail a run over an optimisation
                raise_gpu_failure(e, x.device)
                warnings.warn(f"CUDA graph capture failed, running eagerly: {first_line(e)}", stacklevel=3)
                self.failed = True
        return graph

    @property
    def sizes(self) -> list[int]:
        """The batch sizes captured so far."""
        return sorted(k[0] for k in self.graphs)

    @contextlib.contextmanager
    def _own_stream(self, x: torch.Tensor) -> Iterator[torch.cuda.Stream | None]:
        """Run the body on this object's stream, after the caller's work on ``x`` and before the caller's next
        (yields the caller's stream); a no-op for CPU tensors."""
        if x.device.type != "cuda":
            yield None
            return
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        current = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(current)
        x.record_stream(self.stream)  # the caller may free x while this stream still reads it
        with torch.cuda.stream(self.stream):
            yield current
        current.wait_stream(self.stream)

    def _replay(self, x: torch.Tensor, part: torch.Tensor, size: int) -> Outputs:
        """``part``'s outputs through the graph of ``size`` rows (padded with zeros), or eagerly without one."""
        graph = self._graph(x, size)
        if graph is None:
            return as_outputs(self.model(part))
        n = len(part)
        graph.static_in[:n].copy_(part)
        if n < size:
            graph.static_in[n:].zero_()
        graph.replay()
        return tuple(o[:n].clone() for o in graph.static_out)  # the next call overwrites static_out

    def __call__(self, x: torch.Tensor) -> Outputs:
        with self.lock, self._own_stream(x) as current:
            parts = [self._replay(x, x[start:stop], size) for start, stop, size in graph_chunks(len(x), self.max_batch)]
        outs = parts[0] if len(parts) == 1 else tuple(torch.cat(o) for o in zip(*parts))
        if current is not None:
            for o in outs:
                o.record_stream(current)
        return outs


def output_count(module: Callable) -> int | None:
    """How many tensors an exported program returns (1: logits; 2: logits and features), read from its
    graph; None when ``module`` is no exported graph (a wrapper, say)."""
    graph = getattr(module, "graph", None)
    for node in getattr(graph, "nodes", ()):
        if node.op == "output":
            out = node.args[0]
            return len(out) if isinstance(out, (tuple, list)) else 1
    return None


class TorchBackend:
    """model.pt2: fp16 + channels_last + CUDA graphs on a GPU, plain fp32 on a CPU.

    ``infer`` takes the pipeline's float32 NCHW batch and returns logits; ``embed`` returns the logits and
    the program's second output, the ``features`` vector (None when the program has one output:
    ``has_features``); ``infer_images`` / ``embed_images`` take uint8 NCHW images already on the device and
    normalize there (the nvJPEG path never leaves the GPU); ``embed_uint8`` takes uint8 NHWC host images,
    mirrors and normalises them on the device, and returns host arrays (what ``--cpu-decode``, watch and the
    API can send instead of float32). Out-of-memory and CUDA error states raise ``GpuFailure``.

    ``decision_model`` names the model file whose open-set statistics apply: the card's ONNX file
    (``model.onnx``), because the program is exported from the same weights beside it (``load_program``
    refuses one exported beside another ONNX). On a GPU those FP32 weights run in fp16 by default.
    """

    def __init__(self, card: ModelCard, *, device: str = "cpu", fp16: bool | None = None,
                 channels_last: bool | None = None, compile: bool = False, cuda_graphs: bool | None = None,
                 threads: int | None = None) -> None:
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        if on_gpu and not torch.cuda.is_available():
            raise ModelError("the torch backend on cuda needs an NVIDIA GPU with a CUDA build of torch: "
                             "use --device cpu or --backend onnxruntime")
        if threads:
            torch.set_num_threads(threads)
        self.name = "cuda" if on_gpu else "torch"
        self.dtype = torch.float16 if (on_gpu if fp16 is None else fp16) else torch.float32
        self.memory_format = torch.channels_last if (on_gpu if channels_last is None else channels_last) \
            else torch.contiguous_format
        self.card = card
        self.decision_model = card.onnx
        program = load_program(card)
        outputs = output_count(program)
        self.has_features = outputs is None or outputs > 1  # unknown (not an exported graph): embed says
        model = program.to(self.device, self.dtype).to(memory_format=self.memory_format)
        self.model: Callable[[torch.Tensor], torch.Tensor | Outputs] = \
            torch.compile(model, mode="max-autotune-no-cudagraphs") if compile else model
        if on_gpu and (not compile if cuda_graphs is None else cuda_graphs):
            self.model = GraphedForward(self.model, memory_format=self.memory_format)
        self.normalize = DeviceNormalize(card, self.device)

    def embed_device(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float NCHW on the device -> float32 (logits, features or None) on the device."""
        try:
            with torch.inference_mode():
                x = x.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
                outs = as_outputs(self.model(x))
                return outs[0].float(), (outs[1].float() if len(outs) > 1 else None)
        except Exception as e:
            raise_gpu_failure(e, self.device)
            raise

    def infer_device(self, x: torch.Tensor) -> torch.Tensor:
        """float NCHW on the device -> float32 logits on the device."""
        return self.embed_device(x)[0]

    def _to_host(self, t: torch.Tensor) -> np.ndarray:
        try:
            return t.cpu().numpy()
        except Exception as e:  # an asynchronous CUDA error surfaces at the copy back
            raise_gpu_failure(e, self.device)
            raise

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # A plain copy: pinning a fresh host buffer per batch costs more than the pageable copy it saves.
        return self._to_host(self.infer_device(torch.from_numpy(batch)))

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        logits, features = self.embed_device(torch.from_numpy(batch))
        return self._to_host(logits), (None if features is None else self._to_host(features))

    def infer_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.infer_device(self.normalize(images))

    def embed_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embed_device(self.normalize(images))

    def embed_uint8(self, images: np.ndarray, *, views: int = 1,
                    features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 NHWC host images -> host (logits, features or None) of every view (view-major): equal to
        ``embed(normalize(images and their mirrors))``, with the upload in uint8 and the rest on the device."""
        return images_to_arrays(self, images, views=views, features=features)
