"""The one data path: scan -> decode -> preprocess -> infer -> write.

``batchcls run``, the watch daemon and the Ray job all call these functions; none re-implements
a stage. Decoding runs in worker processes, a bounded window of batches ahead of inference, so
memory stays flat in the number of files and the CPU decodes while the model runs.
"""
from __future__ import annotations

import itertools
import multiprocessing
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from batchcls.backends import Backend, default_threads
from batchcls.card import ModelCard
from batchcls.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from batchcls.presets import EvalPreset, normalize
from batchcls.scan import InputFile

UNKNOWN_LABEL = "unknown"


@dataclass(frozen=True)
class DecodedBatch:
    files: list[InputFile]
    images: np.ndarray  # uint8 NHWC, one image per file whose error is None, in order
    errors: list[str | None]


def load_images(files: list[InputFile], preset: EvalPreset,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedBatch:
    """Decode + resize a batch; a file that fails gets its reason instead of an image."""
    images, errors = [], []
    for f in files:
        try:
            images.append(preset(decode_image(f.path, min_side=preset.min_decode_side, max_pixels=max_pixels)))
            errors.append(None)
        except DecodeError as e:
            errors.append(str(e))
        except Exception as e:  # never let one odd file take the batch down
            errors.append(f"unexpected decode failure: {type(e).__name__}: {e}")
    s = preset.input_size
    stack = np.stack(images) if images else np.empty((0, s, s, 3), np.uint8)
    return DecodedBatch(files, stack, errors)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Classifier:
    """A card and a backend: uint8 images in, calibrated probabilities and result rows out."""

    def __init__(self, card: ModelCard, backend: Backend) -> None:
        self.card = card
        self.backend = backend
        self.preset = EvalPreset.from_card(card)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.empty((0, self.card.num_classes), np.float32)
        logits = self.backend.infer(normalize(images, self.card.mean, self.card.std))
        return softmax(logits, self.card.temperature)

    def rows(self, batch: DecodedBatch, *, top_k: int = 1, threshold: float | None = None,
             probabilities: Callable[[], np.ndarray] | None = None) -> list[dict]:
        """One row per file of ``batch``; ``probabilities`` collects work already launched (GPU path)."""
        try:
            probs = probabilities() if probabilities is not None else self.probabilities(batch.images)
            infer_error = None
        except Exception as e:  # an inference failure becomes error rows, not a crash
            probs, infer_error = None, f"inference failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows, i = [], 0
        for f, err in zip(batch.files, batch.errors):
            row: dict = {"path": f.rel, "label": "", "confidence": None, "status": "error", "error": err or ""}
            if err is None:
                if probs is None:
                    row["error"] = infer_error
                else:
                    p = probs[i]
                    order = np.argsort(-p, kind="stable")[:max(top_k, 1)]
                    top = float(p[order[0]])
                    label = self.card.classes[order[0]]
                    row.update(label=UNKNOWN_LABEL if threshold is not None and top < threshold else label,
                               confidence=top, status="ok")
                    for k, j in enumerate(order[1:], start=2):
                        row[f"label_{k}"], row[f"confidence_{k}"] = self.card.classes[j], float(p[j])
                i += 1
            rows.append(row)
        return rows


def _batched(files: Iterable[InputFile], size: int) -> Iterator[list[InputFile]]:
    it = iter(files)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def decode_pool(workers: int, initializer: Callable[[], None] | None = None) -> ProcessPoolExecutor:
    """Decode worker processes, started by a forkserver: a fork of this process could copy a lock
    held by one of ONNX Runtime's threads."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer)


def decoded_batches(files: Iterable[InputFile], preset: EvalPreset, *, batch_size: int,
                    workers: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[DecodedBatch]:
    """Decoded batches in input order; with workers > 0 they are decoded ahead in processes.

    A run that fits in one batch never starts the pool: a single image classifies in well
    under a second from a cold start.
    """
    batches = _batched(files, batch_size)
    first = next(batches, None)
    if first is None:
        return
    if workers <= 0 or len(first) < batch_size:
        yield load_images(first, preset, max_pixels)
        for b in batches:
            yield load_images(b, preset, max_pixels)
        return
    window: deque[Future] = deque()
    with decode_pool(workers) as pool:
        try:
            for b in itertools.chain([first], batches):
                window.append(pool.submit(load_images, b, preset, max_pixels))
                if len(window) > workers + 1:  # bounded look-ahead keeps memory flat
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for fut in window:
                fut.cancel()


@dataclass
class RunSummary:
    files: int = 0
    errors: int = 0
    seconds: float = 0.0
    skipped: int = 0  # already in the output of a resumed run
    labels: dict[str, int] = field(default_factory=dict)

    def add(self, rows: list[dict]) -> None:
        self.files += len(rows)
        for r in rows:
            if r["status"] == "ok":
                self.labels[r["label"]] = self.labels.get(r["label"], 0) + 1
            else:
                self.errors += 1

    @property
    def images_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0


CPU_BATCH = 64  # ONNX Runtime on a few cores: bigger batches gain nothing, and cost memory
GPU_BATCH = 512  # H200, nvJPEG end to end: 5.6k img/s at 256, 6.1k at 512, 6.4k at 1024


@dataclass(frozen=True)
class RunOptions:
    batch_size: int | None = None  # None: CPU_BATCH, or GPU_BATCH on a GPU backend (see batch())
    workers: int | None = None  # None: one per core
    top_k: int = 1
    threshold: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    gpu_decode: bool = True  # GPU backends decode JPEGs with nvJPEG; False: Pillow, the CPU path's exact pixels

    def batch(self, gpu: bool = False) -> int:
        return self.batch_size or (GPU_BATCH if gpu else CPU_BATCH)


def _on_gpu(backend: Backend) -> bool:
    """Backends that take uint8 images on a CUDA device (TensorRT, CUDA) are fed by nvJPEG by default."""
    device = getattr(backend, "device", None)
    return hasattr(backend, "infer_images") and getattr(device, "type", None) == "cuda"


def classify(files: Iterable[InputFile], classifier: Classifier, options: RunOptions) -> Iterator[list[dict]]:
    """Rows for every file, batch by batch, in input order."""
    if _on_gpu(classifier.backend) and options.gpu_decode:
        from batchcls.engines.cuda import GpuClassifier, GpuJpegLoader, classify_gpu

        card, backend = classifier.card, classifier.backend
        loader = GpuJpegLoader(card, device=str(backend.device), max_pixels=options.max_pixels)  # type: ignore[attr-defined]
        yield from classify_gpu(files, GpuClassifier(card, backend), options, loader=loader)
        return
    workers = default_threads() if options.workers is None else options.workers
    # --cpu-decode with a GPU backend: Pillow workers, but the GPU's batch size
    for batch in decoded_batches(files, classifier.preset, batch_size=options.batch(_on_gpu(classifier.backend)),
                                 workers=workers, max_pixels=options.max_pixels):
        yield classifier.rows(batch, top_k=options.top_k, threshold=options.threshold)


def run(files: Iterable[InputFile], classifier: Classifier, write: Callable[[list[dict]], None],
        options: RunOptions, on_batch: Callable[[int], None] | None = None) -> RunSummary:
    """Classify ``files`` and hand each finished batch of rows to ``write``."""
    summary = RunSummary()
    start = time.perf_counter()
    for rows in classify(files, classifier, options):
        write(rows)
        summary.add(rows)
        if on_batch is not None:
            on_batch(len(rows))
    summary.seconds = time.perf_counter() - start
    return summary
