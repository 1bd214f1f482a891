"""The one data path: scan -> decode -> preprocess -> infer -> write.

``batchcls run``, ``batchcls eval``, engine builds and the Ray job call these functions; the watch daemon
calls the same stages (``decode_stage``, ``infer``) batch by batch. Each stage has one home:

    scan.py            files, streamed in a stable order
    decode_stage.py    decode.py + presets.py in worker processes, a bounded window ahead (gpu.py: nvJPEG)
    infer.py           normalize -> backend (backends/) -> softmax -> rows
    output/            rows -> CSV / JSONL / Parquet (runner.py's job loop wires it to ``classify``)
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from batchcls.backends import Backend
from batchcls.card import ModelCard
from batchcls.decode import DEFAULT_MAX_PIXELS
from batchcls.decode_stage import DecodedBatch, batched, image_stage, load_images
from batchcls.errors import ModelError
from batchcls.infer import Classifier, softmax
from batchcls.machine import default_threads
from batchcls.output.columns import columns_for
from batchcls.presets import EvalPreset
from batchcls.scan import InputFile

# The stages' types, for callers that drive the pipeline (api, runner, Ray): one import for all of it.
__all__ = ["CPU_BATCH", "GPU_BATCH", "Classifier", "DecodedBatch", "RunOptions", "RunSummary", "classify",
           "decoded_batches", "load_images", "softmax"]

CPU_BATCH = 64  # ONNX Runtime on a few cores: bigger batches gain nothing, and cost memory
GPU_BATCH = 512  # nvJPEG end to end: throughput flattens past this (docs/engines.md)


@dataclass
class RunSummary:
    files: int = 0
    errors: int = 0
    seconds: float = 0.0
    skipped: int = 0  # already in the output of a resumed run
    changed: list[str] = field(default_factory=list)  # of those, files changed since their row was written
    labels: dict[str, int] = field(default_factory=dict)
    cut: float | None = None  # the served open-set decision's cut (known_score units); None: off, or not known here

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


ROW_NEUTRAL = ("batch_size", "workers", "embeddings")  # how fast rows come or what goes beside them, not what they say


@dataclass(frozen=True)
class RunOptions:
    batch_size: int | None = None  # None: CPU_BATCH, or GPU_BATCH on a GPU backend (see batch())
    workers: int | None = None  # None: one per core
    top_k: int = 1
    threshold: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    gpu_decode: bool = True  # GPU backends decode JPEGs with nvJPEG; False: Pillow, the CPU path's exact pixels
    probs: bool = False  # every class's probability in the rows (prob_<class>)
    tta: str | None = None  # "flip": average each image with its mirror (2x), "none": off; None: the card's choice
    open_set: bool = True  # the bundle's "none of these" decision: label 'unknown' below the cut
    open_set_cut: float | None = None  # None: the card's operating point (a known_score, 0..1)
    embeddings: bool = False  # rows carry ``embedding`` (penultimate features) for --embeddings and the API

    def row_settings(self) -> dict[str, Any]:
        """The options that shape rows, which a resumed output must have been written with: every field but
        ROW_NEUTRAL, so a field added later counts without being listed here."""
        settings = dataclasses.asdict(self)
        for name in ROW_NEUTRAL:
            del settings[name]
        return settings

    def batch(self, gpu: bool = False) -> int:
        return self.batch_size or (GPU_BATCH if gpu else CPU_BATCH)

    def columns(self, card: ModelCard) -> list[str]:
        """The output's columns for this model; a --top-k past its class count is refused, not padded."""
        if self.top_k > card.num_classes:
            raise ModelError(f"--top-k {self.top_k} is more than the {card.num_classes} classes of model "
                             f"{card.name!r}: use --top-k {card.num_classes} or less")
        if self.open_set_cut is not None and not 0.0 <= self.open_set_cut <= 1.0:
            raise ModelError(f"--open-set-cut {self.open_set_cut} is not a known_score: use a number from 0 to 1")
        return columns_for(self.top_k, model_label=self.threshold is not None,
                           known_score=self.open_set and bool(card.openset),
                           prob_classes=card.classes if self.probs else ())

    def row_args(self) -> dict:
        """The keyword arguments of ``Classifier.rows`` these options set: one place for every runner."""
        return {"top_k": self.top_k, "threshold": self.threshold, "probs": self.probs,
                "open_set": self.open_set, "open_set_cut": self.open_set_cut, "embeddings": self.embeddings}


def _first_and_rest(files: Iterable[InputFile], size: int) -> tuple[list[InputFile] | None, Iterator[list[InputFile]]]:
    batches = batched(files, size)
    return next(batches, None), batches


def decoded_batches(files: Iterable[InputFile], preset: EvalPreset, *, batch_size: int,
                    workers: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[DecodedBatch]:
    """Decoded batches in input order; with workers > 0 they are decoded ahead in processes.

    A run that fits in one batch never starts the pool: a single image classifies in well
    under a second from a cold start.
    """
    first, rest = _first_and_rest(files, batch_size)
    if first is None:
        return
    if len(first) < batch_size:
        workers = 0
    with image_stage(preset, workers=workers, max_pixels=max_pixels) as stage:
        yield from stage.map(itertools.chain([first], rest))


def _on_gpu(backend: Backend) -> bool:
    """Backends that take uint8 images on a CUDA device (TensorRT, CUDA) are fed by nvJPEG by default."""
    device = getattr(backend, "device", None)
    return hasattr(backend, "infer_images") and getattr(device, "type", None) == "cuda"


def classify(files: Iterable[InputFile], classifier: Classifier, options: RunOptions) -> Iterator[list[dict]]:
    """Rows for every file, batch by batch, in input order."""
    workers = default_threads() if options.workers is None else options.workers
    if _on_gpu(classifier.backend) and options.gpu_decode:
        from batchcls.gpu import READ_WORKERS, GpuClassifier, GpuJpegLoader, classify_gpu

        card, backend = classifier.card, classifier.backend
        loader = GpuJpegLoader(card, device=str(backend.device), max_pixels=options.max_pixels)  # type: ignore[attr-defined]
        first, rest = _first_and_rest(files, options.batch(gpu=True))
        if first is None:
            return
        readers = 0 if len(first) < options.batch(gpu=True) else min(workers, READ_WORKERS)
        yield from classify_gpu(itertools.chain([first], rest), GpuClassifier(card, backend, tta=classifier.tta,
                                                                              open_set=options.open_set),
                                loader=loader,
                                workers=readers, row_args=options.row_args())
        return
    # --cpu-decode with a GPU backend: Pillow workers, but the GPU's batch size
    for batch in decoded_batches(files, classifier.preset, batch_size=options.batch(_on_gpu(classifier.backend)),
                                 workers=workers, max_pixels=options.max_pixels):
        yield classifier.rows(batch, **options.row_args())
