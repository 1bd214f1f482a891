"""Choose how the trained network is served, on validation: input size x test-time augmentation.

The network is fully convolutional and trains on random-resized crops, so objects look larger in training
than in a whole-frame eval resize (Touvron et al., "FixRes", 2019): the best serving size is usually above
the training size, and only validation can say by how much. Each candidate runs through the runtime's own
pipeline (Pillow decode, the card's resize, ONNX Runtime), with a temperature fitted at that size.

Rule: the most accurate candidate on validation wins; a candidate within ``TIE`` of the best accuracy wins
instead when it is cheaper (a smaller size, no TTA), because a tie on validation is noise and pixels cost
every user time. Every candidate's val accuracy, NLL and images/s are kept for the results table.

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

from batchcls.fsutil import atomic_write
from train import data as D
from train.metrics import fit_temperature, nll
from train.openset import extract, split_files

SIZES = (128, 144, 160, 176, 192)
TIE = 0.001  # accuracy difference treated as a tie (3 of ~3,100 validation frames)


def _tta_logits(logits: np.ndarray, flipped: np.ndarray, temperature: float) -> np.ndarray:
    """Logits whose softmax at T is the mean of both views' probabilities (how the runtime's --tta flip scores)."""
    def p(z):
        z = z.astype(np.float64) / temperature
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)
    return np.log(0.5 * (p(logits) + p(flipped))) * temperature


def candidates(ckpt_path: str | Path, *, sizes=SIZES, workers: int = 2, log=print) -> list[dict]:
    """Validation accuracy, NLL (at a temperature fitted per candidate) and images/s of each size x TTA."""
    from train.evaluate import load_trained
    from train.export import export_onnx

    model, ckpt, card = load_trained(ckpt_path)
    manifest, _ = D.load_manifest(ckpt["config"]["split"])
    files, y = split_files(Path(manifest["root"]), manifest, "val")
    out = []
    with tempfile.TemporaryDirectory(prefix="batchcls-serving-") as tmp:
        for size in sizes:
            onnx_path = Path(tmp, f"model-{size}.onnx")
            export_onnx(model, size, onnx_path)
            sized = dataclasses.replace(card, input_size=size)
            t = time.perf_counter()
            logits, _, ok = extract(onnx_path, sized, files, workers=workers)
            secs = time.perf_counter() - t
            assert all(ok), "unreadable validation images"
            flipped = _flipped_logits(onnx_path, sized, files, workers)
            for tta in (None, "flip"):
                z = logits if tta is None else _tta_logits(logits, flipped, 1.0)
                temp = fit_temperature(z, y)
                row = {"input_size": size, "tta": tta or "none", "val_acc": float((z.argmax(1) == y).mean()),
                       "val_nll": nll(z, y, temp), "temperature": temp,
                       "images_per_s": len(y) / secs / (2 if tta else 1)}
                out.append(row)
                log(f"serving: {size}px tta={row['tta']}: val acc {row['val_acc']:.4f} NLL {row['val_nll']:.4f} "
                    f"~{row['images_per_s']:.0f} img/s")
    return out


def _flipped_logits(onnx_path: Path, card, files, workers: int) -> np.ndarray:
    """Logits of the mirrored images (the second view of --tta flip)."""
    both, _, _ = extract(onnx_path, card, files, tta=True, workers=workers, raw_views=True)
    return both[len(both) // 2:]


def choose(rows: list[dict]) -> dict:
    """The cheapest candidate within TIE of the best validation accuracy (cost: pixels, then TTA's 2x)."""
    best = max(r["val_acc"] for r in rows)
    near = [r for r in rows if r["val_acc"] >= best - TIE]
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
