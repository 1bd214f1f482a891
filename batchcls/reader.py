"""A file's bytes, read by a helper process, so that a read which never returns costs that file, not the run.

A read from a hung mount (NFS, SMB, FUSE) can block in the kernel where no signal reaches it: Ctrl-C does
nothing, and not even kill -9 ends the process until the mount is aborted. A thread is no way out, since a
process cannot exit while one of its threads is stuck there. So every file a decoder reads is opened and read
by a small helper process (a fresh interpreter with the standard library only), which streams the bytes back
through a pipe; the caller waits on that pipe with a deadline. A helper that sends nothing for ``READ_STALL_S``
is given up: killed, never waited for (it ends when the mount lets it go), and the next file gets a new one.
Each process that decodes (a decode worker, or a run or the API decoding in-process) has its own helper, which
exits when that process does.

Written by hand: no library reads a file under a deadline that survives an uninterruptible wait in the kernel.
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import threading

from batchcls.fsutil import open_long

READ_STALL_S = float(os.environ.get("BATCHCLS_READ_STALL_S", "30"))  # seconds without a byte before a read is given up
READER_FLAG = "--batchcls-reader"  # on each helper's command line: how ps (and the tests) tell them apart
CHUNK = 1 << 20
_HEAD = struct.Struct("<iq")  # errno (0: opened), size (-1: not a regular file)
_FRAME = struct.Struct("<i")  # bytes that follow; 0: the end; < 0: -errno of a failed read
_BOOT = ("import signal, sys, json; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); sys.path[:] = json.loads(sys.argv[2]); "
         "from batchcls.reader import helper_main; helper_main(int(sys.argv[3]))")


class StalledRead(Exception):
    """The file's storage gave no byte for READ_STALL_S seconds (a hung mount?)."""


class NotRegular(Exception):
    """A FIFO, device or folder: reading it could block or never end, so it is not read."""


class TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def read_file(path: str | os.PathLike, *, limit: int) -> bytes:
    """The bytes of ``path``, opened as ``fsutil.open_long`` does (any length, never waiting on a FIFO).

    Raises OSError as open or read would (FileNotFoundError, PermissionError, ...), NotRegular, TooLarge when
    the file holds more than ``limit`` bytes (said before any is read, when its size shows it), and StalledRead.
    """
    if not sys.executable:  # an embedded interpreter has no python to start a helper with: read here
        return _read_here(path, limit)
    # the helper was started in some earlier working folder: a relative path is this process's, made whole here
    # (joined, not normalised: ".." after a symlink must mean what the kernel says)
    whole = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    request = struct.pack("<q", limit) + os.fsencode(whole)
    with _LOCK:  # one helper per process, one file at a time
        for attempt in (1, 2):
            helper = _Helper.current()
            r, w = os.pipe()
            try:
                try:
                    socket.send_fds(helper.sock, [request], [w])
                finally:
                    os.close(w)
            except OSError:  # the helper is gone (killed, crashed): once more, with a fresh one
                os.close(r)
                helper.drop()
                if attempt == 2:
                    raise
                continue
            try:
                return _receive(_Pipe(r, helper), path, limit)
            except (OSError, NotRegular, TooLarge, StalledRead):
                raise  # the helper finished this file, or stops at its next write: it serves the next one
            except BaseException:  # Ctrl-C in the middle: the helper may be stuck on this file, so not reused
                helper.drop()
                raise
            finally:
                os.close(r)
    raise AssertionError("unreachable")


def _read_here(path: str | os.PathLike, limit: int) -> bytes:
    fd = open_long(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular()
        if st.st_size > limit:
            raise TooLarge(st.st_size)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(len(data))
    return data


def _receive(pipe: _Pipe, path: str | os.PathLike, limit: int) -> bytes:
    err, size = _HEAD.unpack(pipe.read(_HEAD.size))
    if err:
        raise OSError(err, os.strerror(err), os.fspath(path))
    if size < 0:
        raise NotRegular()
    if size > limit:
        raise TooLarge(size)
    data = bytearray()
    while True:
        (n,) = _FRAME.unpack(pipe.read(_FRAME.size))
        if n == 0:
            return bytes(data)
        if n < 0:
            raise OSError(-n, os.strerror(-n), os.fspath(path))
        data += pipe.read(n)
        if len(data) > limit:
            raise TooLarge(len(data))


class _Pipe:
    """The read end of one file's pipe: exactly n bytes, or StalledRead after READ_STALL_S without one."""

    def __init__(self, fd: int, helper: _Helper) -> None:
        self.fd, self.helper = fd, helper

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            # Waits READ_STALL_S from the last byte that came: a slow mount is fine, a silent one is not.
            ready, _, _ = select.select([self.fd], [], [], READ_STALL_S)
            if not ready:
                self.helper.drop()
                raise StalledRead()
            chunk = os.read(self.fd, min(n - len(out), CHUNK))
            if not chunk:  # the helper died in the middle (killed): its next file gets a fresh one
                self.helper.drop()
                raise OSError(errno.EIO, "the reader process ended while reading")
            out += chunk
        return bytes(out)


_LOCK = threading.Lock()


def _after_fork() -> None:
    """A forked child starts with no helper and a free lock: another thread may have held it at the fork."""
    global _LOCK
    _LOCK = threading.Lock()
    _Helper._this = None


class _Helper:
    """The helper process of this process: started at the first file, replaced when it stalls or dies."""

    _this: _Helper | None = None

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # No site (-S): the folder this package is in comes first, as an editable install's finder is not there.
            where = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *sys.path]
            # Nothing of ours either: a helper held by the kernel keeps what it holds open, and a caller reading
            # our stdout or stderr through a pipe would wait for their end until the mount is aborted.
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT, READER_FLAG, json.dumps(where),
                                          str(theirs.fileno())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours

    @classmethod
    def current(cls) -> _Helper:
        if cls._this is None:
            cls._this = cls()
        return cls._this

    def drop(self) -> None:
        """Give this helper up: killed, not waited for (a read stuck in the kernel ends when the mount lets it)."""
        if _Helper._this is self:
            _Helper._this = None
        self.sock.close()
        try:
            self.proc.kill()
        except OSError:
            pass


# --- the helper process --------------------------------------------------------------------------------

def helper_main(sock_fd: int) -> None:
    """Serve (limit, path) requests, each with the write end of its pipe, until the caller closes the socket
    (it exited, or gave this helper up)."""
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
        except OSError:
            return
        if not msg:
            return
        if fds:
            _serve(struct.unpack_from("<q", msg)[0], os.fsdecode(msg[8:]), fds[0])


def _serve(limit: int, path: str, out: int) -> None:
    try:
        try:
            fd = open_long(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
        except OSError as e:
            _write(out, _HEAD.pack(e.errno or errno.EIO, 0))
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # reading a FIFO or device would block or never end
                _write(out, _HEAD.pack(0, -1))
                return
            _write(out, _HEAD.pack(0, st.st_size))
            left = limit + 1  # one byte past the limit says "too large" when the size lied (a growing file)
            while left > 0:
                try:
                    chunk = os.read(fd, min(CHUNK, left))
                except OSError as e:
                    _write(out, _FRAME.pack(-(e.errno or errno.EIO)))
                    return
                if not chunk:
                    break
                _write(out, _FRAME.pack(len(chunk)) + chunk)
                left -= len(chunk)
            _write(out, _FRAME.pack(0))
        finally:
            os.close(fd)
    except BrokenPipeError:  # the caller stopped reading (a size over the limit): on to the next request
        pass
    finally:
        os.close(out)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


os.register_at_fork(after_in_child=_after_fork)
