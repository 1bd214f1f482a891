"""Reading back what ``batchcls run --embeddings FILE.npy`` wrote: the public reader of the vectors file.

Writing is ``batchcls.output.embeddings``, one member of the output's transaction (``RowWriter``); this module
only reads a finished pair of files, so a notebook imports no writer to load them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from batchcls.output.embeddings import paths_file
from batchcls.output.names import decode_name


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(vectors, paths) as ``--embeddings`` wrote them; paths decoded back to the file names."""
    path = Path(path)
    with open(paths_file(path), encoding="utf-8") as fh:
        paths = [decode_name(json.loads(line)) for line in fh]
    return np.load(path), paths
