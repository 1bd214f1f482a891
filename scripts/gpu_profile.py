"""Where the GPU path's time goes: start-up phases, then nvJPEG end to end per batch size, then a
cProfile of one pass. For a lent GPU machine (see scripts/gpu_check.sh for DATA staging).

    python scripts/gpu_profile.py --data tmp/bench_jpegs -n 8000
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

t0 = time.perf_counter()


def mark(what: str) -> None:
    print(f"start-up: {what:40s} {time.perf_counter() - t0:6.2f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "engines" / "simpsons"))
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("-n", type=int, default=8000)
    ap.add_argument("--batch-sizes", default="256,512,1024")
    args = ap.parse_args()

    import torch
    mark("import torch")
    torch.zeros(1, device="cuda")
    mark("CUDA context")
    from bench_engines import dataset_files

    from batchcls.backends.pytorch import TorchBackend
    from batchcls.card import load_card
    from batchcls.decode_stage import batched
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu
    card = load_card(args.model)
    backend = TorchBackend(card, device="cuda")
    mark("model.pt2 on the GPU")
    classifier, loader = GpuClassifier(card, backend), GpuJpegLoader(card, device="cuda")
    files = dataset_files(args.data, args.n)

    def one_pass(bs: int, n: int) -> float:
        t = time.perf_counter()
        rows = 0
        for r in classify_gpu(batched(files[:n], bs), classifier, loader=loader):
            rows += len(r)
        torch.cuda.synchronize()
        assert rows == n
        return n / (time.perf_counter() - t)

    one_pass(256, 256)
    mark("first batch (nvJPEG init, graph capture)")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        backend.model = TorchBackend(card, device="cuda").model  # a fresh graph for this batch size
        one_pass(bs, bs)
        rates = sorted(one_pass(bs, len(files)) for _ in range(3))
        print(f"nvJPEG end to end, batch {bs:5d}: median {rates[1]:8.0f} img/s  (runs {', '.join(f'{r:.0f}' for r in rates)})",
              flush=True)
    prof = cProfile.Profile()
    prof.enable()
    one_pass(int(args.batch_sizes.split(",")[0]), len(files))
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print(out.getvalue()[-6000:])


if __name__ == "__main__":
    main()
