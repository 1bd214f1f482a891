"""CUDA without TensorRT: the bundle's ONNX graph run by PyTorch (fp16, channels_last), and nvJPEG.

The bundle ships only ONNX, so ``onnx_to_torch`` turns the graph into a small torch module
(one function per ONNX op, weights copied from the initializers). That keeps this backend free
of train/ and of onnxruntime-gpu, and gives the benchmark a PyTorch-eager baseline of the very
same graph. ``GpuJpegLoader`` decodes JPEGs on the GPU in batches (nvJPEG via torchvision) and
resizes there; anything nvJPEG can't take falls back to the CPU decoder, per file.

Everything here also runs with device="cpu", which is how the tests exercise it without a GPU.
"""
from __future__ import annotations

import itertools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from batchcls.card import ModelCard
from batchcls.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from batchcls.errors import ModelError
from batchcls.pipeline import Classifier, DecodedBatch, RunOptions, softmax
from batchcls.presets import EvalPreset
from batchcls.scan import InputFile

JPEG_MAGIC = b"\xff\xd8\xff"
# torchvision 0.29 deprecates its decoders for TorchCodec; decode_jpeg(device="cuda") still is nvJPEG.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


# --- ONNX graph -> torch module -------------------------------------------------------------
# Values are torch tensors (image data, on the device) or numpy arrays (weights' small constants and
# everything computed from shapes, e.g. the TorchScript exporter's "same"-padding arithmetic).
# A node whose inputs are all numpy runs in numpy on the host, so shape math never syncs the GPU.

def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else v
    return out


def _ints(v) -> list[int]:  # noqa: ANN001
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _conv(x, w, b=None, *, pads=None, strides=(1, 1), dilations=(1, 1), group=1, auto_pad=b"NOTSET", **_):
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise ModelError(f"Conv auto_pad={auto_pad!r} is not supported by the cuda backend")
    top, left, bottom, right = list(pads or [0] * 4)
    if top == bottom and left == right:  # symmetric: let cuDNN pad
        return F.conv2d(x, w, b, strides, (top, left), dilations, group)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, strides, 0, dilations, group)  # TF "same"


def _pad(x, pads, value=None, axes=None, *, mode=b"constant"):
    if mode not in (b"constant", "constant"):
        raise ModelError(f"Pad mode {mode!r} is not supported by the cuda backend")
    p = _ints(pads)
    n = len(p) // 2
    dims = _ints(axes) if axes is not None else list(range(n))
    dims = [d % x.dim() for d in dims]
    torch_pad = [0] * (2 * x.dim())
    for k, d in enumerate(dims):  # ONNX: all begins then all ends; torch: (last dim begin, end, ...)
        torch_pad[2 * (x.dim() - 1 - d)] = p[k]
        torch_pad[2 * (x.dim() - 1 - d) + 1] = p[n + k]
    fill = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0]) if not torch.is_tensor(value) else float(value)
    return F.pad(x, torch_pad, value=fill)


def _clip(x, lo=None, hi=None, *, min=None, max=None):  # noqa: A002 - ONNX attribute names
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.t() if transA else a
    b = b.t() if transB else b
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    return y if c is None else y + (c if beta == 1.0 else beta * c)


def _reduce_mean(x, axes=None, *, keepdims=1, noop_with_empty_axes=0, **attrs):
    axes = attrs.get("axes", axes)
    if axes is None or len(_ints(axes)) == 0:
        return x if noop_with_empty_axes else x.mean()
    return x.mean(dim=_ints(axes), keepdim=bool(keepdims))


def _reshape(x, shape, *, allowzero=0):
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(x, starts, ends, axes=None, steps=None):
    axes = _ints(axes) if axes is not None else list(range(len(_ints(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    index = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, _ints(starts), _ints(ends), steps):
        dim = x.shape[a]
        s, e = max(-dim, min(s, dim)), max(-dim - 1, min(e, dim))
        index[a] = slice(s, e, st)
    return x[tuple(index)]


def _unsqueeze(x, axes=None, **attrs):
    for a in sorted(_ints(attrs.get("axes", axes))):
        x = x.unsqueeze(a) if torch.is_tensor(x) else np.expand_dims(x, a)
    return x


def _squeeze(x, axes):  # noqa: ANN001, ANN202 - tensor or array; axes from the input (opset 13+) or attribute
    if axes is None:
        return x.squeeze()
    dims = tuple(_ints(axes))
    return x.squeeze(dims) if torch.is_tensor(x) else np.squeeze(x, dims)


def _np_div(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (np.trunc(a / b).astype(a.dtype)) if a.dtype.kind in "iu" and b.dtype.kind in "iu" else a / b


# Ops on device data, by ONNX op type.
OPS: dict[str, Callable[..., Any]] = {
    "Conv": _conv,
    "Clip": _clip,
    "Relu": lambda x: F.relu(x),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: torch.clamp(alpha * x + beta, 0, 1),
    "HardSwish": lambda x: F.hardswish(x),
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "MatMul": lambda a, b: a @ b,
    "Gemm": _gemm,
    "ReduceMean": _reduce_mean,
    "GlobalAveragePool": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "Reshape": _reshape,
    "Flatten": lambda x, axis=1: x.reshape(int(np.prod(x.shape[:axis])), -1),
    "Identity": lambda x: x,
    "BatchNormalization": lambda x, s, b, m, v, epsilon=1e-5, **_: F.batch_norm(x, m, v, s, b, False, 0.0, epsilon),
    "Pad": _pad,
    "Slice": _slice,
    "Transpose": lambda x, perm=None: x.permute(*(perm or reversed(range(x.dim())))),
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda x, axes=None, **a: _squeeze(x, a.get("axes", axes)),
}
# Parameters that stay host values even next to device data (shapes, axes, pads, bounds).
_HOST_INPUTS = {"Reshape": (1,), "ReduceMean": (1,), "Clip": (1, 2), "Pad": (1, 2, 3), "Slice": (1, 2, 3, 4),
                "Unsqueeze": (1,), "Squeeze": (1,)}
# The same ops on host values (shape arithmetic), plus the ones that only ever see shapes.
NP_OPS: dict[str, Callable[..., Any]] = {
    "Identity": lambda x: x,
    "Add": lambda a, b: np.asarray(a + b), "Sub": lambda a, b: np.asarray(a - b),
    "Mul": lambda a, b: np.asarray(a * b), "Div": _np_div,
    "Ceil": np.ceil, "Floor": np.floor, "Neg": np.negative,
    "Max": lambda *xs: np.maximum.reduce(xs), "Min": lambda *xs: np.minimum.reduce(xs),
    "Equal": lambda a, b: np.equal(a, b), "Where": lambda c, a, b: np.where(c, a, b),
    "Cast": lambda x, to, **_: np.asarray(x).astype(onnx.helper.tensor_dtype_to_np_dtype(to)),
    "Gather": lambda x, i, axis=0: np.take(x, np.asarray(i), axis=axis),
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda x, axes=None, **a: _squeeze(np.asarray(x), a.get("axes", axes)),
    "Concat": lambda *xs, axis: np.concatenate([np.atleast_1d(x) for x in xs], axis=axis),
    "ConstantOfShape": lambda s, value=None: np.full(_ints(s), 0 if value is None else value.reshape(-1)[0],
                                                     dtype=np.float32 if value is None else value.dtype),
    "Range": lambda s, e, d: np.arange(s, e, d),
    "Reshape": lambda x, shape, **kw: _reshape(np.asarray(x), shape, **kw),  # both work on numpy too
    "Slice": lambda x, *args: _slice(np.asarray(x), *args),
    "Transpose": lambda x, perm=None: np.transpose(x, perm),
    "Clip": lambda x, lo=None, hi=None, **_: np.clip(x, lo, hi),
}


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph node by node with torch ops; large weights are registered buffers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        known = set(OPS) | set(NP_OPS) | {"Constant", "Shape"}
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in known})
        if unknown:
            raise ModelError(f"the cuda backend cannot run ONNX ops {', '.join(unknown)}: "
                             "use --backend onnxruntime or tensorrt")
        host: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.weights: dict[str, str] = {}
        self.nodes = []
        for n in graph.node:  # fold everything that depends on constants only, once, on the host
            attrs = _attrs(n)
            if n.op_type == "Constant":
                host[n.output[0]] = attrs["value"]
            elif n.op_type in NP_OPS and n.input and all(i in host or not i for i in n.input):
                args = [host[i] if i else None for i in n.input]
                host[n.output[0]] = np.asarray(NP_OPS[n.op_type](*args, **attrs))
            else:
                self.nodes.append((n.op_type, list(n.input), list(n.output), attrs))
        used = {i for _, inputs, _, _ in self.nodes for i in inputs}
        self.host = {k: v for k, v in host.items() if k in used}
        for i, (name, arr) in enumerate(self.host.items()):
            if arr.dtype.kind == "f":  # weights and float constants live on the device with the module
                self.register_buffer(f"w{i}", torch.from_numpy(arr.copy()))
                self.weights[name] = f"w{i}"
        inits = {t.name for t in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in inits)
        self.output_name = graph.output[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {self.input_name: x}
        for op, inputs, outputs, attrs in self.nodes:
            args = [None if not n else env[n] if n in env else self.host[n] for n in inputs]
            if op == "Shape":
                out: Any = np.asarray(args[0].shape, np.int64)[attrs.get("start", 0):attrs.get("end")]
            elif op in NP_OPS and not any(torch.is_tensor(a) for a in args):
                out = np.asarray(NP_OPS[op](*args, **attrs))
            else:
                hosted = _HOST_INPUTS.get(op, ())
                ref = next(a for a in args if torch.is_tensor(a))
                args = [a if a is None or torch.is_tensor(a) or k in hosted else self._device(inputs[k], a, ref)
                        for k, a in enumerate(args)]
                out = OPS[op](*args, **attrs)
            env[outputs[0]] = out
        return env[self.output_name]

    def _device(self, name: str, value: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        if name in self.weights:
            return getattr(self, self.weights[name])
        dtype = like.dtype if np.asarray(value).dtype.kind == "f" else None
        return torch.as_tensor(np.asarray(value), device=like.device, dtype=dtype)


def onnx_to_torch(path: str | os.PathLike) -> OnnxModule:
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"cannot read ONNX model {path}: {e}") from e
    return OnnxModule(model).eval()


# --- backend ---------------------------------------------------------------------------------

class DeviceNormalize:
    """uint8 NCHW on the device -> float32 normalized: the GPU twin of presets.normalize."""

    def __init__(self, card: ModelCard, device: torch.device) -> None:
        shape = (1, 3, 1, 1)
        self.scale = (torch.tensor(card.std, device=device) * 255.0).reshape(shape)
        self.shift = (torch.tensor(card.mean, device=device) * 255.0).reshape(shape)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) / self.scale


class GraphedForward:
    """The model's forward captured once as a CUDA graph and replayed per batch.

    The ONNX interpreter launches a few hundred small kernels from Python per batch; a replay
    launches them all at once. One graph, for the first batch size seen: smaller batches are
    padded to it, larger ones split. If capture fails (an op that syncs the host, say), it
    says so once and runs eagerly.
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
            except Exception as e:  # noqa: BLE001 - fall back, never fail a run over an optimisation
                warnings.warn(f"CUDA graph capture failed, running eagerly: {type(e).__name__}: {e}")
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


class CudaBackend:
    """PyTorch on the bundle's graph: fp16 + channels_last + CUDA graphs on a GPU, plain fp32 on a CPU.

    ``infer`` takes the pipeline's float32 NCHW batch; ``infer_images`` takes uint8 NCHW
    images already on the device and normalizes there (the nvJPEG path never leaves the GPU).
    """

    name = "cuda"

    def __init__(self, card: ModelCard, *, device: str = "cuda", fp16: bool | None = None,
                 channels_last: bool | None = None, compile: bool = False, cuda_graphs: bool | None = None) -> None:
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        if on_gpu and not torch.cuda.is_available():
            raise ModelError("--backend cuda needs an NVIDIA GPU with a CUDA build of torch: use --backend onnxruntime")
        self.dtype = torch.float16 if (on_gpu if fp16 is None else fp16) else torch.float32
        self.memory_format = torch.channels_last if (on_gpu if channels_last is None else channels_last) \
            else torch.contiguous_format
        self.card = card
        model = onnx_to_torch(card.onnx_path).to(self.device, self.dtype)
        self.model = torch.compile(model, mode="max-autotune-no-cudagraphs") if compile else model
        if on_gpu and (not compile if cuda_graphs is None else cuda_graphs):
            self.model = GraphedForward(self.model)
        self.normalize = DeviceNormalize(card, self.device)
        if not on_gpu:
            self.name = "torch-eager"

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


# --- nvJPEG decode + device resize -------------------------------------------------------------

_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic"}


class DeviceResize:
    """The card's resize (squash or shorter side + centre crop) on uint8 CHW device tensors.

    Antialiased interpolation matches Pillow's filters (lanczos runs as bicubic). Images of
    equal size are resized in one call, so a batch costs a few kernels, not one per image.
    """

    def __init__(self, preset: EvalPreset, interpolation: str) -> None:
        self.preset = preset
        self.mode = _MODES[interpolation]

    def target(self, h: int, w: int) -> tuple[int, int]:
        s = self.preset.input_size
        if self.preset.resize_mode == "squash":
            return s, s
        short = int(round(s / self.preset.crop_pct))
        scale = short / min(w, h)
        return max(s, round(h * scale)), max(s, round(w * scale))

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        s = self.preset.input_size
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape[1:]), []).append(i)
        for (h, w), idx in groups.items():
            x = torch.stack([images[i] for i in idx]).float()
            th, tw = self.target(h, w)
            if (th, tw) != (h, w):
                aa = self.mode in ("bilinear", "bicubic")
                x = F.interpolate(x, size=(th, tw), mode=self.mode, antialias=aa,
                                  align_corners=False if self.mode != "nearest" else None)
            top, left = (th - s) // 2, (tw - s) // 2
            x = x[:, :, top:top + s, left:left + s].round_().clamp_(0, 255).to(torch.uint8)
            for j, i in enumerate(idx):
                out[i] = x[j]
        return out  # type: ignore[return-value]


def _needs_cpu(data: bytes) -> bool:
    """Files nvJPEG must not take: not JPEG, EXIF (it ignores orientation), or not ending in the
    end-of-image marker (a truncated file could decode to grey instead of an error row)."""
    return not data.startswith(JPEG_MAGIC) or b"Exif" in data[:65536] or not data.rstrip(b"\0").endswith(b"\xff\xd9")


class GpuJpegLoader:
    """files -> DecodedBatch whose images are uint8 NCHW on the device, one per good file.

    JPEGs are decoded together by nvJPEG; a batch that fails is retried file by file so one
    corrupt file can't take its neighbours down, and every file nvJPEG refuses (non-JPEG,
    EXIF-rotated, CMYK, corrupt) goes through the CPU decoder, which gives the same reasons
    (``status=error`` rows) as ``batchcls run``.
    """

    def __init__(self, card: ModelCard, *, device: str = "cuda", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.device = torch.device(device)
        self.preset = EvalPreset.from_card(card)
        self.resize = DeviceResize(self.preset, card.interpolation)
        self.max_pixels = max_pixels

    def _decode_gpu(self, blobs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for b in blobs:
                try:
                    out.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _decode_cpu(self, f: InputFile) -> tuple[torch.Tensor | None, str | None]:
        try:
            img = self.preset(decode_image(f.path, min_side=self.preset.min_decode_side, max_pixels=self.max_pixels))
            return torch.tensor(img).permute(2, 0, 1).to(self.device), None
        except DecodeError as e:
            return None, str(e)
        except Exception as e:  # same contract as pipeline.load_images: one odd file never sinks the batch
            return None, f"unexpected decode failure: {type(e).__name__}: {e}"

    def load(self, files: list[InputFile], blobs: list[bytes | None]) -> DecodedBatch:
        """``blobs`` are the files' bytes (None when unreadable), read ahead by the caller."""
        gpu_idx = [i for i, b in enumerate(blobs) if b is not None and not _needs_cpu(b)]
        decoded = self._decode_gpu([torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu_idx]) \
            if gpu_idx else []
        images: list[torch.Tensor | None] = [None] * len(files)
        big = []
        for i, img in zip(gpu_idx, decoded):
            if img is not None and img.shape[1] * img.shape[2] > self.max_pixels:
                big.append(i)  # let the CPU path write the bomb-guard reason
            elif img is not None:
                images[i] = img
        resized = self.resize([img for img in images if img is not None])
        it = iter(resized)
        images = [next(it) if img is not None else None for img in images]
        errors: list[str | None] = [None] * len(files)
        for i, f in enumerate(files):
            if images[i] is None:
                images[i], errors[i] = self._decode_cpu(f)
        good = [img for img in images if img is not None]
        s = self.preset.input_size
        stack = torch.stack(good) if good else torch.empty((0, 3, s, s), dtype=torch.uint8, device=self.device)
        return DecodedBatch(files, stack, errors)  # type: ignore[arg-type]  # device tensor, see GpuClassifier


def _read(f: InputFile) -> bytes | None:
    try:
        with open(f.path, "rb") as fh:
            return fh.read()
    except OSError:
        return None  # the CPU decoder then writes the precise reason


class GpuClassifier(Classifier):
    """A Classifier whose batches are device tensors: normalize and infer without leaving the GPU."""

    def launch(self, images) -> Callable[[], np.ndarray]:  # noqa: ANN001 - torch uint8 NCHW on the device
        """Queue the batch on the GPU now; the returned callable waits for it and gives probabilities."""
        if len(images) == 0:
            return lambda: np.empty((0, self.card.num_classes), np.float32)
        try:
            logits = self.backend.infer_images(images)  # type: ignore[attr-defined]  # async: no sync here
        except Exception as e:  # noqa: BLE001 - raised again inside rows(), which turns it into error rows
            error = e

            def fail() -> np.ndarray:
                raise error
            return fail
        return lambda: softmax(logits.cpu().numpy(), self.card.temperature)

    def probabilities(self, images) -> np.ndarray:  # noqa: ANN001
        return self.launch(images)()


def classify_gpu(files: Iterable[InputFile], classifier: GpuClassifier, options: RunOptions, *,
                 loader: GpuJpegLoader, readers: int = 4) -> Iterator[list[dict]]:
    """``pipeline.classify`` with nvJPEG decoding: rows for every file, batch by batch, in order.

    Three batches are in flight: file bytes for batch k+1 are read by a thread pool while batch k
    is decoded and queued on the GPU, and only then are batch k-1's results collected and turned
    into rows, so the GPU never waits on Python's row building.
    """
    it = iter(files)
    size = options.batch(gpu=True)
    with ThreadPoolExecutor(max_workers=readers) as pool:
        def read_ahead():  # noqa: ANN202
            chunk = list(itertools.islice(it, size))
            return (chunk, pool.map(_read, chunk)) if chunk else None

        ahead, queued = read_ahead(), None
        while ahead is not None:
            chunk, blobs = ahead
            ahead = read_ahead()
            batch = loader.load(chunk, list(blobs))
            launched = (batch, classifier.launch(batch.images))
            if queued is not None:
                yield _rows(queued, classifier, options)
            queued = launched
        if queued is not None:
            yield _rows(queued, classifier, options)


def _rows(queued, classifier: GpuClassifier, options: RunOptions) -> list[dict]:
    batch, collect = queued
    return classifier.rows(batch, top_k=options.top_k, threshold=options.threshold, probabilities=collect)
