"""Dataset scan, dedupe, seeded stratified split (a JSON manifest), datasets and samplers.

Every later step reads the split manifest, never the folder listing, so train/val/test never drift. The scan
takes folders as people have them: images in nested subfolders of a class folder belong to that class, every
file is decoded once as the runtime decodes it (what does not decode is skipped and counted, in one line),
byte-identical copies are dropped, and a class with too few images to split is refused with how many it needs.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from batchcls.decode import IMAGE_EXTS, DecodeError, decode_image  # the runtime's formats: what it reads, train lists
from batchcls.fsutil import atomic_path, atomic_write
from batchcls.label_folders import ERRORS_DIR, MANIFEST, class_folder

SAMPLERS = ("sqrt", "inverse", "none")


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


MIN_IMAGES = 3  # per class: one each for train, val and test, or the class can be neither learnt nor measured
SKIP_FOLDERS = ("__MACOSX", ERRORS_DIR)  # archive debris and `batchcls review --errors` output: never a class


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in SKIP_FOLDERS


def list_folder(root: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """``root/<class>/**/<file>`` -> ({class: [image paths relative to root, sorted]}, [other files]).

    A file anywhere below a class folder belongs to that class: people sort a class's pictures into
    subfolders (by date, by source) and still mean the class. Hidden files and folders, ``__MACOSX`` and
    ``_errors`` are not data. "Image" means a name the runtime reads (``IMAGE_EXTS``); whether the content
    decodes is ``check_images``' question.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: pass DATA=<folder of class folders>")
    by_class, others = {}, []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name)):
        files = []
        for here, dirs, names in os.walk(d):  # links to folders are not followed: no cycles, no escapes
            dirs[:] = sorted(n for n in dirs if _visible(n))
            for n in names:
                if n.startswith("."):
                    continue
                rel = (Path(here) / n).relative_to(root).as_posix()
                (files if Path(n).suffix.lower() in IMAGE_EXTS else others).append(rel)
        if files:
            by_class[d.name] = sorted(files)
    others += sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not by_class:
        raise FileNotFoundError(f"no class folders with images under {root}: lay it out as {root}/<class>/<image>")
    return by_class, sorted(others)


def scan(root: str | os.PathLike) -> dict[str, list[str]]:
    """``root/<class>/**/<image>`` -> {class: [relative paths, sorted]}; classes sorted by name."""
    return list_folder(root)[0]


def _inspect(path: Path) -> tuple[str, str | None]:
    """(sha256, None) for a file the runtime decodes, (sha256, reason) for one it cannot."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return "", f"cannot read: {e.strerror}"
    try:
        decode_image(data, min_side=64)  # draft-decodes JPEGs: the check, not the pixels, is wanted here
    except DecodeError as e:
        return hashlib.sha256(data).hexdigest(), str(e)
    return hashlib.sha256(data).hexdigest(), None


def check_images(root: Path, rels: list[str], *, workers: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """Every file read once: {rel: sha256} and {rel: why it does not decode}. Threads, because hashing and
    Pillow's decoders release the GIL, and no process pool has to import torch again."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(_inspect, [root / rel for rel in rels]))
    digests = {rel: d for rel, (d, _) in zip(rels, results)}
    bad = {rel: why for rel, (_, why) in zip(rels, results) if why is not None}
    return digests, bad


def _skipped_line(where: Path, others: list[str], bad: dict[str, str]) -> str:
    parts = []
    if others:
        parts.append(f"{len(others)} non-image file(s) (e.g. {others[0]})")
    if bad:
        rel = next(iter(bad))
        parts.append(f"{len(bad)} unreadable image(s) (e.g. {rel}: {bad[rel]})")
    return f"scan: {where}: skipped " + " and ".join(parts)


def dedupe(by_class: dict[str, list[str]], digests: dict[str, str]) -> tuple[dict[str, list[str]], list[list[str]]]:
    """Drop byte-identical copies (sha256), keeping the first path in sorted order.

    Returns the kept files per class and the duplicate groups (kept path first) for the manifest.
    """
    first_seen: dict[str, str] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    kept: dict[str, list[str]] = {}
    for cls, files in by_class.items():
        kept[cls] = []
        for rel in files:
            digest = digests[rel]
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


def make_split(root: str | os.PathLike, *, seed: int = 0, val_frac: float = 0.15, test_frac: float = 0.15,
               extra: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """Scan, drop what does not decode, dedupe, then split each class with its own seeded shuffle (stable if
    other classes change). ``extra`` (corrected review folders) joins the train split only (``extra_items``),
    so val and test are the same with or without it."""
    root = Path(root)
    by_class, others = list_folder(root)
    digests, bad = check_images(root, [rel for files in by_class.values() for rel in files])
    if others or bad:
        log(_skipped_line(root, others, bad))
    kept, dup_groups = dedupe({c: [f for f in files if f not in bad] for c, files in by_class.items()}, digests)
    few = {c: len(files) for c, files in kept.items() if len(files) < MIN_IMAGES}
    if few:
        listed = ", ".join(f"{c!r} has {n}" for c, n in few.items())
        raise ValueError(f"too few images to split: {listed}; every class needs at least {MIN_IMAGES} distinct, "
                         f"readable images (1 train, 1 val, 1 test): add images to those folders under {root} "
                         "or move the folders out")
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
    manifest = {"root": str(root), "seed": seed, "val_frac": val_frac, "test_frac": test_frac,
                "classes": classes, "duplicates": dup_groups, **split}
    if others or bad:  # only then: a clean folder's manifest (and its sha256, in checkpoints) is as it always was
        manifest["skipped"] = {"non_image": len(others), "unreadable": bad}
    if extra is not None:
        items, info = extra_items(extra, classes, set(digests.values()), log=log)
        manifest["train"] += items
        manifest["extra"] = info
    return manifest


def extra_items(extra: str | os.PathLike, classes: list[str], known: set[str], *,
                log: Callable[[str], None] = print) -> tuple[list, dict]:
    """Train items from corrected ``batchcls review`` folders: ``extra/<label folder>/<image>``.

    A label folder is the class's name as ``batchcls.label_folders.class_folder`` writes it; ``unknown/``,
    ``_errors/`` and folders of no class are skipped with a line. A file whose bytes are anywhere in the
    dataset (``known``: every sha256 under DATA, so val and test images above all) is dropped: review copies
    images the model saw, and one of them in train would leak a test answer. Items carry absolute paths (they
    live outside the dataset root; ``root / absolute`` is the absolute path wherever the manifest is read).
    """
    extra = Path(extra).resolve()
    by_folder, others = list_folder(extra)
    index = {class_folder(c): i for i, c in enumerate(classes)}
    strays = {f: len(files) for f, files in by_folder.items() if f not in index}
    if strays:
        log(f"extra: {extra}: skipped folders that name no class of the dataset: "
            + ", ".join(f"{f}/ ({n} images)" for f, n in strays.items()))
    rels = [rel for f, files in by_folder.items() if f in index for rel in files]
    digests, bad = check_images(extra, rels)
    others = [o for o in others if o != MANIFEST]
    if others or bad:
        log(_skipped_line(extra, others, bad))
    items, seen, in_data = [], set(known), 0
    for rel in rels:
        if rel in bad:
            continue
        if digests[rel] in seen:
            in_data += digests[rel] in known
            continue
        seen.add(digests[rel])
        items.append([str(extra / rel), index[rel.split("/", 1)[0]]])
    log(f"extra: {len(items)} images from {extra} join the train split (val and test unchanged); "
        f"{in_data} already in the dataset and {len(rels) - len(bad) - len(items) - in_data} repeated: dropped")
    return items, {"root": str(extra), "added": len(items), "already_in_data": in_data,
                   "skipped_folders": strays, "unreadable": len(bad)}


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
