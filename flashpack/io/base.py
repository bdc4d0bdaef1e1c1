"""The reader interface every backend implements, and the file handling they share.

A reader reads *extents* (a byte range of the file into a caller-owned writable buffer). The protocol:

* ``submit(extents)`` queues extents; it does not block on I/O.
* ``wait(timeout_s=None)`` blocks until at least one submitted extent is finished and returns the
  finished ones as :class:`Completion` (``error`` is ``None`` or the exception for that extent); it
  returns ``[]`` at once when nothing is in flight.
* ``close()`` drains every in-flight read, then releases threads, rings and descriptors; idempotent.
* ``features``: named capabilities that are active (``"o_direct"``, ``"registered_buffers"``, ...).

Every extent is read completely or fails: short reads are resumed at the exact offset, an unaligned
tail is read on the buffered descriptor (never resubmitted with O_DIRECT), and when O_DIRECT is
refused at open (EINVAL: tmpfs before Linux 6.6, eCryptFS, old ZFS) or at read time (EINVAL/EBADF:
overlayfs over squashfs) the bytes are read buffered instead. See open(2), "O_DIRECT" for the
alignment rules: file offset, length and buffer address multiples of the logical block size; 4096 here.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

from ..errors import ReadError, short_read_error
from ..settings import PAGE_NBYTES
from . import pagecache

log = logging.getLogger("flashpack")

#: Linux caps one read(2)/preadv(2) at 0x7ffff000 bytes (read(2), NOTES); larger extents loop.
MAX_RW_NBYTES = 0x7FFFF000
#: errno values that mean "O_DIRECT is not supported here" rather than "the disk failed".
DIRECT_REFUSED = (errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP, errno.ENOTSUP)

# Indirection so tests can fake kernel behaviour (short reads, refusals, EIO).
_preadv = os.preadv
_open = os.open

_notice_lock = threading.Lock()
_notices: set[str] = set()


def notice_once(key: str, message: str) -> None:
    """Log ``message`` at WARNING level once per process for ``key``."""
    with _notice_lock:
        if key in _notices:
            return
        _notices.add(key)
    log.warning(message)


def buffer_address(mv: memoryview) -> int:
    """Address of the first byte of a writable, C-contiguous buffer (0 for an empty one)."""
    if mv.nbytes == 0:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


@dataclass(eq=False)
class Extent:
    """Read ``nbytes`` bytes at file byte ``file_offset`` into ``dest[:nbytes]``.

    ``dest`` is a writable C-contiguous buffer that the caller keeps alive and untouched until the
    extent's completion is returned. ``tag`` is the caller's, returned unchanged.
    """

    file_offset: int
    nbytes: int
    dest: memoryview
    tag: Any = None


@dataclass(eq=False)
class Completion:
    extent: Extent
    error: BaseException | None = None


@dataclass
class ReaderStats:
    """Byte counts of one reader; ``bytes_read`` is what came from the file for this load."""

    bytes_direct: int = 0
    bytes_buffered: int = 0
    extents: int = 0
    direct_fallbacks: int = 0

    @property
    def bytes_read(self) -> int:
        return self.bytes_direct + self.bytes_buffered

    def add(self, other: "ReaderStats") -> None:
        self.bytes_direct += other.bytes_direct
        self.bytes_buffered += other.bytes_buffered
        self.extents += other.extents
        self.direct_fallbacks += other.direct_fallbacks


class FileHandles:
    """A buffered descriptor, an O_DIRECT one where allowed, and the direct/buffered policy.

    Args:
        path: the file.
        direct: ``"auto"`` (O_DIRECT for extents whose pages are mostly not in the page cache, decided
            with mincore(2) at open), ``"on"`` (O_DIRECT whenever aligned), ``"off"`` (buffered only).

    Raises:
        OSError: the file cannot be opened (errno and filename set).
    """

    def __init__(self, path: str | os.PathLike, direct: str = "auto"):
        self.path = os.fspath(path)
        self.fd = _open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.direct_fd = -1
        try:
            self.file_nbytes = os.fstat(self.fd).st_size
            self._resident = None
            if direct != "off":
                try:
                    self.direct_fd = _open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
                except OSError as e:
                    if e.errno not in DIRECT_REFUSED:
                        raise
                    notice_once(f"direct-open:{self.path}",
                                f"flashpack: O_DIRECT refused for {self.path} ({e.strerror}); reading it buffered")
                if direct == "auto" and self.direct_fd >= 0:
                    self._resident = pagecache.ResidencyMap(self.fd, self.file_nbytes)
        except BaseException:
            self.close()
            raise

    def use_direct(self, file_offset: int, nbytes: int, address: int) -> bool:
        """Whether to read this range with O_DIRECT: aligned offset and address, and (``auto``) its
        pages mostly absent from the page cache, so a warm file is copied from the cache instead."""
        if self.direct_fd < 0 or file_offset % PAGE_NBYTES or address % PAGE_NBYTES or nbytes < PAGE_NBYTES:
            return False
        if self._resident is not None and self._resident.fraction(file_offset, nbytes) >= 0.5:
            return False
        return True

    def drop_direct(self, reason: str) -> None:
        """Stop using O_DIRECT for this file (a read was refused); one notice per file.

        Thread-safe. The descriptor stays open until :meth:`close`: a worker still reading on it gets
        another refusal, never a number that a later open(2) reused for another file."""
        notice_once(f"direct-read:{self.path}", f"flashpack: O_DIRECT read refused for {self.path} ({reason}); "
                                                f"reading it buffered")
        with _notice_lock:
            if self.direct_fd >= 0:
                self._dropped_fd, self.direct_fd = self.direct_fd, -1

    def close(self) -> None:
        for name in ("direct_fd", "_dropped_fd", "fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)


def read_buffered(files: FileHandles, mv: memoryview, file_offset: int, done: int, nbytes: int, stats: ReaderStats) -> int:
    """Read bytes ``[done, nbytes)`` of an extent on the buffered descriptor, resuming short reads.

    Raises:
        ReadError: a read fails, or returns 0 before ``nbytes`` (the file is shorter than expected).
    """
    while done < nbytes:
        want = min(nbytes - done, MAX_RW_NBYTES)
        try:
            n = _preadv(files.fd, [mv[done:done + want]], file_offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            raise ReadError(e.errno or errno.EIO, f"read of {want} bytes at byte offset {file_offset + done} "
                                                  f"failed: {e.strerror}", files.path) from e
        if n == 0:
            raise short_read_error(files.path, file_offset, nbytes, done)
        done += n
        stats.bytes_buffered += n
    return done


def read_extent(files: FileHandles, ext: Extent, stats: ReaderStats) -> None:
    """Read one extent completely and synchronously (the ``threads`` backend's unit of work).

    The page-aligned body goes through the O_DIRECT descriptor when :meth:`FileHandles.use_direct`
    says so; the unaligned tail, and everything after a refused or unaligned direct read, goes
    through the buffered descriptor at the exact offset reached.

    Raises:
        ReadError: EIO and friends (naming the file, offset and length), or a short file.
    """
    mv = ext.dest[: ext.nbytes] if ext.dest.nbytes != ext.nbytes else ext.dest
    off, nbytes, done = ext.file_offset, ext.nbytes, 0
    stats.extents += 1
    if files.use_direct(off, nbytes, buffer_address(mv)):
        body = nbytes - nbytes % PAGE_NBYTES
        while done < body:
            want = min(body - done, MAX_RW_NBYTES - MAX_RW_NBYTES % PAGE_NBYTES)
            try:
                n = _preadv(files.direct_fd, [mv[done:done + want]], off + done)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in DIRECT_REFUSED:
                    stats.direct_fallbacks += 1
                    if files.direct_fd >= 0:
                        files.drop_direct(e.strerror or str(e))
                    break
                raise ReadError(e.errno or errno.EIO, f"read of {want} bytes at byte offset {off + done} failed: "
                                                      f"{e.strerror}", files.path) from e
            if n <= 0:
                break
            done += n
            stats.bytes_direct += n
            if n % PAGE_NBYTES:
                break  # an unaligned count: the remainder must not go back to O_DIRECT
    read_buffered(files, mv, off, done, nbytes, stats)


def collect_futures(pending: "dict[cf.Future, Extent]", timeout_s: float | None, stats: ReaderStats) -> list[Completion]:
    """Pop the finished futures of ``read_extent`` calls from ``pending`` (waiting up to ``timeout_s`` for
    the first one) as completions, adding the stats of the successful ones."""
    if not pending:
        return []
    done, _ = cf.wait(pending, timeout=timeout_s, return_when=cf.FIRST_COMPLETED)
    out = []
    for fut in done:
        ext = pending.pop(fut)
        if fut.cancelled():
            out.append(Completion(ext, cf.CancelledError("read cancelled after an earlier error")))
            continue
        err = fut.exception()
        if err is None:
            stats.add(fut.result())
        out.append(Completion(ext, err))
    return out


class Reader:
    """Base class of the backends: holds the :class:`FileHandles` and the stats.

    Subclasses implement ``submit``, ``wait``, ``in_flight`` and ``_close``. Not thread-safe: one
    thread drives a reader (the backends use their own threads or ring internally).
    """

    name: ClassVar[str] = "?"

    def __init__(self, path: str | os.PathLike, *, direct: str = "auto"):
        self.files = FileHandles(path, direct)
        self.stats = ReaderStats()
        self._closed = False

    @property
    def path(self) -> str:
        return self.files.path

    @property
    def file_nbytes(self) -> int:
        return self.files.file_nbytes

    @property
    def features(self) -> frozenset[str]:
        return frozenset({"o_direct"} if self.files.direct_fd >= 0 else {"buffered"})

    def submit(self, extents: Iterable[Extent]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self, timeout_s: float | None = None) -> list[Completion]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def in_flight(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def cancel_pending(self) -> None:
        """Drop submitted extents that have not started; they complete with an error. Optional."""

    def _close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Drain in-flight reads, release everything; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            self.files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def read_all(reader: Reader, extents: Iterable[Extent], on_complete=None) -> None:
    """Submit every extent, wait for all, call ``on_complete(extent)`` for each finished one in the
    calling thread, and after *all* reads have finished raise the first error (case C22).

    ``on_complete`` may raise (a checksum mismatch): the remaining reads are still drained first.
    """
    reader.submit(extents)
    first: BaseException | None = None
    try:
        while reader.in_flight:
            for c in reader.wait():
                if c.error is not None:
                    first = first or c.error
                elif first is None and on_complete is not None:
                    try:
                        on_complete(c.extent)
                    except BaseException as e:  # noqa: BLE001 - re-raised after draining
                        first = e
            if first is not None:
                reader.cancel_pending()
    except BaseException:
        reader.close()  # KeyboardInterrupt while waiting: drain before propagating
        raise
    if first is not None:
        raise first
