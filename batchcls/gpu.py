"""The GPU path: JPEGs decoded by nvJPEG in batches, resized and normalized on the device, inference queued
a batch ahead of row building.

The decode stage's worker processes read each batch's bytes ahead of the GPU, and decode there with
Pillow every file nvJPEG must not take (not a JPEG, EXIF-rotated, truncated), so those files get exactly
the CPU path's pixels and error reasons. ``GpuJpegLoader`` hands the rest to nvJPEG (via torchvision) and
resizes on the device with the card's arithmetic (``EvalPreset.resized_size``).

Everything here also runs with device="cpu", which is how the tests exercise it without a GPU.
"""
from __future__ import annotations

import functools
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from batchcls.card import ModelCard
from batchcls.decode import DEFAULT_MAX_PIXELS
from batchcls.decode_stage import DecodedBatch, DecodeStage, decode_one
from batchcls.infer import Classifier, mean_of_views, softmax
from batchcls.presets import EvalPreset
from batchcls.scan import InputFile

JPEG_MAGIC = b"\xff\xd8\xff"
READ_WORKERS = 4  # reading bytes keeps up with an H200 at 512-image batches; more only holds more memory
# torchvision 0.29 deprecates its decoders for TorchCodec; decode_jpeg(device="cuda") still is nvJPEG.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


# --- the decode workers' part: bytes for nvJPEG, Pillow for the rest -------------------------------

@dataclass(frozen=True)
class ReadBatch:
    """Per file exactly one of: JPEG bytes for nvJPEG, an image the CPU decoded, or an error."""

    files: list[InputFile]
    blobs: list[bytes | None]
    images: list[np.ndarray | None]  # uint8 HWC, the card's size
    errors: list[str | None]


def needs_cpu(data: bytes) -> bool:
    """Files nvJPEG must not take: not JPEG, EXIF (it ignores orientation), or not ending in the
    end-of-image marker (a truncated file could decode to grey instead of an error row)."""
    return not data.startswith(JPEG_MAGIC) or b"Exif" in data[:65536] or not data.rstrip(b"\0").endswith(b"\xff\xd9")


def _jpeg_bytes(f: InputFile) -> bytes | None:
    """The file's bytes if nvJPEG may take it; None sends it to the CPU decoder (which gives the reason)."""
    try:
        if not stat.S_ISREG(os.stat(f.path).st_mode):  # reading a FIFO would block
            return None
        with open(f.path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return None if needs_cpu(data) else data


def read_batch(files: list[InputFile], preset: EvalPreset, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReadBatch:
    """Runs in a decode worker: read each file; decode on the CPU the ones nvJPEG must not take."""
    blobs: list[bytes | None] = []
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for f in files:
        data = _jpeg_bytes(f)
        img, err = decode_one(f, preset, max_pixels) if data is None else (None, None)
        blobs.append(data)
        images.append(img)
        errors.append(err)
    return ReadBatch(files, blobs, images, errors)


def failed_read(files: list[InputFile], reason: str) -> ReadBatch:
    n = len(files)
    return ReadBatch(files, [None] * n, [None] * n, [reason] * n)


# --- on the device ---------------------------------------------------------------------------------

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
        """(height, width) before the crop: the CPU path's own arithmetic."""
        tw, th = self.preset.resized_size(w, h)
        return th, tw

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
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
            left, top, right, bottom = self.preset.crop_box(tw, th)
            x = x[:, :, top:bottom, left:right].round_().clamp_(0, 255).to(torch.uint8)
            for j, i in enumerate(idx):
                out[i] = x[j]
        return out  # type: ignore[return-value]


class GpuJpegLoader:
    """ReadBatch -> DecodedBatch whose images are uint8 NCHW on the device, one per good file.

    JPEGs are decoded together by nvJPEG; a batch that fails is retried file by file so one corrupt
    file can't take its neighbours down, and a file nvJPEG still refuses (CMYK, corrupt) or that is
    over the pixel limit goes through the CPU decoder, which gives the same reasons (``status=error``
    rows) as ``batchcls run``.
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

    def load_files(self, files: list[InputFile]) -> DecodedBatch:
        """Read and decode in this process (tests, benchmarks); the pipeline reads in the decode stage."""
        return self.load(read_batch(files, self.preset, self.max_pixels))

    def load(self, raw: ReadBatch) -> DecodedBatch:
        files, errors = raw.files, list(raw.errors)
        gpu_idx = [i for i, b in enumerate(raw.blobs) if b is not None]
        decoded = self._decode_gpu([torch.frombuffer(bytearray(raw.blobs[i]), dtype=torch.uint8)  # type: ignore[arg-type]
                                    for i in gpu_idx]) if gpu_idx else []
        on_device: dict[int, torch.Tensor] = {}
        for i, img in zip(gpu_idx, decoded):
            if img is not None and img.shape[1] * img.shape[2] <= self.max_pixels:
                on_device[i] = img
        resized = dict(zip(on_device, self.resize(list(on_device.values()))))
        images: list[torch.Tensor | None] = []
        for i, f in enumerate(files):
            img = resized.get(i)
            if img is None and errors[i] is None:
                cpu = raw.images[i]
                if cpu is None:  # nvJPEG refused it, or over the limit: the CPU decoder writes the reason
                    cpu, errors[i] = decode_one(f, self.preset, self.max_pixels)
                img = None if cpu is None else torch.tensor(cpu).permute(2, 0, 1).to(self.device)
            images.append(img)
        good = [img for img in images if img is not None]
        s = self.preset.input_size
        stack = torch.stack(good) if good else torch.empty((0, 3, s, s), dtype=torch.uint8, device=self.device)
        return DecodedBatch(files, stack, errors)  # type: ignore[arg-type]  # device tensor, see GpuClassifier


class GpuClassifier(Classifier):
    """A Classifier whose batches are device tensors: normalize and infer without leaving the GPU."""

    def launch(self, images: torch.Tensor) -> Callable[[], np.ndarray]:
        """Queue the batch on the GPU now; the returned callable waits for it and gives probabilities."""
        if len(images) == 0:
            return lambda: np.empty((0, self.card.num_classes), np.float32)
        views = 2 if self.tta == "flip" else 1
        if views == 2:
            images = torch.cat([images, images.flip(3)])  # NCHW: the mirror flips W
        try:
            logits = self.backend.infer_images(images)  # type: ignore[attr-defined]  # async: no sync here
        except Exception as e:  # raised again inside rows(), which turns it into error rows
            error = e

            def fail() -> np.ndarray:
                raise error
            return fail
        return lambda: mean_of_views(softmax(logits.cpu().numpy(), self.card.temperature), views)

    def probabilities(self, images: torch.Tensor) -> np.ndarray:  # type: ignore[override]
        return self.launch(images)()


def classify_gpu(batches: Iterable[list[InputFile]], classifier: GpuClassifier, *, loader: GpuJpegLoader,
                 workers: int = READ_WORKERS, top_k: int = 1, threshold: float | None = None,
                 probs: bool = False) -> Iterator[list[dict]]:
    """Rows for every file, batch by batch, in order, through nvJPEG.

    Three stages overlap: the decode stage reads batches k+1.. in worker processes while batch k is
    decoded and queued on the GPU, and only then are batch k-1's results collected and turned into
    rows, so the GPU never waits on Python's row building.
    """
    work = functools.partial(read_batch, preset=loader.preset, max_pixels=loader.max_pixels)
    with DecodeStage(work, failed_read, workers=workers) as stage:
        queued: tuple[DecodedBatch, Callable[[], np.ndarray]] | None = None
        for raw in stage.map(batches):
            batch = loader.load(raw)
            launched = (batch, classifier.launch(batch.images))
            if queued is not None:
                yield classifier.rows(queued[0], top_k=top_k, threshold=threshold, probs=probs, probabilities=queued[1])
            queued = launched
        if queued is not None:
            yield classifier.rows(queued[0], top_k=top_k, threshold=threshold, probs=probs, probabilities=queued[1])
