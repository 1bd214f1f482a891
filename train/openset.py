"""Fit and choose the open-set decision on validation, and write it into a bundle.

    python -m train.openset --bundle engines/simpsons --split runs/train/split.json \
        --data ../shared/data/simpsons/train --foreign-val FOREIGN/val [--foreign-test FOREIGN/test] \
        [--down-val DIR --down-test DIR] [--report runs/openset.json] --write

Steps, top to bottom: features of the train split (the statistics), of the validation split (the choice and the
operating point) and of the far-OOD validation images; every candidate method scored; the one with the most
far-OOD validation images flagged at the default cut (1 in 200 correct validation frames flagged) wins, its
statistics go to ``openset.npz`` beside the model and its description and sha256 into the card. Test splits and
the far-OOD test half are scored once, for the published table only. A near-OOD protocol leaves classes out of
the statistics (see ``near_ood``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from batchcls.backends.onnxruntime import OnnxRuntimeBackend
from batchcls.backends.record import file_sha256
from batchcls.card import ModelCard, load_card
from batchcls.decode_stage import DecodedBatch
from batchcls.fsutil import atomic_path
from batchcls.openset import DEFAULT_FLAG_RATE, METHODS, OPENSET_FILE, OpenSet, raw_score
from batchcls.pipeline import decoded_batches
from batchcls.presets import EvalPreset, normalize
from batchcls.scan import InputFile, scan_dir

FEATURES_OUTPUT = "features"
KNN_BANK = 4096  # normalised training features kept for k-NN: a few MB in float16
KNN_K = 10
TRAIN_SUBSET = 4000  # train images the statistics are fitted on: plenty for a 304-d Gaussian, minutes not tens


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


# --- statistics -------------------------------------------------------------------------------------------

def _whitening(cov: np.ndarray, shrink: float = 1e-3) -> np.ndarray:
    """W with W W^T = (cov + shrink * mean eigenvalue * I)^-1 (ridge: the covariance is rank-deficient)."""
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, 0) + shrink * max(vals.mean(), 1e-12)
    return (vecs / np.sqrt(vals)).astype(np.float32)


def fit_statistics(features: np.ndarray, labels: np.ndarray, num_classes: int, *, embed_dim: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Class means + shared covariance (Mahalanobis), one Gaussian of everything (relative), a k-NN bank, all on
    the penultimate vector; and one Gaussian of the texture statistics that follow it in the features."""
    embed_dim = embed_dim or features.shape[1]
    tex = features[:, embed_dim:].astype(np.float64)
    f = features[:, :embed_dim].astype(np.float64)
    means = np.stack([f[labels == c].mean(0) if (labels == c).any() else f.mean(0) for c in range(num_classes)])
    centred = f - means[labels]
    w = _whitening(centred.T @ centred / len(f))
    bg_mean = f.mean(0)
    bg_w = _whitening(np.cov(f, rowvar=False))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(f), size=min(KNN_BANK, len(f)), replace=False)
    bank = f[pick] / np.linalg.norm(f[pick], axis=1, keepdims=True)
    return {"whiten": w, "means_w": (means @ w).astype(np.float32), "bg_mean": bg_mean.astype(np.float32),
            "bg_whiten": bg_w, "bank": bank.astype(np.float16), "k": np.array(KNN_K), "embed_dim": np.array(embed_dim),
            "tex_mean": (tex.mean(0) if tex.shape[1] else np.zeros(0)).astype(np.float32),
            "tex_whiten": _whitening(np.cov(tex, rowvar=False)) if tex.shape[1] > 1 else np.zeros((0, 0), np.float32)}


def _auroc(known: np.ndarray, foreign: np.ndarray) -> float:
    """P(score of a known image > score of a foreign one), ties half."""
    s = np.concatenate([known, foreign])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, ranks)
    ranks = sums[inv] / counts[inv]
    r_known = ranks[:len(known)].sum()
    return float((r_known - len(known) * (len(known) + 1) / 2) / (len(known) * len(foreign)))


def quantiles(raw_correct_val: np.ndarray, n: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF of correct validation frames' raw scores, as (values, levels) for np.interp."""
    v = np.sort(raw_correct_val)
    levels = np.linspace(0.0, 1.0, n)
    values = np.quantile(v, levels, method="inverted_cdf") if len(v) else np.zeros(n)
    values = np.maximum.accumulate(values + np.arange(n) * 1e-12)  # strictly increasing for np.interp
    return values.astype(np.float64), levels


MAX_FLAGGED = 0.01  # at most this share of ALL validation frames (full size and 2x down) may be flagged


def choose_cut(oset: OpenSet, sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """The largest cut that flags at most 1 in 200 correctly classified validation frames AND at most
    ``MAX_FLAGGED`` of all validation frames, at full size and 2x downscaled alike.

    Misclassified frames score low too, so a cut set on correct frames alone flags more of the whole set;
    the second bound keeps the real frames users send from turning into 'unknown' more than 1 in 100.
    """
    scores = {name: (oset.known_score(lg, ft), lg.argmax(1) == y) for name, (lg, ft, y) in sets.items()}
    best = 0.0
    for cut in np.arange(1, int(DEFAULT_FLAG_RATE * 10000) + 1) / 10000:
        if all((s < cut).mean() <= MAX_FLAGGED and (s[ok] < cut).mean() <= DEFAULT_FLAG_RATE
               for s, ok in scores.values()):
            best = float(cut)
    return best


def build(method: str, stats: dict, val_logits: np.ndarray, val_feats: np.ndarray, val_y: np.ndarray,
          temperature: float) -> OpenSet:
    """The OpenSet for ``method``: statistics + the quantile map of correct validation frames."""
    arrays = dict(stats)
    correct = val_logits.argmax(1) == val_y
    if method in ("maha+energy", "texture+msp"):
        a, b = {"maha+energy": ("maha", "energy"), "texture+msp": ("texture", "msp")}[method]
        m = raw_score(a, arrays, val_logits[correct], val_feats[correct], temperature)
        e = raw_score(b, arrays, val_logits[correct], val_feats[correct], temperature)
        arrays["mix"] = np.array([m.mean(), m.std() or 1.0, e.mean(), e.std() or 1.0])
    raw = raw_score(method, arrays, val_logits[correct], val_feats[correct], temperature)
    arrays["q_values"], arrays["q_levels"] = quantiles(raw)
    return OpenSet(method=method, cut=DEFAULT_FLAG_RATE, temperature=temperature, arrays=arrays)


def method_arrays(method: str, arrays: dict) -> dict[str, np.ndarray]:
    """Only what ``method`` reads at inference: the bundle carries no dead weight."""
    need = {"msp": [], "energy": [], "knn": ["bank", "k"], "maha": ["whiten", "means_w"],
            "relmaha": ["whiten", "means_w", "bg_mean", "bg_whiten"],
            "maha+energy": ["whiten", "means_w", "mix"], "texture": ["tex_mean", "tex_whiten"],
            "texture+msp": ["tex_mean", "tex_whiten", "mix"]}[method] + ["embed_dim"]
    return {k: arrays[k] for k in need + ["q_values", "q_levels"]}


def write_bundle(bundle: Path, card: ModelCard, oset: OpenSet, summary: dict) -> ModelCard:
    path = bundle / OPENSET_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **method_arrays(oset.method, oset.arrays))
    spec = {"method": oset.method, "file": OPENSET_FILE, "sha256": file_sha256(path), "cut": oset.cut,
            "model": card.onnx,  # the model file the statistics describe (an INT8 copy computes other ones)
            "flag_rate_val": DEFAULT_FLAG_RATE, **summary}
    card = dataclasses.replace(card, openset=spec)
    card.save(bundle)
    return card


NEAR_OOD_CLASSES = 4  # classes left out of the statistics (and the re-fitted head) in the near-OOD protocol
NEAR_OOD_MIN_IMAGES = 100  # only classes this large are left out: their val frames give a stable rate


def refit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A linear softmax head on fixed features (L-BFGS): the classifier that never saw the left-out classes."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    w = torch.zeros(features.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def near_ood(tr_ft, tr_y, va_ft, va_y, num_classes: int, *, embed_dim: int, seed: int = 0) -> dict[str, dict]:
    """Leave a few large classes out of the statistics and the head; how often are their frames flagged?

    Per method: the share of the left-out classes' validation frames below the cut that flags 1 in 200
    correctly classified frames of the kept classes, and the AUROC between the two.
    """
    counts = np.bincount(tr_y, minlength=num_classes)
    big = [c for c in range(num_classes) if counts[c] >= NEAR_OOD_MIN_IMAGES]
    out_classes = sorted(np.random.default_rng(seed).choice(big, size=NEAR_OOD_CLASSES, replace=False).tolist())
    kept = [c for c in range(num_classes) if c not in out_classes]
    remap = {c: i for i, c in enumerate(kept)}
    tr_mask = np.isin(tr_y, kept)
    tr_yk = np.array([remap[c] for c in tr_y[tr_mask]])
    pen = slice(0, embed_dim or tr_ft.shape[1])
    w, b = refit_head(tr_ft[tr_mask][:, pen], tr_yk, len(kept))
    va_in = np.isin(va_y, kept)
    va_yk = np.array([remap[c] for c in va_y[va_in]])
    lg_in, lg_out = va_ft[va_in][:, pen] @ w + b, va_ft[~va_in][:, pen] @ w + b
    stats = fit_statistics(tr_ft[tr_mask], tr_yk, len(kept), embed_dim=embed_dim, seed=seed)
    result = {"left_out": out_classes}
    for method in METHODS:
        oset = build(method, stats, lg_in, va_ft[va_in], va_yk, 1.0)
        correct = lg_in.argmax(1) == va_yk
        s_in = oset.known_score(lg_in[correct], va_ft[va_in][correct])
        s_out = oset.known_score(lg_out, va_ft[~va_in])
        raw_in = raw_score(method, oset.arrays, lg_in[correct], va_ft[va_in][correct], 1.0)
        raw_out = raw_score(method, oset.arrays, lg_out, va_ft[~va_in], 1.0)
        result[method] = {"flagged": float((s_out < oset.cut).mean()), "auroc": _auroc(raw_in, raw_out),
                          "in_flagged": float((s_in < oset.cut).mean())}
    return result


FAR_TARGET = 0.95  # share of far-OOD validation images a method must flag at its cut to be eligible


def choose_method(rows: dict[str, dict]) -> str:
    """Among the methods that flag at least FAR_TARGET of the far-OOD validation images at their cut, the one
    that flags the most frames of the left-out classes (near-OOD, also validation frames): a new character is
    the harder "none of these". If none reaches the target, the one that flags the most far-OOD images."""
    eligible = [m for m, r in rows.items() if r["far_val_flagged"] >= FAR_TARGET]
    if eligible:
        return max(eligible, key=lambda m: (rows[m]["near_ood_flagged"], rows[m]["far_val_flagged"]))
    return max(rows, key=lambda m: (rows[m]["far_val_flagged"], rows[m]["auroc_far_val"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="the bundle to fit (its model.onnx has a features output)")
    ap.add_argument("--split", type=Path, required=True, help="split manifest JSON of the model's training run")
    ap.add_argument("--data", type=Path, required=True, help="the dataset folder the manifest's paths are under")
    ap.add_argument("--foreign-val", type=Path, required=True, help="far-OOD images for choosing (scripts/build_foreign.py)")
    ap.add_argument("--foreign-test", type=Path, help="far-OOD images for the published table only")
    ap.add_argument("--down-val", type=Path, help="2x-downscaled copy of the val split (same relative paths)")
    ap.add_argument("--down-test", type=Path, help="2x-downscaled copy of the test split (same relative paths)")
    ap.add_argument("--train-subset", type=int, default=TRAIN_SUBSET,
                    help="fit the statistics on this many seeded train images (0: all)")
    ap.add_argument("--cache", type=Path, default=Path("runs/openset-cache"), help="features are cached here")
    ap.add_argument("--report", type=Path, help="write the comparison (JSON) here")
    ap.add_argument("--method", choices=METHODS, help="write this method instead of the validation winner")
    ap.add_argument("--write", action="store_true", help="write the chosen decision into the bundle")
    run(ap.parse_args(argv))


def cached(cache: Path, name: str, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = cache / f"{name}.npz"
    if path.is_file():
        z = np.load(path)
        return z["logits"], z["features"], z["ok"]
    t = time.perf_counter()
    lg, ft, ok = fn()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, logits=lg, features=ft, ok=np.array(ok))
    print(f"features: {name}: {len(lg)} images in {time.perf_counter() - t:.0f} s")
    return lg, ft, np.array(ok)


def _images(folder: Path) -> list[InputFile]:
    return [f for f in folder_files(folder) if not f.rel.endswith((".csv", ".md"))]


def run(args) -> dict:
    card = load_card(args.bundle)
    if not OnnxRuntimeBackend(card.onnx_path).has_features:
        raise SystemExit(f"{card.onnx_path} has no '{FEATURES_OUTPUT}' output: re-export the bundle (python -m train.export)")
    manifest = json.loads(args.split.read_text())
    tta = card.tta == "flip"  # the statistics describe what serves: with --tta flip, both views' mean
    tag, T = card.onnx_sha256[:12] + ("-flip" if tta else ""), card.temperature

    def split(which: str, root: Path, name: str):
        files, y = split_files(root, manifest, which)
        if which == "train" and args.train_subset:
            keep = sorted(np.random.default_rng(0).choice(len(files), min(args.train_subset, len(files)), replace=False))
            files, y = [files[i] for i in keep], y[keep]
            name = f"{name}{len(files)}"
        lg, ft, ok = cached(args.cache, f"{tag}-{name}", lambda: extract(card.onnx_path, card, files, tta=tta))
        if not ok.all():
            raise SystemExit(f"{int((~ok).sum())} unreadable images in {root} ({which} split)")
        return lg, ft, y

    def folder(path: Path, name: str):
        lg, ft, ok = cached(args.cache, f"{tag}-{name}", lambda: extract(card.onnx_path, card, _images(path), tta=tta))
        return lg, ft

    tr_lg, tr_ft, tr_y = split("train", args.data, "train")
    va_lg, va_ft, va_y = split("val", args.data, "val")
    fv_lg, fv_ft = folder(args.foreign_val, "foreign-val")
    stats = fit_statistics(tr_ft, tr_y, card.num_classes, embed_dim=card.embedding_dim)
    sets = {"val": (va_lg, va_ft, va_y)}
    if args.down_val:
        sets["val_down"] = split("val", args.down_val, "val-down")
    rows = {}
    for method in METHODS:
        # the cut: 1 in 200 correctly classified validation frames, at full size and 2x down together
        lg = np.concatenate([v[0] for v in sets.values()])
        ft = np.concatenate([v[1] for v in sets.values()])
        y = np.concatenate([v[2] for v in sets.values()])
        oset = build(method, stats, lg, ft, y, T)
        oset = dataclasses.replace(oset, cut=choose_cut(oset, sets))
        r = {"cut": oset.cut,"auroc_far_val": _auroc(raw_score(method, oset.arrays, lg[lg.argmax(1) == y], ft[lg.argmax(1) == y], T),
                                     raw_score(method, oset.arrays, fv_lg, fv_ft, T)),
             "far_val_flagged": float((oset.known_score(fv_lg, fv_ft) < oset.cut).mean())}
        for name, (slg, sft, sy) in sets.items():
            r[f"{name}_correct_flagged"] = float((oset.known_score(slg, sft)[slg.argmax(1) == sy] < oset.cut).mean())
        rows[method] = {"oset": oset, **r}
        print(f"openset: {method:12s} far-OOD val AUROC {r['auroc_far_val']:.4f}, flagged {r['far_val_flagged']:.3f}; "
              + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k.endswith("_correct_flagged")))
    near = near_ood(tr_ft, tr_y, va_ft, va_y, card.num_classes, embed_dim=card.embedding_dim)
    for method in METHODS:
        rows[method]["near_ood_flagged"] = near[method]["flagged"]
        rows[method]["near_ood_auroc"] = near[method]["auroc"]
    chosen = args.method or choose_method(rows)
    print(f"openset: chosen {chosen}")
    # Reporting only: the test halves, touched once, after the choice.
    if args.foreign_test:
        ft_lg, ft_ft = folder(args.foreign_test, "foreign-test")
    tests = {"test": split("test", args.data, "test")}
    if args.down_test:
        tests["test_down"] = split("test", args.down_test, "test-down")
    for method in METHODS:
        oset = rows[method]["oset"]
        if args.foreign_test:
            ok_scores = oset.known_score(ft_lg, ft_ft)
            rows[method]["far_test_flagged"] = float((ok_scores < oset.cut).mean())
            te_lg, te_ft, te_y = tests["test"]
            c = te_lg.argmax(1) == te_y
            rows[method]["auroc_far_test"] = _auroc(raw_score(method, oset.arrays, te_lg[c], te_ft[c], T),
                                                    raw_score(method, oset.arrays, ft_lg, ft_ft, T))
        for name, (tlg, tft, ty) in tests.items():
            s = oset.known_score(tlg, tft)
            rows[method][f"{name}_flagged"] = float((s < oset.cut).mean())
            rows[method][f"{name}_acc_open_set"] = float(((tlg.argmax(1) == ty) & (s >= oset.cut)).mean())
            rows[method][f"{name}_acc"] = float((tlg.argmax(1) == ty).mean())
    table = {m: {k: v for k, v in r.items() if k != "oset"} for m, r in rows.items()}
    summary = {"chosen": chosen, "left_out_classes": [card.classes[c] for c in near["left_out"]], "methods": table}
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    if args.write:
        keep = {k: v for k, v in table[chosen].items()}
        card = write_bundle(args.bundle, card, rows[chosen]["oset"], {"figures": keep})
        print(f"openset: wrote {args.bundle / OPENSET_FILE} ({chosen}, cut {card.openset['cut']})")
    return summary


if __name__ == "__main__":
    main()
