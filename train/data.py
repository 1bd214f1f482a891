"""Dataset scan, dedupe, seeded stratified split (a JSON manifest), datasets and samplers.

Every later step reads the split manifest, never the folder listing, so train/val/test never drift.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from batchcls.decode import IMAGE_EXTS, decode_image  # the runtime's formats: what it can read, train lists
from batchcls.fsutil import atomic_path, atomic_write

SAMPLERS = ("sqrt", "inverse", "none")


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def scan(root: str | os.PathLike) -> dict[str, list[str]]:
    """``root/<class>/<image>`` -> {class: [relative paths, sorted]}; classes sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: pass DATA=<folder of class folders>")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f.relative_to(root).as_posix() for f in d.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if files:
            out[d.name] = files
    if not out:
        raise FileNotFoundError(f"no class folders with images under {root}")
    return out


def dedupe(root: Path, by_class: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[list[str]]]:
    """Drop byte-identical copies (sha256), keeping the first path in sorted order.

    Returns the kept files per class and the duplicate groups (kept path first) for the manifest.
    """
    first_seen: dict[str, str] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    kept: dict[str, list[str]] = {}
    for cls, files in by_class.items():
        kept[cls] = []
        for rel in files:
            digest = file_sha256(root / rel)
            if digest in first_seen:
                groups[digest].append(rel)
                continue
            first_seen[digest] = rel
            groups[digest] = [rel]
            kept[cls].append(rel)
    return kept, [g for g in groups.values() if len(g) > 1]


def split_counts(n: int, val_frac: float, test_frac: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of n images.

    >=1 train always; a class with >=3 images gets >=1 val and >=1 test; 2 images -> 1 train + 1 val.
    """
    if n <= 1:
        return n, 0, 0
    if n == 2:
        return 1, 1, 0
    n_val = max(1, round(n * val_frac))
    n_test = max(1, round(n * test_frac))
    return n - n_val - n_test, n_val, n_test


def make_split(root: str | os.PathLike, *, seed: int = 0, val_frac: float = 0.15,
               test_frac: float = 0.15, log: Callable[[str], None] = print) -> dict:
    """Dedupe then split each class with its own seeded shuffle (stable if other classes change)."""
    root = Path(root)
    kept, dup_groups = dedupe(root, scan(root))
    classes = sorted(kept)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    tiny = []
    for idx, cls in enumerate(classes):
        files = list(kept[cls])
        random.Random(f"{seed}:{cls}").shuffle(files)
        n_tr, n_va, n_te = split_counts(len(files), val_frac, test_frac)
        split["train"] += [[f, idx] for f in files[:n_tr]]
        split["val"] += [[f, idx] for f in files[n_tr:n_tr + n_va]]
        split["test"] += [[f, idx] for f in files[n_tr + n_va:n_tr + n_va + n_te]]
        if len(files) < 20:
            tiny.append(f"{cls}={len(files)} ({n_tr}/{n_va}/{n_te})")
    n_dup = sum(len(g) - 1 for g in dup_groups)
    log(f"split: {len(classes)} classes, train {len(split['train'])} / val {len(split['val'])} / "
        f"test {len(split['test'])}; dropped {n_dup} byte-identical duplicates in {len(dup_groups)} groups")
    if tiny:
        log(f"split: tiny classes (<20 images, train/val/test): {', '.join(tiny)}")
    return {"root": str(root), "seed": seed, "val_frac": val_frac, "test_frac": test_frac,
            "classes": classes, "duplicates": dup_groups, **split}


def write_manifest(manifest: dict, path: str | os.PathLike) -> str:
    """Write the manifest atomically; returns the sha256 of the bytes written (recorded in checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    atomic_write(path, data)
    digest = hashlib.sha256(data).hexdigest()
    path.with_suffix(".sha256").write_text(digest + "\n")
    return digest


def load_manifest(path: str | os.PathLike) -> tuple[dict, str]:
    data = Path(path).read_bytes()
    return json.loads(data), hashlib.sha256(data).hexdigest()


def seeded_subset(items: list, n: int, seed: int) -> list:
    """A fixed seeded subset of n items (all of them if n <= 0 or n >= len), order kept."""
    if n <= 0 or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def pixel_cache(root: str | os.PathLike, items: list, preset, cache_dir: str | os.PathLike, *,
                workers: int = 2, log: Callable[[str], None] = print) -> np.ndarray:
    """Every item decoded ONCE through ``preset`` (path -> uint8 HWC) into an (N, H, W, 3) uint8 .npy.

    Training then augments batches from memory instead of decoding JPEGs every epoch in loader processes
    that compete with the network for the same cores. The file is keyed by the items and the preset, so
    search trials, models of the same input size, ``--resume`` and DDP ranks share it; it is returned
    memory-mapped (ranks share the page cache).
    """
    side = preset.input_size
    key = json.dumps([str(Path(root).resolve()), items, side, preset.resize_mode, preset.crop_pct,
                      int(preset.resample)]).encode()
    path = Path(cache_dir) / f"pixels-{side}-{hashlib.sha256(key).hexdigest()[:16]}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # complete or absent: a killed build leaves only a hidden temp file (a cache: no fsync needed)
        with atomic_path(path, durable=False) as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), side, side, 3)).flush()
            t0 = time.time()
            paths = [str(Path(root) / rel) for rel, _ in items]
            chunks = [(str(tmp), preset, paths[i:i + 256], i) for i in range(0, len(paths), 256)]
            if workers > 0:
                ctx = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
                with ctx.Pool(workers) as pool:
                    for _ in pool.imap_unordered(_fill_rows, chunks):
                        pass
            else:
                for chunk in chunks:
                    _fill_rows(chunk)
        log(f"pixel cache: decoded {len(items)} images to {side}x{side} in {time.time() - t0:.0f} s -> {path}")
    return np.load(path, mmap_mode="r")


def _fill_rows(job) -> None:
    npy, preset, paths, start = job
    rows = np.load(npy, mmap_mode="r+")
    for i, p in enumerate(paths):
        rows[start + i] = preset(decode_image(p))
    rows.flush()


class ImageDataset(Dataset):
    """[relpath, label] items under root; ``transform(path) -> float32 CHW array``."""

    def __init__(self, root: str | os.PathLike, items: list, transform: Callable[[Path], np.ndarray]):
        self.root = Path(root)
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, label = self.items[i]
        return torch.from_numpy(self.transform(self.root / rel)), label


def class_weights(labels: list[int], num_classes: int, kind: str) -> np.ndarray:
    """Per-sample weights: 1/sqrt(count) ("sqrt") or 1/count ("inverse") of each sample's class."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}: choose one of {', '.join(SAMPLERS)}")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    per_class = {"sqrt": 1 / np.sqrt(np.maximum(counts, 1)), "inverse": 1 / np.maximum(counts, 1),
                 "none": np.ones(num_classes)}[kind]
    return per_class[np.asarray(labels)]


class WeightedShardSampler(Sampler[int]):
    """Distributed-aware weighted sampling: every rank draws the SAME seeded weighted index list for
    the epoch (with replacement) and keeps its own stride-``world_size`` shard, so ranks never overlap
    and together see one epoch's worth of samples. With world_size=1 it is a plain weighted sampler."""

    def __init__(self, weights, num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = math.ceil(num_samples / world_size) * world_size
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        return iter(idx[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples // self.world_size
