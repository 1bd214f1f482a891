"""The Python API: ``batchcls.load()`` and ``Model.predict``, the rows ``batchcls run`` writes, as dicts.

There is one implementation: files go through the pipeline's own ``classify`` (the decode, batching and
GPU path of ``batchcls run``), images already in memory through the same ``Classifier.rows``, after the
decoder's own EXIF rotation and alpha compositing. So a file gives exactly the CLI's row, and a bad item
gives an error row (``status`` "error", the reason in ``error``) instead of failing the whole call.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Union, overload

import numpy as np
from PIL import Image

from batchcls.backends import load_backend
from batchcls.card import ModelCard, load_card
from batchcls.decode import DEFAULT_MAX_PIXELS, DecodeError, byte_limit, decode_image, upright_rgb
from batchcls.errors import first_line
from batchcls.pipeline import Classifier, DecodedBatch, RunOptions, classify
from batchcls.scan import InputFile, scan

__all__ = ["Item", "Model", "Row", "load"]

Item = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]  # noqa: UP007 - a runtime alias on Python 3.10
"""A path, a PIL image (any mode), an HWC (or HW) uint8 RGB array, or a file's encoded bytes."""
Row = dict
"""One result: the output file's columns (``path``, ``label``, ``confidence``, ``status``, ``error``, ...)."""



def load(path: str | os.PathLike | None = None, *, backend: str | None = None, device: str | None = None,
         threads: int | None = None, tta: str | None = None) -> Model:
    """Load a model bundle (a folder with card.json + ONNX); None: the shipped Simpsons model.

    ``backend`` (auto, onnxruntime, tensorrt, cuda, torch) and ``device`` (cpu, cuda, cuda:N) mean what
    ``batchcls run --backend/--device`` mean; None picks as the CLI does (device "cpu" keeps it on ONNX
    Runtime). ``tta="flip"`` averages each image with its mirror, as ``--tta flip`` does (2x the work),
    ``"none"`` turns that off; None: the card's choice (made on validation).
    Raises ``batchcls.ModelError`` with a one-line reason when the bundle can't be used.
    """
    card = load_card(path)
    return Model(Classifier(card, load_backend(card, backend, device=device, threads=threads), tta=tta))


class Model:
    """A loaded bundle. ``predict`` classifies images on disk or in memory; ``predict_folder`` a folder."""

    def __init__(self, classifier: Classifier) -> None:
        self._classifier = classifier

    @property
    def card(self) -> ModelCard:
        """The model card: classes, preprocessing, temperature, metrics."""
        return self._classifier.card

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def backend(self) -> str:
        """The inference backend that was loaded (e.g. "onnxruntime")."""
        return self._classifier.backend.name

    def __repr__(self) -> str:
        return f"<batchcls.Model {self.card.name!r}: {self.card.num_classes} classes, backend {self.backend}>"

    @overload
    def predict(self, items: Iterable[Item], *, top_k: int = ..., threshold: float | None = ...,
                probs: bool = ..., open_set: bool = ..., open_set_cut: float | None = ...,
                embeddings: bool = ..., max_pixels: int = ...) -> list[Row]: ...

    @overload
    def predict(self, items: Item, *, top_k: int = ..., threshold: float | None = ...,
                probs: bool = ..., open_set: bool = ..., open_set_cut: float | None = ...,
                embeddings: bool = ..., max_pixels: int = ...) -> Row: ...

    def predict(self, items: Item | Iterable[Item], *, top_k: int = 1, threshold: float | None = None,
                probs: bool = False, open_set: bool = True, open_set_cut: float | None = None,
                embeddings: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> Row | list[Row]:
        """Classify one item (-> one dict) or any iterable of items: a list, tuple, generator, ``map``, set or an
        array of path strings (-> one dict per item, in the order iterated). A uint8 array is one image.

        Each dict has the keys of the CSV ``batchcls run`` writes with the same options: ``label_2``,
        ``confidence_2``, ... with ``top_k``; ``model_label`` with ``threshold`` (rows under it are
        labelled "unknown"); ``prob_<class>`` for every class with ``probs``; with ``open_set`` (the default,
        when the bundle has the decision) ``known_score`` and ``model_label``, and "unknown" for an image that
        shows none of the classes (``open_set_cut`` moves the cut); with ``embeddings`` an ``embedding`` key
        holds the penultimate-layer vector (float32 numpy array; None on error rows). ``path`` is the path as
        given, "" for an in-memory item. A path or encoded bytes gives exactly the CLI's row for that
        file (JPEGs are draft-decoded as the CLI does); a PIL image is used at the size it has.
        """
        options = _options(top_k, threshold, probs, max_pixels, open_set=open_set, open_set_cut=open_set_cut,
                           embeddings=embeddings)
        columns = options.columns(self.card) + (["embedding"] if embeddings else [])  # refuses a top_k past the class count before any work
        single = _one_item(items)
        batch = [items] if single else list(items)
        rows: list[Row | None] = [None] * len(batch)
        on_disk = [i for i, it in enumerate(batch) if isinstance(it, (str, os.PathLike))]
        files = [InputFile(str(os.fsdecode(batch[i])), str(os.fsdecode(batch[i]))) for i in on_disk]  # np.str_ too
        for i, row in zip(on_disk, itertools.chain.from_iterable(classify(files, self._classifier, options))):
            rows[i] = row
        in_memory = [i for i, it in enumerate(batch) if not isinstance(it, (str, os.PathLike))]
        for start in range(0, len(in_memory), options.batch()):
            chunk = in_memory[start:start + options.batch()]
            decoded = self._decode([batch[i] for i in chunk], max_pixels)
            for i, row in zip(chunk, self._classifier.rows(decoded, **options.row_args())):
                rows[i] = row
        out = [{c: r.get(c, None if c.startswith(("confidence", "prob_", "known_score", "embedding")) else "") for c in columns}
               for r in rows if r is not None]
        assert len(out) == len(batch), "one row per item"
        return out[0] if single else out

    def predict_folder(self, folder: str | os.PathLike, *, recursive: bool = True, top_k: int = 1,
                       threshold: float | None = None, probs: bool = False, open_set: bool = True,
                       open_set_cut: float | None = None, embeddings: bool = False, workers: int | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Row]:
        """Every file under ``folder``, as ``batchcls run FOLDER`` lists and classifies it: the same rows
        (``path`` relative to the folder), decoded in ``workers`` processes (None: one per core).

        ``pandas.DataFrame(model.predict_folder(...))`` makes it a table.
        """
        options = _options(top_k, threshold, probs, max_pixels, workers=workers, open_set=open_set,
                           open_set_cut=open_set_cut, embeddings=embeddings)
        options.columns(self.card)  # refuses a top_k past the class count before any work
        return [row for rows in classify(scan(folder, recursive=recursive), self._classifier, options)
                for row in rows]

    def _decode(self, items: list, max_pixels: int) -> DecodedBatch:
        """In-memory items -> the card's input size, as the decode workers do for files."""
        preset = self._classifier.preset
        images, errors = [], []
        for item in items:
            try:
                images.append(preset(_to_image(item, preset.min_decode_side, max_pixels)))
                errors.append(None)
            except DecodeError as e:
                errors.append(str(e))
            except Exception as e:  # never let one odd item take the batch down
                errors.append(f"unexpected decode failure: {first_line(e)}")
        s = preset.input_size
        stack = np.stack(images) if images else np.empty((0, s, s, 3), np.uint8)
        return DecodedBatch([InputFile("", "")] * len(items), stack, errors)


def _one_item(items: object) -> bool:
    """Whether ``items`` is one image rather than several: a path, bytes, a PIL image, or an array of pixels (an
    array of strings or objects is several paths or items); anything else iterable holds items."""
    if isinstance(items, np.ndarray):
        return items.dtype.kind not in "USO"
    return isinstance(items, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or not isinstance(
        items, Iterable)


def _options(top_k: int, threshold: float | None, probs: bool, max_pixels: int, workers: int | None = None,
             *, open_set: bool = True, open_set_cut: float | None = None, embeddings: bool = False) -> RunOptions:
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, not {top_k!r}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, not {threshold!r}")
    if open_set_cut is not None and not 0 <= open_set_cut <= 1:
        raise ValueError(f"open_set_cut must be between 0 and 1, not {open_set_cut!r}")
    if open_set_cut is not None and not open_set:
        raise ValueError("open_set_cut moves the open-set decision, which open_set=False turns off: pass one")
    return RunOptions(top_k=top_k, threshold=threshold, probs=probs, max_pixels=max_pixels, workers=workers,
                      open_set=open_set, open_set_cut=open_set_cut, embeddings=embeddings)


def _to_image(item: object, min_side: int, max_pixels: int) -> Image.Image:
    """An upright RGB Pillow image from a PIL image, an array or encoded bytes; DecodeError says why not."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(item, min_side=min_side, max_pixels=max_pixels)
    if isinstance(item, Image.Image):
        return upright_rgb(item, byte_limit(max_pixels))
    if isinstance(item, np.ndarray):
        channels = item.shape[2] if item.ndim == 3 else 1
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or channels not in (1, 3, 4) or 0 in item.shape:
            raise DecodeError(f"array of {item.dtype} with shape {item.shape}: give HxWx3 (RGB), HxWx4 (RGBA) "
                              "or HxW (grey) uint8")
        # Pillow reads HxW as L, HxWx3 as RGB, HxWx4 as RGBA; RGBA is then composited over white
        return upright_rgb(Image.fromarray(np.ascontiguousarray(item.reshape(item.shape[:2]) if channels == 1 else item)),
                           byte_limit(max_pixels))
    raise DecodeError(f"unsupported input {type(item).__name__}: give a path, a PIL image, "
                      "an HWC uint8 array or encoded image bytes")
