"""``RowWriter``: rows appended as they are produced, the file finished atomically, resumed without duplicates.

Rows go to ``OUT.partial`` (flushed per batch, so a crash loses at most the batches in flight) and the
finished file is moved into place with ``os.replace``. One writer per output: ``.OUT.lock`` beside OUT
is held (``fcntl.flock``) from before anything is renamed or deleted until the file is finished.
Nothing is created until the first row (or the end of a run with no rows), so a command that fails at
start leaves no file behind.

Every file a run writes is one transaction owned here: the rows, their provenance (``.OUT.meta.json``) and the
``--embeddings`` sidecar (``embeddings.py``). A sidecar is opened after the locks, never through a link, appended
per batch before the rows, finished before OUT is moved into place (OUT in place means all is finished), kept
with ``OUT.partial`` when a run is cut short and cut back to the rows on ``--resume``.
"""
from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from batchcls.errors import OutputError
from batchcls.fsutil import FileLock, LockHeld, NotALock, fsync_dir, lock_path
from batchcls.output.embeddings import Embeddings
from batchcls.output.formats import FORMATS, STDOUT, CsvFormat, Found, ParquetFormat, output_format
from batchcls.output.provenance import Provenance, check_meta, meta_path, write_meta


class RowWriter:
    """Appends rows to OUT.partial and completes OUT on close(); '-' writes straight to stdout.

    ``in_place=True`` is for a long-lived writer (the watch daemon): rows are appended to OUT
    itself and fsynced per write, so OUT is always a valid file that readers can tail and the
    ledger of what is done; there is no final rename. Parquet can't be appended, so it is refused.

    The lock is taken in the constructor, before any file is touched, and held until ``close``
    (or the process ends). Files are created at the first ``write`` (or at ``close(complete=True)``
    of a run without rows); a write finds out when its file was deleted or replaced under it.
    """

    def __init__(self, out: str, *, fmt: str = "csv", columns: list[str], resume: bool = False,
                 overwrite: bool = False, in_place: bool = False, provenance: Provenance | None = None,
                 embeddings: str | os.PathLike | None = None, embedding_dim: int = 0) -> None:
        # The CLI's rules (stdout takes neither parquet nor --resume) hold for API callers too.
        fmt = output_format(out, fmt, resume=resume)
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise OutputError("--format parquet needs pyarrow: pip install 'batchcls[parquet]'") from None
        self.format = FORMATS[fmt]
        if in_place and self.format is ParquetFormat:
            raise OutputError("parquet files can't be appended to in place: use csv or jsonl")
        self.in_place = in_place
        self.columns = columns
        self.fmt = fmt
        self.provenance = provenance
        self.vectors = Embeddings(embeddings, embedding_dim) if embeddings is not None else None
        if self.vectors is not None and in_place:
            raise OutputError("--embeddings is written by `batchcls run`, not by a writer that appends in place")
        self.last_written_ns: int | None = None  # a resumed output's last write (mtime), as found
        self.done: set[str] = set()
        self.to_stdout = out == STDOUT
        self.rows_written = 0
        self.fh: BinaryIO | None = None  # unbuffered: a failed write leaves no bytes behind to flush later
        self._opened = False  # this writer created (or continued) its files: a failed run may discard them
        self._locks: list[FileLock] = []
        if self.to_stdout:
            if self.vectors is not None:
                self._check_apart([])
                self._take(self.vectors.lock, self.vectors.npy, "--embeddings")
                self._guarded(lambda: self._prepare_vectors(resume=False, overwrite=overwrite, found=False))
            sys.stdout.write(self.format.header(columns))
            return
        self.out = Path(out)
        if resume and self.out.is_symlink():
            self.out = self._follow(self.out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.lock_file = lock_path(self.out)
        if not self.out.parent.is_dir():
            raise OutputError(f"output folder {self.out.parent} does not exist: create it first")
        if not os.access(self.out.parent, os.W_OK):
            raise OutputError(f"output folder {self.out.parent} is not writable: choose another --out")
        self._check_apart([self.out, self.partial, self.lock_file, meta_path(self.out)])
        self._take(FileLock(self.lock_file), self.out, "--out")
        if self.vectors is not None:  # the vectors file has one writer too: two outputs never share it
            self._guarded(lambda: self._take(self.vectors.lock, self.vectors.npy, "--embeddings"))
        self._guarded(lambda: self._prepare(resume, overwrite))

    def _take(self, lock: FileLock, path: Path, option: str) -> None:
        """Hold ``lock`` until close; refused in one line when another process holds it or it is not ours."""
        # A writer dropped without close() (a command that failed early) still lets go of the lock and
        # removes the lock file, at garbage collection or interpreter exit.
        weakref.finalize(self, lock.release)
        try:
            lock.acquire()
        except LockHeld as e:
            raise OutputError(f"{path} is being written by another batchcls process (PID "
                              f"{e.pid if e.pid is not None else 'unknown'}): wait for it to finish or stop it, "
                              f"or choose another {option}") from None
        except NotALock as e:
            raise OutputError(f"{lock.path} is {e.strerror}, not a lock batchcls made; it was left as it is: "
                              "remove it, then run again") from None
        except OSError as e:
            raise OutputError(f"cannot lock {lock.path}: {e.strerror}: choose another {option}") from None
        self._locks.append(lock)

    def _guarded(self, step) -> None:
        """Run a step of the start; on any failure the locks taken so far are let go at once."""
        try:
            step()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []

    def _check_apart(self, ours: list[Path]) -> None:
        """The sidecar's names must not be the output's own (``--out feats.paths.jsonl --embeddings feats.npy``)."""
        if self.vectors is None:
            return
        where = {(os.path.realpath(p.parent), p.name) for p in ours}
        for p in [*self.vectors.names, self.vectors.lock.path]:
            if (os.path.realpath(p.parent), p.name) in where:
                raise OutputError(f"--out and --embeddings {self.vectors.npy} both use the name {p}: "
                                  "choose names apart")

    def own_files(self) -> list[str]:
        """Every file this writer writes, for the scan to skip: a run never labels its own output."""
        mine = [] if self.to_stdout else [self.out, self.partial]
        if self.vectors is not None:
            mine += self.vectors.names
        return [str(p) for p in mine]

    @property
    def target(self) -> Path:
        """The file rows are appended to."""
        return self.out if self.in_place else self.partial

    def _follow(self, link: Path) -> Path:
        """A resumed OUT that is a symlink: continue the file it names, if that is a batchcls output."""
        target = Path(os.path.realpath(link))
        try:
            if not target.is_file():
                raise OutputError("not a file")
            self._inspect(target, finished=True)
        except OutputError:
            raise OutputError(f"{link} is a symbolic link to {target}, which is not a batchcls output with this "
                              "run's columns: nothing was changed; remove the link or choose another --out") from None
        return target

    def _inspect(self, path: Path, *, finished: bool) -> Found:
        """The paths in ``path``, its bytes and where its last complete row ends; OutputError, with the file
        untouched, unless it is provably a batchcls output with this run's columns."""
        if finished and self.format is ParquetFormat:  # OUT.partial of a Parquet run is JSON lines
            return ParquetFormat.check_finished(path, self.columns)
        data = _read_nofollow(path)
        found = self.format.check(data, path, self.columns)
        found.data = data
        return found

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        existing = [p for p in (self.out, self.partial) if os.path.lexists(p)]
        if existing and not (resume or overwrite):
            raise OutputError(f"{existing[0]} already exists: pass --resume to continue it or --overwrite to replace it")
        self._clear = overwrite and not resume  # done at the first write: a failed start deletes nothing
        self._continue_out = False  # a finished text OUT being resumed: its rows go on in OUT.partial
        self._expect: os.stat_result | None = None  # the file whose rows are in self.done, as read
        found = self._load_previous() if resume else None
        self._prepare_vectors(resume=resume, overwrite=overwrite, found=bool(existing))
        if found is not None:
            self._cut(found)

    def _prepare_vectors(self, *, resume: bool, overwrite: bool, found: bool) -> None:
        """The sidecar's names: never links; taken only with --overwrite, or on --resume with the rows they
        belong to (checked against them: ``Embeddings.load``)."""
        if self.vectors is None:
            return
        present = self.vectors.check_names()
        if present and not overwrite and not (resume and found):
            raise OutputError(f"{present[0]} already exists: pass --overwrite to replace it, or choose another "
                              "--embeddings")
        if resume and found:
            self.vectors.load(self._ok_paths)

    def _load_previous(self) -> list[tuple[Path, Found]]:
        """Check that what is there is ours and collect the paths already written; returns what ``_cut`` repairs.

        Nothing is changed before every file (the sidecar's too) has passed its check: a file that is refused is
        left whole.
        """
        if self.partial.is_symlink():
            raise OutputError(f"{self.partial} is a symbolic link, which batchcls never makes: nothing was changed; "
                              "remove it, then --resume")
        out, partial = os.path.lexists(self.out), os.path.lexists(self.partial)
        if self.in_place and out and partial:
            # An interrupted `batchcls run`'s OUT.partial simply becomes the ledger; both at once is ambiguous.
            raise OutputError(f"both {self.out} and {self.partial} exist: finish the interrupted run with "
                              "`batchcls run --resume` first, or choose another output")
        if out and partial and self.format is not ParquetFormat:
            # Which one is current can't be known; merging could drop or repeat rows.
            raise OutputError(f"both {self.out} and {self.partial} exist: keep the one you trust, "
                              "remove the other, then --resume")
        if self.provenance is not None and (out or partial):
            check_meta(self.out, self.provenance, self.columns, self.fmt, self._vectors_record())
        found = [(p, self._inspect(p, finished=p == self.out)) for p in (self.partial, self.out) if os.path.lexists(p)]
        if found:
            self.last_written_ns = max(os.stat(p).st_mtime_ns for p, _ in found)
        for _, f in found:
            self.done |= f.done
        # The ok rows in the order their vectors were written: a finished OUT's first, then what followed it
        # (a Parquet OUT.partial may repeat rows a cut finalize already merged into OUT).
        first = next((f for p, f in found if p == self.out), None)
        rest = next((f for p, f in found if p == self.partial), None)
        self._ok_paths = [*(first.ok if first else []),
                          *(p for p in (rest.ok if rest else []) if first is None or p not in first.done)]
        return found

    def _cut(self, found: list[tuple[Path, Found]]) -> None:
        """Every file has passed: cut what a crash left and set up the files the next rows go to."""
        for p, f in found:
            if f.data is not None and f.end != len(f.data):
                # Before reading on: a CSV row cut after its path field would otherwise count as done.
                _truncate(p, len(f.data), f.end)
        if self.vectors is not None:
            self.vectors.cut()
        if self.in_place and os.path.lexists(self.partial):
            os.replace(self.partial, self.out)
        self._continue_out = not self.in_place and self.format is not ParquetFormat and self.out.exists()
        kept = self.out if self._continue_out else self.target
        self._expect = kept.stat() if kept.exists() else None

    def _vectors_record(self) -> dict | None:
        return self.vectors.record() if self.vectors is not None else None

    def _open(self) -> BinaryIO:
        """Create (or continue) the files of the transaction; called at the first write."""
        try:
            if self._expect is not None:
                self._identity = self._expect
                self._check_still_ours(self.out if self._continue_out else self.target)
            if self._clear:
                for p in (self.out, self.partial):
                    p.unlink(missing_ok=True)
            elif self._continue_out:
                os.replace(self.out, self.partial)
            if self.provenance is not None:  # before the rows: an output on disk always says what made it
                write_meta(self.out, self.provenance, self.columns, self.fmt, self._vectors_record())
            self._open_vectors()
            # Never through a symlink someone put at this name: that would append to a file elsewhere.
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            fh = open(fd, "ab", buffering=0)
            self._identity = os.fstat(fh.fileno())
            if self._identity.st_size == 0:
                _write_all(fh, self.format.header(self.columns))
        except OSError as e:
            raise OutputError(f"cannot write {e.filename or self.target}: {e.strerror}: free the space (or fix the "
                              "cause), then run the same command again") from None
        self._clear = self._continue_out = False
        return fh

    def _open_vectors(self) -> None:
        self._opened = True
        if self.vectors is not None:
            self.vectors.open(clear=self._clear)

    def _check_still_ours(self, path: Path | None = None) -> None:
        """Rows written into a file someone deleted or replaced would be lost without a word: stop instead."""
        path = path or self.target
        try:
            same = os.path.samestat(os.stat(path), self._identity)
        except FileNotFoundError:
            same = False
        if not same:
            raise OutputError(f"{path} was deleted or replaced while this process was writing it: "
                              "stopping so no row is lost; restore it, or rerun with a new --out")

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.to_stdout:
            if not self._opened:
                self._clear = True  # stdout takes no --resume: an existing sidecar was allowed by --overwrite
                self._open_vectors()
            self._add_vectors(rows)
            sys.stdout.write(self.format.render(rows, self.columns))
            sys.stdout.flush()
            self.rows_written += len(rows)
            return
        if self.fh is None:
            self.fh = self._open()
        else:
            self._check_still_ours()
        self._add_vectors(rows)  # before the rows: after a crash the sidecar holds at least the rows' vectors
        try:
            _write_all(self.fh, self.format.render(rows, self.columns))
            if self.in_place:  # the daemon renames files after this: the rows must be on disk first
                os.fsync(self.fh.fileno())
        except OSError as e:
            raise OutputError(f"cannot write {self.target}: {e.strerror}: free the space (or fix the cause), "
                              "then rerun with --resume") from None
        self.rows_written += len(rows)

    def _add_vectors(self, rows: list[dict]) -> None:
        if self.vectors is None:
            return
        try:
            self.vectors.add(rows)
        except OSError as e:
            raise OutputError(f"cannot write {self.vectors.npy_partial}: {e.strerror}: free the space (or fix the "
                              "cause), then rerun with --resume") from None

    def close(self, complete: bool = True) -> None:
        """complete=False (interrupted) leaves OUT.partial (and the sidecar's partial files) in place for --resume;
        in place, OUT is already final."""
        self._close(complete, discard=False)

    def abandon(self) -> None:
        """A failed run: its rows (and vectors) are kept for --resume, but files this writer created without
        writing a row into them are removed, while the lock is still held."""
        self._close(False, discard=self._opened and self.rows_written == 0 and not self.done)

    def _close(self, complete: bool, *, discard: bool) -> None:
        if self.to_stdout:
            sys.stdout.flush()
            try:
                if self.vectors is not None and self._locks:
                    if complete and not self._opened:
                        self._clear = True
                        self._open_vectors()  # a run with no rows still ends with an empty (0, D) file
                    self.vectors.close(complete)
                    if discard:
                        self.vectors.discard()
            finally:
                self._release()
            return
        if not self._locks:
            return  # closed already
        try:
            if self.fh is None and complete:
                self.fh = self._open()  # a run with no rows still ends with a (header-only) output
            if self.fh is not None:
                fh, self.fh = self.fh, None
                try:
                    os.fsync(fh.fileno())
                finally:
                    fh.close()
            if self.vectors is not None:  # finished before OUT is: OUT in place means the whole run is
                self.vectors.close(complete)
            if discard:
                self.partial.unlink(missing_ok=True)
                if self.vectors is not None:
                    self.vectors.discard()
            if not complete or self.in_place:
                return
            if self.format is ParquetFormat:
                ParquetFormat.finalize(self.partial, self.out, self.columns)
                self.partial.unlink()
            else:
                os.replace(self.partial, self.out)
            fsync_dir(self.out.parent)
            if self.vectors is not None and self.vectors.npy.parent != self.out.parent:
                fsync_dir(self.vectors.npy.parent)
        finally:
            self._release()


def _write_all(fh: BinaryIO, text: str) -> None:
    """All of ``text`` as UTF-8, or an OSError; a full disk leaves a prefix that ``repair`` cuts back."""
    data = memoryview(text.encode("utf-8", "backslashreplace"))
    while data:
        data = data[fh.write(data):]


def _read_nofollow(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise OutputError(f"cannot read {path}: {e.strerror}: choose another --out") from None
    with open(fd, "rb") as fh:
        return fh.read()


def _truncate(path: Path, size: int, end: int) -> None:
    """Cut ``path`` (checked to be ours, ``size`` bytes when read) back to ``end``."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise OutputError(f"{path} changed while it was being checked: stop the other writer, then --resume")
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(path: Path, fmt: type = CsvFormat) -> None:
    """Cut a crash's fragment (an incomplete last record) off ``path``, a file known to be a batchcls output."""
    data = _read_nofollow(path)
    end = fmt.cut(data, path)
    if end != len(data):
        _truncate(path, len(data), end)
