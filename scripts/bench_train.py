"""Benchmark `make train` on small folders against a linear probe and a plain fine-tune of the same wall-clock.

Two folders are built offline, from Debian's ``openclipart-png`` and from shapes drawn here:

- ``clipart``: six categories of object drawings (PNG with transparency, in nested subfolders as the package
  sorts them), 40-120 images each, about 430 in all: the size of folder a person sorts by hand.
- ``shapes``: five kinds of shape drawn with random colours, sizes, rotations, outlines and backgrounds,
  saved as PNG with alpha, greyscale JPEG, CMYK JPEG and EXIF-rotated JPEG, 60 each.

Each folder is trained three ways, on the same split (the pipeline's), with the same budget:

1. ``python -m train`` (what `make train DATA=... BUDGET=...` runs): probe -> fine-tune -> serving choice ->
   export -> open-set decision; the test accuracy is the bundle's as served, through the runtime.
2. the linear probe alone (train/probe.py: frozen Lite0 features, logistic regression), evaluated once on test.
3. a plain timm-style fine-tune: Lite0 from ImageNet with a fresh head, every stage trainable, AdamW with a
   one-cycle schedule, as many epochs as the same budget allows at the speed measured here (as make train
   plans its own), evaluated once on test.

Each is timed by the wall clock and by the CPU time it used (a busy machine stretches the first, not the second).

    python scripts/bench_train.py --budget 6 --out runs/bench-train      # make bench-train
    python scripts/bench_train.py --only-build runs/bench-train/data     # just the two folders

Writes ``OUT/bench_train.json`` and prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # train/ (imported where used) from the checkout
CLIPART = Path("/usr/share/openclipart/png")
CLIPART_CLASSES = {"animals": 120, "food": 90, "people": 70, "plants": 60, "buildings": 60, "office": 40}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPES_PER_CLASS = 60


def build_clipart(out: Path, *, seed: int = 0) -> Path:
    """A seeded sample of each category, files copied with their subfolders (symlinked duplicates resolved)."""
    if not CLIPART.is_dir():
        raise SystemExit(f"{CLIPART} is missing: apt-get install openclipart-png")
    rng = random.Random(seed)
    for cls, n in CLIPART_CLASSES.items():
        files = sorted(p for p in (CLIPART / cls).rglob("*.png") if p.is_file())
        for src in rng.sample(files, min(n, len(files))):
            dst = out / cls / src.relative_to(CLIPART / cls)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return out


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, **style) -> None:
    def poly(points):
        rot = [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
               for x, y in points]
        draw.polygon(rot, **style)

    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
    elif kind == "square":
        poly([(-r, -r), (r, -r), (r, r), (-r, r)])
    elif kind == "triangle":
        poly([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif kind == "star":
        poly([((r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5 - math.pi / 2),
               (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5 - math.pi / 2)) for i in range(10)])
    else:  # cross
        t = r * 0.32
        poly([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)])


def build_shapes(out: Path, *, seed: int = 0) -> Path:
    """Shapes on plain, gradient or noisy backgrounds, in the formats people's folders hold."""
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(SHAPES_PER_CLASS):
            w, h = int(rng.integers(96, 320)), int(rng.integers(96, 320))
            background = rng.integers(0, 3)
            if background == 0:
                img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
            elif background == 1:
                ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 255, 3) + rng.integers(0, 128, 3)
                img = Image.fromarray(np.clip(np.repeat(ramp, h, 0), 0, 255).astype(np.uint8)).convert("RGBA")
            else:
                img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert("RGBA")
            draw = ImageDraw.Draw(img)
            colour = tuple(int(c) for c in rng.integers(0, 255, 3)) + (255,)
            r = min(w, h) * float(rng.uniform(0.2, 0.45))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            filled = rng.random() < 0.6
            style = {"fill": colour} if filled else {"outline": colour, "width": max(2, int(r / 8))}
            _shape(draw, kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), **style)
            form = i % 4
            if form == 0:
                img.save(out / kind / f"{kind}_{i:03d}.png")
            elif form == 1:
                img.convert("L").save(out / kind / f"{kind}_{i:03d}.jpg", quality=90)
            elif form == 2:
                img.convert("RGB").convert("CMYK").save(out / kind / f"{kind}_{i:03d}.jpg", quality=90)
            else:  # stored sideways with EXIF orientation 6: upright only when the orientation is applied
                exif = Image.Exif()
                exif[0x0112] = 6
                img.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(
                    out / kind / f"{kind}_{i:03d}.jpg", quality=90, exif=exif)
    return out


BUILDERS = {"clipart": build_clipart, "shapes": build_shapes}


def run_pipeline(data: Path, out: Path, budget: float, log) -> dict:
    """`make train DATA=data BUDGET=budget` as a user runs it (a subprocess), timed; its run folder's figures."""
    name = data.name
    cmd = [sys.executable, "-m", "train", "--data", str(data), "--budget-min", str(budget), "--out",
           str(out / "runs" / name), "--export", str(out / "engines" / name), "--overwrite-bundle"]
    env = {**os.environ, "BATCHCLS_TRAIN_COMMAND": f"make train DATA={data} BUDGET={budget:g}"}
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out / f"{name}-train.log", "w") as fh:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)
    minutes = (time.time() - t0) / 60
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_min = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / 60
    served = json.loads((out / "runs" / name / "served.json").read_text())
    rows = list(csv.DictReader(open(out / "runs" / name / "results.csv")))
    probe = next(r for r in rows if r["weights"] == "probe")
    card = json.loads((out / "engines" / name / "card.json").read_text())
    log(f"{name}: make train {minutes:.1f} min, test acc {served['acc']:.4f} as served; probe {probe['test_acc']}")
    return {"minutes": minutes, "cpu_minutes": cpu_min, "served": served, "probe": probe, "rows": rows,
            "weights": card["training"]["weights"], "input_size": card["input_size"], "tta": card["tta"]}


def run_plain(data: Path, out: Path, split: Path, minutes: float, log) -> dict:
    """A plain timm-style fine-tune in the same budget: Lite0 from ImageNet with a fresh head, every stage
    trainable, no warm start, no search, one-cycle AdamW to lr 1e-3 in batches of 32, label smoothing 0.1, the
    epochs that fit ``minutes`` (make train's BUDGET: the time it learns in) at the speed measured here, as
    make train plans its own; the checkpoint with the lowest val NLL, tested once."""
    from train.evaluate import evaluate
    from train.pipeline import measure_train_speed
    from train.train import TrainConfig
    from train.train import main as train_main

    t0, cpu0 = time.time(), time.process_time()
    manifest = json.loads(split.read_text())
    n_train, n_val = len(manifest["train"]), len(manifest["val"])
    cfg = TrainConfig(data=str(data), split=str(split), model="efficientnet_lite0", pretrained="offline",
                      freeze_stages=0, start_size=0, lr=1e-3, batch_size=32, ema_decay=0.0, patience=0,
                      out_dir=str(out / "plain" / data.name), progress=False)
    train_ips = measure_train_speed(cfg, len(manifest["classes"]))
    eval_ips = train_ips * 2  # a val pass: decode + forward, no backward
    epoch_s = n_train / train_ips + n_val / eval_ips
    spend = minutes * 60 - (time.time() - t0) - n_train / eval_ips - 15  # setup and the pixel cache
    epochs = max(1, int(spend // epoch_s))
    log(f"{data.name}: plain fine-tune, {epochs} epochs at {train_ips:.0f} img/s to fill {minutes:.1f} min")
    summary = train_main(dataclasses.replace(cfg, epochs=epochs), log=lambda m: None)
    m = evaluate(summary["ckpt"], out / "plain" / data.name / "eval", log=lambda m: None)
    took = (time.time() - t0) / 60
    log(f"{data.name}: plain fine-tune {took:.1f} min, test acc {m['test']['acc']:.4f}")
    return {"minutes": took, "cpu_minutes": (time.process_time() - cpu0) / 60, "epochs": epochs, "test": m["test"],
            "val": m["val"]}


def table(results: dict, budget: float) -> str:
    """The Markdown rows for docs/benchmarks.md."""
    lines = ["| folder | method | test acc | test macro-F1 | wall-clock (CPU) | notes |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        p, s, plain = r["pipeline"], r["pipeline"]["served"], r["plain"]
        kinds = s.get("foreign_flagged_by_source", {})
        photos = [v for k, v in kinds.items() if k in ("photo", "wallpaper")]
        lines.append(f"| {name} ({r['images']} images, {r['classes']} classes) | `make train BUDGET={budget:g}` | "
                     f"{s['acc']:.3f} | {s['macro_f1']:.3f} | {p['minutes']:.1f} ({p['cpu_minutes']:.1f}) min | {p['weights']} weights at "
                     f"{p['input_size']} px, TTA {p['tta']}; declines {s.get('test_flagged', 0):.1%} of its test "
                     f"split, {s.get('foreign_flagged', 0):.1%} of foreign images"
                     + (f" ({sum(photos) / len(photos):.1%} of photos and wallpapers)" if photos else "") + " |")
        lines.append(f"| | linear probe (frozen Lite0) | {float(p['probe']['test_acc']):.3f} | "
                     f"{float(p['probe']['test_macro_f1']):.3f} | {float(p['probe']['train_min']):.1f} min | "
                     "features + L-BFGS, part of the run above |")
        lines.append(f"| | plain fine-tune, same wall-clock | {plain['test']['acc']:.3f} | {plain['test']['macro_f1']:.3f} "
                     f"| {plain['minutes']:.1f} ({plain['cpu_minutes']:.1f}) min | {plain['epochs']} epochs from a fresh head, all stages "
                     "trainable |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=6.0, help="make train's BUDGET (minutes to learn in)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-train")
    ap.add_argument("--folders", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--only-build", action="store_true", help="build the folders under OUT/data and stop")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    results = {}
    for name in args.folders:
        data = out / "data" / name
        if not data.is_dir():
            BUILDERS[name](data.with_suffix(".partial"))
            os.replace(data.with_suffix(".partial"), data)
        if args.only_build:
            continue
        n = sum(1 for p in data.rglob("*") if p.is_file())
        pipeline = run_pipeline(data, out, args.budget, print)
        plain = run_plain(data, out, out / "runs" / name / "split.json", args.budget, print)
        results[name] = {"images": n, "classes": sum(1 for p in data.iterdir() if p.is_dir()),
                         "pipeline": pipeline, "plain": plain}
        (out / "bench_train.json").write_text(json.dumps(results, indent=1) + "\n")
    if results:
        print(table(results, args.budget))


if __name__ == "__main__":
    main()
