"""What the backends share: the file handles (a buffered descriptor and an O_DIRECT one), the
synchronous extent read, :class:`ReaderBase` (options, stats, file identity, close), and :func:`read_all`.

Every extent is read completely or fails: short reads are resumed at the exact offset, an unaligned
tail is read on the buffered descriptor (never resubmitted with O_DIRECT), and when O_DIRECT is
refused at open (EINVAL: tmpfs before Linux 6.6, eCryptFS, old ZFS) or at read time (EINVAL/EBADF:
overlayfs over squashfs) the bytes are read buffered instead. See open(2), "O_DIRECT" for the
alignment rules: file offset, length and buffer address multiples of the logical block size; 4096 here.

The protocol itself (and :class:`Extent`, :class:`Completion`, :class:`ReaderStats`) is in
:mod:`flashpack.io.protocol`; they are re-exported here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import threading
from typing import ClassVar, Iterable

import xxhash

from ..errors import ReadError, short_read_error
from ..settings import MAX_QUEUE_DEPTH, PAGE_NBYTES, Settings, settings
from ..source import check_identity
from . import pagecache
from .protocol import Completion, Extent, Reader, ReaderStats, c_error  # noqa: F401  (re-exported)

#: ``expect=`` of :func:`flashpack.io.open_reader`: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns).
FileIdentity = tuple[int, int, int, int, int]
#: The most worker threads one reader may start (as ``FLASHPACK_THREADS`` allows).
MAX_THREADS = 4096

log = logging.getLogger("flashpack")

#: Linux caps one read(2)/preadv(2) at 0x7ffff000 bytes (read(2), NOTES); larger extents loop.
MAX_RW_NBYTES = 0x7FFFF000
#: Most bytes per UFFDIO_COPY of an extent filled from the page cache (:meth:`FileHandles.fill_copy`); the worker
#: hashes each piece right after it (``Extent.hasher``). Smaller pieces (to hash from L2) were slower here: a 1 GiB
#: cached load took 0.37 s with 1 MiB pieces and 0.50 s with 256 KiB against 0.31-0.32 s with 8 MiB (the default
#: extent: one piece), and 0.33-0.34 s when the loading thread hashed instead.
FILL_PIECE_NBYTES = 8 * 1024 * 1024
#: errno values that mean "O_DIRECT is not supported here" rather than "the disk failed".
DIRECT_REFUSED = (errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP, errno.ENOTSUP)

# Indirection so tests can fake kernel behaviour (short reads, refusals, EIO).
_preadv = os.preadv
_open = os.open

try:  # the C shim: fp_copy_extent copies (and hashes) a whole extent with the GIL released once
    from .. import _uring as _shim
except ImportError:  # built without liburing, or not built at all: extents are copied by the Python path
    _shim = None


def usable_copy_shim(shim):
    """``shim`` when it has ``fp_copy_available``, ``fp_copy_extent`` and ``fp_copy_extents`` and the first says the
    copy was compiled in (xxhash >= 0.8 headers at build time), else ``None``: a stale build of the extension from
    before them, or one built without xxhash, leaves extents to the Python steps instead of failing the import."""
    lib = getattr(shim, "lib", None)
    if lib is None or not all(hasattr(lib, f) for f in ("fp_copy_available", "fp_copy_extent", "fp_copy_extents")):
        return None
    return shim if lib.fp_copy_available() else None


#: ``flashpack._uring`` where its one-call extent copy is usable (:func:`usable_copy_shim`), else ``None``.
#: Tests that fake :data:`_preadv` or ``FillRegion.copy`` set it to ``None``: the C path makes neither call.
native_copy = usable_copy_shim(_shim)

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


def _blocking(fd: int) -> int:
    """Clear ``O_NONBLOCK`` on ``fd`` (fcntl(2)); returns ``fd``."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


class FileHandles:
    """A buffered descriptor, an O_DIRECT one where allowed, and the direct/buffered policy.

    Args:
        path: the file.
        direct: ``"auto"`` (O_DIRECT for extents whose pages are mostly not in the page cache, decided
            with mincore(2) at open), ``"on"`` (O_DIRECT whenever aligned), ``"off"`` (buffered only).
        cache: ``"bypass"`` (``direct`` decides) or ``"keep"``: no O_DIRECT; the extents whose pages are
            mostly not cached (the residency snapshot at open) are read ahead into the page cache by a
            :class:`~flashpack.io.pagecache.Prefetcher` (:meth:`read_ahead`) as they are queued, and copied out
            of it once read.
        fill: ``None``, or a :class:`~flashpack.io.uffd.FillRegion` (``cache="keep"`` only): extents whose
            destination lies in it are copied with ``UFFDIO_COPY`` from a read-only shared mapping of the file
            (:meth:`fill_copy`) instead of preadv(2).
        all_cached: the caller found every page of the file cached a moment ago (:func:`flashpack.io.wholly_cached`):
            the residency snapshot takes that answer (:class:`~flashpack.io.pagecache.ResidencyMap`).

    Raises:
        OSError: the file cannot be opened (errno and filename set).
        ValueError: ``cache`` is not ``keep`` or ``bypass``.
    """

    def __init__(self, path: str | os.PathLike, direct: str = "auto", cache: str = "bypass", fill=None, *,
                 all_cached: bool = False):
        if cache not in ("keep", "bypass"):
            raise ValueError(f"cache={cache!r}: a reader takes 'keep' or 'bypass' (loads resolve 'auto')")
        if fill is not None and cache != "keep":
            raise ValueError("fill= needs cache='keep' (an O_DIRECT read cannot write into a registered region)")
        self.path = os.fspath(path)
        self.cache = cache
        self.fill = fill
        self._source = 0  # address of the read-only mapping UFFDIO_COPY copies from (0: none)
        self._prefetcher: pagecache.Prefetcher | None = None  # started by the first read_ahead
        self.fd = self.direct_fd = -1
        try:  # each descriptor is ours (closed by close()) from the bytecode after open(2) returns it
            # O_NONBLOCK: a FIFO swapped in under the path cannot hang open(2) (the identity check then refuses
            # it); cleared again at once, since io_uring returns EAGAIN for O_NONBLOCK files instead of waiting.
            self.fd = _open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
            _blocking(self.fd)
            self.file_nbytes = os.fstat(self.fd).st_size
            self._resident = None
            if cache == "keep":
                self._resident = pagecache.ResidencyMap(self.fd, self.file_nbytes, all_cached=all_cached)
                if fill is not None and self.file_nbytes:
                    addr = pagecache.libc.mmap(None, self.file_nbytes, mmap.PROT_READ, mmap.MAP_SHARED, self.fd, 0)
                    self._source = 0 if addr is None or addr == pagecache.MAP_FAILED else addr
                if fill is not None and not self._source and self.file_nbytes:
                    # nothing to UFFDIO_COPY from (a file system that refuses mmap(2), RLIMIT_AS): the reads go
                    # to preadv(2), which cannot write into a still-registered region (EFAULT): release it now
                    log.debug("flashpack: %s cannot be mapped; its extents are read with preadv", self.path)
                    fill.release()
            elif direct != "off":
                try:
                    self.direct_fd = _open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT | os.O_NONBLOCK
                                           | os.O_NOCTTY)
                    _blocking(self.direct_fd)
                except OSError as e:
                    if e.errno not in DIRECT_REFUSED:
                        raise
                    notice_once(f"direct-open:{self.path}",
                                f"flashpack: O_DIRECT refused for {self.path} ({e.strerror}); reading it buffered")
                if direct == "auto" and self.direct_fd >= 0:
                    self._resident = pagecache.ResidencyMap(self.fd, self.file_nbytes, all_cached=all_cached)
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

    @property
    def prefetch_method(self) -> str:
        """How ranges are read ahead (:attr:`flashpack.io.pagecache.Prefetcher.method`); ``""`` when none was."""
        return "" if self._prefetcher is None else self._prefetcher.method

    def read_ahead(self, file_offset: int, nbytes: int) -> pagecache.Latch | None:
        """``cache="keep"``: queue a range to be read into the page cache ahead of its copy.

        Returns:
            ``None`` when there is nothing to wait for (``bypass``, an empty range, or pages mostly cached at
            open), else a latch (:class:`flashpack.io.sync.Latch`) set once the range was read ahead (or that
            failed: the copy then reads, and reports, whatever is missing itself).
        """
        if self.cache != "keep" or nbytes <= 0:
            return None
        if self._resident is not None and self._resident.fraction(file_offset, nbytes) >= 0.5:
            return None
        if self._prefetcher is None:
            self._prefetcher = pagecache.Prefetcher(self.fd, self.file_nbytes)
        return self._prefetcher.add(file_offset, nbytes)

    @property
    def source_address(self) -> int:
        """Address of the read-only shared mapping of the file that fills copy from (0: none)."""
        return self._source

    def copies_from_cache(self, address: int, file_offset: int, nbytes: int) -> bool:
        """Whether reading the range is a copy out of the page cache (CPU-bound, no disk wait): a fill, or a range
        the residency snapshot at open found mostly cached (unknown counts as not)."""
        if self.fill_length(address, file_offset, nbytes):
            return True
        return self._resident is not None and self._resident.fraction(file_offset, nbytes) >= 0.5

    def fill_length(self, address: int, file_offset: int, nbytes: int) -> int:
        """Bytes a fill of ``[file_offset, file_offset + nbytes)`` at ``address`` copies: ``nbytes`` rounded up to
        4096 (the last page is copied whole: past the end of the file it holds zeros), or 0 when the range is not
        for the fill (no region, nothing mapped, unaligned, past the file's last page, outside the region)."""
        region = self.fill
        if region is None or not self._source or nbytes <= 0 or file_offset % PAGE_NBYTES or address % PAGE_NBYTES:
            return 0
        length = nbytes + (-nbytes) % PAGE_NBYTES
        if file_offset + length > self.file_nbytes + (-self.file_nbytes) % PAGE_NBYTES or \
                not region.covers(address, length):
            return 0
        return length

    def fill_copy(self, address: int, file_offset: int, nbytes: int, stats: ReaderStats, landed=None) -> int:
        """Copy file bytes ``[file_offset, file_offset + nbytes)`` to ``address`` with ``UFFDIO_COPY`` when
        ``address`` lies in :attr:`fill` (:meth:`fill_length`), ``FILL_PIECE_NBYTES`` at a time; ``landed(bytes
        done)`` (optional) is called after each piece, while it is still in the CPU cache.

        Returns:
            Bytes done from the start of the range (a multiple of 4096, or ``nbytes``): 0 when the range is not
            for the fill. When a copy fails (``EFAULT``: the file was truncated; any other refusal), or the file
            (fstat(2) after the copy) now ends inside the range, the region is released first and only the bytes
            the file still holds count as done, so the caller reads the rest with preadv(2) and meets the error
            (a short read), if any, itself.
        """
        length = self.fill_length(address, file_offset, nbytes)
        if not length:
            return 0
        done = err = 0
        while done < length and not err:
            step = min(FILL_PIECE_NBYTES, length - done)
            n, err = self.fill.copy(address + done, self._source + file_offset + done, step)
            # unmap the source piece again: its page-cache pages stay cached but leave this process's RSS
            # (madvise(2), MADV_DONTNEED on a shared file mapping), so a load's peak RSS stays the destination's size
            pagecache._madvise(self._source + file_offset + done, step, mmap.MADV_DONTNEED)
            done += n
            if landed is not None and n:
                landed(min(done, nbytes))
        size_after = os.fstat(self.fd).st_size if not err and done else -1
        return self.fill_settle(file_offset, nbytes, done, err, size_after, stats)

    def fill_settle(self, file_offset: int, nbytes: int, done: int, err: int, size_after: int,
                    stats: ReaderStats) -> int:
        """The end of a fill that copied ``done`` bytes and stopped with ``err`` (0: none), the file being
        ``size_after`` bytes long after it: the bytes that count as done (see :meth:`fill_copy`), counted in
        ``stats``; the region is released when the fill failed or the file now ends inside the range.

        A page the file ends inside is copied whole, zeros past the end: a file truncated inside the range since
        the weight map was read would pass as zeros, where preadv(2) comes back short. Past the size after the
        copy, the range goes back to preadv, which reports the short read."""
        if not err and done:
            have = size_after - file_offset
            if have < min(done, nbytes):
                done, err = max(0, have - have % PAGE_NBYTES), errno.ENODATA
        stats.bytes_filled += min(done, nbytes)
        stats.bytes_buffered += min(done, nbytes)
        if err:
            log.debug("flashpack: UFFDIO_COPY of %s at byte offset %d stopped (%s); reading the rest with preadv",
                      self.path, file_offset + done, os.strerror(err))
            self.fill.release()
        return min(done, nbytes)

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
        """Stop the prefetcher, unmap, close the descriptors; idempotent. An interrupt (KeyboardInterrupt) while
        the prefetcher stops still unmaps and closes (in ``finally``), then propagates."""
        try:
            prefetcher = getattr(self, "_prefetcher", None)
            if prefetcher is not None:
                prefetcher.close()  # before the descriptor it reads ahead on (sets every latch still waited for)
                self._prefetcher = None
        finally:
            source, self._source = getattr(self, "_source", 0), 0
            if source:
                pagecache.libc.munmap(source, self.file_nbytes)
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

    A destination in the handles' fill region is copied with ``UFFDIO_COPY`` (:meth:`FileHandles.fill_copy`),
    the rest of it (after a failed copy) with preadv(2). Otherwise the page-aligned body goes through the O_DIRECT
    descriptor when :meth:`FileHandles.use_direct` says so; the unaligned tail, and everything after a refused or
    unaligned direct read, goes through the buffered descriptor at the exact offset reached. With
    ``ext.hasher``, the worker hashes ``ext.dest[:ext.hash_nbytes]`` as it lands and sets ``ext.digest``.
    Where the C shim has ``fp_copy_extent``, a fill or buffered read hashed with XXH3-64 (or not at all) is made in
    one C call (:func:`read_extents`).

    Raises:
        ReadError: EIO and friends (naming the file, offset and length), or a short file.
    """
    error = read_extents(files, [ext], [stats])[0]
    if error is not None:
        raise error


def native_batchable(files: FileHandles, ext: Extent) -> bool:
    """Whether :func:`read_extents` copies ``ext`` in its one C call: the shim has ``fp_copy_extent``, the extent is
    not empty and starts at a byte offset >= 0, its destination is a writable, C-contiguous buffer of at least
    ``ext.nbytes`` bytes, its hash (if any) is XXH3-64, and it is a fill or a buffered read (O_DIRECT reads stay in
    Python). Never raises: anything it cannot judge goes to the Python steps, which report it for that extent."""
    if native_copy is None or ext.nbytes <= 0 or ext.file_offset < 0:
        return False
    try:
        if _hashing(ext) and ext.hasher is not xxhash.xxh3_64:
            return False
        mv = extent_dest(ext)
        if mv.nbytes < ext.nbytes or not mv.c_contiguous or mv.readonly:
            return False
        address = buffer_address(mv)
        if files.fill_length(address, ext.file_offset, ext.nbytes):
            return True
        fill = files.fill
        return not (fill is not None and fill.covers(address, ext.nbytes)) and \
            not files.use_direct(ext.file_offset, ext.nbytes, address)
    except Exception:  # noqa: BLE001 - not a destination this can take (a bytearray, a read-only buffer...)
        return False


def read_extents(files: FileHandles, exts: list[Extent], stats: list[ReaderStats]) -> list[BaseException | None]:
    """Read every extent of ``exts`` as :func:`read_extent` does, adding to ``stats[i]`` for ``exts[i]``; returns
    each one's error (``None``: read, and hashed when asked).

    The extents :func:`native_batchable` takes are copied in one C call for all of them (``fp_copy_extents``,
    native/fp_copy.c): the GIL is released once for the batch, so a worker is not held up at every step by a
    thread running Python meanwhile. The others, and the rest of a fill that stopped partway (a truncated file, a
    refusal: the region is released first), are read by the Python steps.

    Raises:
        ReadError: only if the C call refuses the batch itself (a bad mode or piece size: never expected).
    """
    n = len(exts)
    errors: list[BaseException | None] = [None] * n
    taken: list[int] = []
    reqs = None
    for i, ext in enumerate(exts):
        stats[i].extents += 1
        if native_batchable(files, ext):
            if reqs is None:
                reqs = native_copy.ffi.new("struct fp_copy[]", n)
            try:
                _native_request(files, ext, reqs[len(taken)])
            except Exception:  # noqa: BLE001 - a value C cannot take: the Python steps read it, or report why
                continue
            taken.append(i)
    if taken:
        rc = native_copy.lib.fp_copy_extents(reqs, len(taken))
        if rc < 0:  # only a bad argument: never expected, never silent either
            raise ReadError(-rc, f"fp_copy_extents refused a batch of {len(taken)} extents", files.path)
    k = 0
    for i, ext in enumerate(exts):
        try:
            done = 0
            if k < len(taken) and taken[k] == i:
                k += 1
                done = _native_settle(files, ext, reqs[k - 1], stats[i])
            if done < ext.nbytes or ext.nbytes == 0:
                _read_python(files, ext, stats[i], done)
        except Exception as e:  # noqa: BLE001 - handed to the caller with its extent
            errors[i] = e
    return errors


def extent_dest(ext: Extent) -> memoryview:
    """``ext.dest`` cut to ``ext.nbytes`` (it may be longer). Raises AttributeError when it is not a memoryview."""
    return ext.dest[: ext.nbytes] if ext.dest.nbytes != ext.nbytes else ext.dest


def _hashing(ext: Extent) -> bool:
    return ext.hasher is not None and 0 < ext.hash_nbytes <= ext.nbytes


def _native_request(files: FileHandles, ext: Extent, c) -> None:
    """Fill ``c`` (a ``struct fp_copy``) for ``ext``, which :func:`native_batchable` took."""
    off, nbytes = ext.file_offset, ext.nbytes
    address = buffer_address(extent_dest(ext))
    c.dst, c.file_offset, c.piece_nbytes, c.fd = address, off, FILL_PIECE_NBYTES, files.fd
    c.hash_nbytes = ext.hash_nbytes if _hashing(ext) else 0
    length = files.fill_length(address, off, nbytes)
    uffd = files.fill.uffd if length else -1
    if uffd >= 0:
        c.mode, c.uffd, c.src, c.nbytes, c.unmap_src = (native_copy.lib.FP_COPY_FILL, uffd,
                                                        files.source_address + off, length, 1)
    else:  # no fill, or released since native_batchable looked: the region is ordinary memory now
        c.mode, c.uffd, c.nbytes = native_copy.lib.FP_COPY_PREAD, -1, nbytes


def _native_settle(files: FileHandles, ext: Extent, c, stats: ReaderStats) -> int:
    """The result of ``ext``'s C copy ``c``: counted in ``stats``, ``ext.digest`` set when it is whole.

    Returns:
        ``ext.nbytes`` when done; less where a fill stopped partway (the caller reads and hashes the rest).

    Raises:
        ReadError: a buffered read failed (naming the file, offset and length), or the file is shorter.
    """
    off, nbytes = ext.file_offset, ext.nbytes
    stats.extents_native += 1
    if c.mode == native_copy.lib.FP_COPY_FILL:
        done = files.fill_settle(off, nbytes, c.done, c.error, c.file_nbytes, stats)
        if done < nbytes:
            return done
    else:
        stats.bytes_buffered += c.done
        if c.error:
            want = min(nbytes - c.done, FILL_PIECE_NBYTES)  # what was left of the failing piece
            raise ReadError(c.error, f"read of up to {want} bytes at byte offset {off + c.done} failed: "
                                     f"{os.strerror(c.error)}", files.path)
        if c.done < nbytes:
            raise short_read_error(files.path, off, nbytes, c.done)
    if _hashing(ext):
        ext.digest = c.digest
    return nbytes


def _read_python(files: FileHandles, ext: Extent, stats: ReaderStats, done: int) -> None:
    """The Python steps of :func:`read_extent` from byte ``done`` of the extent (> 0: after a C fill that stopped
    partway; the whole extent is hashed here then)."""
    mv = extent_dest(ext)
    off, nbytes = ext.file_offset, ext.nbytes
    hasher = ext.hasher() if _hashing(ext) else None
    hashed = 0

    def landed(upto: int) -> None:  # hash what has landed, in this worker, while it is still in the CPU cache
        nonlocal hashed
        hi = min(upto, ext.hash_nbytes)
        if hasher is not None and hi > hashed:
            hasher.update(mv[hashed:hi])
            hashed = hi

    if not done and files.fill is not None:
        done = files.fill_copy(buffer_address(mv), off, nbytes, stats, landed)
    if not done:
        done = _read_direct(files, mv, off, nbytes, stats)
    read_buffered(files, mv, off, done, nbytes, stats)
    if hasher is not None:
        landed(nbytes)
        ext.digest = hasher.intdigest()


def _read_direct(files: FileHandles, mv: memoryview, off: int, nbytes: int, stats: ReaderStats) -> int:
    """The O_DIRECT part of :func:`read_extent`: bytes read from the start of the extent (0: none)."""
    done = 0
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
    return done


def check_count(option: str, value: int, most: int) -> int:
    """``value`` as an int if it is from 1 to ``most``.

    Raises:
        ValueError: it is not (the message names ``option``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{option}={value!r}: expected an integer from 1 to {most}")
    return value


def common_features(direct: bool, queue_depth: int, threads: int) -> frozenset[str]:
    """The features every backend reports, from whether O_DIRECT is in use and the two counts."""
    return frozenset({"o_direct" if direct else "buffered", f"queue_depth={queue_depth}", f"threads={threads}"})


class ReaderBase:
    """The shared half of every backend: options, :class:`FileHandles`, stats, identity check, close.

    Args:
        path: the file.
        cfg: settings read once by the caller (default: :func:`flashpack.settings.settings` now).
        direct: ``auto``/``on``/``off`` (default ``cfg.direct``).
        queue_depth: extents in flight at once, 1 to ``MAX_QUEUE_DEPTH`` (default ``cfg.queue_depth``).
        threads: worker threads, 1 to ``MAX_THREADS`` (default ``cfg.threads``).
        expect: ``None``, or the (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) the opened file must have.
        cache: ``"bypass"`` (default) or ``"keep"`` (see :class:`FileHandles`).
        fill: ``None`` or a :class:`~flashpack.io.uffd.FillRegion` the destinations lie in (``cache="keep"``;
            see :class:`FileHandles`).
        all_cached: every page of the file was found cached a moment ago (see :class:`FileHandles`).

    Raises:
        OSError: the file cannot be opened (errno and filename set).
        ReadError: ``ESTALE``, the opened file is not ``expect``.
        ValueError: ``queue_depth`` or ``threads`` out of range, ``cache`` not ``keep``/``bypass``.

    Subclasses implement ``submit``, ``wait``, ``in_flight``, ``cancel_pending``, ``_close`` and
    ``planned_features``. Not thread-safe: one thread drives a reader.
    """

    name: ClassVar[str] = "?"

    def __init__(self, path: str | os.PathLike, *, cfg: Settings | None = None, direct: str | None = None,
                 queue_depth: int | None = None, threads: int | None = None, expect: FileIdentity | None = None,
                 cache: str = "bypass", fill=None, all_cached: bool = False):
        cfg = cfg if cfg is not None else settings()
        queue_depth = check_count("queue_depth", cfg.queue_depth if queue_depth is None else queue_depth,
                                  MAX_QUEUE_DEPTH)
        threads = check_count("threads", cfg.threads if threads is None else threads, MAX_THREADS)
        files = FileHandles(path, direct or cfg.direct, cache, fill, all_cached=all_cached)
        if expect is not None:
            try:
                check_identity(files.fd, expect, files.path)
            except BaseException:
                files.close()
                raise
        self._init_shared(files, ReaderStats(), queue_depth, threads, owns_files=True)

    def _init_shared(self, files: FileHandles, stats: ReaderStats, queue_depth: int, threads: int, *,
                     owns_files: bool) -> None:
        """Set the shared state; from here on :meth:`close` releases it (the files if ``owns_files``)."""
        self.queue_depth = check_count("queue_depth", queue_depth, MAX_QUEUE_DEPTH)
        self.threads = check_count("threads", threads, MAX_THREADS)
        self.stats = stats
        self._files = files
        self._owns_files = owns_files
        self._closed = False

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        """Whether this backend can run here, and if not why and how to fix it."""
        return True, ""

    @classmethod
    def planned_features(cls, cfg: Settings) -> frozenset[str]:
        """The features a reader opened now with ``cfg`` reports, when nothing is refused at open."""
        return common_features(cfg.direct != "off", cfg.queue_depth, cfg.threads)

    @property
    def path(self) -> str:
        return self._files.path

    @property
    def file_nbytes(self) -> int:
        return self._files.file_nbytes

    @property
    def features(self) -> frozenset[str]:
        return common_features(self._files.direct_fd >= 0, self.queue_depth, self.threads)

    def _close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Drain in-flight reads, release everything; safe to call twice."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._close()
        finally:
            if self._owns_files:
                self._files.close()

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
    calling thread, and after *all* reads have finished raise the first error.

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
