"""The writing side of engine records (``batchcls.backends.record`` reads them)."""
from __future__ import annotations

import json

from batchcls.backends.record import read_record, record_path
from batchcls.card import ModelCard
from batchcls.fsutil import atomic_write


def update_record(card: ModelCard, section: str, entry: dict) -> None:
    data = read_record(card)
    data[section] = entry
    atomic_write(record_path(card), json.dumps(data, indent=2) + "\n")
