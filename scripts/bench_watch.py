"""Benchmark `batchcls watch`: close-to-row latency at idle, and burst throughput against `batchcls run`.

Latency: the daemon idles on an empty folder; one dataset JPEG at a time is written into it
(open, write, close), and the time from close() returning to its row appearing in the ledger is
measured. Target: p95 <= 1 s.

Burst: N dataset JPEGs are renamed into the watched folder at once (atomic drops, cheap for the
benchmark itself), timed from the first rename to the N-th row. Baseline: `batchcls run` on the
same files. run's own reported images/s still includes starting its decode pool, which the warm
daemon doesn't pay, so the target is judged against run's marginal rate: the extra files over the
extra seconds between a run of N/2 and a run of N files (fixed costs cancel). Target: burst >= 80%
of that. Runs alternate, medians of --repeats; this machine is shared.

Model: engines/simpsons when it exists, else the colour test bundle (tests/bundles.py); --model X.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_run import dataset_files  # noqa: E402 - scripts/ is on sys.path when run as a script


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchcls.cli", *args]


class Ledger:
    """Tails the daemon's CSV as it grows: which paths have a row, and when each was first seen."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen, self._fh, self._rest = path, {}, None, ""

    def poll(self) -> dict[str, float]:
        if self._fh is None:
            if not self.path.exists():
                return self.seen
            self._fh = open(self.path, encoding="utf-8")
            self._fh.readline()  # header
        chunk = self._fh.read()
        if chunk:
            now = time.perf_counter()
            lines = (self._rest + chunk).split("\n")
            self._rest = lines.pop()
            for line in lines:
                self.seen.setdefault(line.split(",", 1)[0], now)  # bench names need no CSV quoting
        return self.seen


class Daemon:
    def __init__(self, inbox: Path, out: Path, model: str, workers: int) -> None:
        self.proc = subprocess.Popen(cli("watch", str(inbox), "--out", str(out), "--model", model,
                                         "--workers", str(workers)), stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stderr], daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if "watching" in lines.get(timeout=0.5):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    sys.exit("bench: the watch daemon exited at start")
        sys.exit("bench: the watch daemon did not start within 120 s")

    def stop(self) -> None:
        self.proc.terminate()
        if self.proc.wait(timeout=120) != 0:
            sys.exit(f"bench: the watch daemon exited with {self.proc.returncode}")


def wait_rows(ledger: Ledger, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(ledger.poll()) < n:
        if time.monotonic() > deadline:
            sys.exit(f"bench: only {len(ledger.seen)} of {n} rows after {timeout} s")
        time.sleep(0.002)


def latency(tmp: Path, files: list[Path], model: str, workers: int) -> list[float]:
    inbox, out = tmp / "lat_inbox", tmp / "lat.csv"
    inbox.mkdir()
    daemon = Daemon(inbox, out, model, workers)
    ledger, result = Ledger(out), []
    try:
        for i, src in enumerate(files):
            data, name = src.read_bytes(), f"{i:05d}_{src.name}"
            with open(inbox / name, "wb") as fh:
                fh.write(data)
            closed = time.perf_counter()
            deadline = time.monotonic() + 30
            while name not in ledger.poll():
                if time.monotonic() > deadline:
                    sys.exit(f"bench: no row for {name} after 30 s")
                time.sleep(0.002)
            result.append(ledger.seen[name] - closed)
            time.sleep(0.3)  # idle between arrivals: this measures a quiet folder, not a burst
    finally:
        daemon.stop()
    return result


def burst(tmp: Path, files: list[Path], model: str, workers: int, k: int) -> float:
    """images/s from the first rename to the last row."""
    staging, inbox, out = tmp / f"stage{k}", tmp / f"inbox{k}", tmp / f"burst{k}.csv"
    staging.mkdir()
    inbox.mkdir()
    names = [f"{i:05d}_{f.name}" for i, f in enumerate(files)]
    for f, name in zip(files, names):
        shutil.copyfile(f, staging / name)
    daemon = Daemon(inbox, out, model, workers)
    ledger = Ledger(out)
    try:
        start = time.perf_counter()
        for name in names:
            os.rename(staging / name, inbox / name)
        wait_rows(ledger, len(names))
        seconds = max(ledger.seen.values()) - start
    finally:
        daemon.stop()
    shutil.rmtree(inbox)
    return len(names) / seconds


def run_rate(tmp: Path, files: list[Path], model: str, workers: int) -> float:
    """`batchcls run`'s own images/s on a folder holding the same files."""
    folder = tmp / f"run_input{len(files)}"
    if not folder.exists():
        folder.mkdir()
        for i, f in enumerate(files):
            shutil.copyfile(f, folder / f"{i:05d}_{f.name}")
    r = subprocess.run(cli("run", str(folder), "--out", str(tmp / "run.csv"), "--model", model, "--overwrite",
                           "--workers", str(workers)), capture_output=True, text=True)
    m = re.search(r"([\d.]+) images/s", r.stderr)
    if r.returncode != 0 or not m:
        sys.exit(f"bench: batchcls run failed:\n{r.stderr}")
    return float(m.group(1))


def pick_model(arg: str | None, tmp: Path) -> tuple[str, str]:
    if arg:
        return arg, arg
    shipped = REPO / "engines" / "simpsons"
    if (shipped / "card.json").exists():
        return str(shipped), "engines/simpsons"
    sys.path.insert(0, str(REPO / "tests"))
    from bundles import make_colour_bundle
    return str(make_colour_bundle(tmp / "colours")), "colour test bundle (engines/simpsons not built yet)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", REPO.parent / "shared/data/simpsons/train")))
    ap.add_argument("--model", default=None, help="bundle folder (default: engines/simpsons, else the colour bundle)")
    ap.add_argument("-n", type=int, default=2000, help="files in the burst (<= 2000 keeps it modest)")
    ap.add_argument("--latency-files", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decode processes, both sides")
    args = ap.parse_args()

    files = dataset_files(args.data, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, model_name = pick_model(args.model, tmp)
        lat = sorted(latency(tmp, files[:args.latency_files], model, args.workers))
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        half = files[:len(files) // 2]
        runs, halves, bursts = [], [], []
        for k in range(args.repeats):  # alternate, so background load hits all alike
            runs.append(run_rate(tmp, files, model, args.workers))
            halves.append(run_rate(tmp, half, model, args.workers))
            bursts.append(burst(tmp, files, model, args.workers, k))
        run_ips, watch_ips = statistics.median(runs), statistics.median(bursts)
        extra_s = len(files) / run_ips - len(half) / statistics.median(halves)
        marginal = (len(files) - len(half)) / extra_s if extra_s > 0 else float("inf")
        print(f"watch: {model_name}, {len(files)} dataset JPEGs, {args.workers} decode workers")
        print(f"  latency close -> row at idle ({len(lat)} files): median {statistics.median(lat) * 1000:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms (target p95 <= 1000 ms)")
        print(f"  burst of {len(files)} (medians of {args.repeats}): watch {watch_ips:.1f} images/s; "
              f"run {run_ips:.1f} images/s as it reports, {marginal:.1f} images/s marginal")
        print(f"  ratio watch/run: {watch_ips / marginal:.2f} of the marginal rate (target >= 0.80), "
              f"{watch_ips / run_ips:.2f} of the reported rate")


if __name__ == "__main__":
    main()
