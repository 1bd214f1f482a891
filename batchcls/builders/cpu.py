"""CPU engines: an ONNX Runtime offline-optimized model and a static INT8 model, kept only if accurate.

INT8 is quantized statically (QDQ format, per-channel weights) with activation ranges calibrated
on a few hundred training images fed through the runtime's own ``load_images`` + ``normalize``,
so calibration sees exactly the arrays inference will. It is kept only if its macro-F1 on
labelled validation images is within ``F1_TOLERANCE_POINTS`` of the FP32 model's; the decision
and both scores go to ``engines.json``, which ``backends.cpu_model_path`` reads at run time.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from batchcls.backends.onnxruntime import OnnxRuntimeBackend
from batchcls.backends.record import int8_path, onnx_sha256, opt_path
from batchcls.builders.parity import compare_rows
from batchcls.builders.record import update_record
from batchcls.card import ModelCard
from batchcls.decode_stage import load_images
from batchcls.errors import InputError
from batchcls.fsutil import atomic_path
from batchcls.infer import Classifier
from batchcls.machine import cpu_has_vnni
from batchcls.pipeline import RunOptions, classify
from batchcls.presets import EvalPreset, normalize
from batchcls.scan import InputFile, labelled_files, scan_dir

F1_TOLERANCE_POINTS = 0.5  # INT8 may lose at most this many macro-F1 points against FP32
CALIB_IMAGES = 300
CALIB_BATCH = 16
MANIFEST_KEYS = ("split_manifest", "manifest", "split")  # where train/ may record the split file
REPO = Path(__file__).resolve().parents[2]  # a checkout: runs/train/split.json is where `make train` writes


def optimize(card: ModelCard) -> Path:
    """Save ONNX Runtime's graph optimizations (constant folding, Conv+BN/activation fusion).

    EXTENDED, not ALL: ALL adds layouts for this very CPU's instruction set, so the file would not
    travel; the session that loads it still applies ALL on top.
    """
    import onnx
    import onnxruntime as ort

    out = opt_path(card)
    with atomic_path(out) as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(card.onnx_path), opts, providers=["CPUExecutionProvider"])
        # ORT's file may point at the source's external weights file: inline them so it stands alone.
        onnx.save(onnx.load(str(tmp)), str(tmp))
    return out


def int8_settings(vnni: bool) -> dict:
    """u8 activations x s8 weights per channel: the pair x86 int8 kernels implement natively.

    Without VNNI the AVX2 kernel (VPMADDUBSW) saturates 16-bit sums of u8 x s8 products (an
    EfficientNet-Lite0 fell from 0.96 to 0.87 logit cosine to FP32 on such a CPU); 7-bit weights
    (reduce_range) keep the sums in range. A model quantized without it is only used on VNNI CPUs
    (see cpu_engine_path). The stem conv, the depthwise convs (few MACs, most of the error) and the
    classifier head stay FP32, and ranges are the 99.999th percentile rather than the max: on a
    Lite0 the worst top-1 confidence shift on 40 real images went from 0.18 to 0.01, at the same
    speed within this shared machine's noise (1.3-1.45x FP32).
    """
    return {"activation": "uint8", "weight": "int8", "per_channel": True, "reduce_range": not vnni,
            "calibration": "percentile", "percentile": 99.999,
            "fp32_nodes": "stem conv, depthwise convs, classifier head"}


def fp32_nodes(model) -> list[str]:  # onnx.ModelProto
    """Nodes kept in FP32: the first Conv (reads the image), depthwise Convs and the Gemm/MatMul head."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    heads = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return list(dict.fromkeys(n.name for n in convs[:1] + depthwise + heads if n.name))


class ImageCalibrationReader:
    """Feeds calibration batches through the runtime's decode + preset + normalize.

    ``__len__``/``set_range`` let ORT calibrate a slice at a time (CalibStridedMinMax), merging
    ranges as it goes, so memory holds one batch's activations, not all of them.
    """

    def __init__(self, files: list[InputFile], card: ModelCard, input_name: str, batch_size: int = CALIB_BATCH) -> None:
        self.card, self.input_name = card, input_name
        self.preset = EvalPreset.from_card(card)
        self.chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
        self.pending = iter(self.chunks)
        self.images = 0

    def __len__(self) -> int:
        return len(self.chunks)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.chunks[start_index:end_index])

    def get_next(self) -> dict | None:
        for chunk in self.pending:
            batch = load_images(chunk, self.preset)
            if len(batch.images):
                self.images += len(batch.images)
                return {self.input_name: normalize(batch.images, self.card.mean, self.card.std)}
        return None


def quantize_int8(card: ModelCard, calib_files: list[InputFile], settings: dict) -> tuple[Path, int]:
    """Static INT8 (QDQ, MinMax calibration); returns the model and the images calibrated on."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    out = int8_path(card)
    input_name = onnx.load(str(card.onnx_path), load_external_data=False).graph.input[0].name
    reader = Reader(calib_files, card, input_name)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(card.onnx_path), str(pre))  # shape inference + the fusions quantization expects
        with contextlib.redirect_stdout(io.StringIO()):  # ORT prints a line per calibration pass
            quantize_static(str(pre), str(Path(tmp) / "int8.onnx"), reader, quant_format=QuantFormat.QDQ,
                            per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                            activation_type=types[settings["activation"]], weight_type=types[settings["weight"]],
                            nodes_to_exclude=fp32_nodes(onnx.load(str(pre))),
                            calibrate_method=CalibrationMethod.Percentile,
                            # one batch per pass, histograms merged: memory holds one batch's activations
                            extra_options={"CalibStridedMinMax": 1, "CalibPercentile": settings["percentile"]})
        if reader.images == 0:
            raise InputError("none of the calibration images could be decoded")
        with atomic_path(out) as dst:
            os.replace(Path(tmp) / "int8.onnx", dst)
    return out, reader.images


# --- where the images come from: the card's split manifest, or folders -----------------------

def _resolve(p: str, bases: list[Path]) -> Path:
    path = Path(p)
    if path.is_absolute():
        return path
    for base in bases:
        if (base / path).exists():
            return base / path
    return path


def find_manifest(card: ModelCard) -> Path | None:
    """The split manifest train/ used: named in the card, or found where the training targets write it
    (runs/<run>/split.json: make train, train-more, train-long) and matched by the sha256 the card records."""
    assert card.bundle_dir is not None
    ref = next((card.training[k] for k in MANIFEST_KEYS if isinstance(card.training.get(k), str)), None)
    if ref is not None:
        return _resolve(ref, [card.bundle_dir, Path.cwd(), REPO])
    sha = card.training.get("split_manifest_sha256")
    if not sha:
        return None
    runs = [p for base in dict.fromkeys((Path.cwd(), REPO)) for p in sorted((base / "runs").glob("*/split.json"))]
    for path in [card.bundle_dir / "split.json", *runs]:
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
            return path
    return None


def load_split(card: ModelCard, split: str) -> list[tuple[InputFile, str]] | None:
    """(file, true label) for a split of the manifest train/ used, or None when it can't be found."""
    path = find_manifest(card)
    if path is None:
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the split manifest {path} named by the card: {e}") from e
    root = _resolve(manifest.get("root", "."), [path.parent, Path.cwd(), REPO])
    classes = manifest.get("classes", card.classes)
    pairs = [(InputFile(str(root / rel), rel), classes[idx]) for rel, idx in manifest.get(split, [])]
    if pairs and not os.path.exists(pairs[0][0].path):
        raise InputError(f"the {split} images of {path} are not under {root}: pass folders explicitly "
                         "(--val-dir / --calib-dir)")
    return pairs


def seeded_sample(items: list, n: int, seed: int = 0) -> list:
    if len(items) <= n:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def calibration_files(card: ModelCard, calib_dir: str | None, n: int) -> tuple[list[InputFile], str]:
    if calib_dir:
        return seeded_sample(sorted(scan_dir(calib_dir), key=lambda f: f.rel), n), str(calib_dir)
    train = load_split(card, "train")
    if train:
        return seeded_sample([f for f, _ in train], n), "split manifest: train"
    return [], ""


# --- the build ---------------------------------------------------------------------------------

def _rows(card: ModelCard, model: Path, files: list[InputFile]) -> Iterator[dict]:
    classifier = Classifier(card, OnnxRuntimeBackend(model))
    for rows in classify(files, classifier, RunOptions(batch_size=64)):
        yield from rows


def judge_int8(card: ModelCard, int8: Path, val: list[tuple[InputFile, str]],
               tolerance_points: float = F1_TOLERANCE_POINTS) -> tuple[bool, dict]:
    """Keep INT8 only if its macro-F1 on ``val`` is within ``tolerance_points`` of FP32's."""
    files = [f for f, _ in val]
    truth = {f.rel: label for f, label in val}
    cmp = compare_rows(list(_rows(card, card.onnx_path, files)), list(_rows(card, int8, files)), truth)
    drop = cmp.f1_drop_points
    kept = drop is not None and drop <= tolerance_points
    return kept, cmp.to_dict()


def build_cpu_engines(card: ModelCard, *, val_dir: str | None = None, calib_dir: str | None = None,
                      calib_images: int = CALIB_IMAGES, tolerance_points: float = F1_TOLERANCE_POINTS,
                      log: Callable[[str], None] = print) -> dict:
    """Optimized + INT8 models beside the card, and the keep/reject decision in engines.json."""
    import onnxruntime as ort

    start = time.perf_counter()
    entry: dict = {"source_onnx": card.onnx, "source_sha256": onnx_sha256(card), "onnxruntime": ort.__version__,
                   "optimized": opt_path(card).name, "int8": None, "int8_kept": False}
    optimize(card)
    log(f"wrote {opt_path(card)}")
    calib, calib_source = calibration_files(card, calib_dir, calib_images)
    if not calib:
        entry["int8_reason"] = ("no calibration images: pass --calib-dir DIR (a few hundred training images) "
                                "or train with a split manifest")
    else:
        settings = int8_settings(cpu_has_vnni())
        int8, used = quantize_int8(card, calib, settings)
        entry.update(int8=int8.name, int8_settings=settings,
                     calibration={"images": used, "source": calib_source, "format": "QDQ"})
        log(f"wrote {int8} (calibrated on {used} images from {calib_source})")
        val = labelled_files(val_dir) if val_dir else load_split(card, "val")
        if not val:
            entry["int8_reason"] = "no labelled validation images to prove accuracy: pass --val-dir DIR/<class>/*"
        else:
            kept, judged = judge_int8(card, int8, val, tolerance_points)
            drop = judged["f1_drop_points"]
            entry.update(int8_kept=kept, validation={"source": str(val_dir or "split manifest: val"), **judged},
                         tolerance_points=tolerance_points,
                         int8_reason=f"macro-F1 {judged['macro_f1_candidate']:.4f} vs FP32 {judged['macro_f1_ref']:.4f} "
                                     f"({drop:+.2f} points lost, limit {tolerance_points})")
    entry["build_seconds"] = round(time.perf_counter() - start, 1)
    update_record(card, "cpu", entry)
    verdict = "kept" if entry["int8_kept"] else "not used"
    log(f"INT8 {verdict}: {entry['int8_reason']}")
    return entry

