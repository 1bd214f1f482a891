"""Helpers shared by the backend and builder tests: rows through the real pipeline, the sample frames, a
labelled colour folder, plan metadata as a build writes it, the parity bar, and the GPU markers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLES
from PIL import Image

from batchcls.backends.record import onnx_sha256
from batchcls.backends.tensorrt import GpuFacts, meta_path, plan_path
from batchcls.builders.parity import MAX_CONF_DIFF, MIN_AGREEMENT, compare_rows
from batchcls.infer import Classifier
from batchcls.pipeline import RunOptions, classify
from batchcls.scan import scan_dir

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the runtime install has no torch: the cuda module's tests skip
    torch = None
    HAS_CUDA = False
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (pip install 'batchcls[train]')")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with a CUDA build of torch")


SHIPPED = REPO / "engines" / "simpsons"
H200 = GpuFacts("10.9.0.34", "NVIDIA H200", "9.0")


def rows_for(card, backend, files, batch_size=16) -> list[dict]:
    out = []
    for rows in classify(files, Classifier(card, backend), RunOptions(batch_size=batch_size, workers=0)):
        out += rows
    return out


def sample_files() -> list:
    return sorted(scan_dir(SAMPLES), key=lambda f: f.rel)


def colour_folder(root: Path) -> Path:
    """Labelled DIR/<class>/* of solid colours, slightly noisy so calibration sees a range."""
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (25, 20, 230)}.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            arr = np.clip(np.array(rgb) + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def write_plan(card, facts: GpuFacts, **override) -> None:
    """A plan file with its metadata, as build_plan writes them (the plan bytes are opaque here)."""
    plan_path(card).write_bytes(b"not a real plan")
    meta = {"tensorrt_version": facts.tensorrt_version, "gpu_name": facts.gpu_name,
            "compute_capability": facts.compute_capability, "source_sha256": onnx_sha256(card), **override}
    meta_path(card).write_text(json.dumps(meta))


def assert_parity(ref, got, what: str) -> None:
    """The issue's bar for every engine: identical top-1 on >= 99.5% and confidence within 0.02."""
    cmp = compare_rows(ref, got)
    assert cmp.n == len(ref), what
    assert cmp.agreement >= MIN_AGREEMENT, f"{what}: top-1 agreement {cmp.agreement:.4f}"
    assert cmp.max_conf_diff < MAX_CONF_DIFF, f"{what}: confidence differs by {cmp.max_conf_diff:.4f}"


def gpu_bundle(request) -> Path:
    """The real model when it is here (engines/simpsons or $BATCHCLS_TEST_BUNDLE), else the Lite0 stand-in."""
    for candidate in (os.environ.get("BATCHCLS_TEST_BUNDLE"), REPO / "engines" / "simpsons"):
        if candidate and (Path(candidate) / "card.json").is_file():
            return Path(candidate)
    return request.getfixturevalue("lite0_engines")


def bad_inputs(root: Path) -> Path:
    """Good JPEGs mixed with every kind nvJPEG must hand to the CPU decoder."""
    root.mkdir()
    for f in sample_files()[:3]:
        shutil.copy(f.path, root / Path(f.rel).name)
    Image.open(sample_files()[3].path).save(root / "b_png_named.jpg", format="PNG")
    (root / "c_corrupt.jpg").write_bytes(Path(sample_files()[4].path).read_bytes()[:300])
    (root / "d_empty.jpg").write_bytes(b"")
    img = Image.open(sample_files()[5].path)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: only the CPU decoder applies it
    img.save(root / "e_rotated.jpg", exif=exif.tobytes())
    Image.open(sample_files()[6].path).convert("L").save(root / "f_grey.jpg")
    return root
