"""The report's thumbnails: small JPEGs cached in ``<report>_files/thumbs/`` under a key that covers
everything that shapes them, made in the decode stage's worker processes, pruned to what the page shows.

The cache folder is ours alone: it must be a real folder (a symlink planted at ``<report>_files`` or at
``thumbs`` is refused, never followed), and the prune removes entries through a descriptor of that very
folder, so nothing outside it can be deleted even if a name is swapped for a link meanwhile.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from batchcls.errors import OutputError
from batchcls.fsutil import atomic_path
from batchcls.machine import default_threads
from batchcls.scan import InputFile

THUMB_SIZE = 160  # px, longest side of a thumbnail (and its box on the page)
THUMB_QUALITY = 80  # JPEG quality: small files that still show what the picture is
THUMB_VERSION = 1  # bump when thumbnail making changes, so old cache entries are not reused
THUMB_NAME = re.compile(r"[0-9a-f]{24}\.jpg")
IN_PROCESS_BELOW = 32  # thumbnails; fewer are made in-process: starting workers costs more than it saves
BATCH = 16  # thumbnails per task handed to a worker


def thumb_key(st: os.stat_result, size: int) -> str:
    """Everything that shapes a thumbnail: which file (device, inode), its size and mtime, and how it is made.

    The inode rather than the name: the same picture under two names (links, copies of a row) gets one
    thumbnail, and an edited or replaced file gets a new one.
    """
    raw = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{size}:{THUMB_VERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def thumbs_folder(files_dir: str | os.PathLike) -> str:
    """``files_dir``/thumbs, created if needed; refused when either level is a symlink or not a folder."""
    files_dir = os.fspath(files_dir)
    thumbs = os.path.join(files_dir, "thumbs")
    for folder in (files_dir, thumbs):
        if os.path.islink(folder):
            raise OutputError(f"{folder} is a symlink: the thumbnail cache must be a real folder "
                              "(it is pruned); remove the link, or choose another --out")
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise OutputError(f"{folder} is not a folder: remove it, or choose another --out") from None
    return thumbs


def make_thumbnail(src: str, dest: str, size: int) -> str | None:
    """Decode ``src`` and write a JPEG of at most size x size to ``dest``; the error text on failure."""
    from PIL import Image

    from batchcls.decode import DecodeError, decode_image

    try:
        img = decode_image(src, min_side=size)  # JPEG draft mode: decode at reduced scale, most of the cost
    except DecodeError as e:
        return str(e)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    with atomic_path(dest, durable=False) as tmp:  # a reader (or a crash) never sees half a thumbnail
        img.save(tmp, "JPEG", quality=THUMB_QUALITY)
    return None


def make_batch(files: list[InputFile], *, folder: str, size: int) -> list[str | None]:
    """One task of the stage: each file's thumbnail (``rel`` is its name in ``folder``), or why not."""
    return [make_thumbnail(f.path, os.path.join(folder, f.rel), size) for f in files]


def _failed_batch(files: list[InputFile], reason: str) -> list[str | None]:
    return [reason] * len(files)


def make_all(todo: dict[str, str], folder: str, size: int, *, workers: int | None = None,
             progress: bool = False) -> dict[str, str]:
    """Make the thumbnail of each ``key -> source`` in ``todo``; returns ``key -> reason`` for those that failed.

    The work runs in the decode stage (``workers`` processes, None: one per core, 0: in-process), so the
    report's workers follow its rules: they ignore Ctrl-C (the parent stops and says so in one line),
    die with the parent, and a worker killed by a hostile file costs that batch a retry, then error text.
    """
    from batchcls.decode_stage import DecodeStage, batched  # numpy and Pillow: not on `batchcls --help`'s path

    files = [InputFile(src, f"{key}.jpg") for key, src in todo.items()]
    if workers is None:
        workers = default_threads()
    if len(files) < IN_PROCESS_BELOW:
        workers = 0
    bar = _progress_bar(len(files)) if progress else None
    reasons: list[str | None] = []
    try:
        with DecodeStage(functools.partial(make_batch, folder=folder, size=size), _failed_batch,
                         workers=workers) as stage:
            for batch in stage.map(batched(files, BATCH)):
                reasons += batch
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return {key: reason for key, reason in zip(todo, reasons) if reason}


def prune(folder: str, keep: Iterable[str]) -> None:
    """Drop cached thumbnails the page no longer shows (and temp files a crash left), so the cache stays
    the size of the report. Entries are listed and removed through a descriptor of ``folder`` opened
    without following links: whatever happens to the name meanwhile, only that folder's entries go."""
    keep = {f"{k}.jpg" for k in keep}
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in os.listdir(fd):
            if (THUMB_NAME.fullmatch(name) and name not in keep) or name.endswith(".tmp"):
                try:
                    os.unlink(name, dir_fd=fd)
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    pass  # gone already, or a folder someone made here: not ours to remove
    finally:
        os.close(fd)


def _progress_bar(total: int) -> Any:
    """A tqdm bar on an interactive stderr, else nothing (logs stay clean)."""
    if not total or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="thumbnails", file=sys.stderr, dynamic_ncols=True)
