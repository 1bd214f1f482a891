"""Run a command the way a person does: in a real pseudo-terminal, as the foreground process group.

Ctrl-C is sent as a terminal sends it: the byte 0x03 written to the terminal, which the kernel's line
discipline turns into SIGINT for the whole foreground process group (decode workers included).
"""
from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _make_controlling_tty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command on a pty (stdin, stdout, stderr all the terminal unless redirected), 100x30."""

    def __init__(self, *argv: str | os.PathLike, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, stdout: int | None = None) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        argv = [str(a) for a in argv]
        if argv[0] == "batchcls":
            argv[0] = str(BIN / "batchcls")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave if stdout is None else stdout, stderr=slave,
                                     cwd=cwd, env={**os.environ, "TERM": "xterm", **(env or {})},
                                     preexec_fn=_make_controlling_tty, close_fds=True)
        os.close(slave)
        self.raw = b""

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every holder of the terminal has gone
                chunk = b""
            self.raw += chunk

    @property
    def screen(self) -> str:
        """Everything printed so far, escape codes and carriage-return redraws removed."""
        return ANSI.sub("\n", self.raw.decode("utf-8", "replace"))

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.screen)
            if m:
                return m
            if self.proc.poll() is not None:
                self._read(0.2)
                m = re.search(pattern, self.screen)
                if m:
                    return m
                raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}:\n{self.screen}")
            self._read(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.screen}")

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def wait(self, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"still running after {timeout}s:\n{self.screen}")
            self._read(0.1)
        end = time.monotonic() + 2
        while time.monotonic() < end:  # drain what is still buffered in the terminal
            before = len(self.raw)
            self._read(0.1)
            if len(self.raw) == before:
                break
        os.close(self.master)
        return self.proc.returncode


def run_in_terminal(*argv: str | os.PathLike, timeout: float = 180.0, **kw) -> tuple[int, str]:
    term = Terminal(*argv, **kw)
    return term.wait(timeout), term.screen
