"""File-system primitives every writer shares: atomic writes, one-writer locks, safe names, confined paths.

Written by hand because the standard library has the pieces but not the rules: a whole-file write is
complete or absent after a crash (temp file in the same folder, fsync, ``os.replace``, fsync of the
folder); a lock is ``fcntl.flock`` on a lock file beside the output that names its holder's PID; a
name taken from data (a label, a row's path) can never climb out of the folder it is put in; and a
path longer than ``PATH_MAX`` can still be opened, one folder fd at a time.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096  # bytes, NUL included
NAME_MAX = 255  # bytes in one path component on every Linux file system we write to


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new name in ``folder`` survive a power cut (a no-op where dirs can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain FUSE mounts) refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    # Hidden (scans skip it) and unique, so two writers of the same file never share a temp file.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed onto ``path``.

    For writers that want a file name (``torch.save``, ``pq.write_table``, ``onnx.save``). On an
    exception the temp file is removed and ``path`` is left as it was. ``durable=False`` skips the
    fsyncs (a cache that is rebuilt when lost): still never half a file, but it may vanish in a power cut.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, durable: bool = True, **kwargs) -> Iterator[IO]:
    """``open()`` for a whole file that appears complete or not at all (mode 'w' or 'wb')."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path, durable=durable) as tmp:
        # O_EXCL on the fresh name; 0o666 so the umask decides permissions as for a plain open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with open(fd, mode, **kwargs) as fh:
            yield fh


def atomic_write(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8",
                 errors: str = "strict") -> None:
    """Replace ``path`` with ``data`` atomically (str is encoded with ``encoding``)."""
    raw = data.encode(encoding, errors) if isinstance(data, str) else data
    with atomic_open(path, "wb") as fh:
        fh.write(raw)


def _escaped(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))


def safe_name(text: str) -> str:
    """``text`` (a label, a file name from a row) as one harmless path component, a different one for each text.

    '%', '/', '\\', control characters, lone surrogates, a leading '.' and leading or trailing spaces are
    percent-encoded (their UTF-8 bytes), everything else is kept: 'homer_simpson' stays itself, 'a/b' is
    'a%2Fb' (never 'a_b', another label's folder), '..' is '%2E.', and '' is '%'. A name over NAME_MAX
    bytes is cut and ends in '%~' and a hash of the whole text. Every '%' the encoding writes starts an
    escape, a '%~' or the whole name, so two texts never share a name: a label like '../../etc' can
    neither leave the folder it names nor land in another label's.
    """
    last = len(text) - 1
    name = "".join(_escaped(c) if c in "%/\\" or ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF
                   or (i == 0 and c == ".") or (c == " " and i in (0, last)) else c
                   for i, c in enumerate(text)) or "%"
    if len(name.encode()) > NAME_MAX:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        cut = name.encode()[:NAME_MAX - 2 - len(digest)].decode("utf-8", "ignore")
        name = f"{re.sub(r'%[0-9A-F]?$', '', cut)}%~{digest}"  # never half an escape before the hash
    return name


def confined(root: str | os.PathLike, rel: str) -> str | None:
    """``root``/``rel`` if it stays inside ``root`` (judged on the spelling, '..' included), else None.

    ``rel`` comes from data (a row of a CSV), so '../../etc/passwd', '/etc/shadow' or a NUL are refused;
    an absolute ``rel`` is accepted only when it lies under ``root``.
    """
    if not rel or "\0" in rel:
        return None
    base = os.path.normpath(os.path.abspath(root))
    joined = os.path.normpath(os.path.join(base, rel))
    if joined == base or not joined.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return joined


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _chunks(path: str) -> list[str]:
    """Split ``path`` at '/' into pieces that each fit a syscall (< PATH_MAX bytes)."""
    raw = os.fsencode(path)
    if len(raw) < PATH_MAX:
        return [path]
    pieces, start = [], 0
    while len(raw) - start >= PATH_MAX:
        cut = raw.rfind(b"/", start, start + PATH_MAX - 1)
        if cut <= start:  # a component over PATH_MAX can't exist; let the kernel say so
            break
        pieces.append(os.fsdecode(raw[start:cut] or b"/"))
        start = cut + 1
    pieces.append(os.fsdecode(raw[start:]))
    return pieces


def open_long(path: str | os.PathLike, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    """``os.open`` for a path of any length: past PATH_MAX it descends one folder fd at a time.

    Paths under the limit take the ordinary single call. Symlinks along the way are followed, as
    the ordinary call would.
    """
    pieces = _chunks(os.fspath(path))
    if len(pieces) == 1:
        return os.open(pieces[0], flags, mode, dir_fd=dir_fd)
    fd = dir_fd
    try:
        for piece in pieces[:-1]:
            nxt = os.open(piece, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            if fd is not None and fd != dir_fd:
                os.close(fd)
            fd = nxt
        return os.open(pieces[-1], flags, mode, dir_fd=fd)
    finally:
        if fd is not None and fd != dir_fd:
            os.close(fd)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards ``path``: hidden, beside it (``labels.csv`` -> ``.labels.csv.lock``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is its PID as written in the lock file (None if unknown)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by PID {pid if pid is not None else 'unknown'}")
        self.path, self.pid = path, pid


class NotALock(OSError):
    """The lock file's name holds something batchcls never makes there (a symlink, a file with other names)."""


class FileLock:
    """An exclusive, non-blocking ``fcntl.flock`` on a lock file that records the holder's PID.

    The kernel drops the lock when its holder dies (even by kill -9), so a stale file never blocks
    anyone. ``release`` removes the file while still holding the lock; ``acquire`` re-checks that the
    name it locked is still the file on disk, so a remover and a newcomer can never both win. The name
    is opened without following a symlink, and a file with other names (hard links) is refused, so
    taking the lock can never truncate a file elsewhere.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._pid = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise NotALock(errno.ELOOP, "a symbolic link", str(self.path)) from None
                raise
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                os.close(fd)
                raise NotALock(errno.EEXIST, "a file with other names (hard links)" if stat.S_ISREG(st.st_mode)
                               else "not a regular file", str(self.path))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise LockHeld(self.path, self._holder()) from None
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed (released) between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd, self._pid = fd, os.getpid()

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "x")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        if self._pid == os.getpid():  # a forked child's copy must not remove its parent's lock file
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
