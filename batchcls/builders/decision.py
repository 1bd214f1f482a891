"""Fit, choose and gate the "none of these" decision for every way a bundle is served.

    python -m train.decision --bundle engines/simpsons                      # FP32 (+ shipped INT8) x TTA
    python -m train.decision --bundle engines/simpsons --test --report runs/decision.json   # + the test tables

A builder like the INT8 and TensorRT ones: ``batchcls engine build`` fits the decision of what it builds here,
``train/`` fits it for every bundle it exports (``train/decision.py`` is the command line).

One served configuration = one model file (FP32 ONNX, the shipped INT8, a local build) x one TTA mode. Each
gets its own statistics, fitted through the runtime's own ``Classifier`` on what that configuration computes:

1. Validation frames (the split manifest's) are scored at full size and as users shrink them (``CONDITIONS``:
   half size with five filters and JPEG qualities), so covariate shift stays "known" and only semantic shift
   is flagged (OpenOOD v1.5's full-spectrum setting).
2. Signal statistics (a texture Gaussian, class means) come from one seeded half of a train sample; a logistic
   model over the standardised signals is fitted on the other half (frames under every condition) against
   the foreign training images (outlier exposure's set, disjoint by source package from the measuring half).
   Its output is ``known_score``: P(one of the classes) under even odds.
3. Each candidate method (a subset of the signals) gets the largest cut that flags at most ``FLAG_TARGET`` of
   the validation frames under every condition; the method flagging the most foreign validation images wins
   (a tie, within ``TIE``, goes to the one that reads fewer of the model's outputs).
4. The gate: at most ``GATE_FLAGGED`` of validation frames flagged under every condition and at least
   ``GATE_FOREIGN`` of the foreign validation half flagged. A configuration that fails is recorded with the
   reason; the runtime warns when it serves one, and the CPU backend prefers a model file whose decision passed.

The test split and the foreign test half are scored once, with ``--test``, for the published tables only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from batchcls.backends.onnxruntime import OnnxRuntimeBackend
from batchcls.backends.record import file_sha256, read_record
from batchcls.builders.conditions import CONDITIONS, Condition, degraded_bytes
from batchcls.builders.manifest import find_manifest
from batchcls.builders.record import update_record
from batchcls.card import ModelCard, load_card
from batchcls.decode import DecodeError, decode_image
from batchcls.errors import InputError
from batchcls.fsutil import atomic_path
from batchcls.infer import TTA_MODES, Classifier, Outputs, mean_of_views
from batchcls.metrics import macro_f1
from batchcls.openset import OpenSet, signals
from batchcls.presets import EvalPreset

FLAG_TARGET = 0.0075  # the cut flags at most this share of validation frames under each condition
GATE_FLAGGED = 0.01  # the gate: at most this share of validation frames flagged, under every condition
GATE_FOREIGN = 0.95  # the gate: at least this share of the foreign validation half flagged
TIE = 0.005  # foreign-flagged rates this close are a tie between methods
METHODS = ("msp", "energy", "msp+energy", "texture+msp", "texture+msp+energy", "texture+msp+energy+maha")
TRAIN_SAMPLE = 4000  # train frames: half for the signal statistics, half for the logistic model
BATCH = 64


# --- pixels: every image as the runtime decodes it, under a condition ------------------------------------

def _decode(job: tuple[str, Condition, EvalPreset]) -> np.ndarray | None:
    path, condition, preset = job
    try:
        return preset(decode_image(degraded_bytes(path, condition), min_side=preset.min_decode_side))
    except (DecodeError, OSError):
        return None


def pixels(paths: list[str], conditions: list[Condition], preset: EvalPreset, cache: Path, *,
           workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC, ok mask) of ``paths[i]`` under ``conditions[i]``, decoded as the runtime decodes a file.

    Cached by the file list, conditions and preset: every model file and TTA mode reads the same pixels."""
    key = hashlib.sha256(json.dumps([paths, [dataclasses.astuple(c) for c in conditions], preset.input_size,
                                     preset.resize_mode, preset.crop_pct, int(preset.resample)]).encode()).hexdigest()
    path = cache / f"pixels-{key[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["images"], z["ok"]
    s = preset.input_size
    jobs = [(p, c, preset) for p, c in zip(paths, conditions)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        decoded = pool.map(_decode, jobs, chunksize=32)
    ok = np.array([d is not None for d in decoded])
    images = np.stack([d if d is not None else np.zeros((s, s, 3), np.uint8) for d in decoded])
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, ok=ok)
    return images, ok


# --- outputs: what one served configuration computes --------------------------------------------------------

@dataclasses.dataclass
class Scored:
    """One configuration's outputs for a set of images (ok ones only), with labels where known."""

    probs: np.ndarray
    logits: np.ndarray
    features: np.ndarray | None
    labels: np.ndarray | None = None
    condition: np.ndarray | None = None  # condition name per image

    def take(self, mask: np.ndarray) -> Scored:
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[mask]
        return Scored(self.probs[mask], self.logits[mask], pick(self.features), pick(self.labels),
                      pick(self.condition))


def score(card: ModelCard, model: Path, images: np.ndarray) -> dict[str, Scored]:
    """{tta: outputs} for every TTA mode, through the runtime's ``Classifier``: each image and its mirror go
    through the model once; 'none' reads the first view, 'flip' averages both exactly as serving does."""
    clf = Classifier(card, OnnxRuntimeBackend(model), tta="none", open_set=False)
    parts: dict[str, list[Outputs]] = {t: [] for t in TTA_MODES}
    for i in range(0, len(images), BATCH):
        x = images[i:i + BATCH]
        n = len(x)
        both = clf.outputs(np.concatenate([x, x[:, :, ::-1]]), features=True)  # probs: the runtime's softmax
        p_views, feats = both.probs, both.features
        parts["none"].append(Outputs(both.probs[:n], both.logits[:n], None if feats is None else feats[:n]))
        parts["flip"].append(Outputs(mean_of_views(p_views, 2), mean_of_views(both.logits, 2),
                                     None if feats is None else mean_of_views(feats, 2)))
    out = {}
    for t, ps in parts.items():
        feats = None if ps[0].features is None else np.concatenate([p.features for p in ps])
        out[t] = Scored(np.concatenate([p.probs for p in ps]), np.concatenate([p.logits for p in ps]), feats)
    return out


# --- fitting -------------------------------------------------------------------------------------------

def _whitening(cov: np.ndarray, shrink: float = 1e-3) -> np.ndarray:
    """W with W W^T = (cov + shrink * mean eigenvalue * I)^-1 (ridge: the covariance is rank-deficient)."""
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, 0) + shrink * max(vals.mean(), 1e-12)
    return (vecs / np.sqrt(vals)).astype(np.float32)


def fit_statistics(s: Scored, num_classes: int, embed_dim: int) -> dict[str, np.ndarray]:
    """The texture Gaussian and the class means (shared covariance) of training frames' features."""
    if s.features is None:
        return {}
    tex = s.features[:, embed_dim:].astype(np.float64)
    f = s.features[:, :embed_dim].astype(np.float64)
    y = s.labels
    means = np.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(num_classes)])
    centred = f - means[y]
    w = _whitening(centred.T @ centred / len(f))
    return {"embed_dim": np.array(embed_dim), "tex_mean": tex.mean(0).astype(np.float32),
            "tex_whiten": _whitening(np.cov(tex, rowvar=False)), "whiten": w,
            "means_w": (means @ w).astype(np.float32)}


def logistic(z: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, steps: int = 50) -> tuple[np.ndarray, float]:
    """Weights and intercept of a logistic regression, both classes weighted equally (Newton's method)."""
    x = np.hstack([z, np.ones((len(z), 1))])
    w = np.zeros(x.shape[1])
    sw = np.where(y == 1, 0.5 / max((y == 1).sum(), 1), 0.5 / max((y == 0).sum(), 1))
    reg = l2 * np.eye(x.shape[1])
    reg[-1, -1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (sw * (p - y)) + reg @ w
        hess = (x * (sw * p * (1 - p))[:, None]).T @ x + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def build(method: str, stats: dict, known: Scored, foreign: Scored, temperature: float) -> OpenSet:
    """The OpenSet of ``method``: signals standardised on known frames, a logistic model against foreign ones."""
    names = tuple(method.split("+"))
    arrays = dict(stats)
    zk = signals(names, arrays, known.probs, known.logits, known.features, temperature)
    zf = signals(names, arrays, foreign.probs, foreign.logits, foreign.features, temperature)
    mean, std = zk.mean(0), zk.std(0) + 1e-9
    coef, intercept = logistic(np.vstack([(zk - mean) / std, (zf - mean) / std]),
                               np.r_[np.ones(len(zk)), np.zeros(len(zf))])
    arrays.update(sig_mean=mean, sig_std=std, coef=coef, intercept=np.array(intercept))
    need = {"sig_mean", "sig_std", "coef", "intercept"}
    if "texture" in names or "maha" in names:
        need.add("embed_dim")
    if "texture" in names:
        need |= {"tex_mean", "tex_whiten"}
    if "maha" in names:
        need |= {"whiten", "means_w"}
    return OpenSet(method=method, cut=0.5, temperature=temperature, arrays={k: arrays[k] for k in need})


def known_scores(oset: OpenSet, s: Scored) -> np.ndarray:
    return oset.known_score(s.probs, s.logits, s.features)


def choose_cut(oset: OpenSet, val: Scored) -> float:
    """The largest cut flagging at most FLAG_TARGET of validation frames under every condition."""
    k = known_scores(oset, val)
    return float(min(np.quantile(k[val.condition == c], FLAG_TARGET) for c in np.unique(val.condition)))


def figures(oset: OpenSet, cut: float, val: Scored, foreign_val: Scored) -> dict:
    """What the gate reads: flagged share per condition (all frames and correct ones), foreign flagged."""
    k = known_scores(oset, val)
    correct = val.probs.argmax(1) == val.labels
    pred = val.probs.argmax(1)
    n = val.probs.shape[1]
    fig = {"flagged": {c: float((k[val.condition == c] < cut).mean()) for c in np.unique(val.condition)},
           "acc": {c: float(correct[val.condition == c].mean()) for c in np.unique(val.condition)},
           "macro_f1": {c: macro_f1(val.labels[val.condition == c], pred[val.condition == c], n)
                        for c in np.unique(val.condition)},
           "correct_flagged": {c: float((k[(val.condition == c) & correct] < cut).mean())
                               for c in np.unique(val.condition)},
           "foreign_flagged": float((known_scores(oset, foreign_val) < cut).mean())}
    return fig


def gate(fig: dict) -> tuple[bool, str]:
    worst = max(fig["flagged"], key=fig["flagged"].get)
    ok_val = fig["flagged"][worst] <= GATE_FLAGGED
    ok_foreign = fig["foreign_flagged"] >= GATE_FOREIGN
    reason = (f"validation frames flagged at most {fig['flagged'][worst]:.2%} ({worst}; limit {GATE_FLAGGED:.0%}), "
              f"foreign validation images flagged {fig['foreign_flagged']:.1%} (at least {GATE_FOREIGN:.0%})")
    return ok_val and ok_foreign, reason


def choose(card: ModelCard, stats: dict, train_known: Scored, foreign_train: Scored, val: Scored,
           foreign_val: Scored, log: Callable[[str], None]) -> tuple[OpenSet, dict]:
    """Every candidate method fitted, cut and measured on validation; the winner, and every candidate's row."""
    rows, fitted = {}, {}
    has_features = train_known.features is not None
    for method in METHODS:
        if not has_features and ("texture" in method or "maha" in method):
            continue
        oset = build(method, stats, train_known, foreign_train, card.temperature)
        cut = choose_cut(oset, val)
        fig = figures(oset, cut, val, foreign_val)
        rows[method], fitted[method] = {"cut": cut, **fig}, dataclasses.replace(oset, cut=cut)
        log(f"decision: {method:26s} cut {cut:.3f}: foreign val flagged {fig['foreign_flagged']:.3f}, val flagged "
            f"at most {max(fig['flagged'].values()):.4f}")
    best = max(rows[m]["foreign_flagged"] for m in rows)
    winner = next(m for m in rows if rows[m]["foreign_flagged"] >= best - TIE)  # METHODS: cheapest first
    return fitted[winner], rows


NEAR_OOD_CLASSES = 4  # classes left out of the head and the statistics in the near-OOD protocol
NEAR_OOD_MIN_IMAGES = 100  # only classes with this many train frames in the sample are left out


def refit_head(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float = 1e-4, steps: int = 300
               ) -> tuple[np.ndarray, np.ndarray]:
    """A linear softmax head on fixed features (full-batch gradient descent with momentum): the classifier that
    never saw the left-out classes."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    onehot = np.eye(num_classes)[y]
    for _ in range(steps):
        logits = z @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        gw, gb = z.T @ (p - onehot) / len(z) + l2 * w, (p - onehot).mean(0)
        vw, vb = 0.9 * vw - 0.5 * gw, 0.9 * vb - 0.5 * gb
        w, b = w + vw, b + vb
    return w / sd[:, None], b - (mu / sd) @ w


def near_ood(card: ModelCard, method: str, tr: Scored, foreign_train: Scored, val: Scored, seed: int = 0) -> dict:
    """How often frames of characters the model never learnt are flagged (the harder "none of these").

    A few large classes are left out of a re-fitted linear head and of the statistics; the decision of
    ``method`` is fitted, cut and scored as for the real model, and the left-out classes' validation frames
    (every condition) are the unknowns."""
    if tr.features is None:
        return {}
    dim = card.embedding_dim or tr.features.shape[1]
    counts = np.bincount(tr.labels, minlength=card.num_classes)
    big = [c for c in range(card.num_classes) if counts[c] >= NEAR_OOD_MIN_IMAGES]
    if len(big) < NEAR_OOD_CLASSES + 2:
        return {}  # too few large classes to leave some out and keep a classifier
    out = sorted(np.random.default_rng(seed).choice(big, size=min(NEAR_OOD_CLASSES, len(big)), replace=False).tolist())
    kept = [c for c in range(card.num_classes) if c not in out]
    remap = np.full(card.num_classes, -1)
    remap[kept] = np.arange(len(kept))

    def relabel(s: Scored, w, b) -> Scored:
        logits = s.features[:, :dim].astype(np.float64) @ w + b
        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        labels = None if s.labels is None else remap[s.labels]
        return Scored(p.astype(np.float32), logits.astype(np.float32), s.features, labels, s.condition)

    keep_tr = np.isin(tr.labels, kept)
    w, b = refit_head(tr.features[keep_tr][:, :dim].astype(np.float64), remap[tr.labels[keep_tr]], len(kept))
    half = np.arange(len(tr.probs)) % 2 == 0
    tr2, fo2 = relabel(tr.take(keep_tr), w, b), relabel(foreign_train, w, b)
    h = half[keep_tr]
    stats = fit_statistics(tr2.take(h), len(kept), dim)
    oset = build(method, stats, tr2.take(~h), fo2, 1.0)
    val2 = relabel(val, w, b)
    inside = np.isin(val.labels, kept)
    cut = choose_cut(oset, val2.take(inside))
    k_out = known_scores(oset, val2.take(~inside))
    return {"left_out": [card.classes[c] for c in out], "flagged": float((k_out < cut).mean()),
            "in_flagged": float((known_scores(oset, val2.take(inside)) < cut).mean())}


# --- the bundle's configurations ---------------------------------------------------------------------------

def served_models(card: ModelCard) -> list[Path]:
    """The model files a bundle serves on a CPU: its ONNX, and the shipped INT8 model when there is one."""
    from batchcls.backends.record import shipped_int8_path

    models = [card.onnx_path]
    if shipped_int8_path(card).is_file():
        models.append(shipped_int8_path(card))
    return models


@dataclasses.dataclass
class Sets:
    """The images a fit reads, decoded once: (pixels, ok, labels, condition names) per set."""

    train: tuple
    val: tuple
    foreign_train: tuple
    foreign_val: tuple


def _images(folder: Path) -> list[str]:
    from batchcls.scan import scan_dir

    return sorted(f.path for f in scan_dir(str(folder), recursive=True) if not f.rel.endswith((".csv", ".md", ".txt")))


def _spread(paths: list[str], seed: int) -> list[Condition]:
    """One condition per image, seeded, every condition equally often."""
    rng = np.random.default_rng(seed)
    return [CONDITIONS[i] for i in rng.permutation(np.arange(len(paths)) % len(CONDITIONS))]


def load_sets(card: ModelCard, manifest: dict, foreign_train: Path, foreign_val: Path, cache: Path,
              split: str = "val", foreign_measure: Path | None = None) -> Sets:
    preset = EvalPreset.from_card(card)
    root = Path(manifest["root"])
    rng = np.random.default_rng(0)
    train = manifest["train"]
    pick = sorted(rng.choice(len(train), min(TRAIN_SAMPLE, len(train)), replace=False))
    tr_paths = [str(root / train[i][0]) for i in pick]
    tr_y = np.array([train[i][1] for i in pick])
    tr_cond = _spread(tr_paths, 1)
    ev = manifest[split]
    ev_paths = [str(root / rel) for rel, _ in ev] * len(CONDITIONS)
    ev_cond = [c for c in CONDITIONS for _ in ev]
    ev_y = np.array([y for _, y in ev] * len(CONDITIONS))
    ft_paths = _images(foreign_train)
    ft_cond = _spread(ft_paths, 2)
    fv_paths = _images(foreign_measure or foreign_val)
    fv_cond = [CONDITIONS[0]] * len(fv_paths)

    def load(paths, conds, y):
        images, ok = pixels(paths, conds, preset, cache)
        return images, ok, y, np.array([c.name for c in conds])
    return Sets(load(tr_paths, tr_cond, tr_y), load(ev_paths, ev_cond, ev_y), load(ft_paths, ft_cond, None),
                load(fv_paths, fv_cond, None))


def scored_sets(card: ModelCard, model: Path, sets: Sets,
                names: tuple[str, ...] = ("train", "val", "foreign_train", "foreign_val")) -> dict[str, dict[str, Scored]]:
    """{set name: {tta: Scored}} for one model file."""
    out = {}
    for name in names:
        images, ok, y, cond = getattr(sets, name)
        by_tta = score(card, model, images[ok])
        for s in by_tta.values():
            s.labels = None if y is None else y[ok]
            s.condition = cond[ok]
        out[name] = by_tta
    return out


def fit_config(card: ModelCard, model: Path, tta: str, scored: dict[str, dict[str, Scored]], bundle: Path,
               log: Callable[[str], None]) -> tuple[dict, OpenSet]:
    """Fit, choose, gate and write one configuration's statistics; returns its card entry."""
    tr = scored["train"][tta]
    half = np.arange(len(tr.probs)) % 2 == 0
    stats = fit_statistics(tr.take(half), card.num_classes, card.embedding_dim or 0) if tr.features is not None else {}
    oset, rows = choose(card, stats, tr.take(~half), scored["foreign_train"][tta], scored["val"][tta],
                        scored["foreign_val"][tta], log)
    fig = rows[oset.method]
    fig["near_ood"] = near_ood(card, oset.method, tr, scored["foreign_train"][tta], scored["val"][tta])
    passed, reason = gate(fig)
    sha = file_sha256(model)
    name = f"openset-{model.stem}-{tta}.npz"
    path = bundle / name
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **oset.arrays)
    entry = {"model": model.name, "model_sha256": sha, "tta": tta, "method": oset.method, "file": name,
             "sha256": file_sha256(path), "cut": round(oset.cut, 6),
             "gate": {"passed": passed, "reason": reason, **fig},
             "candidates": {m: {"cut": r["cut"], "foreign_flagged": r["foreign_flagged"],
                                "max_val_flagged": max(r["flagged"].values())} for m, r in rows.items()}}
    log(f"decision: {model.name} --tta {tta}: {oset.method}, cut {oset.cut:.3f}; gate "
        f"{'PASSED' if passed else 'FAILED'}: {reason}")
    return entry, dataclasses.replace(oset, config=entry)


def find_split(card: ModelCard, split: Path | None) -> dict:
    path = split or find_manifest(card)
    if path is None:
        raise InputError(f"the split manifest of {card.bundle_dir} is not here (the card records its sha256): pass "
                         "--split runs/<run>/split.json")
    return json.loads(Path(path).read_text())


def foreign_sets(foreign: Path | None) -> dict[str, Path]:
    """The foreign image folders (train / val / test) that ``scripts/build_foreign.py`` writes."""
    root = Path(foreign or "runs/foreign")
    if not all((root / k).is_dir() for k in ("train", "val")):
        raise InputError(f"no foreign images in {root}/train and {root}/val, which the decision is fitted and gated "
                         f"on: build them with `python scripts/build_foreign.py {root}`")
    return {k: root / k for k in ("train", "val", "test")}


def fit_decision(bundle: Path, *, manifest: Path | None = None, foreign: Path | None = None,
                 models: list[Path] | None = None, local: bool = False, cache: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Fit and gate the decision of every configuration (model file x TTA) of ``bundle`` and write them: into
    the card for the files it ships, into the machine's engine record with ``local`` (``make engine``'s
    builds). Returns {"configs": [...], "passed": all gates passed}."""
    t0 = time.perf_counter()
    bundle = Path(bundle)
    card = load_card(bundle)
    split = find_split(card, manifest)
    folders = foreign_sets(foreign)
    cache = cache or Path("runs/decision-cache")
    sets = load_sets(card, split, folders["train"], folders["val"], cache)
    entries = []
    for model in models or served_models(card):
        scored = scored_sets(card, model, sets)
        for tta in TTA_MODES:
            entry, _ = fit_config(card, model, tta, scored, bundle, log)
            entries.append(entry)
    if local:
        keep = [e for e in read_record(card).get("openset", []) if e.get("model") not in {e2["model"] for e2 in entries}]
        update_record(card, "openset", keep + entries)
    else:
        keep = [e for e in (card.openset or {}).get("configs", []) if isinstance(e, dict)
                and e.get("model") not in {e2["model"] for e2 in entries}]
        card = dataclasses.replace(card, openset={"configs": keep + entries})
        card.save(bundle)
    passed = all(e["gate"]["passed"] for e in entries)
    log(f"decision: {len(entries)} configurations fitted in {time.perf_counter() - t0:.0f} s; "
        f"{'all passed their gate' if passed else 'NOT all passed: see the reasons above'}")
    return {"configs": entries, "passed": passed}


def test_tables(bundle: Path, *, manifest: Path | None = None, foreign: Path | None = None,
                cache: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """The published tables, touching the test split and the foreign test half once: per configuration and
    condition, accuracy with and without the decision and the share flagged; the foreign test half flagged."""
    from batchcls.openset import Decisions

    card = load_card(bundle)
    split = find_split(card, manifest)
    folders = foreign_sets(foreign)
    cache = cache or Path("runs/decision-cache")
    decisions = Decisions.from_card(card, extra=read_record(card).get("openset", []))
    sets = load_sets(card, split, folders["train"], folders["val"], cache, split="test",
                     foreign_measure=folders["test"])
    tables = {}
    for model in sorted({bundle / e["model"] for e in decisions.entries}):
        scored = scored_sets(card, model, sets, ("val", "foreign_val"))
        for tta in TTA_MODES:
            if decisions.find(file_sha256(model), tta) is None:
                continue
            oset = decisions.load(model, tta)
            te, fo = scored["val"][tta], scored["foreign_val"][tta]  # "val" holds the test split here
            k = known_scores(oset, te)
            correct = te.probs.argmax(1) == te.labels
            row = {}
            pred = te.probs.argmax(1)
            for c in np.unique(te.condition):
                m = te.condition == c
                row[c] = {"acc": float(correct[m].mean()), "acc_decision": float((correct & (k >= oset.cut))[m].mean()),
                          "flagged": float((k[m] < oset.cut).mean()),
                          "macro_f1": macro_f1(te.labels[m], pred[m], card.num_classes)}
            kf = known_scores(oset, fo)
            tables[f"{model.name} --tta {tta}"] = {"method": oset.method, "cut": oset.cut, "conditions": row,
                                                   "foreign_test_flagged": float((kf < oset.cut).mean()),
                                                   "foreign_test_n": int(len(kf))}
            log(f"test: {model.name} --tta {tta}: " + ", ".join(
                f"{c} acc {r['acc_decision']:.4f} flagged {r['flagged']:.4f}" for c, r in row.items())
                + f"; foreign test flagged {tables[f'{model.name} --tta {tta}']['foreign_test_flagged']:.3f}")
    return tables
