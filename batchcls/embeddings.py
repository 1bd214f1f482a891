"""``--embeddings FILE.npy``: the penultimate-layer vector of every ok row, for FiftyOne, cleanlab or a
near-duplicate search.

``FILE.npy`` is an (N, D) float16 array in output row order (ok rows only); ``FILE.paths.jsonl`` beside it
holds row i's ``path`` on line i, encoded as the output's ``path`` column is (JSON strings, so any file name
survives). Vectors stream to ``FILE.npy.partial`` batch by batch and the ``.npy`` is written once, at the end
of a complete run, so memory stays flat however many files there are and a cut run leaves no ``.npy``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from batchcls.errors import OutputError
from batchcls.fsutil import atomic_path
from batchcls.output import encode_name

DTYPE = np.float16


def paths_file(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".npy") + ".paths.jsonl")


class EmbeddingWriter:
    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.suffix != ".npy":
            raise OutputError(f"--embeddings {self.path}: name a .npy file (NumPy's format; paths go beside it)")
        if not overwrite and (self.path.exists() or paths_file(self.path).exists()):
            raise OutputError(f"--embeddings {self.path} exists: pass --overwrite to replace it, or another name")
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._raw = open(self.partial, "wb")
        self._paths = open(paths_file(self.partial), "w", encoding="utf-8")
        self.rows = 0
        self.dim: int | None = None

    def add(self, rows: list[dict]) -> None:
        """Append the ``embedding`` of each ok row of a batch, in row order."""
        for r in rows:
            vec = r.get("embedding")
            if r["status"] != "ok" or vec is None:
                continue
            if self.dim is None:
                self.dim = len(vec)
            self._raw.write(np.asarray(vec, DTYPE).tobytes())
            self._paths.write(json.dumps(encode_name(r["path"]), ensure_ascii=False) + "\n")
            self.rows += 1

    def close(self, complete: bool = True) -> None:
        """Complete: write ``FILE.npy`` (header + the streamed vectors) and its paths, atomically; else drop."""
        self._raw.close()
        self._paths.close()
        if not complete:
            self.partial.unlink(missing_ok=True)
            paths_file(self.partial).unlink(missing_ok=True)
            return
        shape = (self.rows, self.dim or 0)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as out, open(self.partial, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)),
                                                       "fortran_order": False, "shape": shape})
            while chunk := raw.read(1 << 20):
                out.write(chunk)
        os.replace(paths_file(self.partial), paths_file(self.path))
        self.partial.unlink(missing_ok=True)


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(vectors, paths) as ``--embeddings`` wrote them; paths decoded back to the file names."""
    from batchcls.output import decode_name

    path = Path(path)
    with open(paths_file(path), encoding="utf-8") as fh:
        paths = [decode_name(json.loads(line)) for line in fh]
    return np.load(path), paths
