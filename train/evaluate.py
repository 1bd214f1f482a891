"""Evaluate one final model: calibrate on val, then touch the test split exactly once.

Writes into the model's folder: metrics.json, per_class.csv, confusion.png, reliability.png.
Test is scored twice: as is, and as a 2x-downscaled copy (each decoded image shrunk by 0.5, LANCZOS).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from batchcls.card import ModelCard
from batchcls.fsutil import atomic_open, atomic_path, atomic_write
from batchcls.metrics import confusion, macro_f1, per_class
from batchcls.pipeline import softmax
from train import data as D
from train import models
from train.metrics import ece, fit_temperature, nll, reliability
from train.presets import EvalTransform
from train.train import predict


def load_trained(ckpt_path: str | os.PathLike) -> tuple[torch.nn.Module, dict, ModelCard]:
    """Model (eval mode, CPU), raw checkpoint and the preprocessing card stored in it."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = models.create_model(ckpt["model_args"]["name"], ckpt["model_args"]["num_classes"], pretrained="none")
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, ModelCard(**ckpt["card"])


def _logits(model, card, root, items, *, downscale=1.0, batch_size=128, num_workers=2):
    ds = D.ImageDataset(root, items, EvalTransform(card, downscale=downscale))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    return predict(model, loader, torch.device("cpu"), channels_last=True, autocast=torch.autocast("cpu", enabled=False))


def evaluate(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, *, num_workers: int = 2,
             log=print) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, ckpt, card = load_trained(ckpt_path)
    manifest, split_sha = D.load_manifest(ckpt["config"]["split"])
    if split_sha != ckpt["split_sha256"]:
        raise RuntimeError(f"split manifest {ckpt['config']['split']} changed since {ckpt_path} was trained")
    root, n = manifest["root"], card.num_classes
    torch.set_num_threads(os.cpu_count() or 1)

    # Calibration sees validation logits only.
    val_logits, val_y, _ = _logits(model, card, root, manifest["val"], num_workers=num_workers)
    temperature = fit_temperature(val_logits, val_y)
    # The one and only pass over the test split for this model (plus its downscaled copy).
    test_logits, test_y, secs = _logits(model, card, root, manifest["test"], num_workers=num_workers)
    down_logits, down_y, _ = _logits(model, card, root, manifest["test"], downscale=0.5, num_workers=num_workers)

    def scores(logits, y):
        pred = logits.argmax(1)
        return {"macro_f1": macro_f1(y, pred, n), "acc": float((pred == y).mean()),
                "nll": nll(logits, y, temperature), "nll_raw": nll(logits, y),  # nll: at the fitted T
                "ece": ece(softmax(logits), y), "ece_calibrated": ece(softmax(logits, temperature), y)}

    m = {"model": card.architecture, "weights": ckpt.get("weights", "raw"),
         "params": sum(p.numel() for p in model.parameters()),
         "input_size": card.input_size, "train_time_s": ckpt["train_time_s"], "epochs": ckpt["epoch"] + 1,
         "temperature": temperature, "val": scores(val_logits, val_y), "test": scores(test_logits, test_y),
         "test_downscaled": scores(down_logits, down_y),
         "images_per_s": len(test_y) / secs}  # end to end: decode + preprocess + forward, batch 128
    _write_per_class(out / "per_class.csv", card.classes, test_y, test_logits.argmax(1), down_y, down_logits.argmax(1))
    _plot_confusion(out / "confusion.png", confusion(test_y, test_logits.argmax(1), n), card.classes,
                    f"{card.architecture} test (macro-F1 {m['test']['macro_f1']:.4f})")
    _plot_reliability(out / "reliability.png", card.architecture, temperature,
                      {"test": (test_logits, test_y), "test 2x downscaled": (down_logits, down_y)})
    atomic_write(out / "metrics.json", json.dumps(m, indent=2) + "\n")
    log(f"eval {card.architecture} ({m['weights']}, epoch {m['epochs']}): val NLL {m['val']['nll']:.4f} "
        f"acc {m['val']['acc']:.4f} macro-F1 {m['val']['macro_f1']:.4f} | test acc {m['test']['acc']:.4f} "
        f"macro-F1 {m['test']['macro_f1']:.4f} | 2x-downscaled acc {m['test_downscaled']['acc']:.4f} "
        f"macro-F1 {m['test_downscaled']['macro_f1']:.4f} | "
        f"T {temperature:.3f}, ECE {m['test']['ece']:.4f} -> {m['test']['ece_calibrated']:.4f} | "
        f"{m['images_per_s']:.0f} img/s")
    return m


def _write_per_class(path: Path, classes, y, pred, y_down, pred_down) -> None:
    n = len(classes)
    a, b = per_class(confusion(y, pred, n)), per_class(confusion(y_down, pred_down, n))
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "support", "precision", "recall", "f1", "downscaled_precision", "downscaled_recall",
                    "downscaled_f1"])
        for i, c in enumerate(classes):
            w.writerow([c, int(a["support"][i]), *(f"{a[k][i]:.4f}" for k in ("precision", "recall", "f1")),
                        *(f"{b[k][i]:.4f}" for k in ("precision", "recall", "f1"))])


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")


def _plot_confusion(path: Path, cm: np.ndarray, classes, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(5, 0.28 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
    ax.set_yticks(range(len(classes)), classes, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title + " - rows normalised")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _savefig(fig, path)
    plt.close(fig)


def _plot_reliability(path: Path, name: str, temperature: float, sets: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.5))
    for ax, (label, (logits, y)) in zip(np.atleast_1d(axes), sets.items()):
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for t, style in ((1.0, "o-"), (temperature, "s-")):
            centres, acc, conf, count = reliability(softmax(logits, t), y)
            keep = count > 0
            ax.plot(conf[keep], acc[keep], style, ms=4,
                    label=f"T={t:.2f}: ECE {ece(softmax(logits, t), y):.4f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} - {label}")
        ax.legend(loc="upper left")
    _savefig(fig, path)
    plt.close(fig)
