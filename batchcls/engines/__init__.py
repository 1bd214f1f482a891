"""Engines built from a bundle's ONNX model, stored beside its card.

``batchcls engine build`` (``make engine``) writes them into the bundle folder:
- TensorRT (NVIDIA GPU with the tensorrt package): ``model.plan`` + ``model.plan.json`` (what the
  plan is tied to) + a timing cache;
- CPU: ``model.opt.onnx`` (ONNX Runtime offline-optimized) and ``model.int8.onnx`` (static INT8),
  with ``engines.json`` recording whether INT8 was kept and the macro-F1s that decided it.

Every engine records the sha256 of the ONNX it came from, so a retrained model never runs
through a stale engine. This module stays light (json, hashlib): ``load_backend`` reads it on
every run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from batchcls.card import ModelCard

RECORD_FILE = "engines.json"
TARGETS = ("auto", "tensorrt", "cpu")

def onnx_sha256(card: ModelCard) -> str:
    """sha256 of the bundle's ONNX file (~20 ms for a small CNN; hashed, not cached, so a model
    rewritten within one timestamp tick is still seen as changed)."""
    h = hashlib.sha256()
    with open(card.onnx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def record_path(card: ModelCard) -> Path:
    assert card.bundle_dir is not None
    return card.bundle_dir / RECORD_FILE


def read_record(card: ModelCard) -> dict:
    """engines.json as a dict ({} when absent or unreadable: then no engine is trusted)."""
    try:
        data = json.loads(record_path(card).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_record(card: ModelCard, section: str, entry: dict) -> None:
    data = read_record(card)
    data[section] = entry
    atomic_write_json(record_path(card), data)


def build_engines(model: str | None, *, target: str = "auto", fp16: bool = True, max_batch: int = 256,
                  val_dir: str | None = None, calib_dir: str | None = None, calib_images: int = 300,
                  log: Callable[[str], None] = print) -> str:
    """Build the fastest engine this machine allows; returns the target that was built.

    auto: a TensorRT plan when the tensorrt package and a CUDA GPU are here, else CPU engines.
    """
    from batchcls.card import load_card
    from batchcls.errors import ModelError

    if target not in TARGETS:
        raise ModelError(f"unknown engine target {target!r}: choose one of {', '.join(TARGETS)}")
    card = load_card(model)
    if target == "auto":
        from batchcls.backends import machine_facts

        facts = machine_facts()
        target = "tensorrt" if facts.tensorrt_version and facts.gpu_name else "cpu"
        if facts.gpu_name and not facts.tensorrt_version:
            log(f"{facts.gpu_name} found but no tensorrt package: building CPU engines; the cuda backend "
                "needs no build (pip install 'batchcls[tensorrt]' for a TensorRT plan)")
    if target == "tensorrt":
        from batchcls.engines.tensorrt import build_plan

        build_plan(card, fp16=fp16, max_batch=max_batch, log=log)
    else:
        import importlib.util

        from batchcls.engines.cpu import build_cpu_engines

        # onnx reads the graph; ONNX Runtime's quantizer imports ml_dtypes, its pre-processing sympy
        missing = [m for m in ("onnx", "ml_dtypes", "sympy") if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelError(f"building CPU engines needs {', '.join(missing)}: pip install 'batchcls[engine]'")
        build_cpu_engines(card, val_dir=val_dir, calib_dir=calib_dir, calib_images=calib_images, log=log)
    return target
