"""The whole training pipeline: one command from a folder of ``<class>/<image>`` to a complete bundle.

    split -> warm start (linear probe) -> [search] -> fine-tune -> evaluate + calibrate -> select
          -> serving size x TTA -> export -> open-set decision -> results page -> engines/<name>

    python -m train --data ~/pictures/birds                          # -> engines/birds (make train DATA=...)
    python -m train --data ~/pictures/birds --extra review/ --name birds-2   # corrected review folders join train
    python -m train --data ... --models "efficientnet_lite0 efficientnet_lite2" --budget-min 60
    python -m train --smoke --data samples/simpsons --out /tmp/s --export /tmp/s/engine

What ships is set in ONE place: TrainConfig's defaults are the Lite0 recipe, RECIPES lists only how the other
models differ, recipe files (jobs/*.json, --config) override both for a run, and the card records the command.

Small data is the common case, so the run starts where it is cheapest to be good: the frozen ImageNet
backbone's features and a logistic-regression head fitted on them (train/probe.py, seconds). That probe is
a model (it is evaluated, and exported when nothing beats it) and the fine-tune's starting weights. The
budget (--budget-min) is the time to learn in: split, probe, search and fine-tuning. The speed measured on
this machine plans it: the search runs only where it has the images and the time to say something, and each
model gets the epochs its share of the budget affords (at least MIN_EPOCHS, or it is skipped with a line).
What follows (evaluation, serving choice, export, the open-set decision, the results page) depends on the
data's size, not on training, and its expected time is logged up front. A model ships only if it is at least
as accurate on validation as the probe: the most accurate wins, and among equals the lowest validation NLL at
the fitted temperature (see train.train).

The bundle is written beside its destination and moved into place at the end, complete: the destination is
never a half bundle, and an existing one is replaced only when asked (--overwrite-bundle).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from batchcls.card import load_card
from batchcls.fsutil import atomic_open, atomic_write
from train import data as D
from train import models, serving
from train.evaluate import evaluate, evaluate_bundle
from train.export import export, write_results_page
from train.probe import fit_probe
from train.search import GRID, SEARCH_SUBSET, SEARCH_VAL_SUBSET, best_row, search
from train.train import RUN_LOCAL, TrainConfig, schedule_cost, set_backbone_trainable
from train.train import main as train_main

# Per-model recipe sized for a 2-core CPU (speeds and the resolution trials: docs/training.md, docs/results.md);
# anything in --config overrides it for every model.
RECIPES = {
    "efficientnet_lite0": {},  # = TrainConfig's defaults
    "efficientnet_lite2": {"epochs": 2},  # ~2.5x slower per image
    "efficientnetv2_b0": {"epochs": 3, "input_size": 144, "start_size": 0},
    "vgg16": {"epochs": 2, "start_size": 0},  # backbone frozen on CPU (freeze_backbone="auto")
}
# Training seconds per image relative to efficientnet_lite0 at the same input size (CPU, measured/estimated).
COST = {"efficientnet_lite0": 1.0, "efficientnet_lite2": 2.5, "efficientnetv2_b0": 1.6, "vgg16": 2.0}
# Smoke: the whole pipeline on samples/simpsons (8 classes x 5 images) in well under 3 minutes.
SMOKE = {"input_size": 64, "epochs": 1, "max_steps": 3, "batch_size": 8, "num_workers": 0}
SMOKE_GRID = {"lr": [1e-3, 3e-3]}

MIN_EPOCHS = 3  # fewer epochs than this is a head fitted again, not a fine-tune: such a candidate is skipped
MIN_STEPS = 300  # a small train split gets enough epochs for this many optimizer steps, where the budget allows
MAX_EPOCHS = 40
SMALL_DATA = 2000  # train images under which batches are 32 (more steps per epoch) and the budget is the stop
WARM_LR = 1e-3  # peak lr from a fitted head: the backbone is adapted, not a new head chased
SEARCH_SHARE = 0.25  # the search may take at most this share of the training time left
# What follows training, for the plan: export (ONNX, model.pt2, both parity checks) and a first build of the
# foreign image sets, in seconds; the passes over images are planned from the measured speed.
EXPORT_S, FOREIGN_BUILD_S, FOREIGN_IMAGES = 60.0, 180.0, 3500
GENERIC_NAMES = {"train", "training", "images", "imgs", "data", "dataset", "pictures", "photos", "all"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of <class>/<image> folders (the split is made from it)")
    p.add_argument("--name", help="the bundle's name (its card, engines/<name>); default: the data folder's name")
    p.add_argument("--models", default="efficientnet_lite0", help=f"space-separated, from: {', '.join(models.MODELS)}")
    p.add_argument("--pretrained", default="offline", help=f"weight source: {', '.join(models.SOURCES)}")
    p.add_argument("--out", help="run folder: split.json, probe, models, results (default: runs/train/<name>)")
    p.add_argument("--export", help="bundle folder (default: engines/<name>); an existing one is never replaced "
                                    "without --overwrite-bundle")
    p.add_argument("--overwrite-bundle", action="store_true", help="replace an existing bundle at --export")
    p.add_argument("--extra", help="corrected `batchcls review` folders (<label>/<image>): added to the train split "
                                   "only; files already in the dataset are dropped")
    p.add_argument("--config", help="JSON of TrainConfig overrides applied to every model")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip the hyperparameter search")
    p.add_argument("--epochs", type=int, help="epochs for every model (over the recipes, --config and the plan)")
    p.add_argument("--budget-min", type=float, default=66.0,
                   help="minutes to learn in (split, probe, search, fine-tuning): plans the search and every model's "
                        "epochs from the speed measured here; evaluation, export and the decision follow; "
                        "0 = off (recipes as written)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and steps: checks the plumbing, not accuracy")
    return p


# --- where the bundle goes ---------------------------------------------------------------------------------

def bundle_name(data: str, name: str | None = None) -> str:
    """``name``, or the data folder's name (its parent's for a generic one such as ``train/``), made a safe
    folder name: word characters (any script), dots and dashes."""
    if not name:
        folder = Path(data).resolve()
        name = folder.parent.name if folder.name.lower() in GENERIC_NAMES and folder.parent.name else folder.name
    safe = re.sub(r"[^\w.-]+", "-", name.strip()).strip("-.")
    if not safe:
        raise ValueError(f"cannot make a bundle name of {name!r}: pass NAME=<name> (--name)")
    return safe


def check_target(export_dir: Path, overwrite: bool, log=print) -> None:
    """Refuse, before any work, to replace an existing folder unless told to in so many words."""
    if not export_dir.exists() or (export_dir.is_dir() and not any(export_dir.iterdir())):
        return
    what = "a bundle" if (export_dir / "card.json").is_file() else "files"
    if overwrite and export_dir.is_dir():
        log(f"export: {export_dir} holds {what}: it is replaced at the end (--overwrite-bundle)")
        return
    raise ValueError(f"{export_dir} already holds {what}, and this run would replace it: pass NAME=<another name> "
                     f"(--name) or EXPORT=<folder> (--export), or OVERWRITE=1 (--overwrite-bundle) to replace it")


def install(staging: Path, target: Path) -> None:
    """Move the finished bundle into place; an existing one (allowed by check_target) goes only then."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


# --- progress --------------------------------------------------------------------------------------------

class PipelineBar:
    """One tqdm bar for the whole run, measured in planned seconds: each step fills its planned share as it
    runs (never past it) and the rest when it ends, so tqdm's ETA is the whole pipeline's, re-planned as the
    measured speeds come in. Log lines go through ``tqdm.write`` above it."""

    def __init__(self, total_s: float, *, disable: bool | None = None):
        self.bar = tqdm(total=max(total_s, 1.0), unit="s", desc="pipeline", disable=disable, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        self.done, self.step_s, self.t_step = 0.0, 0.0, time.time()

    def step(self, name: str, planned_s: float) -> None:
        """A new step begins; the one before is done."""
        self.done += self.step_s
        self.step_s, self.t_step = max(planned_s, 0.0), time.time()
        self.bar.total = max(self.bar.total, self.done + self.step_s)
        self.bar.set_postfix_str(name, refresh=False)
        self.tick()

    def plan(self, remaining_s: float) -> None:
        """The planned seconds of the current step and every later one."""
        self.bar.total = self.done + max(remaining_s, self.step_s, 1.0)
        self.tick()

    def tick(self) -> None:
        self.bar.n = min(self.done + min(time.time() - self.t_step, self.step_s), self.bar.total)
        self.bar.refresh()

    def log(self, msg: str) -> None:
        tqdm.write(str(msg), file=sys.stdout)
        sys.stdout.flush()
        self.tick()

    def close(self) -> None:
        self.bar.n = self.bar.total
        self.bar.close()


# --- recipes ---------------------------------------------------------------------------------------------

@dataclass
class Recipe:
    """One model's TrainConfig for this run: TrainConfig's defaults, then RECIPES[name], then the run's overrides
    (--config, --smoke, --epochs), then the caller's extras (the warm start, the plan, the search's winner)."""
    data: str
    split: str
    pretrained: str
    overrides: dict

    def __call__(self, name: str, **extra) -> TrainConfig:
        return TrainConfig(**{"data": self.data, "split": self.split, "model": name, "pretrained": self.pretrained,
                              **RECIPES.get(name, {}), **self.overrides, **extra})


def run_overrides(args: argparse.Namespace) -> dict:
    """TrainConfig overrides for every model of the run: --config, then --smoke's sizes under it, then --epochs."""
    overrides = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.smoke:
        overrides = {**SMOKE, **overrides}
    if args.epochs:
        overrides["epochs"] = args.epochs
    return overrides


# --- 1. split --------------------------------------------------------------------------------------------

def prepare_split(args: argparse.Namespace, out: Path, log) -> tuple[Path, dict, str]:
    """One split manifest for everything that follows; a run folder never mixes splits of two datasets. A
    changed --extra remakes it: the dataset's own split is seeded per class, so val and test stay the same."""
    split_path = out / "split.json"
    extra = str(Path(args.extra).resolve()) if args.extra else None
    if split_path.is_file():
        manifest, _ = D.load_manifest(split_path)
        if Path(manifest["root"]).resolve() != Path(args.data).resolve():
            raise ValueError(f"{split_path} was made from {manifest['root']}, not {args.data}: use another --out")
        if manifest.get("extra", {}).get("root") != extra:
            split_path.unlink()
    if not split_path.is_file():
        D.write_manifest(D.make_split(args.data, seed=TrainConfig.seed, extra=extra, log=log), split_path)
    manifest, split_sha = D.load_manifest(split_path)
    log(f"split manifest {split_path} sha256 {split_sha}")
    return split_path, manifest, split_sha


# --- 2. warm start ---------------------------------------------------------------------------------------

def warm_start(args: argparse.Namespace, config: Recipe, names: list[str], out: Path, log) -> dict[str, dict]:
    """A linear probe per model whose weights come from ImageNet ({} for weights that bring their own head:
    a checkpoint or bundle of ours, trained on from as it is)."""
    if args.pretrained not in ("offline", "hub"):
        log(f"warm start: none ({args.pretrained} brings its own head)")
        return {}
    return {name: fit_probe(config(name), out / name / "probe", cache=out / "features", log=log) for name in names}


# --- 3. the plan -----------------------------------------------------------------------------------------

def measure_train_speed(cfg: TrainConfig, num_classes: int, steps: int = 3) -> float:
    """Training images/s of ``cfg``'s network at its input size, trainable layers as train.train sets them:
    a few timed AdamW steps on random pixels, after one untimed step."""
    model = models.create_model(cfg.model, num_classes, pretrained="none").to(memory_format=torch.channels_last)
    set_backbone_trainable(model, cfg.model, True, cfg.freeze_stages)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = min(cfg.batch_size, 32)
    x = torch.randn(batch, 3, cfg.input_size, cfg.input_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,))
    model.train()
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.time()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / max(time.time() - t0, 1e-9)


@dataclass
class Plan:
    """What the measured speeds say the budget affords."""
    budget_s: float  # the whole run's budget (inf: none)
    train_ips: float  # first model's training images/s at its input size
    eval_ips: float  # decode + forward images/s at the input size (every evaluation pass)
    n_train: int
    n_val: int
    n_test: int
    decision: bool  # the open-set decision will be fitted (its passes are reserved for)
    foreign_cached: bool
    pixels_cached: bool = False  # the probe already decoded the train split into the pixel cache

    def after_training_s(self, n_models: int) -> float:
        """Evaluation, serving choice, export, decision and results page: the run's expected time after the
        budget (the log and the progress bar's ETA)."""
        passes = (1 + 2 * n_models) * (self.n_val + 2 * self.n_test)  # probe + raw/EMA per model
        passes += len(serving.SIZE_STEPS) * 2 * 1.6 * self.n_val  # each size plain and mirrored, larger than trained
        passes += self.n_test
        if self.decision:  # two TTA modes over a train sample, val under a few conditions, foreign images
            passes += min(self.n_train, 4000) + 6 * self.n_val + FOREIGN_IMAGES
        return passes / self.eval_ips + EXPORT_S + (0 if self.foreign_cached or not self.decision else FOREIGN_BUILD_S)

    def epoch_s(self, cfg: TrainConfig, first: str) -> float:
        """One epoch of ``cfg``'s model (progressive resizing's average) with its validation passes."""
        scale = COST.get(cfg.model, 2.0) / COST.get(first, 1.0)
        train = self.n_train / self.train_ips * scale * schedule_cost(cfg) / max(cfg.epochs, 1)
        return train + (2 if cfg.ema_decay else 1) * self.n_val / self.eval_ips * scale

    def setup_s(self) -> float:
        """Per model: building the network and, unless the probe did, the train split's pixel cache."""
        return 15.0 + (0 if self.pixels_cached else self.n_train / self.eval_ips)


def epoch_cap(cfg: TrainConfig, n_train: int) -> int:
    """The most epochs worth planning: the recipe's, or enough for MIN_STEPS steps on a small split."""
    return min(MAX_EPOCHS, max(cfg.epochs, math.ceil(MIN_STEPS * cfg.batch_size / max(n_train, 1))))


def small_data(n_train: int, config: Recipe) -> dict:
    """Small splits: batches of 32 (more steps per epoch), no early stop (the budget is the stop). Settings a
    person put in --config are kept."""
    if n_train >= SMALL_DATA:
        return {}
    return {k: v for k, v in {"batch_size": 32, "patience": 0}.items() if k not in config.overrides}


def planned_epochs(cfg: TrainConfig, plan: Plan, first: str, share_s: float) -> int:
    """Epochs of ``cfg``'s model that fit ``share_s`` seconds (0: fewer than MIN_EPOCHS fit)."""
    cap = epoch_cap(cfg, plan.n_train)
    epochs = min(cap, int((share_s - plan.setup_s()) // plan.epoch_s(dataclasses.replace(cfg, epochs=cap), first)))
    return epochs if epochs >= MIN_EPOCHS else 0


def search_grid(args: argparse.Namespace, plan: Plan | None, train_s: float, log) -> dict | None:
    """The grid the budget can afford: the full one, the learning rates alone, or none (with a line why)."""
    if args.smoke:
        return SMOKE_GRID
    if plan is None:
        return GRID
    if plan.n_train < SEARCH_SUBSET:
        log(f"search: skipped: {plan.n_train} train images are fewer than a trial's {SEARCH_SUBSET}; one epoch of "
            "so few steps cannot tell the grid's points apart")
        return None
    trial_s = SEARCH_SUBSET / plan.train_ips + 2 * SEARCH_VAL_SUBSET / plan.eval_ips + 15
    for grid in (GRID, {"lr": GRID["lr"]}):
        cost = trial_s * math.prod(len(v) for v in grid.values())
        if cost <= SEARCH_SHARE * train_s:
            if grid is not GRID:
                log(f"search: shrunk to {grid}: the full grid needs {cost * 2 / 60:.0f} min of {train_s / 60:.0f}")
            return grid
    log(f"search: skipped: even {len(GRID['lr'])} trials need {cost / 60:.0f} min, over {SEARCH_SHARE:.0%} of "
        f"the {train_s / 60:.0f} min left for training")
    return None


# --- 4. search -------------------------------------------------------------------------------------------

def search_step(args: argparse.Namespace, cfg: TrainConfig, grid: dict, out: Path, split_sha: str, log) -> dict:
    """Search on the first (cheapest) model from its warm start; the winner is reused by every model."""
    subset = 0 if args.smoke else SEARCH_SUBSET
    t0 = time.time()
    key = search_key(cfg, grid, subset, split_sha)
    cached = out / "search" / "search.json"
    if cached.is_file() and json.loads(cached.read_text())["key"] == key:  # same search already run here
        rows = json.loads(cached.read_text())["rows"]
        best_point = {k: best_row(rows)[k] for k in grid}
        log(f"search: reusing {cached}")
    else:
        best_point, rows = search(dataclasses.replace(cfg, progress=False), out / "search", grid=grid, subset=subset,
                                  val_subset=0 if args.smoke else SEARCH_VAL_SUBSET, log=log)
        cached.write_text(json.dumps({"key": key, "rows": rows}, indent=1) + "\n")
    log(f"search: best {best_point} by val NLL ({(time.time() - t0) / 60:.1f} min); "
        f"grid {grid}, 1 epoch on {subset or 'all'} train images, model {cfg.model}")
    return best_point


def search_key(cfg: TrainConfig, grid: dict, subset: int, split_sha: str) -> dict:
    """What a cached search result must match: everything its trials train with (the recipe included, so a
    changed input size or schedule searches again), but not where or how verbosely they run."""
    trial = {k: v for k, v in asdict(cfg).items() if k not in RUN_LOCAL}
    return {"grid": grid, "subset": subset, "config": trial, "split_sha256": split_sha}


# --- 5. fine-tune + evaluate -----------------------------------------------------------------------------

def train_and_evaluate(args: argparse.Namespace, config: Recipe, names: list[str], warm: dict, best_point: dict,
                       out: Path, plan: Plan | None, t_start: float, bar: PipelineBar, log) -> list[dict]:
    """Fine-tune each model from its probe and evaluate + calibrate its raw and EMA weights (the only test pass
    of each), then each probe; one result row per model. Each model's epochs come from its share of the budget
    left, re-planned with the speed measured on the one before; the probes are evaluated after the budget."""
    results = []
    for i, name in enumerate(names):
        extra = {"out_dir": str(out / name), **small_data(plan.n_train if plan else SMALL_DATA, config)}
        if name in warm:
            extra |= {"pretrained": warm[name]["ckpt"], "head_epochs": 0.0}
            extra |= {} if "lr" in config.overrides else {"lr": WARM_LR}
        extra |= best_point
        cfg = config(name, **extra)
        if plan is not None and "epochs" not in config.overrides:
            left = plan.budget_s - (time.time() - t_start)
            epochs = planned_epochs(cfg, plan, names[0], left / (len(names) - i))
            if not epochs:
                log(f"budget: SKIPPING {name}: {MIN_EPOCHS} epochs need "
                    f"{(plan.setup_s() + MIN_EPOCHS * plan.epoch_s(cfg, names[0])) / 60:.1f} min, "
                    f"{max(left, 0) / (len(names) - i) / 60:.1f} min are left for it")
                continue
            steps = epochs * max(1, plan.n_train // cfg.batch_size)
            cfg = dataclasses.replace(cfg, epochs=epochs, ema_decay=min(cfg.ema_decay, 1 - 5 / max(steps, 10))
                                      if cfg.ema_decay else 0.0)
            log(f"budget: {name} gets {epochs} epochs ({steps} steps of {cfg.batch_size}; "
                f"{left / 60:.1f} min left for training)")
            bar.step(f"train {name}", plan.setup_s() + epochs * plan.epoch_s(cfg, names[0]))
        summary = train_main(cfg, log=log)
        if plan is not None:  # what the next model is planned with
            plan.train_ips = summary["full_size_images_per_s"] * COST.get(name, 2.0) / COST.get(names[0], 1.0)
        bar.step(f"evaluate {name}", 2 * (plan.n_val + 2 * plan.n_test) / plan.eval_ips if plan else 0)
        for weights, ckpt in summary["ckpts"].items():  # raw and EMA: each is a model, tested once
            m = evaluate(ckpt, out / name / weights, num_workers=cfg.num_workers, log=log)
            results.append({**m, "ckpt": ckpt, "dir": str(out / name / weights), "ema_decay": cfg.ema_decay})
    for name, probe in warm.items():
        m = evaluate(probe["ckpt"], out / name / "probe", num_workers=config(name).num_workers, log=log)
        results.append({**m, "ckpt": probe["ckpt"], "dir": str(out / name / "probe"), "ema_decay": 0.0,
                        "weight_decay": probe["weight_decay"]})
    return results


def select(results: list[dict]) -> dict:
    """The model to ship: the most accurate on validation, so never one less accurate than the linear probe;
    among equals, the lowest val NLL at the fitted temperature (within 1e-4, the faster). Accuracy first: a
    probe's strongly regularised head wins on NLL while it gets fewer answers right than a fine-tune."""
    return min(results, key=lambda r: (-round(r["val"]["acc"], 4), round(r["val"]["nll"], 4), -r["images_per_s"]))


def beats(val: dict, start: dict) -> bool:
    """Is a new model better on validation than the checkpoint it started from? On NLL where that checkpoint
    recorded one, else (checkpoints from before NLL selection) on macro-F1."""
    if "best_val_nll" in start:
        return val["nll"] < start["best_val_nll"]
    return val["macro_f1"] > start.get("best_val_f1", -1.0)


# --- 9. the open-set decision ----------------------------------------------------------------------------

def foreign_cache() -> Path:
    """Where the foreign image sets are built once for every run of this user: $BATCHCLS_CACHE or the XDG cache."""
    base = os.environ.get("BATCHCLS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchcls"
    return Path(base) / "foreign-0"


def foreign_sets(log) -> dict[str, Path] | None:
    """train/val/test folders of foreign images (train/foreign.py), built on first use; None without it."""
    if importlib.util.find_spec("train.foreign") is None:
        return None
    root = foreign_cache()
    done = root / "sets.json"
    if done.is_file():
        return {k: root / v for k, v in json.loads(done.read_text()).items()}
    from train.foreign import build_sets

    log(f"foreign images: building them once in {root} (offline package data and drawn images)")
    shutil.rmtree(root, ignore_errors=True)  # a build that died half-way is built again
    sets = build_sets(root, log=log)
    atomic_write(done, json.dumps({k: Path(v).relative_to(root).as_posix() for k, v in sets.items()}) + "\n")
    return {k: Path(v) for k, v in sets.items()}


def decision_step(bundle: Path, split_path: Path, foreign: dict[str, Path] | None, log) -> dict | None:
    """Fit and gate the "none of these" decision of every served configuration (train/decision.py) and write it
    into the bundle; None where train/decision.py or the foreign images are not available (said in a line)."""
    if importlib.util.find_spec("train.decision") is None or foreign is None:
        log("decision: train/decision.py or train/foreign.py is not installed: the bundle has no open-set decision")
        return None
    from train.decision import fit_decision

    return fit_decision(bundle, manifest=split_path, foreign_train=foreign["train"], foreign_val=foreign["val"],
                        log=log)


# --- the run ---------------------------------------------------------------------------------------------

def card_metrics(best: dict) -> dict:
    """The selected model's scores as the card records them."""
    return {"val_nll": best["val"]["nll"], "val_macro_f1": best["val"]["macro_f1"], "val_acc": best["val"]["acc"],
            "test_macro_f1": best["test"]["macro_f1"], "test_acc": best["test"]["acc"],
            "test_downscaled_macro_f1": best["test_downscaled"]["macro_f1"],
            "test_downscaled_acc": best["test_downscaled"]["acc"],
            "test_ece": best["test"]["ece"], "test_ece_calibrated": best["test"]["ece_calibrated"],
            "test_downscaled_ece": best["test_downscaled"]["ece"],
            "test_downscaled_ece_calibrated": best["test_downscaled"]["ece_calibrated"]}


def card_training(args: argparse.Namespace, best: dict, best_point: dict, commit: str, split_sha: str,
                  manifest: dict, probe: dict | None) -> dict:
    """How the selected model was made, as the card records it: commit, command, data, split, schedule."""
    return {"git_commit": commit, "command": _command(), "dataset": str(args.data),
            "split_manifest_sha256": split_sha,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "epochs": best["epochs"], "train_time_s": round(best["train_time_s"], 1), **best_point,
            "weights": best["weights"], "ema_decay": best["ema_decay"],
            "selected_by": "val accuracy (never below the linear probe's), then val NLL at the fitted temperature",
            **({"linear_probe": {"val_acc": probe["val"]["acc"], "test_acc": probe["test"]["acc"],
                                 "test_macro_f1": probe["test"]["macro_f1"]}} if probe else {}),
            **({"extra": manifest["extra"]} if "extra" in manifest else {})}


def run(args: argparse.Namespace, log=None) -> dict:
    t_start = time.time()
    commit = _git_commit()  # at start: the code that actually ran, even if HEAD moves during the run
    names = args.models.split()
    for model_name in names:  # fail in one line before any work: unknown names, missing weights, no network
        models.check_weights(model_name, args.pretrained)
    name = bundle_name(args.data, args.name)
    target = Path(args.export or Path("engines") / name)
    out = Path(args.out or Path("runs") / "train" / name)
    budget_s = args.budget_min * 60 if args.budget_min and not args.smoke else math.inf
    bar = PipelineBar(budget_s if budget_s < math.inf else 180.0, disable=True if log else None)  # None: a TTY
    log = log or bar.log
    check_target(target, args.overwrite_bundle, log)
    out.mkdir(parents=True, exist_ok=True)
    config = Recipe(args.data, "", args.pretrained, run_overrides(args))
    log(f"pipeline: {name}: models {names}, weights {args.pretrained}, data {args.data}, run folder {out}, "
        f"bundle {target}{' (SMOKE)' if args.smoke else ''}")

    # 1. one split manifest for everything that follows
    bar.step("split", 10)
    split_path, manifest, split_sha = prepare_split(args, out, log)
    config.split = str(split_path)
    n_train, n_val, n_test = (len(manifest[k]) for k in ("train", "val", "test"))
    # 2. warm start: a linear probe on the frozen backbone's features, per model
    bar.step("linear probe", 30)
    warm = warm_start(args, config, names, out, log)
    # 3. the plan: this machine's speed, the budget's search and epochs
    plan = None
    if budget_s < math.inf:
        first = config(names[0], **small_data(n_train, config))
        eval_ips = max([w["eval_images_per_s"] for w in warm.values()] + [0.0]) or 3 * measure_train_speed(
            first, len(manifest["classes"]))
        plan = Plan(budget_s, measure_train_speed(first, len(manifest["classes"])), eval_ips, n_train, n_val, n_test,
                    decision=importlib.util.find_spec("train.decision") is not None,
                    foreign_cached=(foreign_cache() / "sets.json").is_file(), pixels_cached=bool(warm))
        log(f"plan: measured {plan.train_ips:.0f} train img/s, {plan.eval_ips:.0f} eval img/s (decode + forward); "
            f"{(budget_s - (time.time() - t_start)) / 60:.1f} min left to learn in, then about "
            f"{plan.after_training_s(len(names)) / 60:.1f} min to evaluate, export and fit the decision")
        bar.plan(budget_s - (time.time() - t_start) + plan.after_training_s(len(names)))
    # 4. search on the first (cheapest) model from its warm start; the winner is reused by every model
    best_point = {}
    if args.search:
        train_s = plan.budget_s - (time.time() - t_start) if plan else math.inf
        grid = search_grid(args, plan, train_s, log)
        if grid:
            first = config(names[0], **({"pretrained": warm[names[0]]["ckpt"], "lr": WARM_LR} if names[0] in warm
                                        else {}))
            bar.step("search", 60)
            best_point = search_step(args, first, grid, out, split_sha, log)
    # 5. fine-tune, then evaluate + calibrate (the only test pass) each model and each probe
    results = train_and_evaluate(args, config, names, warm, best_point, out, plan, t_start, bar, log)
    if not results:
        raise ValueError(f"a budget of {args.budget_min:g} min affords no model on this machine: raise BUDGET "
                         "(--budget-min), or train from ImageNet weights (its linear probe is always fitted)")
    write_table(results, out)

    # 6. select: the most accurate on validation (never below the probe), then the lowest val NLL
    best = select(results)
    log(f"selected {best['model']} {best['weights']} weights (val NLL {best['val']['nll']:.4f}, "
        f"acc {best['val']['acc']:.4f}, macro-F1 {best['val']['macro_f1']:.4f})")
    start = models.checkpoint_info(args.pretrained) if Path(args.pretrained).is_file() else {}
    if start.get("split_sha256") == split_sha and not beats(best["val"], start):
        log(f"NOT exported: val NLL {best['val']['nll']:.4f} / macro-F1 {best['val']['macro_f1']:.4f} does not beat "
            f"the checkpoint this run started from ({args.pretrained}: {start}); {target} is unchanged")
        bar.close()
        return {"best": best["model"], "results": results, "export": None}
    # 7. serving size x TTA, chosen on validation through the runtime's preprocessing
    bar.step("serving size", len(serving.SIZE_STEPS) * 2 * 1.6 * n_val / plan.eval_ips + 20 if plan else 30)
    sizes = serving.sizes_for(best["input_size"])[:2 if args.smoke else None]  # smoke: the plumbing, two sizes
    rows = serving.candidates(best["ckpt"], sizes=sizes, workers=config(best["model"]).num_workers, log=log)
    chosen = serving.choose(rows)
    atomic_write(out / "serving.json", json.dumps({"candidates": rows, "chosen": chosen}, indent=1) + "\n")
    log(f"serving: chosen {chosen['input_size']}px tta={chosen['tta']} (val acc {chosen['val_acc']:.4f})")
    # 8. export beside the destination; moved into place at the end
    bar.step("export", EXPORT_S)
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    root = Path(manifest["root"])
    parity_items = (manifest["test"] + manifest["val"] + manifest["train"])[:128]
    files = {"results.md": out / "results.md", "results.csv": out / "results.csv"}
    for r in results:
        for png in ("confusion.png", "reliability.png"):
            files[f"{r['model']}_{r['weights']}_{png}"] = Path(r["dir"]) / png
    probe = next((r for r in results if r["weights"] == "probe" and r["model"] == best["model"]), None)
    export(best["ckpt"], staging, name=name, input_size=chosen["input_size"], tta=chosen["tta"],
           temperature=chosen["temperature"], metrics=card_metrics(best),
           training=card_training(args, best, best_point, commit, split_sha, manifest, probe),
           parity_images=[root / rel for rel, _ in parity_items], results=files, log=log)
    # 9. the open-set decision, fitted through the runtime for every served configuration
    bar.step("open-set decision", plan.after_training_s(0) - EXPORT_S if plan else 60)
    foreign = foreign_sets(log)
    decision = decision_step(staging, split_path, foreign, log)
    # 10. the results page: the bundle as served, on the test split and held-out foreign images
    bar.step("results page", (n_test + FOREIGN_IMAGES / 4) / plan.eval_ips if plan else 30)
    served = evaluate_bundle(staging, manifest, staging / "results",
                             foreign=foreign["test"] if foreign and decision else None, log=log)
    card = load_card(staging)
    card = dataclasses.replace(card, metrics={**card.metrics, "served": {
        k: v for k, v in served.items() if k not in ("per_class", "foreign_flagged_by_source")}})
    card.save(staging)
    minutes = (time.time() - t_start) / 60
    page = {"name": name, "bundle": str(target), "data": str(args.data), "classes": manifest["classes"],
            "counts": {"train": n_train, "val": n_val, "test": n_test,
                       "extra": manifest.get("extra", {}).get("added", 0)},
            "minutes": minutes, "command": _command(), "model": f"{best['model']} ({best['weights']} weights)",
            "served": served, "probe": probe["test"] if probe else None,
            "decision": _decision_summary(decision), "candidates": (out / "results.md").read_text()}
    write_results_page(staging, page)
    atomic_write(out / "served.json", json.dumps(served, indent=1) + "\n")
    # 11. into place
    install(staging, target)
    bar.close()
    log(f"pipeline done in {(time.time() - t_start) / 60:.1f} min: test acc {served['acc']:.4f} as served"
        + (f" (linear probe {probe['test']['acc']:.4f})" if probe else ""))
    log(f"bundle: {target}  (results: {target / 'results' / 'README.md'})")
    log(f"use it: batchcls run IMAGES --model {target} --out labels.csv")
    return {"best": best["model"], "results": results, "export": str(target), "served": served,
            "decision": decision, "minutes": minutes}


def _decision_summary(decision: dict | None) -> dict | None:
    if decision is None:
        return None
    failed = [c for c in decision.get("configs", []) if isinstance(c, dict) and not c.get("gate", {}).get("passed", True)]
    reason = "; ".join(str(c["gate"].get("reason", "")) for c in failed)
    return {"passed": bool(decision.get("passed")), "reason": reason}


COLUMNS = ["model", "weights", "params_M", "input_size", "epochs", "train_min", "val_nll", "val_acc", "val_macro_f1",
           "test_acc", "test_macro_f1", "test_2x_down_acc", "test_2x_down_macro_f1", "test_ece", "test_ece_calibrated",
           "down_ece", "down_ece_calibrated", "temperature", "images_per_s"]


def write_table(results: list[dict], out: Path) -> None:
    rows = [[r["model"], r["weights"], f"{r['params'] / 1e6:.2f}", r["input_size"], r["epochs"],
             f"{r['train_time_s'] / 60:.1f}", f"{r['val']['nll']:.4f}", f"{r['val']['acc']:.4f}",
             f"{r['val']['macro_f1']:.4f}", f"{r['test']['acc']:.4f}", f"{r['test']['macro_f1']:.4f}",
             f"{r['test_downscaled']['acc']:.4f}", f"{r['test_downscaled']['macro_f1']:.4f}",
             f"{r['test']['ece']:.4f}", f"{r['test']['ece_calibrated']:.4f}",
             f"{r['test_downscaled']['ece']:.4f}", f"{r['test_downscaled']['ece_calibrated']:.4f}",
             f"{r['temperature']:.3f}", f"{r['images_per_s']:.0f}"] for r in results]
    with atomic_open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    md += ["", "weights: probe (a logistic-regression head on the frozen ImageNet backbone, epochs 0), raw, or "
           "their EMA; epochs: the epoch each was selected at (lowest val NLL at the temperature fitted on val). "
           "ECE: 15 equal-width bins, before / after temperature scaling (T fitted on validation NLL). "
           "test_2x_down: each decoded test image shrunk by 0.5 (LANCZOS) before the eval preset. "
           "images_per_s: decode + preprocess + forward, batch 128, on this machine's CPU."]
    atomic_write(out / "results.md", "\n".join(md) + "\n")


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "train"], capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command() -> str:
    return os.environ.get("BATCHCLS_TRAIN_COMMAND") or shlex.join(["python", "-m", "train", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (models.WeightsError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
