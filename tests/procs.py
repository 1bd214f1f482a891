"""Helpers the process- and tree-level tests share: waiting on a condition, finding our live processes,
and building folders nested past PATH_MAX."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _members(field: int, value: int) -> list[int]:
    """Live processes (not zombies) whose /proc stat field ``field`` (after the state) equals ``value``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[field]) == value:
            out.append(int(entry))
    return out


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid``."""
    return _members(2, pgid)


def session_members(sid: int) -> list[int]:
    """Live processes in session ``sid`` (a command started as its own session leader, as a terminal does)."""
    return _members(3, sid)


def nested(root: str | os.PathLike, name: str, depth: int, leaf: str, data: bytes) -> list[str]:
    """``depth`` folders named ``name`` under root with a file ``leaf`` at the bottom, made through folder fds
    (their path may pass PATH_MAX); returns the path's parts."""
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    out = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, data)
    os.close(out)
    os.close(fd)
    return [name] * depth + [leaf]
