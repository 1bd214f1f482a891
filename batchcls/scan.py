"""Find the input files, streaming and in a deterministic order.

Every file counts (the format is judged later, by content), so a stray text file, a dangling
symlink or a FIFO gets its own error row instead of silently vanishing. Hidden names are
skipped; symlinked folders are followed once each, so loops end.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from batchcls.errors import InputError


@dataclass(frozen=True)
class InputFile:
    path: str  # what to open
    rel: str  # the output key: relative to the input root, '/' separators


def _walk(root: str, prefix: str, recursive: bool, seen: set[tuple[int, int]],
          exclude: frozenset[str]) -> Iterator[InputFile]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise InputError(f"cannot list folder {root}: {e.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        rel = f"{prefix}{entry.name}"
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            if not recursive:
                continue
            try:
                st = os.stat(entry.path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:  # a symlink loop or a second route to a folder already listed
                continue
            seen.add(key)
            yield from _walk(entry.path, rel + "/", recursive, seen, exclude)
        elif os.path.abspath(entry.path) not in exclude:
            yield InputFile(entry.path, rel)


def scan_dir(root: str | os.PathLike, *, recursive: bool = True,
             exclude: Iterable[str] = ()) -> Iterator[InputFile]:
    root = os.fspath(root)
    st = os.stat(root)
    yield from _walk(root, "", recursive, {(st.st_dev, st.st_ino)},
                     frozenset(os.path.abspath(p) for p in exclude))


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
