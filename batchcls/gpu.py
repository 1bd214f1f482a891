"""The GPU path: JPEGs decoded by nvJPEG in batches, resized, mirrored and normalized on the device,
inference and its copy back queued a batch ahead of row building.

The decode stage's worker processes read each batch's bytes ahead of the GPU (``gpu_read``, no torch
there), and decode there with Pillow every file nvJPEG must not take (not a JPEG, EXIF-rotated, truncated,
CMYK, or failing the CPU path's header and size guards), so those files get exactly the CPU path's pixels
and error reasons. ``GpuJpegLoader`` hands the rest to nvJPEG (via torchvision) and resizes on the device
with the card's arithmetic (``EvalPreset.resized_size``). Out-of-memory and CUDA error states stop the run
(``GpuFailure``) instead of becoming error rows.

Everything here also runs with device="cpu", which is how the tests exercise it without a GPU.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from batchcls.backends.device import HostCopy, device_broken, gpu_failure, raise_gpu_failure, run_views
from batchcls.card import ModelCard
from batchcls.decode import DEFAULT_MAX_PIXELS
from batchcls.decode_stage import DecodedBatch, DecodeStage, decode_one
from batchcls.errors import GpuFailure, ModelError
from batchcls.gpu_read import ReadBatch, failed_read, read_batch
from batchcls.infer import Classifier, Outputs, mean_of_views, softmax
from batchcls.presets import EvalPreset
from batchcls.scan import InputFile

READ_WORKERS = 4  # reading bytes keeps up with an H200 at 512-image batches; more only holds more memory
# torchvision 0.29 deprecates its decoders for TorchCodec (its replacement for decode_jpeg on the GPU);
# decode_jpeg(device="cuda") is still nvJPEG there and the train/tensorrt extras pin that torchvision.
# A torchvision without it is refused when the loader starts (GpuJpegLoader), never mid-run.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


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

    JPEGs are decoded together by nvJPEG; a batch that fails is split in halves and each half retried
    (``decode_halving``), so one corrupt file costs a few extra batch calls, not a decode per file; a file
    nvJPEG still refuses (corrupt, unsupported) goes through the CPU decoder, which gives the same reasons
    (``status=error`` rows) as ``batchcls run``. Files over ``max_pixels`` never reach the GPU: the
    decode workers checked their headers first (``gpu_read.nvjpeg_may_take``).
    """

    def __init__(self, card: ModelCard, *, device: str = "cuda", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError as e:
            raise ModelError(f"the nvJPEG path needs torchvision's decode_jpeg ({e}): install the torchvision "
                             "pinned by batchcls[tensorrt], or run with --cpu-decode") from None
        self._decode_jpeg = functools.partial(decode_jpeg, mode=ImageReadMode.RGB)
        self.device = torch.device(device)
        self.preset = EvalPreset.from_card(card)
        self.resize = DeviceResize(self.preset, card.interpolation)
        self.max_pixels = max_pixels
        self.decode_calls = 0  # batch calls into the decoder, for tests and profiles

    def _decode(self, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.decode_calls += 1
        return list(self._decode_jpeg(blobs, device=self.device))

    def decode_blobs(self, blobs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return decode_halving(blobs, self._decode, self.device)

    def load_files(self, files: list[InputFile]) -> DecodedBatch:
        """Read and decode in this process (tests, benchmarks); the pipeline reads in the decode stage."""
        return self.load(read_batch(files, self.preset, self.max_pixels))

    def load(self, raw: ReadBatch) -> DecodedBatch:
        try:
            return self._load(raw)
        except Exception as e:
            raise_gpu_failure(e, self.device)
            raise

    def _load(self, raw: ReadBatch) -> DecodedBatch:
        files, errors = raw.files, list(raw.errors)
        gpu_idx = [i for i, b in enumerate(raw.blobs) if b is not None]
        decoded = self.decode_blobs([torch.frombuffer(bytearray(raw.blobs[i]), dtype=torch.uint8)  # type: ignore[arg-type]
                                    for i in gpu_idx]) if gpu_idx else []
        on_device = {i: img for i, img in zip(gpu_idx, decoded) if img is not None}
        resized = dict(zip(on_device, self.resize(list(on_device.values()))))
        images: list[torch.Tensor | None] = []
        for i, f in enumerate(files):
            img = resized.get(i)
            if img is None and errors[i] is None:
                cpu = raw.images[i]
                if cpu is None:  # nvJPEG refused it: the CPU decoder writes the reason
                    cpu, errors[i] = decode_one(f, self.preset, self.max_pixels)
                img = None if cpu is None else torch.tensor(cpu).permute(2, 0, 1).to(self.device)
            images.append(img)
        good = [img for img in images if img is not None]
        s = self.preset.input_size
        stack = torch.stack(good) if good else torch.empty((0, 3, s, s), dtype=torch.uint8, device=self.device)
        return DecodedBatch(files, stack, errors)  # type: ignore[arg-type]  # device tensor, see GpuClassifier


def decode_halving(blobs: list, decode: Callable[[list], list], device: torch.device) -> list:
    """``decode(blobs)`` as one batch; when it raises, each half again, down to single files (None when a
    file alone fails). k bad files among n cost about 2·k·log2(n) batch calls instead of n single ones.

    Out-of-memory and CUDA error states are not a bad file: they raise ``GpuFailure``.
    """
    try:
        return decode(blobs)
    except Exception as e:  # nvJPEG's errors for a bad file are untyped RuntimeErrors
        failure = gpu_failure(e, device) or device_broken(device)
        if failure is not None:
            raise failure from e
    if len(blobs) == 1:
        return [None]
    half = len(blobs) // 2
    return decode_halving(blobs[:half], decode, device) + decode_halving(blobs[half:], decode, device)


class GpuClassifier(Classifier):
    """A Classifier whose batches are device tensors: mirror, normalize and infer without leaving the GPU."""

    def launch(self, images: torch.Tensor, *, features: bool | None = None) -> Callable[[], Outputs]:
        """Queue the batch on the GPU now, and its copy back behind it; the returned callable waits for that
        copy alone (not for batches launched after it) and gives the batch's Outputs.

        ``features``: also the features output, which the open-set decision and ``--embeddings`` read
        (``Classifier.wants_features``); None asks for them when this classifier's decision reads them.
        A failure of this batch alone is raised again by the callable (``rows`` makes error rows of it);
        out-of-memory or a CUDA error state raises ``GpuFailure`` at once or from the callable.
        """
        if len(images) == 0:
            return lambda: self.outputs(np.empty((0, 1, 1, 3), np.uint8))
        device = images.device
        views = 2 if self.tta == "flip" else 1
        want = self.wants_features(True) if features is None else features
        try:
            logits, feats = run_views(self.backend, images, views=views, features=want)  # queued: no sync here
            copy = HostCopy([logits.float(), None if feats is None else feats.float()], device)
        except Exception as e:
            raise_gpu_failure(e, device)
            error = e

            def fail() -> Outputs:
                raise error
            return fail

        def collect() -> Outputs:
            try:
                z, f = copy.wait()
            except Exception as e:  # an asynchronous CUDA error surfaces at the copy back
                raise_gpu_failure(e, device)
                raise
            return Outputs(mean_of_views(softmax(z, self.card.temperature), views), mean_of_views(z, views),
                           None if f is None else mean_of_views(f, views))
        return collect

    def probabilities(self, images: torch.Tensor) -> np.ndarray:  # type: ignore[override]
        return self.launch(images)().probs


def _rows(classifier: GpuClassifier, batch: DecodedBatch, collect: Callable[[], Outputs], **kw) -> list[dict]:
    """Rows of a launched batch; a GpuFailure leaves here instead of becoming the batch's error rows."""
    try:
        outputs = collect()
    except GpuFailure:
        raise
    except Exception as e:  # this batch's own failure: rows() writes it into the batch's rows
        error = e

        def fail() -> Outputs:
            raise error
        return classifier.rows(batch, probabilities=fail, **kw)
    return classifier.rows(batch, probabilities=lambda: outputs, **kw)


def classify_gpu(batches: Iterable[list[InputFile]], classifier: GpuClassifier, *, loader: GpuJpegLoader,
                 workers: int = READ_WORKERS, row_args: dict | None = None) -> Iterator[list[dict]]:
    """Rows for every file, batch by batch, in order, through nvJPEG.

    Three stages overlap: the decode stage reads batches k+1.. in worker processes while batch k is
    decoded and queued on the GPU (its copy back queued behind it), and only then are batch k-1's results
    collected and turned into rows, so the GPU runs batch k while Python builds batch k-1's rows. A
    ``GpuFailure`` ends the iteration with the rows of earlier batches already yielded. ``row_args`` are
    ``Classifier.rows``'s options (``RunOptions.row_args``); they also say whether features are needed.
    """
    work = functools.partial(read_batch, preset=loader.preset, max_pixels=loader.max_pixels)
    kw = row_args or {}
    features = classifier.wants_features(kw.get("open_set", True), kw.get("embeddings", False))
    with DecodeStage(work, failed_read, workers=workers) as stage:
        queued: tuple[DecodedBatch, Callable[[], Outputs]] | None = None
        for raw in stage.map(batches):
            try:
                batch = loader.load(raw)
                launched = (batch, classifier.launch(batch.images, features=features))
            except GpuFailure:
                if queued is not None:  # the batch before it is done: its rows are kept, then the run stops
                    yield _rows(classifier, *queued, **kw)
                raise
            if queued is not None:
                yield _rows(classifier, *queued, **kw)
            queued = launched
        if queued is not None:
            yield _rows(classifier, *queued, **kw)
