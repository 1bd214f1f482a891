"""Linear probe: the frozen ImageNet backbone's features and a logistic-regression head fitted on them.

On a few hundred images, a fine-tune's first epochs go to a head that starts from nothing; a head fitted in
closed form-ish (L-BFGS on cached features, seconds on a CPU) is where fine-tuning should start, and the bar
it has to clear. The probe is written as a checkpoint of the whole network (backbone + fitted head) in
train.train's format, so the same file is the fine-tune's ``pretrained`` weights, a model evaluate() scores,
and a model export() ships when nothing beats it.

Features are the input of the network's last Linear layer (read with a forward hook, so any model of
train.models works). Validation images go through the eval preset the runtime uses; train images come from the
uint8 pixel cache train.train builds anyway (the eval preset at 1.25x, resized to the input side, which is the
augmentation with everything off), so the train split is decoded once for probe and fine-tune together. Both
are cached on disk: the probe of a rerun (another budget, review folders added to train) costs only the images
it has not seen.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from batchcls.metrics import macro_f1
from train import data as D
from train import models
from train.metrics import fit_temperature, nll
from train.presets import BatchAugment, EvalTransform, cache_preset, cache_side, preprocessing_card
from train.train import TrainConfig, atomic_save

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)  # L2 on the head's weights; chosen by CV on train
TRAIN_SUBSET = 4000  # train images the head is fitted on: a linear head on ~1,300 features needs no more


def last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The layer that maps features to class scores (timm: the classifier; VGG: its MLP's last layer)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


@torch.inference_mode()
def features(model: torch.nn.Module, batches) -> np.ndarray:
    """The last Linear layer's input for every image of ``batches`` (normalized float NCHW tensors)."""
    grabbed = []
    hook = last_linear(model).register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].float().cpu()))
    model.eval()
    try:
        for x in batches:
            model(x.contiguous(memory_format=torch.channels_last))
    finally:
        hook.remove()
    return torch.cat(grabbed).numpy()


def eval_batches(card, root: str, items: list, *, batch_size: int = 64, num_workers: int = 2):
    """Files through the runtime's eval preset (what validation and test are scored on)."""
    loader = DataLoader(D.ImageDataset(root, items, EvalTransform(card)), batch_size=batch_size,
                        num_workers=num_workers)
    return (x for x, _ in loader)


def cache_batches(card, pixels: np.ndarray, rows: list[int], *, batch_size: int = 64):
    """Cached train pixels (``rows`` of them) as the fine-tune sees them with every augmentation off: the eval
    preset."""
    plain = BatchAugment(card, scale=(1, 1), ratio=(1, 1), rotation=0, flip=False, p_downscale=0)
    return (plain(torch.from_numpy(np.ascontiguousarray(pixels[rows[i:i + batch_size]])))
            for i in range(0, len(rows), batch_size))


def cached_features(model, batches, n: int, cache: Path, key: dict, *, log=print) -> tuple[np.ndarray, float]:
    """``features`` once per ``key`` (weights, preprocessing, items): a rerun reads them back; returns them and
    the images per second (decode + forward; 0 when read back)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"features-{digest}.npy"
    if path.is_file():
        return np.load(path), 0.0
    t0 = time.time()
    feats = features(model, batches)
    ips = n / max(time.time() - t0, 1e-9)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    log(f"probe: features of {n} images at {ips:.0f} img/s -> {path}")
    return feats, ips


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, *,
             steps: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (L-BFGS), classes balanced by 1/sqrt(count) like the fine-tune's
    sampler; returns the Linear layer's (weight [C, D], bias [C])."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    per_class = torch.as_tensor(1 / np.sqrt(np.maximum(counts, 1)))
    sample_w = per_class[yt] / per_class[yt].mean()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(xt @ w.T + b, yt, reduction="none")
        loss = (ce * sample_w).mean() + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float().numpy(), b.detach().float().numpy()


def cross_validated(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, *, folds: int = 3,
                    seed: int = 0) -> dict:
    """Scores of the out-of-fold logits of ``folds`` fits. The weight decay is chosen on train this way, not on
    validation: a probe picked as the best of several on validation would be judged there with the pick's
    optimism, and validation is where it is weighed against the fine-tunes."""
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    logits = np.zeros((len(y), num_classes), np.float32)
    for k in range(folds):
        w, b = fit_head(x[fold != k], y[fold != k], num_classes, weight_decay)
        logits[fold == k] = x[fold == k] @ w.T + b
    return scores(logits, y, num_classes)


def scores(logits: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """What train.train logs for validation: NLL at the fitted temperature, accuracy, macro-F1."""
    t = fit_temperature(logits, y)
    pred = logits.argmax(1)
    return {"nll": nll(logits, y, t), "temperature": t, "acc": float((pred == y).mean()),
            "macro_f1": macro_f1(y, pred, num_classes)}


def fit_probe(cfg: TrainConfig, out_dir: str | Path, *, cache: Path | None = None, log=print) -> dict:
    """Fit the probe for ``cfg`` (model, weights, split, input size) and save it as ``out_dir/ckpt_best.pt``.

    Returns {"ckpt", "val" (its validation scores), "weight_decay", "eval_images_per_s"}.
    """
    t0 = time.time()
    out = Path(out_dir)
    manifest, split_sha = D.load_manifest(cfg.split)
    classes, root = manifest["classes"], manifest["root"]
    card = preprocessing_card(architecture=cfg.model, classes=classes, input_size=cfg.input_size,
                              **models.data_config(cfg.model))
    model = models.create_model(cfg.model, len(classes), pretrained=cfg.pretrained, classes=classes)
    model = model.to(memory_format=torch.channels_last)
    rows = D.seeded_subset(list(range(len(manifest["train"]))), TRAIN_SUBSET, cfg.seed)
    train_items = [manifest["train"][i] for i in rows]
    cache = cache or out.parent / "features"
    key = {"model": cfg.model, "pretrained": cfg.pretrained, "root": str(Path(root).resolve()), "card": card.to_dict()}
    # the pixel cache train.train reads (same preset, folder and items): the train split is decoded once
    t0_px = time.time()
    pixels = D.pixel_cache(root, manifest["train"], cache_preset(card, cache_side(card)),
                           Path(cfg.split).parent / "cache", workers=cfg.num_workers, log=log)
    decode_s = time.time() - t0_px
    x_tr, _ = cached_features(model, cache_batches(card, pixels, rows), len(rows), cache,
                              {**key, "items": train_items, "from": "pixel cache"}, log=log)
    x_va, ips_va = cached_features(model, eval_batches(card, root, manifest["val"], num_workers=cfg.num_workers),
                                   len(manifest["val"]), cache, {**key, "items": manifest["val"]}, log=log)
    if not ips_va and decode_s > 1:  # validation read back: the train split's decode says what a pass costs
        ips_va = len(manifest["train"]) / decode_s
    y_tr = np.array([y for _, y in train_items])
    y_va = np.array([y for _, y in manifest["val"]])
    cv = {wd: cross_validated(x_tr, y_tr, len(classes), wd, seed=cfg.seed) for wd in WEIGHT_DECAYS}
    wd = min(cv, key=lambda d: (round(cv[d]["nll"], 4), -d))  # ties: the stronger decay
    log("probe: weight decay by 3-fold cross-validation on train: "
        + ", ".join(f"{d:g} NLL {r['nll']:.4f} acc {r['acc']:.3f}" for d, r in cv.items()) + f" -> {wd:g}")
    w, b = fit_head(x_tr, y_tr, len(classes), wd)
    val = scores(x_va @ w.T + b, y_va, len(classes))
    head = last_linear(model)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt_best.pt"
    secs = time.time() - t0
    # train.train's checkpoint keys: train.models reads "model" + "classes" (the head is kept), evaluate and
    # export read the rest; "weights" names what kind of model this is in every table.
    atomic_save({"model": model.state_dict(), "model_args": {"name": cfg.model, "num_classes": len(classes)},
                 "classes": classes, "card": card.to_dict(), "config": asdict(cfg), "split_sha256": split_sha,
                 "epoch": -1, "step": 0, "train_time_s": secs, "weights": "probe", "val": val,
                 "weight_decay": wd, "best_val_nll": val["nll"], "best_val_f1": val["macro_f1"]}, ckpt)
    log(f"probe: {cfg.model} linear head on frozen features: val acc {val['acc']:.4f} macro-F1 "
        f"{val['macro_f1']:.4f} NLL {val['nll']:.4f} (weight decay {wd:g}, {secs:.0f} s)")
    return {"ckpt": str(ckpt), "val": val, "weight_decay": wd, "eval_images_per_s": ips_va}
