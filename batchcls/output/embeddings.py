"""``--embeddings FILE.npy``: the penultimate-layer vector of every ok row, one member of the output's transaction.

``FILE.npy`` is an (N, D) float16 array in output row order (ok rows only); ``FILE.paths.jsonl`` beside it holds
row i's ``path`` on line i, encoded as the output's ``path`` column is (JSON strings, so any file name survives).

``RowWriter`` owns these files as it owns ``OUT.partial``, so they follow the output's rules, not rules of their
own: they are opened only after the output's lock and this file's own lock (``.FILE.npy.lock``: two outputs never
share one vectors file), never through a symbolic link, and only at the first row, so a start that fails creates
nothing. Each batch's vectors go to ``FILE.npy.partial`` and ``FILE.paths.jsonl.partial`` *before* its rows go to
``OUT.partial``: after a crash the sidecar holds at least the vectors of the rows on disk, and ``--resume`` cuts it
back to exactly those. The files are finished together with the rows and kept with them when a run is cut short.

The partial vectors file is already a ``.npy``: a header of fixed size, rewritten in place with the final shape at
the end, then the vectors. Finishing, and continuing a finished file, are renames, never a copy.
"""
from __future__ import annotations

import ast
import json
import os
import struct
from pathlib import Path

import numpy as np

from batchcls.errors import OutputError
from batchcls.fsutil import FileLock
from batchcls.output.names import decode_name, encode_name

DTYPE = np.dtype("<f2")
HEADER_BYTES = 128  # magic, version, length and the shape dict padded with spaces: room for any (N, D)
_MAGIC = b"\x93NUMPY\x01\x00"


def paths_file(path: Path) -> Path:
    """``FILE.paths.jsonl`` beside ``FILE.npy``."""
    return path.with_name(path.name.removesuffix(".npy") + ".paths.jsonl")


def partial_of(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def npy_header(rows: int, dim: int) -> bytes:
    """A version 1.0 ``.npy`` header of exactly HEADER_BYTES for a C-order (rows, dim) float16 array."""
    text = f"{{'descr': '{DTYPE.str}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body = text.ljust(HEADER_BYTES - len(_MAGIC) - 2 - 1) + "\n"
    return _MAGIC + struct.pack("<H", len(body)) + body.encode("latin1")


def _parse_header(head: bytes) -> tuple[int, int] | None:
    """(rows, dim) of a header ``npy_header`` wrote, or None for any other bytes."""
    if len(head) != HEADER_BYTES or not head.startswith(_MAGIC):
        return None
    if struct.unpack("<H", head[8:10])[0] != HEADER_BYTES - 10:
        return None
    try:
        meta = ast.literal_eval(head[10:].decode("latin1").strip())
        rows, dim = meta["shape"]
        ok = meta["descr"] == DTYPE.str and meta["fortran_order"] is False
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None
    return (int(rows), int(dim)) if ok and isinstance(rows, int) and isinstance(dim, int) else None


def _open_nofollow(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def _read_nofollow(path: Path) -> bytes:
    with open(_open_nofollow(path, os.O_RDONLY), "rb") as fh:
        return fh.read()


class Embeddings:
    """The vectors and paths files of one ``--embeddings FILE.npy``, driven by ``RowWriter``.

    ``dim`` is the card's ``embedding_dim`` (0: learned from the first vector, or from a resumed file's header).
    """

    def __init__(self, path: str | os.PathLike, dim: int = 0) -> None:
        self.npy = Path(path)
        if self.npy.suffix != ".npy":
            raise OutputError(f"--embeddings {self.npy}: name a .npy file (NumPy's format; paths go beside it)")
        self.paths = paths_file(self.npy)
        self.npy_partial, self.paths_partial = partial_of(self.npy), partial_of(self.paths)
        self.dim = dim
        self.rows = 0  # vectors in the file, those of a resumed run included
        self.lock = FileLock(self.npy.with_name(f".{self.npy.name}.lock"))
        self._vec: int | None = None  # fds of the two partial files, open from the first write to the end
        self._txt: int | None = None
        self._cut: tuple[int, int] | None = None  # a resume's byte lengths to keep (vectors, paths), set by load
        self._sizes: tuple[Path, int, Path, int] | None = None  # the files load checked, as it read them
        self._continue: list[tuple[Path, Path]] = []  # finished files a resume renames back to partial

    @property
    def names(self) -> list[Path]:
        """Every name this sidecar writes (the lock aside)."""
        return [self.npy, self.npy_partial, self.paths, self.paths_partial]

    def record(self) -> dict:
        """What the provenance sidecar records: where the vectors go and their dimension."""
        return {"path": os.path.join(os.path.realpath(self.npy.parent), self.npy.name), "dim": self.dim}

    def check_names(self) -> list[Path]:
        """The names that exist; a symbolic link at any of them is refused (batchcls never makes one there)."""
        for p in self.names:
            if p.is_symlink():
                raise OutputError(f"{p} is a symbolic link, which batchcls never makes: nothing was changed; "
                                  "remove it, or choose another --embeddings")
        return [p for p in self.names if os.path.lexists(p)]

    def load(self, ok_paths: list[str]) -> None:
        """A resume: check that the files hold the vectors of ``ok_paths`` (the output's ok rows, in order) and
        plan the cut back to exactly them. Changes nothing; ``cut`` does, once every file has passed."""
        vec = self._one_of(self.npy_partial, self.npy)
        txt = self._one_of(self.paths_partial, self.paths)
        if vec is None and txt is None:
            if ok_paths:
                raise OutputError(f"{self.npy} is missing, so the vectors of the {len(ok_paths)} rows already written "
                                  "are gone: rerun with --overwrite")
            return
        if vec is None or txt is None:
            raise OutputError(f"{self.npy} has {'no paths file' if txt is None else 'no vectors file'} beside it: "
                              "rerun with --overwrite")
        data = _read_nofollow(vec)
        shape = _parse_header(data[:HEADER_BYTES])
        if shape is None or (self.dim and shape[1] not in (0, self.dim)):
            raise OutputError(f"{vec} is not the vectors file of this output: it was left as it is; "
                              "rerun with --overwrite, or choose another --embeddings")
        self.dim = self.dim or shape[1]
        width = DTYPE.itemsize * self.dim
        have = (len(data) - HEADER_BYTES) // width if width else 0
        text = _read_nofollow(txt)
        lines = text[:text.rfind(b"\n") + 1].split(b"\n")[:-1]
        try:
            listed = [decode_name(json.loads(line)) for line in lines[:len(ok_paths)]]
        except ValueError:
            listed = []
        if have < len(ok_paths) or listed != ok_paths:
            raise OutputError(f"{self.npy} does not match the output's rows (vectors for {min(have, len(listed))} of its "
                              f"{len(ok_paths)} ok rows): rerun with --overwrite")
        keep_txt = sum(len(line) + 1 for line in lines[:len(ok_paths)])
        self._cut = (HEADER_BYTES + width * len(ok_paths), keep_txt)
        self._sizes = (vec, len(data), txt, len(text))
        self.rows = len(ok_paths)
        self._continue = [(p, partial_of(p)) for p in (vec, txt) if p in (self.npy, self.paths)]

    def _one_of(self, partial: Path, final: Path) -> Path | None:
        if os.path.lexists(partial) and os.path.lexists(final):
            raise OutputError(f"both {final} and {partial} exist: keep the one you trust, remove the other, "
                              "then --resume")
        return partial if os.path.lexists(partial) else final if os.path.lexists(final) else None

    def cut(self) -> None:
        """Cut what a crash left past the rows' vectors (planned by ``load``)."""
        if self._cut is None or self._sizes is None:
            return
        vec, vec_size, txt, txt_size = self._sizes
        for path, size, end in ((vec, vec_size, self._cut[0]), (txt, txt_size, self._cut[1])):
            fd = _open_nofollow(path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size != size:
                    raise OutputError(f"{path} changed while it was being checked: stop the other writer, then --resume")
                if end != size:
                    os.ftruncate(fd, end)
                    os.fsync(fd)
            finally:
                os.close(fd)

    def open(self, clear: bool) -> None:
        """Create (or continue) the partial files: at the transaction's first write."""
        if clear:
            for p in self.names:
                p.unlink(missing_ok=True)
        for final, partial in self._continue:
            os.replace(final, partial)
        self._continue = []
        # Never through a link planted at these names: O_NOFOLLOW, as for OUT.partial and the lock.
        self._vec = _open_nofollow(self.npy_partial, os.O_WRONLY | os.O_CREAT)
        self._txt = _open_nofollow(self.paths_partial, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        if os.lseek(self._vec, 0, os.SEEK_END) == 0:
            _write_all(self._vec, npy_header(0, self.dim))

    def add(self, rows: list[dict]) -> None:
        """Append the vector and path of each ok row of a batch, in row order (before the rows are written)."""
        vectors, names = [], []
        for r in rows:
            if r["status"] != "ok":
                continue
            vec = r.get("embedding")
            if vec is None:
                raise OutputError(f"row {r['path']!r} has no embedding: this model gives no features for --embeddings")
            vectors.append(np.asarray(vec, DTYPE))
            names.append(json.dumps(encode_name(r["path"]), ensure_ascii=False) + "\n")
        if not vectors:
            return
        assert self._vec is not None and self._txt is not None, "open() first"
        if not self.dim:  # the card did not say: the first vector does, and the header follows
            self.dim = len(vectors[0])
            os.pwrite(self._vec, npy_header(0, self.dim), 0)
        if any(len(v) != self.dim for v in vectors):
            raise OutputError(f"the model gives vectors of {len(vectors[0])} values, {self.npy} holds {self.dim}: "
                              "rerun with --overwrite")
        _write_all(self._vec, np.stack(vectors).tobytes())
        _write_all(self._txt, "".join(names).encode("utf-8", "surrogateescape"))
        self.rows += len(vectors)

    def close(self, complete: bool) -> None:
        """Complete: the final shape into the header, both files made durable and renamed into place. Else the
        partial files are only closed, kept for --resume with the rows."""
        fds, self._vec, self._txt = (self._vec, self._txt), None, None
        try:
            if complete and fds[0] is not None:
                os.pwrite(fds[0], npy_header(self.rows, self.dim), 0)
                for fd in fds:
                    os.fsync(fd)  # type: ignore[arg-type]
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
        if complete and fds[0] is not None:
            os.replace(self.npy_partial, self.npy)
            os.replace(self.paths_partial, self.paths)

    def discard(self) -> None:
        """A run that wrote nothing leaves no partial files behind."""
        for p in (self.npy_partial, self.paths_partial):
            if not p.is_symlink():
                p.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

