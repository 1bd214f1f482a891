"""PyTorch: the bundle's ``model.pt2`` (a ``torch.export`` program) on the CPU or a CUDA GPU.

``train/export.py`` writes the program beside ``model.onnx`` from the same weights, with a dynamic
batch; it loads in a process without timm or ``train/`` and matches ONNX Runtime to ~1e-6. On a GPU it
runs in fp16 and channels_last, its forward captured once as a CUDA graph and replayed per batch; on a
CPU it runs plain fp32 (the benchmark's PyTorch-eager baseline). ``--backend cuda`` and ``--backend
torch`` are this one backend; they differ only in the default device.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from batchcls.backends.device import DeviceNormalize
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


class GraphedForward:
    """The model's forward captured once as a CUDA graph and replayed per batch.

    Eager PyTorch launches a few hundred small kernels from Python per batch; a replay launches them
    all at once. One graph, for the first batch size seen: smaller batches are padded to it, larger
    ones split. If capture fails (an op that syncs the host, say), it says so once and runs eagerly.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    def _capture(self, like: torch.Tensor) -> None:
        self.static_in = torch.zeros_like(like)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs advises
            for _ in range(3):
                self.model(self.static_in)
        torch.cuda.current_stream(like.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self.model(self.static_in)
        self.graph = graph

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed or (self.graph is not None and x.shape[1:] != self.static_in.shape[1:]):
            return self.model(x)
        if self.graph is None:
            try:
                self._capture(x)
            except Exception as e:  # fall back, never fail a run over an optimisation
                warnings.warn(f"CUDA graph capture failed, running eagerly: {first_line(e)}", stacklevel=2)
                self.failed = True
                return self.model(x)
        size = self.static_in.shape[0]
        outs = []
        for start in range(0, x.shape[0], size):
            part = x[start:start + size]
            n = part.shape[0]
            self.static_in[:n].copy_(part)
            if n < size:
                self.static_in[n:].zero_()
            self.graph.replay()
            outs.append(self.static_out[:n].clone())
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class TorchBackend:
    """model.pt2: fp16 + channels_last + CUDA graphs on a GPU, plain fp32 on a CPU.

    ``infer`` takes the pipeline's float32 NCHW batch; ``infer_images`` takes uint8 NCHW images already
    on the device and normalizes there (the nvJPEG path never leaves the GPU).
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
        model = load_program(card).to(self.device, self.dtype).to(memory_format=self.memory_format)
        self.model = torch.compile(model, mode="max-autotune-no-cudagraphs") if compile else model
        if on_gpu and (not compile if cuda_graphs is None else cuda_graphs):
            self.model = GraphedForward(self.model)
        self.normalize = DeviceNormalize(card, self.device)

    def infer_device(self, x: torch.Tensor) -> torch.Tensor:
        """float NCHW on the device -> float32 logits on the device."""
        with torch.inference_mode():
            x = x.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
            return self.model(x).float()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # A plain copy: pinning a fresh host buffer per batch costs more than the pageable copy it saves.
        return self.infer_device(torch.from_numpy(batch)).cpu().numpy()

    def infer_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.infer_device(self.normalize(images))
