"""Benchmark every engine this machine can run on the same real JPEGs, against PyTorch eager.

Baseline: PyTorch eager, fp32, on the CPU, running the bundle's model.pt2 (measured in this run).
For each available backend it prints images/s for
- infer: preprocessed batches through ``Classifier.probabilities`` (normalize + model + softmax),
  which is what an engine changes;
- end to end: files -> rows through the run pipeline with Pillow decode workers (``--cpu-decode`` for
  GPU backends), and for GPU backends also through nvJPEG (``gpu.classify_gpu``, the default there);
and each one's parity with the ONNX FP32 reference (identical top-1 share, max confidence diff).
Medians of --repeats. Targets: CPU INT8 >= 1.5x the CPU FP32 ONNX engine (infer); on an
H100/H200-class GPU >= 10,000 images/s end to end with the CUDA or TensorRT backend.

    python scripts/bench_engines.py [--model BUNDLE] [--data ROOT/<class>/*.jpg] [-n 1000]
    python scripts/bench_engines.py --stage tmp/bench_jpegs   # copy the -n images for a GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchcls.pipeline import GPU_BATCH  # noqa: E402 - after the sys.path line that makes it runnable as a script
from batchcls.scan import InputFile  # noqa: E402 - after the sys.path line that makes it runnable as a script


def dataset_files(data: Path, n: int) -> list[InputFile]:
    """n JPEGs spread over the classes (every k-th in sorted order); a small folder is cycled."""
    paths = sorted(data.glob("*/*.jpg")) or sorted(data.glob("*.jpg"))
    if not paths:
        sys.exit(f"bench: no JPEGs under {data}: pass --data ROOT/<class>/*.jpg")
    if len(paths) < n:
        print(f"bench: only {len(paths)} JPEGs under {data}: cycling them to {n}")
        paths = (paths * (n // len(paths) + 1))[:n]
    step = max(1, len(paths) // n)
    chosen = paths[::step][:n]
    return [InputFile(str(p), f"{i:05d}/{p.parent.name}/{p.name}") for i, p in enumerate(chosen)]


def median_rate(n: int, fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # lazy init, autotuning, page cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def candidates(card, gpu: bool, variants: bool = False) -> list[tuple[str, Callable[[], object]]]:
    """(label, backend factory) for every engine this machine has, baseline first."""
    from batchcls.backends import OnnxRuntimeBackend
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.backends.record import int8_path, opt_path

    out: list[tuple[str, Callable[[], object]]] = [
        ("torch-eager fp32 cpu (baseline)", lambda: TorchBackend(card, device="cpu")),
        ("onnxruntime fp32 cpu", lambda: OnnxRuntimeBackend(card.onnx_path)),
    ]
    if opt_path(card).is_file():
        out.append(("onnxruntime optimized cpu", lambda: OnnxRuntimeBackend(opt_path(card))))
    if int8_path(card).is_file():
        out.append(("onnxruntime int8 cpu", lambda: OnnxRuntimeBackend(int8_path(card))))
    if gpu:
        out.append(("cuda fp16", lambda: TorchBackend(card, device="cuda")))
        if variants:
            out.append(("cuda fp16 eager (no graphs)", lambda: TorchBackend(card, device="cuda", cuda_graphs=False)))
            out.append(("cuda fp32", lambda: TorchBackend(card, device="cuda", fp16=False)))
        from batchcls.backends.record import onnx_sha256
        from batchcls.backends.tensorrt import TensorRTBackend, current_facts, plan_problem, read_meta

        meta = read_meta(card)
        problem = "no plan (run `make engine`)" if meta is None else plan_problem(meta, current_facts(), onnx_sha256(card))
        if problem is None:
            out.append(("tensorrt", lambda: TensorRTBackend(card)))
        else:
            print(f"bench: skipping TensorRT: {problem}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("MODEL", str(REPO / "engines" / "simpsons")))
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", REPO.parent / "shared/data/simpsons/train")))
    ap.add_argument("-n", type=int, default=1000,
                    help="images; a folder with fewer is cycled (GPU runs need many to get past start-up costs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="CPU batch size")
    ap.add_argument("--gpu-batch-size", type=int, default=GPU_BATCH)
    ap.add_argument("--gpu-variants", action="store_true", help="also time cuda fp32 and fp16 without CUDA graphs")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")
    ap.add_argument("--cpu-n", type=int, default=None, help="time CPU backends on the first N images only "
                                                              "(rates stay comparable; saves GPU-machine time)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--stage", type=Path, help="copy the chosen JPEGs to DIR/<class>/ and exit")
    args = ap.parse_args()

    files = dataset_files(args.data, args.n)
    if args.stage:
        for f in files[:1000]:  # a GPU run cycles these
            dest = args.stage / Path(f.rel).parent.name / Path(f.path).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f.path, dest)
        sys.exit(f"staged {len(files[:1000])} JPEGs in {args.stage}")

    import numpy as np
    import torch

    from batchcls.builders.parity import compare_rows
    from batchcls.card import load_card
    from batchcls.decode_stage import batched, load_images
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu
    from batchcls.infer import Classifier
    from batchcls.machine import default_threads
    from batchcls.pipeline import RunOptions, classify
    from batchcls.presets import EvalPreset

    card = load_card(args.model)
    threads = default_threads()
    torch.set_num_threads(threads)
    gpu = torch.cuda.is_available()
    n = len(files)
    print(f"bench: {n} JPEGs from {args.data}, model {card.name} ({card.architecture}, {card.input_size}px), "
          f"{threads} CPU threads, GPU: {torch.cuda.get_device_name() if gpu else 'none'}, medians of {args.repeats}")

    decoded = load_images(files, EvalPreset.from_card(card))
    images = decoded.images
    good = [f for f, e in zip(files, decoded.errors) if e is None]
    results, reference, ref_probs = [], None, None
    for label, make in candidates(card, gpu, args.gpu_variants):
        backend = make()
        classifier = Classifier(card, backend)
        on_gpu = "cuda" in label or "tensorrt" in label
        bs = args.gpu_batch_size if on_gpu else args.batch_size
        some_images, some_files = (images, good) if on_gpu else (images[:args.cpu_n], good[:args.cpu_n])

        probs: list = []

        def infer() -> None:
            probs.clear()
            for i in range(0, len(some_images), bs):
                probs.append(classifier.probabilities(some_images[i:i + bs]))

        row: dict = {"backend": label, "infer_ips": median_rate(len(some_images), infer, args.repeats)}
        row["probs"] = np.concatenate(probs)  # CPU-decoded input: parity here is the engine's alone
        opts = RunOptions(batch_size=bs, workers=args.workers, gpu_decode=False)  # Pillow workers; nvJPEG below
        rows: list[dict] = []

        def e2e() -> None:
            rows.clear()
            for r in classify(some_files, classifier, opts):
                rows.extend(r)

        row["e2e_ips"] = median_rate(len(some_files), e2e, args.repeats, warmup=False)  # warmed up by infer
        if label.startswith("onnxruntime fp32"):
            reference, ref_probs = list(rows), row["probs"]
        if on_gpu:
            loader = GpuJpegLoader(card, device="cuda")
            gclassifier = GpuClassifier(card, backend)
            gpu_rows: list[dict] = []

            def e2e_nvjpeg() -> None:
                gpu_rows.clear()
                for r in classify_gpu(batched(good, bs), gclassifier, loader=loader):
                    gpu_rows.extend(r)
                torch.cuda.synchronize()

            row["e2e_nvjpeg_ips"] = median_rate(len(good), e2e_nvjpeg, args.repeats)  # warm-up: nvJPEG init
            row["nvjpeg_rows"] = gpu_rows
            if label == "cuda fp16":  # nvJPEG + device resize vs Pillow, pixel by pixel, on the distinct files
                distinct = good[:min(len(good), 1000)]
                dev = loader.load_files(distinct).images
                diff = (dev.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16) - images[:len(distinct)].astype(np.int16))
                row["nvjpeg_pixels"] = {"mean_abs": float(np.abs(diff).mean()), "max_abs": int(np.abs(diff).max()),
                                        "share_over_8": float((np.abs(diff) > 8).mean())}
                print(f"  nvJPEG + device resize vs Pillow on {len(distinct)} images: mean |diff| "
                      f"{row['nvjpeg_pixels']['mean_abs']:.2f}, max {row['nvjpeg_pixels']['max_abs']}, "
                      f"share > 8 levels {row['nvjpeg_pixels']['share_over_8']:.4f}")
        row["rows"] = rows
        results.append(row)
        print(f"  {label:34s} infer {row['infer_ips']:9.1f} img/s" +
              f"   end to end {row['e2e_ips']:9.1f} img/s" +
              (f"   nvJPEG end to end {row['e2e_nvjpeg_ips']:9.1f} img/s" if "e2e_nvjpeg_ips" in row else ""),
              flush=True)

    base = results[0]
    print("\nratios to the PyTorch-eager baseline, and parity with ONNX FP32 (top-1 agreement, max confidence diff):")
    report = []
    for r in results:
        entry = {k: v for k, v in r.items() if not k.endswith("rows") and k != "probs"}
        if ref_probs is not None:  # engine alone, same CPU-decoded input: top-1 agreement, max |d top-1 conf|
            m = min(len(ref_probs), len(r["probs"]))
            a, b = ref_probs[:m], r["probs"][:m]
            entry["parity_infer"] = {"agreement": float((a.argmax(1) == b.argmax(1)).mean()),
                                     "max_conf_diff": float(np.abs(a.max(1) - b.max(1)).max()),
                                     "max_prob_diff": float(np.abs(a - b).max())}
            parity_engine = f"engine {entry['parity_infer']['agreement']:.4f}/{entry['parity_infer']['max_conf_diff']:.4f}"
        else:
            parity_engine = ""
        entry["infer_ratio"] = r["infer_ips"] / base["infer_ips"]
        entry["e2e_ratio"] = r["e2e_ips"] / base["e2e_ips"]
        parity = []
        for key in ("rows", "nvjpeg_rows"):
            if reference and r.get(key):
                cmp = compare_rows(reference, r[key])
                entry[f"parity_{key}"] = cmp.to_dict()
                parity.append(f"{'nvJPEG ' if key == 'nvjpeg_rows' else ''}{cmp.agreement:.4f}/{cmp.max_conf_diff:.4f}")
        report.append(entry)
        print(f"  {r['backend']:34s} infer {entry['infer_ratio']:6.2f}x  end to end {entry['e2e_ratio']:6.2f}x"
              f"   parity {', '.join([parity_engine, *parity]).strip(', ') or '-'}")

    by = {r["backend"]: r for r in report}
    fp32, int8 = by.get("onnxruntime fp32 cpu"), by.get("onnxruntime int8 cpu")
    if fp32 and int8:
        print(f"\nCPU INT8 vs CPU FP32 ONNX (infer): {int8['infer_ips'] / fp32['infer_ips']:.2f}x (target >= 1.5x)")
    gpu_e2e = [v for r in report for k, v in r.items() if k in ("e2e_ips", "e2e_nvjpeg_ips")
               and ("cuda" in r["backend"] or "tensorrt" in r["backend"])]
    if gpu_e2e:
        print(f"GPU best end to end (decode included): {max(gpu_e2e):.0f} images/s (target >= 10,000 on H100/H200)")
    if args.json:
        args.json.write_text(json.dumps({"images": n, "threads": threads, "model": str(card.bundle_dir),
                                         "gpu": torch.cuda.get_device_name() if gpu else None,
                                         "results": report}, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
