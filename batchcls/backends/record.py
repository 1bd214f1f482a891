"""The reading side of a bundle's engine records: which built engine, if any, may run this model.

``batchcls engine build`` (``batchcls.builders``) writes engines beside the card and records in
``engines.json`` what each was built from and whether it was kept. That record describes this machine's
build, so it lives beside the engine, ignored by git; a bundle without one (a fresh clone, a wheel)
runs its plain ONNX model. Every engine records the sha256 of the ONNX it came from, so a retrained
model never runs through a stale engine. Light on purpose (json, hashlib): ``load_backend`` reads it
on every run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from batchcls.card import ModelCard
from batchcls.machine import cpu_has_vnni

RECORD_FILE = "engines.json"


def onnx_sha256(card: ModelCard) -> str:
    """sha256 of the bundle's ONNX file (~20 ms for a small CNN; hashed, not cached, so a model
    rewritten within one timestamp tick is still seen as changed)."""
    h = hashlib.sha256()
    with open(card.onnx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def opt_path(card: ModelCard) -> Path:
    return card.onnx_path.with_name(card.onnx_path.stem + ".opt.onnx")


def int8_path(card: ModelCard) -> Path:
    return card.onnx_path.with_name(card.onnx_path.stem + ".int8.onnx")


def cpu_engine_path(card: ModelCard) -> Path:
    """The fastest CPU model a build has vouched for: INT8 if kept, else optimized, else the ONNX.

    A model quantized without reduce_range (on a VNNI CPU) saturates on AVX2-only CPUs, so it runs only
    where VNNI is.
    """
    entry = read_record(card).get("cpu", {})
    if not entry or entry.get("source_sha256") != onnx_sha256(card):
        return card.onnx_path  # never built, or built from an older model: the FP32 ONNX is the truth
    int8, opt = int8_path(card), opt_path(card)
    needs_vnni = not entry.get("int8_settings", {}).get("reduce_range", True)
    if entry.get("int8_kept") and int8.is_file() and (cpu_has_vnni() or not needs_vnni):
        return int8
    return opt if opt.is_file() else card.onnx_path
