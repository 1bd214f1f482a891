"""Benchmark `batchcls run --engine ray` against the local runner on the same images, in the same run.

Prints images/s for the local runner and for the Ray engine (on an already running local Ray, and
cold: a fresh `batchcls run --engine ray` process that starts Ray itself), the overhead ratio, whether
both wrote the same rows, the per-stage rates Ray Data's scaling model needs (decode per CPU core,
inference per thread, the driver's row writer), and from those an estimate for 8 nodes x 8 GPUs.
Medians of --repeats runs; this machine is small and shared, so read ratios, not absolutes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # bundles.py: the colour bundle when no trained model exists yet
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def dataset_files(data: Path, n: int) -> list[Path]:
    files = sorted(data.glob("*/*.jpg"))
    if not files:
        sys.exit(f"bench_ray: no JPEGs under {data}: pass --data ROOT/<class>/*.jpg")
    step = max(1, len(files) // n)
    return files[::step][:n]  # spread over every class, not the first few folders


def pick_model(requested: str | None, tmp: Path) -> tuple[str, str]:
    """The trained Simpsons bundle when it exists, else the tiny colour bundle; says which."""
    shipped = REPO / "engines" / "simpsons"
    if requested:
        return requested, f"model {requested}"
    if (shipped / "card.json").is_file():
        return str(shipped), "model engines/simpsons (the trained Simpsons classifier)"
    from bundles import make_colour_bundle

    return str(make_colour_bundle(tmp / "colours")), ("model: the colour test bundle (engines/simpsons does not exist "
                                                       "yet), so inference is nearly free and decode dominates")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(ray_csv: Path, local_csv: Path) -> str:
    from batchcls.output import read_rows

    a, b = read_rows(ray_csv), read_rows(local_csv)
    same = [(x["path"], x["label"], x["status"]) for x in a] == [(x["path"], x["label"], x["status"]) for x in b]
    diff = max((abs(float(x["confidence"]) - float(y["confidence"])) for x, y in zip(a, b)
                if x["confidence"] and y["confidence"]), default=0.0)
    return f"same rows (path, label, status): {same}; max confidence difference {diff:.1e}"


def stage_rates(files: list[Path], model: str) -> dict[str, float]:
    """Per-worker rates of each stage, measured single-threaded: what Ray Data multiplies by workers."""
    from batchcls.backends import load_backend
    from batchcls.card import load_card
    from batchcls.output import RowWriter, columns_for
    from batchcls.pipeline import Classifier, load_images
    from batchcls.scan import InputFile

    card = load_card(model)
    clf = Classifier(card, load_backend(card, device="cpu", threads=1))
    sample = [InputFile(str(f), f.name) for f in files[:256]]
    decode_s = median_time(lambda: load_images(sample, clf.preset), 3)
    batch = load_images(sample[:64], clf.preset)
    infer_s = median_time(lambda: clf.rows(batch), 3)
    rows = [json.dumps(r) for r in clf.rows(batch)] * 500  # 32,000 rows as they arrive from the actors
    with tempfile.TemporaryDirectory() as tmp:
        w = RowWriter(str(Path(tmp) / "w.csv"), columns=columns_for(1))
        start = time.perf_counter()
        for i in range(0, len(rows), 64):
            w.write([json.loads(r) for r in rows[i:i + 64]])
        writer_s = time.perf_counter() - start
        w.close()
    return {"decode": len(sample) / decode_s, "infer": len(batch.files) / infer_s, "writer": len(rows) / writer_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", REPO.parent / "shared/data/simpsons/train")))
    ap.add_argument("--model", default=None, help="bundle; default engines/simpsons if present, else the colour bundle")
    ap.add_argument("-n", type=int, default=2000, help="images (the same ones for both engines)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--node-cpus", type=int, default=96, help="vCPUs of one 8-GPU node, for the estimate")
    ap.add_argument("--gpu-rate", type=float, default=None,
                    help="images/s one GPU actor sustains; default 2,490: the CUDA backend on an H200 (scripts/gpu_check.sh)")
    args = ap.parse_args()

    import ray

    from batchcls.pipeline import RunOptions
    from batchcls.ray_runner import run_ray_job
    from batchcls.runner import RunJob, run_job

    cores = len(os.sched_getaffinity(0))
    files = dataset_files(args.data, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, which = pick_model(args.model, tmp)
        listing = tmp / "files.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        options = RunOptions(batch_size=args.batch_size)

        def job(out: str) -> RunJob:
            return RunJob(source=None, files_from=str(listing), out=str(tmp / out), model=model, overwrite=True,
                          quiet=True, options=options)

        print(f"bench_ray: {len(files)} dataset JPEGs, {cores} cores, batch {args.batch_size}, medians of {args.repeats}")
        print(f"  {which}")
        run_job(job("local.csv"))  # warm the page cache so neither engine pays the first disk read
        local_s = median_time(lambda: run_job(job("local.csv")), args.repeats)

        ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING)
        try:
            ray_s = median_time(lambda: run_ray_job(job("ray.csv")), args.repeats)
        finally:
            ray.shutdown()
        start = time.perf_counter()  # cold: a new process that starts (and stops) its own Ray
        subprocess.run([sys.executable, "-m", "batchcls.cli", "run", "--files-from", str(listing), "--out",
                        str(tmp / "cold.csv"), "--model", model, "--engine", "ray", "--overwrite", "-q"],
                       check=True, stderr=subprocess.DEVNULL)
        cold_s = time.perf_counter() - start

        n = len(files)
        print(f"  local runner:                         {n / local_s:8.1f} images/s")
        print(f"  ray engine, Ray already running:      {n / ray_s:8.1f} images/s   "
              f"overhead ratio {ray_s / local_s:.2f}x the local time")
        print(f"  ray engine, cold (starts Ray itself): {n / cold_s:8.1f} images/s   "
              f"overhead ratio {cold_s / local_s:.2f}x")
        print(f"  {compare(tmp / 'ray.csv', tmp / 'local.csv')}")

        rates = stage_rates(files, model)
        print(f"  stage rates, one worker each: decode {rates['decode']:.0f} images/s per CPU core, "
              f"inference {rates['infer']:.0f} images/s per CPU thread, driver writer {rates['writer']:.0f} rows/s")

    # Ray Data's scaling model for this plan (map -> map, no shuffle): stages stream concurrently, so the
    # job runs at the slowest stage's (workers x per-worker rate), and it scales with nodes until the
    # one thing that does not - the driver, which re-orders rows and writes the single output file.
    nodes, gpus_per_node = 8, 8
    gpu_rate = args.gpu_rate or 2490.0  # CUDA backend on decoded host arrays, measured on a lent H200
    decode_cpus = args.node_cpus - gpus_per_node  # each GPU actor reserves one CPU
    decode = nodes * decode_cpus * rates["decode"]
    infer = nodes * gpus_per_node * gpu_rate
    bound, limit = min((decode, "CPU decode"), (infer, "GPU inference"), (rates["writer"], "the driver's row writer"))
    startup = max(0.0, cold_s - ray_s)  # starting and stopping Ray: paid once per job, not per image
    print(f"  estimate, {nodes} nodes x {gpus_per_node} GPUs ({args.node_cpus} vCPUs per node):")
    print(f"    decode  {nodes} x {decode_cpus} CPUs x {rates['decode']:.0f} = {decode:10.0f} images/s")
    print(f"    infer   {nodes * gpus_per_node} GPUs x {gpu_rate:.0f} = {infer:10.0f} images/s"
          + ("" if args.gpu_rate else "  (GPU rate measured on an H200, not here: pass --gpu-rate)"))
    print(f"    driver  {rates['writer']:10.0f} rows/s (measured: re-order + one output file, does not scale with nodes)")
    print(f"    => about {bound:.0f} images/s, limited by {limit}: {1e6 / bound:.0f} s per million images, "
          f"plus ~{startup:.0f} s of Ray start-up per job (measured here)")

if __name__ == "__main__":
    main()
