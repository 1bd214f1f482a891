"""Export a trained checkpoint as the bundle the runtime reads: model.onnx + card.json (+ results/).

``model.pt`` (the plain state_dict) rides along for ``--backend torch``/``cuda`` and the PyTorch baseline
of ``make bench``; the CPU runtime never reads it.

The ONNX graph outputs RAW logits; the runtime applies softmax(logits / card.temperature).
ONNX Runtime must match PyTorch probabilities on >= 64 real images (max abs diff < 1e-4) or export fails.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from batchcls.fsutil import atomic_path
from train.evaluate import load_trained
from train.presets import EvalTransform

PARITY_TOL = 1e-4


class ParityError(RuntimeError):
    pass


def export_onnx(model: torch.nn.Module, input_size: int, path: Path) -> None:
    x = torch.zeros(1, 3, input_size, input_size)
    with atomic_path(path) as tmp:
        torch.onnx.export(model.eval(), (x,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)  # the TorchScript exporter handles timm's "same" padding at a fixed size


def parity(model: torch.nn.Module, onnx_path: Path, card, images: list[Path], *, tol: float = PARITY_TOL) -> float:
    """Max |p_torch - p_ort| over images, p = softmax(logits / T); raises ParityError above tol."""
    import onnxruntime as ort
    from batchcls.pipeline import softmax
    tf = EvalTransform(card)
    x = np.stack([tf(p) for p in images]).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i in range(0, len(x), 32):  # also exercises the dynamic batch axis
        with torch.inference_mode():
            ref = model(torch.from_numpy(x[i:i + 32])).numpy()
        got = sess.run(["logits"], {"input": x[i:i + 32]})[0]
        worst = max(worst, float(np.abs(softmax(ref, card.temperature) - softmax(got, card.temperature)).max()))
    if worst >= tol:
        raise ParityError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (limit {tol:.0e}) on {len(images)} images")
    return worst


def export(ckpt_path: str | os.PathLike, bundle_dir: str | os.PathLike, *, temperature: float, metrics: dict,
           training: dict, parity_images: list[Path], results: dict[str, Path] | None = None, log=print) -> Path:
    bundle = Path(bundle_dir)
    bundle.mkdir(parents=True, exist_ok=True)
    model, ckpt, card = load_trained(ckpt_path)
    onnx_path = bundle / card.onnx
    export_onnx(model, card.input_size, onnx_path)
    card = dataclasses.replace(card, temperature=float(temperature), metrics=metrics, training=training,
                               onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest())
    with atomic_path(bundle / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    worst = parity(model, onnx_path, card, parity_images)
    log(f"export: ONNX Runtime vs PyTorch max |dprob| {worst:.2e} on {len(parity_images)} images (limit {PARITY_TOL:.0e})")
    card.save(bundle)  # written last: a bundle with a card always has a verified model next to it
    if results:
        (bundle / "results").mkdir(exist_ok=True)
        for name, f in results.items():
            shutil.copyfile(f, bundle / "results" / name)
    log(f"export: {card.architecture} -> {bundle} (card.json, {card.onnx}, T={card.temperature:.3f})")
    return bundle
