"""Evaluate one final model: calibrate on val, then touch the test split exactly once.

``evaluate``: a trained checkpoint, in PyTorch, at its training size. Writes into the model's folder:
metrics.json, per_class.csv, confusion.png, reliability.png. Test is scored twice: as is, and as a
2x-downscaled copy (each decoded image shrunk by 0.5, LANCZOS).

``evaluate_bundle``: the exported bundle as users get it, through the runtime (its serving size, TTA,
temperature and open-set decision): the figures of the results page.
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


def evaluate_bundle(bundle: str | os.PathLike, manifest: dict, out_dir: str | os.PathLike, *,
                    foreign: str | os.PathLike | None = None, log=print) -> dict:
    """The test split (and foreign images, where given) through ``batchcls.load(bundle)``: what a user's
    ``batchcls run`` would write. Scores the model's own label (``model_label``: accuracy, macro-F1, per-class
    F1, calibration) and the decision beside it (share of test images declined, accuracy with it on, share of
    foreign images declined, per kind of picture where its provenance.csv says). Writes confusion.png,
    reliability.png and per_class.csv into ``out_dir``."""
    import batchcls
    from batchcls.label_folders import declined

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = batchcls.load(bundle, backend="onnxruntime", device="cpu")
    card = model.card
    root, n = Path(manifest["root"]), card.num_classes
    rows = model.predict([str(root / rel) for rel, _ in manifest["test"]], probs=True)
    if any(r["status"] != "ok" for r in rows):
        bad = next(r for r in rows if r["status"] != "ok")
        raise RuntimeError(f"the bundle could not classify a test image ({bad['path']}: {bad['error']})")
    y = np.array([label for _, label in manifest["test"]])
    probs = np.array([[r[f"prob_{c}"] for c in card.classes] for r in rows])
    pred = probs.argmax(1)
    flagged = np.array([declined(r) for r in rows])
    m = {"input_size": card.input_size, "tta": card.tta, "temperature": card.temperature, "n_test": len(y),
         "acc": float((pred == y).mean()), "macro_f1": macro_f1(y, pred, n), "ece": ece(probs, y),
         "open_set": bool(card.openset)}
    if card.openset:
        m |= {"test_flagged": float(flagged.mean()), "acc_open_set": float(((pred == y) & ~flagged).mean())}
    if foreign is not None:
        f_rows = [r for r in model.predict_folder(foreign) if r["status"] == "ok"]
        kinds = _kinds(Path(foreign))
        sources: dict[str, list[bool]] = {}
        for r in f_rows:
            sources.setdefault(kinds.get(r["path"], r["path"].split("/", 1)[0] if "/" in r["path"] else ""),
                               []).append(declined(r))
        m["foreign_n"] = len(f_rows)
        m["foreign_flagged"] = float(np.mean([declined(r) for r in f_rows])) if f_rows else 0.0
        if len(sources) > 1:
            m["foreign_flagged_by_source"] = {s: float(np.mean(v)) for s, v in sorted(sources.items())}
    cm = confusion(y, pred, n)
    m["per_class"] = {c: {k: float(v[i]) for k, v in per_class(cm).items()} for i, c in enumerate(card.classes)}
    _plot_confusion(out / "confusion.png", cm, card.classes, f"{card.name} test (macro-F1 {m['macro_f1']:.4f})")
    _plot_reliability_probs(out / "reliability.png", f"{card.name} test, as served", probs, y)
    log(f"served: {bundle} at {card.input_size}px tta={card.tta}: test acc {m['acc']:.4f} macro-F1 "
        f"{m['macro_f1']:.4f} ECE {m['ece']:.4f}"
        + (f" | declined: test {m['test_flagged']:.3f}" if card.openset else " | no open-set decision")
        + (f", foreign {m['foreign_flagged']:.3f} of {m['foreign_n']}" if "foreign_flagged" in m else ""))
    return m


def _kinds(folder: Path) -> dict[str, str]:
    """{file: kind} from a foreign folder's provenance.csv (photo, clipart, cartoon, ...); {} without one."""
    try:
        with open(folder / "provenance.csv", newline="", encoding="utf-8") as fh:
            return {r["file"]: r.get("kind") or r.get("source", "") for r in csv.DictReader(fh)}
    except (OSError, KeyError):
        return {}


def _plot_reliability_probs(path: Path, title: str, probs: np.ndarray, y: np.ndarray) -> None:
    """Accuracy per confidence bin of probabilities as served (already at the card's temperature)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, acc, conf, count = reliability(probs, y)
    keep = count > 0
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot(conf[keep], acc[keep], "s-", ms=4, label=f"ECE {ece(probs, y):.4f}")
    for c, a, k in zip(conf[keep], acc[keep], count[keep]):
        ax.annotate(str(int(k)), (c, a), fontsize=6, xytext=(2, -8), textcoords="offset points")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    _savefig(fig, path)
    plt.close(fig)


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
