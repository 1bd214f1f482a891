"""Benchmark `batchcls run` against a PyTorch-eager baseline measured in the same run.

Baseline = the way timm's inference.py classifies a folder: the same model in PyTorch eager, fed by
a torchvision ImageFolder-style dataset + DataLoader with the same preprocessing and thread count.
Prints images/s for the baseline; ONNX Runtime FP32 and INT8 on the model alone (preprocessed batches of 64);
`batchcls run` end to end with FP32 and with INT8, each as a ratio to the baseline (target >= 3.5x) and to its
model alone (what decoding and the pipeline keep of the model's speed); top-1 agreement; the cold-start wall
time of one image (target < 1 s); peak memory for 1,000 vs 20,000 files (target: flat within 10%).
INT8 is the model the runtime picks for the bundle (built here or shipped); without one, it is built into a
copy of the bundle by the real build, gate included. Medians of --repeats runs; these machines are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def int8_bundle(model: str, tmp: Path) -> tuple[str | None, str]:
    """A bundle whose CPU model is INT8, and what it is; None (and why) when its gate does not keep one."""
    import shutil

    from batchcls.backends.onnxruntime import cpu_model_path
    from batchcls.card import load_card

    chosen = cpu_model_path(load_card(model))
    if "int8" in chosen.name:
        return model, chosen.name
    copy = tmp / "int8-bundle"
    copy.mkdir()
    card = load_card(model)
    shutil.copy(card.onnx_path, copy / card.onnx)
    # without the open-set decision: a decision is fitted per model file, and this copy has no split to fit on
    data = json.loads((Path(model) / "card.json").read_text())
    data["openset"] = {}
    (copy / "card.json").write_text(json.dumps(data))
    from batchcls.builders.cpu import build_cpu_engines

    entry = build_cpu_engines(load_card(copy), log=lambda m: print(f"  build: {m}"))
    chosen = cpu_model_path(load_card(copy))
    return (str(copy), chosen.name) if "int8" in chosen.name else (None, entry.get("int8_reason", "not built"))


def fp32_bundle(model: str, tmp: Path) -> str:
    """The bundle's card and ONNX alone: what runs where nothing was built or shipped."""
    import shutil

    from batchcls.card import load_card

    copy = tmp / "fp32-bundle"
    copy.mkdir()
    card = load_card(model)
    shutil.copy(Path(model) / "card.json", copy / "card.json")
    shutil.copy(card.onnx_path, copy / card.onnx)
    data = json.loads((Path(model) / "card.json").read_text())
    configs = [c for c in (card.openset or {}).get("configs", []) if c.get("model") == card.onnx]
    for c in configs:  # the decision fitted on this very file, for each TTA mode
        shutil.copy(Path(model) / c["file"], copy / c["file"])
    data["openset"] = {"configs": configs} if configs else {}
    (copy / "card.json").write_text(json.dumps(data))
    return str(copy)


def model_only(model_path: Path, files: list[Path], card, threads: int, repeats: int) -> float:
    """images/s of ONNX Runtime alone on preprocessed batches of 64 (decoding excluded)."""
    from batchcls.backends import OnnxRuntimeBackend
    from batchcls.decode_stage import load_images
    from batchcls.presets import EvalPreset, normalize
    from batchcls.scan import InputFile

    batch = load_images([InputFile(str(f), f.name) for f in files[:64]], EvalPreset.from_card(card)).images
    x = normalize(np.resize(batch, (64, *batch.shape[1:])), card.mean, card.std)
    backend = OnnxRuntimeBackend(model_path, threads=threads)
    session, name = backend.session, backend.session.get_inputs()[0].name
    session.run(None, {name: x})
    rounds = max(1, len(files) // 64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(rounds):
            session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return 64 * rounds / statistics.median(times)


def time_ours(listing: Path, model: str, out: Path, threads: int, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run(batchcls_cmd("run", "--files-from", str(listing), "--out", str(out), "--model", model,
                                "--overwrite", "-q", "--workers", str(threads), *extra), check=True)
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

    from batchcls.backends.onnxruntime import cpu_model_path
    from batchcls.card import load_card
    from batchcls.output import read_rows

    files = dataset_files(args.data, args.n)
    card = load_card(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = tmp / "files.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        out = tmp / "labels.csv"
        fp32 = fp32_bundle(args.model, tmp)
        int8, int8_what = int8_bundle(args.model, tmp)
        base = [baseline(files, args.model, args.threads, 64) for _ in range(args.repeats)]
        base_ips = len(files) / statistics.median(t for t, _ in base)
        fp32_model = model_only(load_card(fp32).onnx_path, files, card, args.threads, args.repeats)
        int8_model = model_only(cpu_model_path(load_card(int8)), files, card, args.threads, args.repeats) if int8 else None
        fp32_e2e = len(files) / statistics.median(time_ours(listing, fp32, out, args.threads) for _ in range(args.repeats))
        fp32_rows = read_rows(out)
        int8_e2e = (len(files) / statistics.median(time_ours(listing, int8, out, args.threads)
                                                   for _ in range(args.repeats))) if int8 else None
        classes = card.classes
        def top(r: dict) -> str:  # the model's own class, also on a row the open-set decision declined
            return r.get("model_label") or r["label"]
        agree = sum(top(r) == classes[i] for r, i in zip(fp32_rows, base[0][1])) / len(files)
        int8_agree = (sum(top(a) == top(b) for a, b in zip(fp32_rows, read_rows(out))) / len(files)
                      if int8 else None)
        served = fp32  # what a plain `batchcls run` uses here with the decision on: the decision's cost on it
        with_open_set = statistics.median(time_ours(listing, served, out, args.threads) for _ in range(args.repeats))
        without = statistics.median(time_ours(listing, served, out, args.threads, "--no-open-set")
                                    for _ in range(args.repeats))
        print(f"run: {len(files)} dataset JPEGs at {card.input_size} px, {args.threads} threads, medians of {args.repeats}")
        print(f"  baseline (PyTorch eager + DataLoader):        {base_ips:8.1f} images/s")
        print(f"  ONNX Runtime FP32, model only:                {fp32_model:8.1f} images/s")
        if int8:
            print(f"  ONNX Runtime INT8 ({int8_what}), model only: {int8_model:8.1f} images/s")
        print(f"  batchcls run FP32, end to end: {fp32_e2e:8.1f} images/s = {fp32_e2e / base_ips:.2f}x baseline, "
              f"{fp32_e2e / fp32_model:.2f} of its model alone")
        if int8:
            print(f"  batchcls run INT8, end to end: {int8_e2e:8.1f} images/s = {int8_e2e / base_ips:.2f}x baseline "
                  f"(target >= 3.5x), {int8_e2e / int8_model:.2f} of its model alone; same top-1 as FP32: {int8_agree:.4f}")
        else:
            print(f"  INT8: none ({int8_what})")
        print(f"  (process start included end to end); FP32 identical top-1 with the baseline: {agree:.4f}")
        print(f"  open-set decision: {len(files) / with_open_set:.1f} images/s on, {len(files) / without:.1f} off "
              f"-> costs {1 - without / with_open_set:.1%} of end-to-end throughput (target <= 5 %)")

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
        for size in (int(s) for s in args.memory_sizes.split(",") if s):
            lst = tmp / f"mem{size}.txt"
            chosen = (all_files * (size // len(all_files) + 1))[:size]
            lst.write_text("".join(f"{f}\n" for f in chosen))
            peaks[size] = peak_rss_mb(batchcls_cmd("run", "--files-from", str(lst), "--out", str(tmp / "m.csv"),
                                                   "--model", args.model, "--overwrite", "-q"))
        sizes = sorted(peaks)
        if sizes:
            print("  peak memory: " + ", ".join(f"{s} files {peaks[s]:.0f} MB" for s in sizes)
                  + f"; ratio {peaks[sizes[-1]] / peaks[sizes[0]]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
