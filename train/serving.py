"""Choose how the trained network is served, on validation: input size x test-time augmentation.

The network is fully convolutional and trains on random-resized crops, so objects look larger in training
than in a whole-frame eval resize (Touvron et al., "FixRes", 2019): the best serving size is usually above
the training size, and only validation can say by how much. Each candidate runs through the runtime's own
pipeline (Pillow decode, the card's resize, ONNX Runtime, its softmax and its TTA average), with a
temperature fitted at that size on what serves.

Rule: the most accurate candidate on validation wins; a candidate within ``TIE`` of the best accuracy (or
within one validation image, on a small validation split) wins instead when it is cheaper (a smaller size,
no TTA), because a tie on validation is noise and pixels cost every user time. Every candidate's val
accuracy, NLL and images/s are kept for the results table.

    python -m train.serving CKPT --sizes 144 160 176 192 --out runs/x/serving.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from batchcls.backends.onnxruntime import OnnxRuntimeBackend
from batchcls.fsutil import atomic_write
from batchcls.infer import mean_of_views, softmax
from batchcls.pipeline import decoded_batches
from batchcls.presets import EvalPreset, normalize
from batchcls.scan import InputFile
from train import data as D
from train.metrics import fit_temperature

SIZES = (128, 144, 160, 176, 192)
SIZE_STEPS = (1.0, 1.125, 1.25, 1.375, 1.5)  # serving sizes tried, relative to the training size
TIE = 0.001  # accuracy difference treated as a tie (3 of ~3,100 validation frames)


def sizes_for(input_size: int) -> tuple[int, ...]:
    """The serving sizes to try for a network trained at ``input_size``: it and up to 1.5x, in 8 px steps
    (SIZES for the 128 px recipe)."""
    return tuple(dict.fromkeys(max(8, int(round(input_size * f / 8)) * 8) for f in SIZE_STEPS))


def view_logits(onnx_path: Path, card, files: list[InputFile], *, workers: int = 2) -> np.ndarray:
    """Logits of every file and of its mirror, [2, N, C], decoded and preprocessed as the runtime does (one
    decode per file serves both TTA modes)."""
    backend = OnnxRuntimeBackend(onnx_path)
    out = []
    for b in decoded_batches(files, EvalPreset.from_card(card), batch_size=64, workers=workers):
        bad = [f.rel for f, e in zip(b.files, b.errors) if e is not None]
        if bad:
            raise ValueError(f"unreadable validation image {bad[0]}")
        x = normalize(np.concatenate([b.images, b.images[:, :, ::-1]]), card.mean, card.std)
        z = backend.infer(x)
        out.append(z.reshape(2, len(b.images), -1))
    return np.concatenate(out, axis=1)


def served_probs(views: np.ndarray, tta: str, temperature: float) -> np.ndarray:
    """What the runtime serves for these logits: softmax at T of the first view, or (flip) the mean of both
    views' softmax, with the runtime's own softmax and view average."""
    if tta == "none":
        return softmax(views[0], temperature)
    return mean_of_views(softmax(views.reshape(-1, views.shape[-1]), temperature), 2)


def fit_served_temperature(views: np.ndarray, y: np.ndarray, tta: str) -> float:
    """T minimising the validation NLL of what serves (for flip: of the mean of both views' probabilities)."""
    return fit_temperature(views[0] if tta == "none" else views, y)


def candidates(ckpt_path: str | Path, *, sizes=SIZES, workers: int = 2, log=print) -> list[dict]:
    """Validation accuracy, NLL (at a temperature fitted per candidate) and images/s of each size x TTA."""
    from train.evaluate import load_trained
    from train.export import export_onnx

    model, ckpt, card = load_trained(ckpt_path)
    manifest, _ = D.load_manifest(ckpt["config"]["split"])
    root = Path(manifest["root"])
    files = [InputFile(str(root / rel), rel) for rel, _ in manifest["val"]]
    y = np.array([label for _, label in manifest["val"]])
    out = []
    with tempfile.TemporaryDirectory(prefix="batchcls-serving-") as tmp:
        for size in sizes:
            onnx_path = Path(tmp, f"model-{size}.onnx")
            export_onnx(model, size, onnx_path)
            t = time.perf_counter()
            views = view_logits(onnx_path, dataclasses.replace(card, input_size=size), files, workers=workers)
            secs = time.perf_counter() - t  # both views: the flip cost; one view costs about half
            for tta in ("none", "flip"):
                temp = fit_served_temperature(views, y, tta)
                p = served_probs(views, tta, temp)
                row = {"input_size": size, "tta": tta, "val_acc": float((p.argmax(1) == y).mean()),
                       "val_nll": float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()),
                       "temperature": temp, "images_per_s": len(y) / secs * (1 if tta == "flip" else 2),
                       "n_val": len(y)}
                out.append(row)
                log(f"serving: {size}px tta={row['tta']}: val acc {row['val_acc']:.4f} NLL {row['val_nll']:.4f} "
                    f"~{row['images_per_s']:.0f} img/s")
    return out


def choose(rows: list[dict]) -> dict:
    """The cheapest candidate within TIE (or one validation image) of the best validation accuracy (cost:
    pixels, then TTA's 2x)."""
    best = max(r["val_acc"] for r in rows)
    tie = max(TIE, max(1.0 / r.get("n_val", 1 / TIE) for r in rows) + 1e-9)
    near = [r for r in rows if r["val_acc"] >= best - tie]
    return min(near, key=lambda r: (r["input_size"] ** 2 * (2 if r["tta"] == "flip" else 1), -r["val_acc"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="a training checkpoint (ckpt_best.pt)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--out", type=Path, required=True, help="JSON: every candidate and the choice")
    args = ap.parse_args(argv)
    rows = candidates(args.ckpt, sizes=args.sizes)
    chosen = choose(rows)
    atomic_write(args.out, json.dumps({"candidates": rows, "chosen": chosen, "rule": __doc__.split("Rule: ")[1]
                                       .split("\n\n")[0].replace("\n", " ")}, indent=2) + "\n")
    print(f"serving: chosen {chosen['input_size']}px tta={chosen['tta']} (val acc {chosen['val_acc']:.4f})")


if __name__ == "__main__":
    main()
