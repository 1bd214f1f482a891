"""A small declared hyperparameter grid, judged on validation NLL only (never on test), as model selection is.

Each trial is short: 1 epoch on a fixed seeded subset of the train split, no EMA (25 steps are too few for one).
"""
from __future__ import annotations

import csv
import itertools
import os
from dataclasses import replace
from pathlib import Path

from batchcls.fsutil import atomic_open
from train.train import TrainConfig
from train.train import main as train_main

# 4 trials: learning rate x how deep the frozen stem is; TrainConfig's defaults (what ships) are one of them.
GRID = {"lr": [1e-3, 3e-3], "freeze_stages": [2, 3]}
SEARCH_SUBSET = 1600  # train images per trial (fixed seeded subset)
SEARCH_VAL_SUBSET = 600  # val images per trial (fixed seeded subset); the final models use all of val


def search(base: TrainConfig, out_dir: str | os.PathLike, *, grid: dict = GRID, subset: int = SEARCH_SUBSET,
           val_subset: int = SEARCH_VAL_SUBSET, log=print, **overrides) -> tuple[dict, list[dict]]:
    """Run every grid point; returns (best point, all rows). Ties keep the earlier point."""
    out = Path(out_dir)
    rows = []
    for i, values in enumerate(itertools.product(*grid.values())):
        point = dict(zip(grid, values))
        cfg = replace(base, **point, epochs=1, train_subset=subset, val_subset=val_subset, out_dir=str(out / f"trial{i}"),
                      resume=False, ema_decay=0.0, **overrides)
        log(f"search trial {i + 1}: {point}")
        result = train_main(cfg, log=log)
        rows.append({**point, "val_nll": round(result["best_val_nll"], 5), "val_macro_f1": round(result["best_val_f1"], 5),
                     "train_time_s": round(result["train_time_s"], 1),
                     "train_images_per_s": round(result["train_images_per_s"], 1)})
        log(f"search trial {i + 1}: val NLL {result['best_val_nll']:.4f}, macro-F1 {result['best_val_f1']:.4f}")
    best = best_row(rows)
    with atomic_open(out / "search.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {k: best[k] for k in grid}, rows


def best_row(rows: list[dict]) -> dict:
    """The trial with the lowest val NLL; min() keeps the first of equal scores."""
    return min(rows, key=lambda r: r["val_nll"])
