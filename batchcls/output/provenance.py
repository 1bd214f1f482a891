"""What produced an output, recorded beside it (``.OUT.meta.json``) and compared before a resume adds to it.

Rows from another model, another input folder, or other row-shaping options would mix silently with
the rows already there: the first model's labels kept for the first folder's names, the second model's
appended after them. So a writer given a ``Provenance`` records it (written atomically whenever the
output's file is created or continued) and refuses a resume whose provenance differs, naming what
differs. An output written before provenance was recorded has no sidecar: it resumes as before and
gets one.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchcls.card import ModelCard
from batchcls.errors import OutputError
from batchcls.fsutil import atomic_write
from batchcls.scan import key_root

META_VERSION = 1


@dataclass(frozen=True)
class Provenance:
    model_sha256: str
    input: str  # the real folder the rows' relative paths are relative to (a list's: the current folder)
    options: dict[str, Any]  # the options that shape rows (RunOptions.row_settings())
    # For an option a recorded output predates: its rows were made with the default of today.
    option_defaults: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, card: ModelCard, options: Any, *, source: str | os.PathLike | Sequence[str] | None,
           files_from: str | None = None) -> Provenance:
        """The provenance of rows ``card`` makes from ``source`` (folders and files, or a list) with
        ``options``, a ``pipeline.RunOptions`` (anything with ``row_settings()`` whose class builds its defaults)."""
        # A list's relative lines are keyed as spelled, so relative to the current folder, like a folder's files.
        where = os.path.realpath(".") if files_from is not None or not source else key_root(source)
        return cls(model_sha256(card), where, _plain(options.row_settings()),
                   _plain(type(options)().row_settings()))


def model_sha256(card: ModelCard) -> str:
    """The card's ``onnx_sha256``; a card without one (a bundle made by hand) has its ONNX file hashed."""
    if card.onnx_sha256:
        return card.onnx_sha256
    digest = hashlib.sha256()
    with open(card.onnx_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def meta_path(out: Path) -> Path:
    """The sidecar beside OUT: hidden (scans skip it), one for OUT and its OUT.partial."""
    return out.with_name(f".{out.name}.meta.json")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # as it reads back from the sidecar: tuples are lists


def _record(prov: Provenance, columns: list[str], fmt: str) -> dict[str, Any]:
    return {"batchcls_output": META_VERSION, "model_sha256": prov.model_sha256, "input": prov.input,
            "format": fmt, "columns": list(columns), "options": prov.options}


def write_meta(out: Path, prov: Provenance, columns: list[str], fmt: str) -> None:
    atomic_write(meta_path(out), json.dumps(_record(prov, columns, fmt), indent=2) + "\n")


def check_meta(out: Path, prov: Provenance, columns: list[str], fmt: str) -> None:
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
    differ = _differences(recorded, _record(prov, columns, fmt), prov.option_defaults)
    if differ:
        raise OutputError(f"{out} was written by another run ({'; '.join(differ)}): --resume would mix the two; "
                          "pass --overwrite to replace it, or choose another --out")


def _differences(was: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    out = []
    if was.get("model_sha256") != now["model_sha256"]:
        out.append(f"model sha256 {str(was.get('model_sha256'))[:12]}, now {now['model_sha256'][:12]}")
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
    return out
