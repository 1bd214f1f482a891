"""The reading side of a bundle's engine records: which built engine, if any, may run this model.

``batchcls engine build`` (``batchcls.builders``) writes engines beside the card and records in
``engines.json`` what each was built from and whether it was kept. That record describes this machine's
build, so it lives beside the engine, ignored by git; a bundle without one (a fresh clone, a wheel)
runs the INT8 model the bundle ships, if any (``shipped-int8.onnx`` + ``shipped-int8.json``: its gate
figures and a probe that ``backends.onnxruntime`` checks on each new CPU), else its plain ONNX model. A
local build's record comes first: it measured this very CPU. Every engine records the sha256 of the ONNX it came from, so a retrained
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


SHIPPED_RECORD_FILE = "shipped-int8.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_sha256(card: ModelCard) -> str:
    """sha256 of the bundle's ONNX file (~20 ms for a small CNN; hashed, not cached, so a model
    rewritten within one timestamp tick is still seen as changed)."""
    return file_sha256(card.onnx_path)


def cpu_family() -> str:
    """The instruction-set family INT8 results depend on: VNNI, AVX-512 without it, AVX2, or the machine."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    if cpu_has_vnni():
        return "x86 vnni"
    return "x86 avx512" if " avx512bw" in flags else "x86 avx2" if " avx2" in flags else platform.machine()


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


def shipped_int8_path(card: ModelCard) -> Path:
    return card.onnx_path.with_name("shipped-int8.onnx")


def shipped_probe_path(card: ModelCard) -> Path:
    return card.onnx_path.with_name("shipped-int8-probe.npy")


def shipped_record_path(card: ModelCard) -> Path:
    assert card.bundle_dir is not None
    return card.bundle_dir / SHIPPED_RECORD_FILE


def local_cpu_engine(card: ModelCard) -> Path | None:
    """What a build on this machine vouched for: INT8 if kept, else optimized, else the ONNX; None when
    there is no build of this model here.

    A model quantized without reduce_range (on a VNNI CPU) saturates on AVX2-only CPUs, so it runs only
    where VNNI is.
    """
    entry = read_record(card).get("cpu", {})
    if not entry or entry.get("source_sha256") != onnx_sha256(card):
        return None  # never built, or built from an older model
    int8, opt = int8_path(card), opt_path(card)
    needs_vnni = not entry.get("int8_settings", {}).get("reduce_range", True)
    if entry.get("int8_kept") and int8.is_file() and (cpu_has_vnni() or not needs_vnni):
        return int8
    return opt if opt.is_file() else card.onnx_path


def cpu_engine_path(card: ModelCard) -> Path:
    """The fastest CPU model a build on this machine vouched for, else the bundle's ONNX."""
    return local_cpu_engine(card) or card.onnx_path


def shipped_int8(card: ModelCard) -> dict | None:
    """The shipped INT8 model's record when it was kept by its gate, made from this very ONNX and is
    the file it measured; None otherwise. Whether this CPU computes what the gate measured is the probe's
    question, asked by the backend."""
    try:
        entry = json.loads(shipped_record_path(card).read_text())
    except (OSError, ValueError):
        return None
    path, probe = shipped_int8_path(card), shipped_probe_path(card)
    if not (isinstance(entry, dict) and entry.get("int8_kept") and path.is_file() and probe.is_file()):
        return None
    if entry.get("source_sha256") != onnx_sha256(card) or entry.get("int8_sha256") != file_sha256(path):
        return None
    if not entry.get("int8_settings", {}).get("reduce_range", False) and not cpu_has_vnni():
        return None
    return entry
