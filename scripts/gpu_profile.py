"""Where the GPU path's time goes, stage by stage, and what it does end to end; for a lent GPU machine.

Needs nothing but the checkout: the frames are the 40 samples, re-encoded into 1,000 distinct JPEGs
(sizes and quality vary) and cycled to -n files in --work. Reports, as images/s at --batch:
- stages, each alone: read + header guard (one decode worker), Pillow decode + resize (one core),
  nvJPEG decode, device resize, inference (uint8 on the device -> logits, one view and the card's TTA),
  host copy + softmax, rows (Python), and the host paths' step (``Classifier.outputs``: --cpu-decode, watch,
  the API) next to uint8 host images sent up and mirrored and normalised there (``embed_uint8``);
- end to end: the pipeline's nvJPEG route and its --cpu-decode route (Pillow in worker processes);
- start-up: import torch, CUDA context, model.pt2 on the GPU, first batch (nvJPEG init, graph capture);
- with --cprofile, the top functions of one nvJPEG pass (the per-image Python cost).
Results go to --json; ``--table DIR`` prints scripts/gpu_check.sh's one table from what it left in DIR.

    python scripts/gpu_profile.py -n 10000 --json tmp/gpu_check/profile.json
    python scripts/gpu_profile.py --device cpu -n 300 --json /tmp/p.json    # the script itself, no GPU
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

T0 = time.perf_counter()
startup: dict[str, float] = {}


def mark(what: str) -> None:
    startup[what] = round(time.perf_counter() - T0, 2)
    print(f"start-up: {what:40s} {startup[what]:6.2f} s", flush=True)


def frames(work: Path, n: int) -> list:
    """n files: 1,000 distinct variants of the sample frames, cycled (copies share the page cache)."""
    from hostile_jpegs import variant

    from batchcls.scan import InputFile

    samples = sorted((REPO / "samples" / "simpsons").glob("*/*.jpg"))
    distinct = work / "distinct"
    if not (distinct / "00999.jpg").is_file():
        distinct.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            (distinct / f"{i:05d}.jpg").write_bytes(variant(samples[i % len(samples)], i // len(samples)))
    paths = [distinct / f"{i % 1000:05d}.jpg" for i in range(n)]
    return [InputFile(str(p), f"{i:06d}.jpg") for i, p in enumerate(paths)]


def rate(n: int, fn, repeats: int = 3, sync=lambda: None) -> float:
    """Images/s of ``fn`` over ``n`` images: the best of ``repeats`` after one warm-up (GPU work synced)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return n / best


def profile(args) -> dict:
    import torch
    mark("import torch")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)
    mark("CUDA context")
    from batchcls.backends.device import run_views
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.card import load_card
    from batchcls.decode_stage import load_images
    from batchcls.gpu import GpuClassifier, GpuJpegLoader
    from batchcls.gpu_read import read_batch
    from batchcls.infer import Classifier, mean_of_views, softmax
    from batchcls.machine import default_threads
    from batchcls.pipeline import RunOptions, classify

    card = load_card(args.model)
    backend = TorchBackend(card, device=args.device)
    classifier = GpuClassifier(card, backend)
    mark("model.pt2 on the device, model check")
    loader = GpuJpegLoader(card, device=args.device)
    files = frames(Path(args.work), args.n)
    bs = args.batch
    one = files[:bs]
    loader.load_files(one)
    classifier.probabilities(loader.load_files(one).images)
    mark(f"first batch of {bs} (nvJPEG init, graph capture)")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    stages: dict[str, float] = {}
    raw = read_batch(one, loader.preset, loader.max_pixels)
    stages["read + header guard (1 worker)"] = rate(bs, lambda: read_batch(one, loader.preset, loader.max_pixels))
    stages["Pillow decode + resize (1 core)"] = rate(min(bs, 256), lambda: load_images(one[:256], loader.preset), 1)
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw.blobs if b is not None]
    stages["nvJPEG decode" if device.type == "cuda" else "JPEG decode (torchvision, CPU)"] = \
        rate(len(blobs), lambda: loader.decode_blobs(blobs), sync=sync)
    from hostile_jpegs import hostile_bytes
    samples = sorted((REPO / "samples" / "simpsons").glob("*/*.jpg"))
    progressive = [torch.frombuffer(bytearray(hostile_bytes("progressive", samples[i % len(samples)])), dtype=torch.uint8)
                   for i in range(min(bs, 128))]
    stages["nvJPEG decode, progressive JPEGs" if device.type == "cuda" else "JPEG decode, progressive (CPU)"] = \
        rate(len(progressive), lambda: loader.decode_blobs(progressive), sync=sync)
    decoded = [d for d in loader.decode_blobs(blobs) if d is not None]
    stages["device resize + crop"] = rate(len(decoded), lambda: loader.resize(decoded), sync=sync)
    images = loader.load(raw).images
    stages["inference (uint8 on device -> logits)"] = rate(len(images), lambda: backend.infer_images(images), sync=sync)
    views = 2 if classifier.tta == "flip" else 1
    stages[f"inference, TTA {classifier.tta} ({views} pass(es))"] = rate(
        len(images), lambda: run_views(backend, images, views=views, features=classifier.open_set is not None), sync=sync)
    host_images = load_images(one, loader.preset).images
    host_classifier = Classifier(card, backend, open_set=False)
    stages[f"host path (Classifier.outputs), TTA {classifier.tta}"] = rate(
        len(host_images), lambda: host_classifier.outputs(host_images), sync=sync)
    stages[f"host path, uint8 up + device normalise (embed_uint8), TTA {classifier.tta}"] = rate(
        len(host_images), lambda: backend.embed_uint8(host_images, views=views), sync=sync)
    logits = backend.infer_images(images)
    stages["copy back + softmax"] = rate(len(images), lambda: mean_of_views(softmax(logits.cpu().numpy(), card.temperature), 1))
    batch = loader.load(raw)
    probs = classifier.probabilities(batch.images)
    stages["rows (Python, per image)"] = rate(len(one), lambda: classifier.rows(batch, probabilities=lambda: probs))
    stages["full nvJPEG batch in-process (load + launch + rows)"] = rate(bs, lambda: classifier.rows(
        batch, probabilities=classifier.launch(loader.load(raw).images)), sync=sync)

    cores = default_threads()
    e2e: dict[str, float] = {}

    def run(gpu_decode: bool) -> None:
        options = RunOptions(batch_size=bs, gpu_decode=gpu_decode)
        count = sum(len(rows) for rows in classify(files, Classifier(card, backend), options))
        assert count == len(files), count

    e2e["nvJPEG route"] = rate(len(files), lambda: run(True), repeats=2, sync=sync)
    e2e["--cpu-decode route"] = rate(len(files), lambda: run(False), repeats=1, sync=sync)
    mark("measured")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": bs, "files": len(files), "cores": cores,
              "input_size": card.input_size, "tta": classifier.tta,
              "graph_sizes": getattr(backend.model, "sizes", []), "startup_s": startup,
              "stages": {k: round(v) for k, v in stages.items()}, "end_to_end": {k: round(v) for k, v in e2e.items()}}
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        run(True)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue()[-5000:])
    return result


def table(folder: Path) -> None:
    """scripts/gpu_check.sh's summary: one table from the tests' row reports, the profile and the junit log."""
    import xml.etree.ElementTree as ET

    prof = json.loads((folder / "profile.json").read_text()) if (folder / "profile.json").is_file() else {}
    env = (folder / "env.txt").read_text().strip() if (folder / "env.txt").is_file() else ""
    print(f"GPU check: {env}")
    cases = []
    for junit in sorted(folder.glob("junit*.xml")):
        root = ET.parse(junit).getroot()
        cases += root.iter("testcase")
    skipped_trt: list[str] = []
    if cases:
        failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
        skipped = [c for c in cases if c.find("skipped") is not None]
        skipped_trt = list(dict.fromkeys(  # parametrized cases once, in order
            c.get("name").split("[")[0] for c in skipped
            if "TensorRT" in (c.find("skipped").get("message") or "") or "tensorrt" in c.get("name")))
        print(f"tests: {len(cases) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped")
        for c in failed:
            print(f"  FAILED {c.get('classname')}.{c.get('name')}")
    else:
        print("tests: no junit*.xml (pytest did not finish)")
    print(f"\n{'rows vs the CPU path (ORT FP32, Pillow)':42s} {'files':>6s} {'errors':>7s} {'same errors':>12s} "
          f"{'model_label':>12s} {'near ties':>10s} {'max |dconf|':>12s} {'p95':>7s} {'decided':>8s} "
          f"{'near cut':>9s} {'max |dknown|':>13s} {'problems':>9s}")
    reports = sorted((folder / "report").glob("rows-*.json")) if (folder / "report").is_dir() else []
    for path in reports:
        r = json.loads(path.read_text())
        print(f"  {r['what']:40s} {r['files']:6d} {r['errors']:7d} {'yes' if r['errors_identical'] else 'NO':>12s} "
              f"{r['agreement']:12.4f} {r.get('near_tie_flips', 0):10d} {r['max_conf_diff']:12.4f} "
              f"{r['p95_conf_diff']:7.4f} {r.get('decisions_compared', 0):8d} {r.get('decisions_near_cut_differ', 0):9d} "
              f"{r.get('max_known_diff', 0.0):13.4f} {len(r.get('problems', [])):9d}")
        for problem in r.get("problems", [])[:3]:
            print(f"      {problem}")
    if not reports:
        print("  (none: the row tests did not run)")
    if prof:
        print(f"\nend to end, {prof['files']} files, batch {prof['batch']}, {prof['cores']} CPU threads ({prof['device']}), "
              f"{prof.get('input_size', '?')} px, TTA {prof.get('tta', '?')}")
        for k, v in prof["end_to_end"].items():
            print(f"  {k:40s} {v:8d} images/s")
        print(f"stages alone, batch {prof['batch']} (images/s; a stage below 10,000 caps the end to end rate)")
        for k, v in prof["stages"].items():
            print(f"  {k:64s} {v:8d}")
        print("start-up (s since the script began): " + ", ".join(f"{k} {v}" for k, v in prof["startup_s"].items()))
        print(f"CUDA graph batch sizes captured: {prof['graph_sizes']}")
    else:
        print("\nno profile.json (the profile did not finish)")
    print("\nTensorRT checks that could not run here: " + (", ".join(skipped_trt) if skipped_trt else "none"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "engines" / "simpsons"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--work", default=str(REPO / "tmp" / "gpu_profile"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--table", type=Path, help="print gpu_check.sh's table from this folder and exit")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    os.makedirs(args.work, exist_ok=True)
    result = profile(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
