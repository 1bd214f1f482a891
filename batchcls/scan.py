"""Find the input files, streaming and in a deterministic order.

Every file counts (the format is judged later, by content), so a stray text file, a dangling
symlink or a FIFO gets its own error row instead of silently vanishing; so does a folder that
can't be listed, and the walk goes on. Hidden names are skipped; symlinked folders are followed
once each, so loops end, but never into /proc, /sys or /dev. The walk is iterative and lists each
folder through a folder fd, so neither depth nor PATH_MAX drops a file.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from batchcls.errors import InputError
from batchcls.fsutil import open_long


@dataclass(frozen=True)
class InputFile:
    path: str  # what to open (may pass PATH_MAX: open it with fsutil.open_long, as decode_image does)
    rel: str  # the output key: relative to the input root, '/' separators
    error: str = ""  # set when the scan itself failed here (an unreadable folder): the row's reason


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


def _walk(root: str, recursive: bool, seen: set[tuple[int, int]], exclude: frozenset[str],
          follow_pseudo: bool) -> Iterator[InputFile]:
    """Depth first, names sorted in each folder, with an explicit stack: no recursion limit."""
    devices = frozenset() if follow_pseudo else _pseudo_devices()
    try:
        stack = [_Folder(root, "", _list(root, follow_pseudo, devices)[::-1])]
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
            if os.path.abspath(path) not in exclude:
                yield InputFile(path, rel)
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
        stack.append(_Folder(path, rel + "/", entries[::-1]))


def scan_dir(root: str | os.PathLike, *, recursive: bool = True, exclude: Iterable[str] = (),
             follow_pseudo: bool = False) -> Iterator[InputFile]:
    """Every file under ``root``; a folder that can't be listed becomes an entry with ``error`` set.

    Symlinked folders are followed once each, except into /proc, /sys or /dev (``follow_pseudo``
    allows it); ``root`` itself may be anywhere.
    """
    root = os.fspath(root)
    fd = open_long(root, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    yield from _walk(root, recursive, {(st.st_dev, st.st_ino)},
                     frozenset(os.path.abspath(p) for p in exclude), follow_pseudo)


def scan_list(stream: TextIO, base: str = ".") -> Iterator[InputFile]:
    """One path per line; relative paths are relative to ``base`` and keep their spelling as key."""
    for line in stream:
        name = line.rstrip("\r\n")
        if not name.strip():
            continue
        yield InputFile(os.path.join(base, name), name.replace(os.sep, "/"))


def scan(source: str | os.PathLike | None, *, recursive: bool = True, files_from: str | None = None,
         exclude: Iterable[str] = ()) -> Iterator[InputFile]:
    """A folder, a single file, or a list file ('-' = stdin)."""
    if files_from is not None:
        if files_from == "-":
            return scan_list(sys.stdin)
        try:
            stream = open(files_from, encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise InputError(f"cannot read file list {files_from}: {e.strerror}") from None
        return _closing(scan_list(stream), stream)
    if source is None:
        raise InputError("give a folder or file to classify, or --files-from LIST")
    path = Path(source)
    if path.is_dir():
        return scan_dir(path, recursive=recursive, exclude=exclude)
    if path.is_file():
        return iter([InputFile(str(path), path.name)])
    raise InputError(f"{source} does not exist: give an existing folder or image file")


def _closing(it: Iterator[InputFile], stream: TextIO) -> Iterator[InputFile]:
    with stream:
        yield from it


def labelled_files(root: str | os.PathLike) -> list[tuple[InputFile, str]]:
    """``root/<class>/<image>`` as (file, class) pairs: what `batchcls eval` and engine builds score on."""
    files = [(f, f.rel.split("/", 1)[0]) for f in scan_dir(root) if "/" in f.rel]
    if not files:
        raise InputError(f"{root} has no class folders with images: expected {root}/<class>/<image>")
    return files
