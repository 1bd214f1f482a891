"""The model's outputs for a list of files through the runtime's own decode and preprocessing, for choosing the
serving size and TTA (train/serving.py); and the exporter's second output, ``features``, for older bundles.

The open-set decision itself is fitted by ``batchcls.builders.decision`` (``python -m train.decision``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from batchcls.backends.onnxruntime import OnnxRuntimeBackend
from batchcls.card import ModelCard
from batchcls.decode_stage import DecodedBatch
from batchcls.pipeline import decoded_batches
from batchcls.presets import EvalPreset, normalize
from batchcls.scan import InputFile, scan_dir

FEATURES_OUTPUT = "features"


def add_features_output(src: Path, dst: Path) -> None:
    """Expose the classifier's input (the pooled penultimate features) as a second output named 'features'.

    For bundles exported before the exporter named both outputs itself; the graph is otherwise untouched.
    """
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    if any(o.name == FEATURES_OUTPUT for o in g.output):
        onnx.save(model, str(dst))
        return
    head = next(n for n in g.node if "logits" in n.output)
    feat = head.input[0]
    for n in g.node:  # rename the tensor so the output is called 'features' for every runtime
        n.input[:] = [FEATURES_OUTPUT if i == feat else i for i in n.input]
        n.output[:] = [FEATURES_OUTPUT if o == feat else o for o in n.output]
    info = onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, ["batch", None])
    g.output.append(info)
    onnx.save(model, str(dst))


def extract(model_path: Path, card: ModelCard, files: list[InputFile], *, size: int | None = None,
            tta: bool = False, workers: int = 2, raw_views: bool = False) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """(logits, features, ok) for ``files`` through the runtime's own decode and preprocessing.

    With ``tta`` each image and its mirror are scored: averaged as the runtime's --tta flip does, or with
    ``raw_views`` returned as all originals' rows followed by all mirrors' rows."""
    preset = EvalPreset(input_size=size or card.input_size, resize_mode=card.resize_mode, crop_pct=card.crop_pct,
                        interpolation=card.interpolation)
    sess = OnnxRuntimeBackend(model_path).session
    names = [o.name for o in sess.get_outputs()]
    logits, feats, ok, mirrored = [], [], [], []
    b: DecodedBatch
    for b in decoded_batches(files, preset, batch_size=64, workers=workers):
        ok += [e is None for e in b.errors]
        if len(b.images) == 0:
            continue
        imgs = np.concatenate([b.images, b.images[:, :, ::-1]]) if tta else b.images
        out = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: normalize(imgs, card.mean, card.std)})))
        lg, ft = out["logits"], out.get(FEATURES_OUTPUT)
        if tta and raw_views:
            n = len(b.images)
            lg, ft, mirrored = lg[:n], (None if ft is None else ft[:n]), mirrored + [out["logits"][n:]]
        elif tta:  # as the runtime does (infer.Classifier.outputs): the mean of both views' logits and features
            n = len(b.images)
            lg = 0.5 * (lg[:n] + lg[n:])
            ft = None if ft is None else 0.5 * (ft[:n] + ft[n:])
        logits.append(lg)
        if ft is not None:
            feats.append(ft)
    all_logits = np.concatenate(logits + mirrored)
    return all_logits, (np.concatenate(feats) if feats else np.empty((0, 0))), ok


def split_files(root: Path, manifest: dict, which: str) -> tuple[list[InputFile], np.ndarray]:
    items = manifest[which]
    return [InputFile(str(root / rel), rel) for rel, _ in items], np.array([y for _, y in items])


def folder_files(folder: Path) -> list[InputFile]:
    return list(scan_dir(str(folder), recursive=True))
