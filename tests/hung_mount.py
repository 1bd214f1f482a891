"""A real hung mount for tests and `make soak`: a tiny FUSE file system (the kernel protocol spoken directly over
/dev/fuse, no libfuse) serving the files of a folder, except that it never answers the OPEN of the files named
``--hang-open`` or the READ of those named ``--hang-read``.

A request the server has read and never answers is what a dead NFS server or a wedged FUSE daemon gives: the
process that made it waits in the kernel where Ctrl-C does not reach it, and after the server has taken the
request not even kill -9 ends it, until the connection is aborted. Stopping the server (``HungMount.close``)
aborts it: every stuck request fails and the processes waiting on it go on.

    with HungMount(mountpoint, source_folder, hang_open=["stuck.jpg"]):
        ...  # reading mountpoint/stuck.jpg hangs; the other files read normally

Needs root (or CAP_SYS_ADMIN) and /dev/fuse; ``HungMount`` raises PermissionError where mounting is not allowed.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, extlen+padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT = 1, 2, 3, 14, 15, 18, 25, 26
OPENDIR, READDIR, RELEASEDIR, INTERRUPT, DESTROY, BATCH_FORGET = 27, 28, 29, 36, 38, 42
FOPEN_DIRECT_IO = 1  # every READ reaches the server (no page cache): a hung READ is always the server's
MAX_WRITE = 1 << 17


class Server:
    def __init__(self, fd: int, files: dict[str, bytes], hang_open: set[str], hang_read: set[str]) -> None:
        self.fd, self.hang_open, self.hang_read = fd, hang_open, hang_read
        self.names = sorted(files)
        self.data = [files[n] for n in self.names]  # nodeid i + 2 is file i; 1 is the root
        self.held: list[int] = []  # requests never answered

    def reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)
        except OSError as e:  # the caller was interrupted and the request is gone: nothing to answer
            if e.errno != errno.ENOENT:
                raise

    def attr(self, node: int) -> bytes:
        now = int(time.time())
        if node == 1:
            return ATTR.pack(1, 0, 0, now, now, now, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
        size = len(self.data[node - 2])
        return ATTR.pack(node, size, (size + 511) // 512, now, now, now, 0, 0, 0, stat.S_IFREG | 0o644, 1, 0, 0, 0,
                         4096, 0)

    def entry(self, node: int) -> bytes:
        return struct.pack("<QQQQII", node, 0, 60, 60, 0, 0) + self.attr(node)

    def dirents(self, offset: int, size: int) -> bytes:
        out = b""
        for i in range(offset, len(self.names)):
            name = self.names[i].encode()
            ent = struct.pack("<QQII", i + 2, i + 1, len(name), stat.S_IFREG >> 12) + name
            ent += b"\0" * (-len(ent) % 8)
            if len(out) + len(ent) > size:
                break
            out += ent
        return out

    def serve(self) -> None:
        while True:
            try:
                req = os.read(self.fd, MAX_WRITE + 4096)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            _, op, unique, node, *_ = IN_HEADER.unpack_from(req)
            body = req[IN_HEADER.size:]
            if op in (FORGET, BATCH_FORGET, INTERRUPT):
                continue  # no answer expected (an interrupt of a held request is ignored: it stays held)
            if op == INIT:
                major, minor = struct.unpack_from("<II", body)
                self.reply(unique, INIT_OUT.pack(7, min(minor, 31), MAX_WRITE, 0, 16, 12, MAX_WRITE, 1, 32, 0, 0,
                                                 *[0] * 7))
            elif op == LOOKUP:
                name = body.split(b"\0", 1)[0].decode()
                if node == 1 and name in self.names:
                    self.reply(unique, self.entry(self.names.index(name) + 2))
                else:
                    self.reply(unique, error=errno.ENOENT)
            elif op == GETATTR:
                self.reply(unique, struct.pack("<QII", 60, 0, 0) + self.attr(node))
            elif op == OPENDIR:
                self.reply(unique, struct.pack("<QII", 0, 0, 0))
            elif op == READDIR:
                _, offset, size, *_ = READ_IN.unpack_from(body)
                self.reply(unique, self.dirents(offset, size))
            elif op == OPEN:
                if self.names[node - 2] in self.hang_open:
                    self.held.append(unique)
                else:
                    self.reply(unique, struct.pack("<QII", 0, FOPEN_DIRECT_IO, 0))
            elif op == READ:
                _, offset, size, *_ = READ_IN.unpack_from(body)
                if self.names[node - 2] in self.hang_read:
                    self.held.append(unique)
                else:
                    self.reply(unique, self.data[node - 2][offset:offset + size])
            elif op in (RELEASE, RELEASEDIR, FLUSH):
                self.reply(unique)
            elif op == DESTROY:
                self.reply(unique)
                return
            else:
                self.reply(unique, error=errno.ENOSYS)


def _mount(mountpoint: str) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},allow_other".encode()
    if libc.mount(b"batchcls-hung", mountpoint.encode(), b"fuse.batchcls-hung", 0, opts) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise PermissionError(err, f"cannot mount FUSE here: {os.strerror(err)}")
    return fd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mountpoint")
    ap.add_argument("source", help="the folder whose files are served (its top level only)")
    ap.add_argument("--hang-open", action="append", default=[])
    ap.add_argument("--hang-read", action="append", default=[])
    args = ap.parse_args()
    files = {p.name: p.read_bytes() for p in sorted(Path(args.source).iterdir()) if p.is_file()}
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # closing /dev/fuse aborts the connection
    try:
        fd = _mount(args.mountpoint)
    except PermissionError as e:
        print(f"error: {e.strerror}", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    Server(fd, files, set(args.hang_open), set(args.hang_read)).serve()


class HungMount:
    """The server in its own process, mounted at ``mountpoint`` until ``close`` (or the end of a with block)."""

    def __init__(self, mountpoint: Path, source: Path, *, hang_open: list[str] = (), hang_read: list[str] = ()) -> None:
        if not os.path.exists("/dev/fuse"):
            raise PermissionError("no /dev/fuse here")
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        cmd = [sys.executable, __file__, str(mountpoint), str(source)]
        cmd += [f"--hang-open={n}" for n in hang_open] + [f"--hang-read={n}" for n in hang_read]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.wait()
            raise PermissionError(line or "the FUSE server did not start")

    def close(self) -> None:
        """Abort the connection (every held request fails), then unmount."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()
        self.proc.stdout.close()
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)

    def __enter__(self) -> HungMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
