"""Filing labelled files away: atomic renames into MOVE_TO/<label>/ (or ERRORS_TO/), never overwriting.

A move happens only after the file's row is on disk, so after a kill -9 a file is either not in the
ledger (labelled again on restart) or in it (and moved on restart if it wasn't yet). Its destination is
chosen before the row is written (``plan``: the label's folder, and ``name-1.jpg`` after a clash), so the
row can say where the file went (``moved_to``), and a move a crash cut short is finished to that very name.
Only a file put under that name by someone else in between sends it to the next free name (said in the log).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
from pathlib import Path

from batchcls.fsutil import inside
from batchcls.label_folders import label_folder
from batchcls.scan import InputFile
from batchcls.watch.config import WatchError

log = logging.getLogger("batchcls.watch")

_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src: str, dst: str) -> None:
    """Atomically rename src to dst; FileExistsError if dst exists (os.rename would overwrite it)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # those mean: this filesystem can't
            raise OSError(err, os.strerror(err), dst)  # EEXIST becomes FileExistsError
    # link() refuses to overwrite; a crash between the two calls leaves two names for one inode,
    # which move_into() recognises and finishes.
    os.link(src, dst)
    os.unlink(src)


def free_name(src: str, folder: Path, taken: set[Path]) -> Path:
    """The first of name, name-1, name-2... in ``folder`` that no file holds and no move in flight has
    (``taken``); a name that already holds ``src`` itself (a link+unlink move cut short) is its name."""
    base = os.path.basename(src)
    stem, ext = os.path.splitext(base)
    for i in range(10_000):
        dst = folder / (base if i == 0 else f"{stem}-{i}{ext}")
        if dst in taken:
            continue
        if not os.path.lexists(dst):
            return dst
        try:
            if os.path.samefile(src, dst):
                return dst
        except OSError:
            pass
    raise OSError(errno.EEXIST, f"no free name for {base} in {folder}")


def move_into(src: str, folder: Path) -> Path:
    """Move src into folder under its own name, or name-1, name-2... on a clash; returns where it went."""
    folder.mkdir(parents=True, exist_ok=True)
    base = os.path.basename(src)
    stem, ext = os.path.splitext(base)
    for i in range(10_000):
        dst = folder / (base if i == 0 else f"{stem}-{i}{ext}")
        try:
            rename_noreplace(src, str(dst))
            return dst
        except FileExistsError:
            if os.path.samefile(src, dst):  # an interrupted link+unlink move: finish it
                os.unlink(src)
                return dst
    raise OSError(errno.EEXIST, f"no free name for {base} in {folder}")


class Mover:
    """Where ok rows' files (``--move-to``) and error rows' files (``--errors-to``) go."""

    def __init__(self, root: str, move_to: str | None, errors_to: str | None) -> None:
        self.root = root
        self.targets = {k: self._prepare(v, flag) for k, flag, v in
                        (("ok", "--move-to", move_to), ("error", "--errors-to", errors_to)) if v}

    def _prepare(self, folder: str, flag: str) -> Path:
        path = Path(folder).resolve()
        if inside(path, self.root):  # the scope excludes move targets: the whole inbox would be skipped
            raise WatchError(f"{flag} {folder} is the watched folder or holds it: nothing would ever be "
                             "labelled; choose a folder outside it, or a sub-folder of it")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WatchError(f"cannot create {flag} folder {folder}: {e.strerror}") from None
        if path.stat().st_dev != os.stat(self.root).st_dev:
            raise WatchError(f"{flag} {folder} is on another filesystem than the watched folder: "
                             "moves must be atomic renames, so choose a folder on the same one")
        return path

    @property
    def folders(self) -> list[Path]:
        return list(self.targets.values())

    def target_for(self, row: dict) -> Path | None:
        """Where a file with this row goes (None: it stays)."""
        return self.targets.get("ok" if row["status"] == "ok" else "error")

    def plan(self, f: InputFile, row: dict, taken: set[Path]) -> Path | None:
        """Where ``f`` is to go, chosen before its row is written: a free name in the folder its row says
        (not one of ``taken``, the names planned for the batch so far, which it joins). None: it stays,
        because there is no target, or its folder leads outside the target or cannot be made (logged)."""
        target = self.target_for(row)
        if target is None or os.path.isdir(f.path):  # a folder the scan could not list is never moved
            return None
        folder = target / label_folder(row) if row["status"] == "ok" else target
        if folder.exists() and not inside(target, folder):  # e.g. a symlink planted in MOVE_TO
            log.warning("not moving %s: %s leads outside %s; it stays", f.rel, folder, target)
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            dst = free_name(f.path, folder, taken)
        except OSError as e:
            log.warning("cannot move %s into %s: %s; it stays", f.rel, folder, e.strerror or e)
            return None
        taken.add(dst)
        return dst

    def finish(self, f: InputFile, dst: Path) -> Path | None:
        """Move ``f`` to ``dst``, where its row says it went; where it went (the next free name if someone else
        took ``dst`` meanwhile), or None when it could not move (the move is retried on the next start)."""
        try:
            rename_noreplace(f.path, str(dst))
            return dst
        except FileNotFoundError:
            return None
        except FileExistsError:
            pass
        except OSError as e:
            log.warning("could not move %s to %s: %s", f.rel, dst, e.strerror or e)
            return None
        try:
            went = move_into(f.path, dst.parent)  # an interrupted link+unlink to dst itself is finished there
        except OSError as e:
            log.warning("could not move %s into %s: %s", f.rel, dst.parent, e.strerror or e)
            return None
        if went != dst:
            log.warning("%s went to %s: another file took %s, the name its ledger row names", f.rel, went, dst)
        return went
