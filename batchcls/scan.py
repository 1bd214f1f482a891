"""Find the input files, streaming and in a deterministic order.

Every file counts (the format is judged later, by content), so a stray text file, a dangling
symlink or a FIFO gets its own error row instead of silently vanishing; so does a folder that
can't be listed, and the walk goes on. Hidden names are skipped; symlinked folders are followed
once each, so loops end, but never into /proc, /sys or /dev. The walk is iterative and lists each
folder through a folder fd, so neither depth nor PATH_MAX drops a file.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

from batchcls.errors import InputError
from batchcls.fsutil import open_long


@dataclass(frozen=True)
class InputFile:
    path: str  # what to open (may pass PATH_MAX: open it with fsutil.open_long, as decode_image does)
    rel: str  # the output key: relative to the input root, '/' separators
    error: str = ""  # set when the scan itself failed here (an unreadable folder): the row's reason
    ident: tuple = ()  # which file this is, whatever the route to it (see _identity); () when unknown


PSEUDO_ROOTS = ("/proc", "/sys", "/dev")  # kernel file systems: endless, or they block when read
_PSEUDO_TYPES = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                 "pstore", "bpf", "configfs", "fusectl", "mqueue", "binfmt_misc", "hugetlbfs", "efivarfs"}


def _pseudo_devices() -> frozenset[int]:
    """st_dev of every pseudo file system mounted here (and of anything mounted under /proc, /sys, /dev)."""
    devs = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                sep = fields.index("-")
                major, minor = fields[2].split(":")
                mount, fstype = fields[4], fields[sep + 1]
                if fstype in _PSEUDO_TYPES or any(mount == p or mount.startswith(p + "/") for p in PSEUDO_ROOTS):
                    devs.add(os.makedev(int(major), int(minor)))
    except (OSError, ValueError, IndexError):
        pass  # no /proc here: the path test below still applies
    return frozenset(devs)


def _into_pseudo(path: str, st: os.stat_result, devices: frozenset[int]) -> bool:
    if st.st_dev in devices:
        return True
    try:
        real = os.path.realpath(path)
    except OSError:
        return False
    return any(real == p or real.startswith(p + "/") for p in PSEUDO_ROOTS)


@dataclass
class _Folder:
    path: str  # as given plus relative names: can pass PATH_MAX, so it is opened with open_long
    prefix: str  # rel of the folder, '' or ending in '/'
    entries: list  # (name, is_dir, stat of the folder it leads to or None), sorted, consumed from the end
    ident: tuple[int, int]  # (st_dev, st_ino): with a name, the identity of a file in it (see _identity)


def _list(path: str, follow_pseudo: bool, devices: frozenset[int]) -> list[tuple[str, str, os.stat_result | None]]:
    """The folder's visible entries, sorted: (name, kind, stat) with kind 'file', 'dir' or a reason.

    Read through a folder fd (os.scandir on it): the names are relative, so depth and PATH_MAX
    don't matter, and the fd is closed before the caller goes deeper (open fds stay bounded).
    """
    fd = open_long(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            raw = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        out = []
        for e in raw:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if not is_dir:
                out.append((e.name, "file", None))
                continue
            try:
                st = e.stat(follow_symlinks=True)
            except OSError:
                out.append((e.name, "file", None))  # vanished: the decode will say so in its row
                continue
            if not follow_pseudo and e.is_symlink() and _into_pseudo(f"{path}/{e.name}", st, devices):
                out.append((e.name, "link into a pseudo-filesystem (/proc, /sys or /dev): not followed", None))
            else:
                out.append((e.name, "dir", st))
        return out
    finally:
        os.close(fd)


def _walk(root: str, root_ident: tuple[int, int], recursive: bool, seen: set[tuple[int, int]],
          exclude: frozenset[str], follow_pseudo: bool, *, prefix: str = "",
          files_seen: set | None = None) -> Iterator[InputFile]:
    """Depth first, names sorted in each folder, with an explicit stack: no recursion limit.

    ``files_seen`` (several sources): identities already yielded, so a file reached again is skipped.
    """
    devices = frozenset() if follow_pseudo else _pseudo_devices()
    try:
        stack = [_Folder(root, prefix, _list(root, follow_pseudo, devices)[::-1], root_ident)]
    except OSError as e:
        raise InputError(f"cannot list folder {root}: {e.strerror}") from None
    while stack:
        folder = stack[-1]
        if not folder.entries:
            stack.pop()
            continue
        name, kind, st = folder.entries.pop()
        path, rel = f"{folder.path.rstrip('/')}/{name}", f"{folder.prefix}{name}"
        if kind == "file":
            if os.path.abspath(path) in exclude:
                continue
            ident = (*folder.ident, name)
            if files_seen is not None:
                if ident in files_seen:
                    continue
                files_seen.add(ident)
            yield InputFile(path, rel, ident=ident)
            continue
        if kind != "dir":
            yield InputFile(path, rel, error=kind)
            continue
        if not recursive:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a symlink loop or a second route to a folder already listed
            continue
        seen.add(key)
        try:
            entries = _list(path, follow_pseudo, devices)
        except OSError as e:  # one unreadable folder is one error row; the rest of the tree still runs
            yield InputFile(path, rel, error=f"cannot list folder: {e.strerror}")
            continue
        stack.append(_Folder(path, rel + "/", entries[::-1], key))


def scan_dir(root: str | os.PathLike, *, recursive: bool = True, exclude: Iterable[str] = (),
             follow_pseudo: bool = False) -> Iterator[InputFile]:
    """Every file under ``root``; a folder that can't be listed becomes an entry with ``error`` set.

    Symlinked folders are followed once each, except into /proc, /sys or /dev (``follow_pseudo``
    allows it); ``root`` itself may be anywhere.
    """
    root = os.fspath(root)
    ident = _stat_ident(root)
    yield from _walk(root, ident, recursive, {ident}, frozenset(os.path.abspath(p) for p in exclude), follow_pseudo)


def _stat_ident(path: str) -> tuple[int, int]:
    fd = open_long(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def _identity(path: str, folders: dict[str, tuple[int, int] | None]) -> tuple:
    """What makes two spellings one file: its folder's (st_dev, st_ino) and its name.

    ``x``, ``./x``, ``/abs/x`` and ``d/../x`` agree (the kernel resolves the folder, symlinks and
    ``..`` included), while a symlink or hard link under another name stays a file of its own, as in a
    folder walk. A folder that cannot be opened falls back to the normalised absolute spelling.
    ``folders`` caches each folder's identity: a list names thousands of files in a few folders.
    """
    parent, name = os.path.split(path)
    parent = parent or "."
    if parent not in folders:
        try:
            folders[parent] = _stat_ident(parent)
        except OSError:
            folders[parent] = None
    ident = folders[parent]
    return ("path", os.path.normpath(os.path.abspath(path))) if ident is None else (*ident, name)


def _once(files: Iterable[InputFile]) -> Iterator[InputFile]:
    """Each file of a list once, under the first spelling that named it."""
    seen: set[tuple] = set()
    folders: dict[str, tuple[int, int] | None] = {}
    for f in files:
        ident = _identity(f.path, folders)
        if ident not in seen:
            seen.add(ident)
            yield InputFile(f.path, f.rel, f.error, ident)


class Written:
    """The files an output already has rows for: by key, and by identity, so that a file reached by another
    route than when its row was written (SOURCEs in another order, a folder link added since, a list that spells
    it otherwise) is still known and never gets a second row.

    ``root`` is the folder the keys are relative to (the output's recorded input). Each key's identity is its
    folder's (st_dev, st_ino) and its name, as the walk gives it; a key whose folder is gone matches by key only.
    """

    def __init__(self, keys: set[str], root: str) -> None:
        self.keys = keys
        folders: dict[str, tuple[int, int] | None] = {}
        self.idents = {_identity(os.path.join(root, k), folders) for k in keys}

    def __contains__(self, f: object) -> bool:
        if isinstance(f, str):
            return f in self.keys
        return isinstance(f, InputFile) and (f.rel in self.keys or bool(f.ident) and f.ident in self.idents)

    def __len__(self) -> int:
        return len(self.keys)


def scan_list(stream: TextIO, base: str = ".") -> Iterator[InputFile]:
    """One path per line; relative paths are relative to ``base`` and keep their spelling as key."""
    for line in stream:
        name = line.rstrip("\r\n")
        if not name.strip():
            continue
        yield InputFile(os.path.join(base, name), name.replace(os.sep, "/"))


Source = str | os.PathLike


def scan(sources: Source | Sequence[Source] | None, *, recursive: bool = True, files_from: str | None = None,
         exclude: Iterable[str] = ()) -> Iterator[InputFile]:
    """Folders and files (in the order given), or a list file ('-' = stdin); each file once.

    The output key (``rel``) of one folder's files is their path inside it, and of one file its name.
    Several sources are keyed relative to their common parent folder, counting a folder as itself and a
    file as the folder it is in: ``imgs/*.jpg`` is keyed like ``imgs`` (``a.jpg``), ``imgs/a imgs/b`` as
    ``a/x.jpg``, ``b/y.jpg``. A file named twice (``x``, ``./x``, ``/abs/x``, ``d/../x``) is listed once,
    under its first spelling. List lines keep their spelling as key.
    """
    if files_from is not None:
        if files_from == "-":
            return _once(scan_list(sys.stdin))
        try:
            stream = open(files_from, encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise InputError(f"cannot read file list {files_from}: {e.strerror}") from None
        return _closing(_once(scan_list(stream)), stream)
    if sources is None or (not isinstance(sources, (str, os.PathLike)) and not sources):
        raise InputError("give a folder or file to classify, or --files-from LIST")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    roots = [_source(os.fspath(s)) for s in sources]
    exclude = frozenset(os.path.abspath(p) for p in exclude)
    if len(roots) == 1:
        path, is_dir, _ = roots[0]
        if is_dir:
            return scan_dir(path, recursive=recursive, exclude=exclude)
        return iter([InputFile(path, os.path.basename(path), ident=_identity(path, {}))])
    return _several(roots, recursive, exclude)


def _source(path: str) -> tuple[str, bool, str]:
    """(path, is a folder, where it really is): the last names a folder itself, or a file's real folder and
    its own name (a symlinked file stays a file of that name, as in a walk)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"{path} does not exist: give an existing folder or image file") from None
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return path, True, os.path.realpath(path)
    parent, name = os.path.split(path)
    return path, False, os.path.join(os.path.realpath(parent or "."), name)


def key_root(sources: Source | Sequence[Source]) -> str:
    """The real folder that ``scan(sources)`` keys rows relative to: the folder, a file's folder, or the
    common parent of several (what a resumed output's rows must have been keyed against)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return _base([_source(os.fspath(s)) for s in sources])


def _base(roots: list[tuple[str, bool, str]]) -> str:
    return os.path.commonpath([real if is_dir else os.path.dirname(real) for _, is_dir, real in roots])


def _several(roots: list[tuple[str, bool, str]], recursive: bool, exclude: frozenset[str]) -> Iterator[InputFile]:
    base = _base(roots)
    files_seen: set[tuple] = set()
    folders: dict[str, tuple[int, int] | None] = {}
    for path, is_dir, real in roots:
        rel = os.path.relpath(real, base).replace(os.sep, "/")
        if not is_dir:
            ident = _identity(path, folders)
            if ident not in files_seen and os.path.abspath(path) not in exclude:
                files_seen.add(ident)
                yield InputFile(path, rel, ident=ident)
            continue
        ident = _stat_ident(path)
        yield from _walk(path, ident, recursive, {ident}, exclude, False,
                         prefix="" if rel == "." else rel + "/", files_seen=files_seen)


def _closing(it: Iterator[InputFile], stream: TextIO) -> Iterator[InputFile]:
    with stream:
        yield from it


def labelled_files(root: str | os.PathLike) -> list[tuple[InputFile, str]]:
    """``root/<class>/<image>`` as (file, class) pairs: what `batchcls eval` and engine builds score on."""
    files = [(f, f.rel.split("/", 1)[0]) for f in scan_dir(root) if "/" in f.rel]
    if not files:
        raise InputError(f"{root} has no class folders with images: expected {root}/<class>/<image>")
    return files


def count(sources: Source | Sequence[Source] | None, *, recursive: bool = True, files_from: str | None = None,
          exclude: Iterable[str] = (), skip: Container[str] | Written = frozenset(),
          stop: threading.Event | None = None) -> int | None:
    """How many files ``scan`` lists with these arguments, less those in ``skip`` (a resume's rows: keys, or
    ``Written``): a progress bar's total, counted by a second walk beside the run. None for stdin (it can be
    read once only) or when ``stop`` is set first."""
    if files_from == "-":
        return None
    n = 0
    for f in scan(sources, recursive=recursive, files_from=files_from, exclude=exclude):
        if stop is not None and stop.is_set():
            return None
        n += (f not in skip) if isinstance(skip, Written) else (f.rel not in skip)
    return n
