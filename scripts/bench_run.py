"""Benchmark `batchcls run` against a PyTorch-eager baseline measured in the same run.

Baseline = the way timm's inference.py classifies a folder: the same model in PyTorch eager, fed by
a torchvision ImageFolder-style dataset + DataLoader with the same preprocessing and thread count.
Prints images/s for both, their ratio (target >= 3x), top-1 agreement, the cold-start wall time of
one image (target < 1 s), and peak memory for 1,000 vs 20,000 files (target: flat within 10%).
Medians of --repeats runs; these machines are noisy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def dataset_files(data: Path, n: int) -> list[Path]:
    files = sorted(data.glob("*/*.jpg"))
    if not files:
        sys.exit(f"bench: no JPEGs under {data}: pass --data ROOT/<class>/*.jpg")
    step = max(1, len(files) // n)
    return files[::step][:n]


def batchcls_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchcls.cli", *args]


def time_ours(listing: Path, model: str, out: Path, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run(batchcls_cmd("run", "--files-from", str(listing), "--out", str(out), "--model", model,
                                "--overwrite", "-q", "--workers", str(threads)), check=True)
    return time.perf_counter() - start


def baseline(files: list[Path], model_dir: str, threads: int, batch_size: int) -> tuple[float, list[int]]:
    """PyTorch eager + DataLoader, as timm's inference.py does it. Returns (seconds, top-1 indices)."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from batchcls.card import load_card
    from train.models import load_for_inference

    card = load_card(model_dir)
    torch.set_num_threads(threads)
    model = load_for_inference(card)
    tf = transforms.Compose([transforms.Resize((card.input_size, card.input_size)), transforms.ToTensor(),
                             transforms.Normalize(card.mean, card.std)])

    class Files(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(files[i]).convert("RGB"))

    start = time.perf_counter()
    loader = DataLoader(Files(), batch_size=batch_size, num_workers=threads)
    top1: list[int] = []
    with torch.inference_mode():
        for x in loader:
            top1 += model(x).argmax(1).tolist()
    return time.perf_counter() - start, top1


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak of the summed RSS of the process tree, sampled every 50 ms from /proc."""
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        total = 0
        for pid in _tree(proc.pid):
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        peak = max(peak, total)
        time.sleep(0.05)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(cmd)} failed")
    return peak / 1024


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", REPO.parent / "shared/data/simpsons/train")))
    ap.add_argument("--model", default=str(REPO / "engines" / "simpsons"))
    ap.add_argument("-n", type=int, default=1000, help="images for the throughput comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--memory-sizes", default="1000,20000", help="file counts for the peak-memory comparison")
    args = ap.parse_args()

    from batchcls.output import read_rows

    files = dataset_files(args.data, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = tmp / "files.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        out = tmp / "labels.csv"
        ours = [time_ours(listing, args.model, out, args.threads) for _ in range(args.repeats)]
        base = [baseline(files, args.model, args.threads, 64) for _ in range(args.repeats)]
        rows = read_rows(out)
        classes = __import__("batchcls.card", fromlist=["load_card"]).load_card(args.model).classes
        agree = sum(r["label"] == classes[i] for r, i in zip(rows, base[0][1])) / len(files)
        ours_ips = len(files) / statistics.median(ours)
        base_ips = len(files) / statistics.median(t for t, _ in base)
        print(f"run: {len(files)} dataset JPEGs, {args.threads} threads, medians of {args.repeats}")
        print(f"  baseline (PyTorch eager + DataLoader): {base_ips:8.1f} images/s")
        print(f"  batchcls run (end to end, process start included): {ours_ips:8.1f} images/s")
        print(f"  ratio: {ours_ips / base_ips:.2f}x (target >= 3x); identical top-1: {agree:.4f}")

        one = tmp / "one.csv"
        cold = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run(batchcls_cmd("run", str(files[0]), "--out", str(one), "--model", args.model,
                                        "--overwrite", "-q"), check=True)
            cold.append(time.perf_counter() - t)
        print(f"  cold start, one image: {statistics.median(cold):.3f} s median of 5 (target < 1 s)")

        all_files = sorted(args.data.glob("*/*.jpg"))
        peaks = {}
        for size in (int(s) for s in args.memory_sizes.split(",")):
            lst = tmp / f"mem{size}.txt"
            chosen = (all_files * (size // len(all_files) + 1))[:size]
            lst.write_text("".join(f"{f}\n" for f in chosen))
            peaks[size] = peak_rss_mb(batchcls_cmd("run", "--files-from", str(lst), "--out", str(tmp / "m.csv"),
                                                   "--model", args.model, "--overwrite", "-q"))
        sizes = sorted(peaks)
        print("  peak memory: " + ", ".join(f"{s} files {peaks[s]:.0f} MB" for s in sizes)
              + f"; ratio {peaks[sizes[-1]] / peaks[sizes[0]]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
