"""The writing side of engine records (``batchcls.backends.record`` reads them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchcls.backends.record import read_record, record_path
from batchcls.card import ModelCard
from batchcls.fsutil import atomic_write


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def update_record(card: ModelCard, section: str, entry: dict) -> None:
    data = read_record(card)
    data[section] = entry
    atomic_write_json(record_path(card), data)
