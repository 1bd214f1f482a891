"""What produced an output, recorded beside it (``.OUT.meta.json``) and compared before a resume adds to it.

Rows from another model, another input folder, or other row-shaping options would mix silently with
the rows already there: the first model's labels kept for the first folder's names, the second model's
appended after them. So a writer given a ``Provenance`` records it (written atomically whenever the
output's file is created or continued) and refuses a resume whose provenance differs, naming what
differs. An output written before provenance was recorded has no sidecar: it resumes as before and
gets one.

A bundle is identified by everything that changes its rows, not by its ONNX file alone: two bundles with the
same ONNX may differ in their card (classes, preprocessing, temperature, TTA) or in their open-set decision (a
refit, a moved cut), and the backend may run another file of the bundle (an INT8 model, a TensorRT plan). The
open-set section is hashed whole, together with every bundle file it names, so a new layout of that section
needs no change here.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchcls.backends.record import file_sha256
from batchcls.card import ModelCard
from batchcls.errors import OutputError
from batchcls.fsutil import atomic_write, confined
from batchcls.scan import key_root

META_VERSION = 2
PREPROCESSING = ("input_size", "resize_mode", "crop_pct", "interpolation", "mean", "std")
CARD_VALUES = (*PREPROCESSING, "temperature", "tta", "embedding_dim")  # recorded as they are, so a refusal names them


@dataclass(frozen=True)
class Provenance:
    model_sha256: str
    input: str  # the real folder the rows' relative paths are relative to (a list's: the current folder)
    options: dict[str, Any]  # the options that shape rows (RunOptions.row_settings())
    # For an option a recorded output predates: its rows were made with the default of today.
    option_defaults: dict[str, Any] = field(default_factory=dict, compare=False)
    bundle: dict[str, Any] = field(default_factory=dict)  # bundle_identity(): what in the bundle shapes rows

    @classmethod
    def of(cls, card: ModelCard, options: Any, *, source: str | os.PathLike | Sequence[str] | None,
           files_from: str | None = None, served: Path | None = None) -> Provenance:
        """The provenance of rows ``card`` makes from ``source`` (folders and files, or a list) with
        ``options``, a ``pipeline.RunOptions`` (anything with ``row_settings()`` whose class builds its defaults).
        ``served`` is the model file the backend runs, where the caller knows it (None: not recorded)."""
        # A list's relative lines are keyed as spelled, so relative to the current folder, like a folder's files.
        where = os.path.realpath(".") if files_from is not None or not source else key_root(source)
        return cls(model_sha256(card), where, _plain(options.row_settings()),
                   _plain(type(options)().row_settings()),
                   bundle_identity(card, served, open_set=getattr(options, "open_set", True)))


def model_sha256(card: ModelCard) -> str:
    """The card's ``onnx_sha256``; a card without one (a bundle made by hand) has its ONNX file hashed."""
    return card.onnx_sha256 or file_sha256(card.onnx_path)


def bundle_identity(card: ModelCard, served: Path | None = None, *, open_set: bool = True) -> dict[str, Any]:
    """Everything in the bundle that shapes rows: the card's values, a digest of its classes, a digest of its
    open-set section with the bytes of every bundle file the section names (when the decision is on: off, no
    row depends on it), and the model file actually run."""
    hashes: dict[str, str] = {}

    def sha(path: str | os.PathLike) -> str:
        real = os.path.realpath(path)
        if real not in hashes:
            hashes[real] = file_sha256(Path(real))
        return hashes[real]

    identity: dict[str, Any] = {k: getattr(card, k) for k in CARD_VALUES}
    identity["classes"] = _digest(card.classes)
    identity["openset"] = None
    if open_set and card.openset:
        named = {name: sha(path) for name, path in sorted(_named_files(card.openset, card.bundle_dir))}
        identity["openset"] = _digest({"section": card.openset, "files": named})
    identity["served"] = None if served is None else {"file": served.name, "sha256": sha(served)}
    return _plain(identity)


def _named_files(section: Any, bundle: Path | None) -> Iterator[tuple[str, str]]:
    """(name, path) of every string in ``section`` that names a file inside the bundle folder, at any depth."""
    if bundle is None:
        return
    if isinstance(section, dict):
        for value in section.values():
            yield from _named_files(value, bundle)
    elif isinstance(section, list):
        for value in section:
            yield from _named_files(value, bundle)
    elif isinstance(section, str):
        path = confined(bundle, section)
        if path is not None and os.path.isfile(path):
            yield section, path


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def meta_path(out: Path) -> Path:
    """The sidecar beside OUT: hidden (scans skip it), one for OUT and its OUT.partial."""
    return out.with_name(f".{out.name}.meta.json")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # as it reads back from the sidecar: tuples are lists


def _record(prov: Provenance, columns: list[str], fmt: str, embeddings: dict | None) -> dict[str, Any]:
    return {"batchcls_output": META_VERSION, "model_sha256": prov.model_sha256, "bundle": prov.bundle,
            "input": prov.input, "format": fmt, "columns": list(columns), "options": prov.options,
            "embeddings": embeddings}


def write_meta(out: Path, prov: Provenance, columns: list[str], fmt: str, embeddings: dict | None = None) -> None:
    """Record ``prov`` beside ``out``; ``embeddings`` is the sidecar's ``Embeddings.record()`` (path, dimension)."""
    atomic_write(meta_path(out), json.dumps(_record(prov, columns, fmt, embeddings), indent=2) + "\n")


def check_meta(out: Path, prov: Provenance, columns: list[str], fmt: str, embeddings: dict | None = None) -> None:
    """Refuse (OutputError, one line) to resume ``out`` when its sidecar records another producer."""
    path = meta_path(out)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # written before provenance was recorded: resumed as before
    except OSError as e:
        raise OutputError(f"cannot read {path}: {e.strerror}: remove it to resume {out} as an output of "
                          "unknown origin") from None
    try:
        with open(fd, "rb") as fh:
            recorded = json.loads(fh.read())
        if not isinstance(recorded, dict) or not isinstance(recorded.get("options"), dict):
            raise ValueError("not a record")
    except ValueError:
        raise OutputError(f"{path} is damaged: remove it to resume {out} as an output of unknown origin, "
                          "or --overwrite") from None
    differ = _differences(recorded, _record(prov, columns, fmt, embeddings), prov.option_defaults)
    if differ:
        raise OutputError(f"{out} was written by another run ({'; '.join(differ)}): --resume would mix the two; "
                          "pass --overwrite to replace it, or choose another --out")


def _short(value: Any) -> str:
    return value[:12] if isinstance(value, str) else str(value)


def _bundle_differences(was: Any, now: dict[str, Any]) -> list[str]:
    """What differs in the bundle; a record from before bundles were identified (no ``bundle``) has only its
    ONNX sha256 to compare, and a model file recorded by only one side (Ray, watch) is not compared."""
    if not isinstance(was, dict):
        return []
    out = []
    for key, value in now.items():
        before = was.get(key, value)
        if before == value or (key == "served" and (before is None or value is None)):
            continue
        if key == "served":
            out.append(f"model file {before.get('file')} (sha256 {_short(before.get('sha256'))}), "
                       f"now {value['file']} (sha256 {_short(value['sha256'])})")
        elif key in ("classes", "openset"):
            what = "classes" if key == "classes" else "open-set section or statistics"
            out.append(f"the card's {what} (sha256 {_short(before)}, now {_short(value)})")
        else:
            out.append(f"the card's {key} {before}, now {value}")
    return out


def _differences(was: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    out = []
    if was.get("model_sha256") != now["model_sha256"]:
        out.append(f"model sha256 {str(was.get('model_sha256'))[:12]}, now {now['model_sha256'][:12]}")
    else:
        out += _bundle_differences(was.get("bundle"), now["bundle"])
    if was.get("input") != now["input"]:
        out.append(f"input {was.get('input')}, now {now['input']}")
    if was.get("format") != now["format"]:
        out.append(f"--format {was.get('format')}, now {now['format']}")
    elif was.get("columns") != now["columns"]:
        out.append(f"columns {was.get('columns')}, now {now['columns']}")
    for name, value in now["options"].items():
        before = was["options"].get(name, defaults.get(name, value))
        if before != value:
            out.append(f"{name} {before}, now {value}")
    vectors, before = now["embeddings"], was.get("embeddings")
    if (before or {}).get("path") != (vectors or {}).get("path"):
        out.append(f"--embeddings {(before or {}).get('path', 'none')}, now {(vectors or {}).get('path', 'none')}")
    return out
