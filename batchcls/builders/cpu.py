"""CPU engines: an ONNX Runtime offline-optimized model and a static INT8 model, kept only if accurate.

INT8 is quantized statically (QDQ, per-channel symmetric weights, MinMax activation ranges) on the graph
with its shape arithmetic frozen to constants, calibrated on a few hundred training images fed through the
runtime's own ``load_images`` + ``normalize``, so calibration sees exactly the arrays inference will. It is
kept only if, on labelled validation images and on this CPU, it keeps accuracy within
``ACC_TOLERANCE_POINTS`` and macro-F1 within ``F1_TOLERANCE_POINTS`` of the FP32 model; the decision and
its figures go to ``engines.json``, which ``backends.cpu_model_path`` reads at run time.

``--ship`` builds the INT8 model a bundle carries instead (``shipped-int8.onnx``): 7-bit weights, so any
x86 CPU computes the logits the gate measured, recorded with its figures and a probe in ``shipped-int8.json``.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from batchcls.backends.onnxruntime import OnnxRuntimeBackend
from batchcls.backends.record import (
    cpu_family,
    file_sha256,
    int8_path,
    onnx_sha256,
    opt_path,
    shipped_int8_path,
    shipped_probe_path,
    shipped_record_path,
)
from batchcls.builders.manifest import load_split
from batchcls.builders.record import update_record
from batchcls.card import ModelCard
from batchcls.decode_stage import load_images
from batchcls.errors import InputError
from batchcls.fsutil import atomic_path, atomic_write
from batchcls.machine import cpu_has_vnni
from batchcls.metrics import f1_table
from batchcls.presets import EvalPreset, normalize
from batchcls.scan import InputFile, labelled_files, scan_dir

F1_TOLERANCE_POINTS = 1.0  # INT8 may lose at most this many macro-F1 points against FP32
ACC_TOLERANCE_POINTS = 0.3  # and at most this many points of accuracy
CALIB_IMAGES = 300
CALIB_BATCH = 16
PROBE_IMAGES = 8  # shipped with the portable INT8 model: its logits are checked on each new CPU
POOLING_OPS = ("GlobalAveragePool", "Flatten", "Reshape", "Squeeze", "ReduceMean")


def optimize(card: ModelCard) -> Path:
    """Save ONNX Runtime's graph optimizations (constant folding, Conv+BN/activation fusion).

    The shape arithmetic of "same" padding is frozen first, so its Pads fold into the Convs.
    EXTENDED, not ALL: ALL adds layouts for this very CPU's instruction set, so the file would not
    travel; the session that loads it still applies ALL on top.
    """
    import onnx
    import onnxruntime as ort

    out = opt_path(card)
    with atomic_path(out) as tmp:
        onnx.save(freeze_shape_math(onnx.load(str(card.onnx_path))), str(tmp))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        # ORT's file may point at the source's external weights file: inline them so it stands alone.
        onnx.save(onnx.load(str(tmp)), str(tmp))
    return out


def int8_settings(reduce_range: bool) -> dict:
    """u8 activations x s8 weights per channel, every layer quantized, ranges the calibration maximum.

    Without VNNI the AVX2 kernel (VPMADDUBSW) saturates 16-bit sums of u8 x s8 products; 7-bit weights
    (reduce_range) keep the sums in range and give the same logits, bit for bit, on AVX2 and VNNI. A model
    quantized without it is only used on VNNI CPUs (see cpu_engine_path). Per-channel weights are what
    depthwise convs need (one scale per tensor loses several points). Nothing else is kept in FP32 but
    arithmetic on shapes (frozen to constants, or left unquantized where the input size is dynamic) and the
    pooling that produces a ``features`` output, so that output carries no rounding of its own.
    """
    return {"activation": "uint8", "weight": "int8", "per_channel": True, "reduce_range": reduce_range,
            "calibration": "minmax", "fp32_nodes": "shape arithmetic; pooling feeding a features output"}


def _shape_nodes(model) -> tuple[set[int], set[str]]:  # onnx.ModelProto
    """Indices of nodes that compute on shapes and constants only, and the tensors they make.

    Exported "same" padding computes its pads in float from Shape(); quantizing that arithmetic
    rounds the pads (the feature maps shift by a pixel), so it must never be quantized.
    """
    known = {t.name for t in model.graph.initializer}
    nodes: set[int] = set()
    for i, n in enumerate(model.graph.node):  # topological order
        if n.op_type == "Shape" or all(x in known for x in n.input if x):
            nodes.add(i)
            known.update(n.output)
    return nodes, known - {t.name for t in model.graph.initializer}


def freeze_shape_math(model):  # onnx.ModelProto -> onnx.ModelProto
    """Replace shape arithmetic that does not depend on the batch size by constants.

    Only for a static input size (every dimension but the batch): the values are computed by running
    the model at batch 1 and 2 and kept where both agree. A model without such arithmetic comes back as it was.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    nodes, made = _shape_nodes(model)
    boundary = list(dict.fromkeys(x for i, n in enumerate(graph.node) if i not in nodes for x in n.input if x in made))
    if not boundary or len(graph.input) != 1 or not all(d.dim_value > 0 for d in dims[1:]):
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(b, types[b], None) for b in boundary if b in types)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [b for b in boundary if b in types]
    shape = [d.dim_value for d in dims[1:]]
    one, two = (session.run(names, {graph.input[0].name: np.zeros([b, *shape], np.float32)}) for b in (1, 2))
    frozen = {n: a for n, a, b in zip(names, one, two) if a.shape == b.shape and np.array_equal(a, b)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.extend(numpy_helper.from_array(v, f"{n}_frozen") for n, v in frozen.items())
    for n in out.graph.node:
        n.input[:] = [f"{x}_frozen" if x in frozen else x for x in n.input]
    while True:  # drop what nothing reads any more
        used = {x for n in out.graph.node for x in n.input} | {o.name for o in out.graph.output}
        dead = [n for n in out.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            out.graph.node.remove(n)
    used = {x for n in out.graph.node for x in n.input}
    keep = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    del out.graph.value_info[:]
    return out


def logits_output(names: list[str]) -> str:
    """The output the gate and the classifier read: ``logits`` by name, else the first."""
    return "logits" if "logits" in names else names[0]


def fp32_nodes(model) -> list[str]:  # onnx.ModelProto
    """Nodes kept in FP32: shape arithmetic, and the pooling chain that produces any output besides the logits."""
    nodes, _ = _shape_nodes(model)
    keep = [model.graph.node[i].name for i in nodes]
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = [o.name for o in model.graph.output]
    for name in outputs:
        if name == logits_output(outputs):
            continue
        node = producer.get(name)
        while node is not None and node.op_type in POOLING_OPS:
            keep.append(node.name)
            node = producer.get(node.input[0])
    return [n for n in dict.fromkeys(keep) if n]


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


def quantize_int8(card: ModelCard, calib_files: list[InputFile], settings: dict, out: Path | None = None
                  ) -> tuple[Path, int]:
    """Static INT8 (QDQ, MinMax calibration) of the frozen graph; returns the model and the images calibrated on."""
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
    out = out or int8_path(card)
    input_name = onnx.load(str(card.onnx_path), load_external_data=False).graph.input[0].name
    reader = Reader(calib_files, card, input_name)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        frozen, pre = Path(tmp) / "frozen.onnx", Path(tmp) / "pre.onnx"
        onnx.save(freeze_shape_math(onnx.load(str(card.onnx_path))), str(frozen))
        quant_pre_process(str(frozen), str(pre))  # shape inference + the fusions quantization expects
        with contextlib.redirect_stdout(io.StringIO()):  # ORT prints a line per calibration pass
            quantize_static(str(pre), str(Path(tmp) / "int8.onnx"), reader, quant_format=QuantFormat.QDQ,
                            per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                            activation_type=types[settings["activation"]], weight_type=types[settings["weight"]],
                            nodes_to_exclude=fp32_nodes(onnx.load(str(pre))),
                            calibrate_method=CalibrationMethod.MinMax,
                            # one batch per pass, ranges merged: memory holds one batch's activations
                            extra_options={"CalibStridedMinMax": 1})
        if reader.images == 0:
            raise InputError("none of the calibration images could be decoded")
        with atomic_path(out) as dst:
            onnx.save(float_side_outputs(onnx.load(str(Path(tmp) / "int8.onnx"))), str(dst))
    return out, reader.images


def float_side_outputs(model):  # onnx.ModelProto -> onnx.ModelProto
    """Outputs besides the logits (``features``) read the FP32 tensor, not its 8-bit copy.

    The quantizer gives a graph output that a quantized node also reads (the classifier reads the
    pooled features) a QuantizeLinear -> DequantizeLinear pair and names the DequantizeLinear's output
    after it; the output is pointed back at the float tensor, and only the classifier reads the copy.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = [o.name for o in model.graph.output]
    for name in outputs:
        dq = producer.get(name)
        if name == logits_output(outputs) or dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        src, copy = q.input[0], f"{name}_DequantizeLinear_Output"
        for n in model.graph.node:
            n.input[:] = [copy if x == name else name if x == src else x for x in n.input]
        dq.output[0] = copy
        producer[src].output[:] = [name if o == src else o for o in producer[src].output]
    return model


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


# --- the gate ------------------------------------------------------------------------------------

def _outputs(model: Path, images: list[np.ndarray], card: ModelCard) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (and the ``features`` output when the model has one) for preprocessed uint8 batches."""
    session = OnnxRuntimeBackend(model).session
    names = [o.name for o in session.get_outputs()]
    wanted = [logits_output(names)] + (["features"] if "features" in names else [])
    runs = [session.run(wanted, {session.get_inputs()[0].name: normalize(b, card.mean, card.std)}) for b in images]
    logits = np.concatenate([r[0] for r in runs])
    return logits, (np.concatenate([r[1] for r in runs]) if len(wanted) > 1 else None)


def judge_int8(card: ModelCard, int8: Path, val: list[tuple[InputFile, str]],
               tolerance_points: float = F1_TOLERANCE_POINTS,
               acc_tolerance_points: float = ACC_TOLERANCE_POINTS) -> tuple[bool, dict]:
    """Keep INT8 only if, on ``val`` and on this CPU, it keeps accuracy within ``acc_tolerance_points`` and
    macro-F1 within ``tolerance_points`` of FP32. A ``features`` output is compared too (cosine to FP32),
    recorded, not gated: it is pooled in FP32 from INT8 activations."""
    preset = EvalPreset.from_card(card)
    batches, truth, errors = [], [], 0
    for i in range(0, len(val), 64):
        chunk = val[i:i + 64]
        decoded = load_images([f for f, _ in chunk], preset)
        errors += sum(bool(e) for e in decoded.errors)
        truth += [label for (_, label), e in zip(chunk, decoded.errors) if not e]
        if len(decoded.images):
            batches.append(decoded.images)
    ref_logits, ref_feat = _outputs(card.onnx_path, batches, card)
    int8_logits, int8_feat = _outputs(int8, batches, card)
    ref = [card.classes[i] for i in ref_logits.argmax(1)]
    cand = [card.classes[i] for i in int8_logits.argmax(1)]
    f1_ref, f1_cand = (f1_table(truth, ref)[0], f1_table(truth, cand)[0]) if truth else (None, None)
    acc_ref = float(np.mean([t == p for t, p in zip(truth, ref)])) if truth else None
    acc_cand = float(np.mean([t == p for t, p in zip(truth, cand)])) if truth else None
    judged = {"n": len(truth), "errors": errors, "agreement": float(np.mean([a == b for a, b in zip(ref, cand)])) if ref else 0.0,
              "logit_rel_error": float(np.linalg.norm(int8_logits - ref_logits) / max(np.linalg.norm(ref_logits), 1e-12)),
              "accuracy_ref": acc_ref, "accuracy_candidate": acc_cand, "macro_f1_ref": f1_ref, "macro_f1_candidate": f1_cand,
              "accuracy_drop_points": None if acc_ref is None else 100.0 * (acc_ref - acc_cand),
              "f1_drop_points": None if f1_ref is None else 100.0 * (f1_ref - f1_cand)}
    if ref_feat is not None and int8_feat is not None:
        cos = np.sum(ref_feat * int8_feat, 1) / np.maximum(
            np.linalg.norm(ref_feat, axis=1) * np.linalg.norm(int8_feat, axis=1), 1e-12)
        judged["features_cosine_mean"], judged["features_cosine_min"] = float(cos.mean()), float(cos.min())
    kept = (judged["f1_drop_points"] is not None and judged["f1_drop_points"] <= tolerance_points
            and judged["accuracy_drop_points"] <= acc_tolerance_points)
    return kept, judged


def gate_reason(judged: dict, tolerance_points: float, acc_tolerance_points: float) -> str:
    return (f"val accuracy {100 * judged['accuracy_candidate']:.2f}% vs FP32 {100 * judged['accuracy_ref']:.2f}% "
            f"({judged['accuracy_drop_points']:+.2f} points lost, limit {acc_tolerance_points}); macro-F1 "
            f"{judged['macro_f1_candidate']:.4f} vs {judged['macro_f1_ref']:.4f} ({judged['f1_drop_points']:+.2f} "
            f"points lost, limit {tolerance_points}); {judged['n']} images")


# --- the build ---------------------------------------------------------------------------------

def build_cpu_engines(card: ModelCard, *, val_dir: str | None = None, calib_dir: str | None = None,
                      calib_images: int = CALIB_IMAGES, tolerance_points: float = F1_TOLERANCE_POINTS,
                      acc_tolerance_points: float = ACC_TOLERANCE_POINTS, ship: bool = False,
                      log: Callable[[str], None] = print) -> dict:
    """Optimized + INT8 models beside the card, and the keep/reject decision in engines.json.

    ``ship``: instead, the portable INT8 model (7-bit weights: the same logits on AVX2 and VNNI) that a
    bundle carries to every machine, with its gate figures and a probe (``shipped-int8.json``), for
    ``backends.onnxruntime.cpu_model_path`` to check at load.
    """
    import onnxruntime as ort

    start = time.perf_counter()
    entry: dict = {"source_onnx": card.onnx, "source_sha256": onnx_sha256(card), "onnxruntime": ort.__version__,
                   "int8": None, "int8_kept": False}
    if not ship:
        entry["optimized"] = opt_path(card).name
        optimize(card)
        log(f"wrote {opt_path(card)}")
    calib, calib_source = calibration_files(card, calib_dir, calib_images)
    val = labelled_files(val_dir) if val_dir else load_split(card, "val")
    if not calib:
        entry["int8_reason"] = ("no calibration images: pass --calib-dir DIR (a few hundred training images) "
                                "or train with a split manifest")
    elif ship and not val:
        raise InputError("a shipped INT8 model needs its gate: pass --val-dir DIR/<class>/* or train with a split manifest")
    else:
        settings = int8_settings(reduce_range=ship or not cpu_has_vnni())
        int8, used = quantize_int8(card, calib, settings, shipped_int8_path(card) if ship else None)
        entry.update(int8=int8.name, int8_settings=settings, cpu=cpu_family(),
                     calibration={"images": used, "source": calib_source, "format": "QDQ"})
        log(f"wrote {int8} (calibrated on {used} images from {calib_source})")
        if not val:
            entry["int8_reason"] = "no labelled validation images to prove accuracy: pass --val-dir DIR/<class>/*"
        else:
            kept, judged = judge_int8(card, int8, val, tolerance_points, acc_tolerance_points)
            entry.update(int8_kept=kept, validation={"source": str(val_dir or "split manifest: val"), **judged},
                         tolerance_points=tolerance_points, accuracy_tolerance_points=acc_tolerance_points,
                         int8_reason=gate_reason(judged, tolerance_points, acc_tolerance_points))
    if entry["int8_kept"] and card.openset:
        entry["int8_openset"] = fit_int8_decision(card, shipped_int8_path(card) if ship else int8_path(card),
                                                  local=not ship, log=log)
    entry["build_seconds"] = round(time.perf_counter() - start, 1)
    if ship:
        _ship(card, entry, calib)
    else:
        update_record(card, "cpu", entry)
    verdict = "kept" if entry["int8_kept"] else "not used"
    log(f"INT8 {verdict}: {entry['int8_reason']}")
    return entry


def fit_int8_decision(card: ModelCard, model: Path, *, local: bool, log: Callable[[str], None]) -> str:
    """The open-set decision fitted on the INT8 model itself (its signals are not FP32's), where the validation
    split and the foreign images are at hand; else INT8 serves only with the decision off, and this says so."""
    from batchcls.builders.decision import fit_decision

    try:
        result = fit_decision(card.bundle_dir, models=[model], local=local, log=log)
    except InputError as e:
        log(f"INT8: no open-set decision of its own ({e}); runs with the decision on use {card.onnx}")
        return "not fitted"
    return "fitted, gate passed" if result["passed"] else "fitted, gate failed"


def _ship(card: ModelCard, entry: dict, calib: list[InputFile]) -> None:
    """Record the shipped model's gate and a probe: a few calibration images and the INT8 logits they gave here."""
    path = shipped_int8_path(card)
    if not entry["int8_kept"]:
        path.unlink(missing_ok=True)
        shipped_probe_path(card).unlink(missing_ok=True)
    else:
        images = load_images(calib[:PROBE_IMAGES], EvalPreset.from_card(card)).images
        logits, _ = _outputs(path, [images], card)
        with atomic_path(shipped_probe_path(card)) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
        entry.update(int8_sha256=file_sha256(path), probe={"file": shipped_probe_path(card).name,
                                                           "logits": np.round(logits, 5).tolist()})
    atomic_write(shipped_record_path(card), json.dumps(entry, indent=1) + "\n")
