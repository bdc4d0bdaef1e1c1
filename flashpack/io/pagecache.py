"""The page cache: which pages of a file are in it (cachestat(2), else mincore(2)), the page-cache policy of a
load (:func:`decide_cache`), and :class:`Prefetcher`, which fills the cache ahead of buffered copies.

cachestat(2) (Linux 6.5) counts the cached pages of a byte range of a file from its descriptor, without a
mapping; mincore(2), the fallback, reports residency for a mapping without touching its pages, so mapping a file
just to ask never faults, never reads and never risks SIGBUS. :class:`Prefetcher` maps the file read-only too and
only ever passes the mapping to madvise(2) (``MADV_POPULATE_READ``), which returns ``EFAULT`` where a touch would
raise SIGBUS (a file truncated meanwhile); :func:`read_ahead` (its fallback) only advises the kernel
(posix_fadvise(2)). The bytes themselves are copied with preadv(2) or ``UFFDIO_COPY``.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import itertools
import mmap
import os
import platform
import threading
from dataclasses import dataclass

import numpy as np
import psutil

from ..settings import CACHE_POLICIES, PAGE_NBYTES
from .sync import Bell, HelperThread, Latch, run_to_end

#: libc with the prototypes flashpack calls through ctypes (mincore(2), mmap(2), munmap(2), madvise(2));
#: the one binding that io/, staging/ and loading/ share. Calls set errno (``ctypes.get_errno()``).
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc = libc
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int
#: libc again, called *without* releasing the GIL (``ctypes.PyDLL``), for system calls that take microseconds and are
#: made many times per load (cachestat(2), once per 8 MiB): through :data:`libc` each call gives the GIL up, and while
#: another thread runs Python, taking it back waits that thread's switch interval (5 ms): 129 calls for a 1 GiB file
#: took 0.34 s of a load on a background thread instead of under 1 ms (perf/bench_contended.py).
libc_holding_gil = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
#: What mmap(2) returns on failure.
MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FAILED = MAP_FAILED

#: linux/mman.h (Linux 5.14, madvise(2)): fault in the pages of a range readable, reading them from the file
#: into the page cache with the kernel's readahead, without copying them anywhere. Python names it from 3.13.
MADV_POPULATE_READ = 22

#: ``auto`` keeps a load's bytes in the page cache when they are at most this fraction of MemAvailable
#: (``psutil.virtual_memory().available``, /proc/meminfo). A host load of N bytes needs N bytes of anonymous
#: memory for its result *and* N bytes of page cache for the kept file: at <= 50% both fit in what the kernel
#: calls available, so keeping the file never makes the kernel reclaim the load's own pages (or swap) while it
#: runs. Above it, the cached copy would evict other files' pages for a file that may not stay cached anyway,
#: so ``bypass`` (O_DIRECT) reads it without touching the cache. The cost of keeping is nil below the
#: threshold (a cold keep load runs at O_DIRECT speed, see the README's performance section).
CACHE_KEEP_FRACTION = 0.5

_populate_refused = False



#: cachestat(2)'s system call number (Linux 6.5; asm-generic/unistd.h and x86's syscall_64.tbl: the same number on
#: every architecture but alpha, as for every call added since 5.1). glibc has no wrapper before 2.43.
SYS_CACHESTAT = 451


class _CachestatRange(ctypes.Structure):  # struct cachestat_range, man 2 cachestat
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):  # struct cachestat, man 2 cachestat
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cached_pages(fd: int, file_offset: int, nbytes: int) -> int | None:
    """Pages of the byte range ``[file_offset, file_offset + nbytes)`` of ``fd``'s file in the page cache now
    (``nr_cache`` of cachestat(2): no mapping, no per-page vector; the kernel walks the cache's folios).

    Returns:
        The count, or ``None`` where the kernel does not answer: ``ENOSYS`` before Linux 6.5 (or a seccomp filter
        that does not know the call), ``EPERM`` from a filter, ``EOPNOTSUPP`` for hugetlbfs; callers fall back to
        :func:`resident_pages`.
    """
    if nbytes < 0 or file_offset < 0 or platform.machine() == "alpha":
        return None
    if nbytes == 0:
        return 0
    rng, st = _CachestatRange(file_offset, nbytes), _Cachestat()
    if libc_holding_gil.syscall(SYS_CACHESTAT, ctypes.c_uint(fd), ctypes.byref(rng), ctypes.byref(st),
                                ctypes.c_uint(0)) != 0:
        return None
    return int(st.nr_cache)


def resident_pages(fd: int, file_nbytes: int, file_offset: int = 0, nbytes: int | None = None) -> np.ndarray | None:
    """One bool per 4096-byte page of ``[file_offset, file_offset + nbytes)`` of the file (default: all of it): is
    it in the page cache now (mincore(2) on a private mapping of that range)? ``None`` if unknown.

    Args:
        file_offset: a multiple of 4096.
    """
    nbytes = file_nbytes - file_offset if nbytes is None else min(nbytes, file_nbytes - file_offset)
    if nbytes <= 0:
        return np.zeros(0, dtype=bool)
    if mmap.PAGESIZE != PAGE_NBYTES or file_offset % PAGE_NBYTES:
        return None
    try:
        mm = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY, offset=file_offset)
    except (OSError, ValueError):
        return None
    anchor = None
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        npages = (nbytes + PAGE_NBYTES - 1) // PAGE_NBYTES
        vec = (ctypes.c_ubyte * npages)()
        rc = _libc.mincore(ctypes.addressof(anchor), nbytes, vec)
        if rc != 0:
            return None
        return (np.frombuffer(vec, dtype=np.uint8) & 1).astype(bool)
    finally:
        anchor = None  # the export goes first, also when a KeyboardInterrupt lands here (close would raise BufferError
        mm.close()     # over it)


#: Granule of :class:`ResidencyMap`'s cachestat(2) snapshot: one call per 8 MiB (the default extent size).
RESIDENCY_GRANULE_NBYTES = 8 * 1024 * 1024


#: linux/capability.h: override the owner checks on files (inode_owner_or_capable).
CAP_FOWNER = 3


def _has_effective_capability(cap: int) -> bool:
    """Whether capability number ``cap`` is in this thread's effective set (``CapEff`` of
    /proc/thread-self/status, proc(5)); ``False`` where it cannot be read."""
    try:
        for line in _read_text("/proc/thread-self/status").splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def mincore_reports_cache(fd: int) -> bool:
    """Whether mincore(2) on a mapping of ``fd``'s file tells its page-cache residency. Since Linux 5.0 it does only
    for files the caller owns or could open for writing (or with CAP_FOWNER); for any other file it says every page
    is resident, cached or not (mm/mincore.c, ``can_do_mincore``: "mm/mincore.c: make mincore() more conservative",
    against page-cache side channels). cachestat(2) refuses the same files with ``EPERM`` (seen on Linux 6.18).
    A model store owned by another user (a shared, read-only Hugging Face cache) is such a file.

    Approximated from user space: the owner (the effective uid), ``CAP_FOWNER`` in the effective capability set
    (/proc/self/status ``CapEff``: root in a container started with ``--cap-drop=ALL`` has none), or access(2)
    ``W_OK`` with the effective ids (which counts ``CAP_DAC_OVERRIDE``). One known miss: access(2) says ``EROFS``
    for a read-only *bind* mount of a writable file system, where the kernel (which checks only the file system)
    still answers; that only matters where cachestat(2) is missing, and then such a cached file is read as cold.
    """
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() or _has_effective_capability(CAP_FOWNER):
        return True
    try:
        return os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)
    except (OSError, NotImplementedError):
        return False


#: linux/magic.h: statfs(2) ``f_type`` of overlayfs.
OVERLAYFS_SUPER_MAGIC = 0x794C7630


def _fs_type(fd: int) -> int | None:
    """statfs(2) ``f_type`` of the file system holding ``fd``'s file (the first field of ``struct statfs`` on every
    Linux architecture), or ``None`` if fstatfs fails."""
    buf = (ctypes.c_long * 32)()  # struct statfs is 120 bytes on x86_64; room to spare
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return buf[0] & 0xFFFFFFFF


class ResidencyMap:
    """A snapshot of a file's page-cache residency, taken once at open: every later question is answered from it,
    so a load decides each extent by the state the file was in when it started (its own read-ahead does not
    change the answers).

    With cachestat(2) (:attr:`method` ``"cachestat"``) the snapshot counts the cached pages of each 8 MiB granule
    (about 2 us a call: 0.3 ms for a GiB) and asks mincore(2) only about the granules that are partly cached (the
    header and weight map a cold load read first, a file evicted in part). Without it (``"mincore"``: kernels
    before 6.5, a seccomp filter that refuses the call) one mincore(2) snapshot of the whole file is taken:
    12-15 ms per GiB here, cached or not, which every load of a 1 GiB file paid before cachestat.

    On overlayfs (every file of a Docker image) cachestat(2) counts the overlay inode's own mapping, which is
    always empty: a cached file read 0% cached. The file's pages live in the page cache of the file beneath, which
    a mapping of the overlay file maps, so such files are asked with mincore(2).

    ``all_cached=True``: the caller has just been told that every page is cached (:func:`flashpack.io.wholly_cached`,
    one cachestat of the whole file), and the snapshot is that answer, the kernel not asked again; a page evicted
    since is then copied out of the mapping after a page fault reads it from the disk: correct, only slower.

    ``"unknown"``: the kernel will not tell (a file of another user the caller cannot write:
    :func:`mincore_reports_cache`), or mincore failed. Every range then counts as not cached, so a load reads it
    ahead (``keep``) or with O_DIRECT (``bypass``) instead of taking mincore's "all resident" for an answer and
    copying a cold file page fault by page fault.
    """

    def __init__(self, fd: int, file_nbytes: int, *, all_cached: bool = False):
        self.method = "cachestat"
        self._npages = (file_nbytes + PAGE_NBYTES - 1) // PAGE_NBYTES
        self._granule_npages = max(1, RESIDENCY_GRANULE_NBYTES // PAGE_NBYTES)
        # per granule: its cached pages; for a partly cached granule also the running count of its cached pages
        # (numpy, len = its pages + 1). No per-page array of the whole file: building and summing one cost
        # 1.5-5.6 ms a load for a GiB here, before the first copy.
        if all_cached:  # the caller was told so a moment ago (wholly_cached): the kernel's walk of a cached GiB
            # took 0.8-1.5 ms, and the granules' 1.2-1.3 ms more
            counts = [self._granule_pages(g) for g in range(-(-self._npages // self._granule_npages))], {}
        else:
            counts = None if _fs_type(fd) == OVERLAYFS_SUPER_MAGIC else self._granules(fd, file_nbytes)
        if counts is None:
            self.method = "mincore"
            pages = resident_pages(fd, file_nbytes) if mincore_reports_cache(fd) else None
            counts = None if pages is None else self._from_pages(pages)
        if counts is None:
            self.method = "unknown"
        self._cum: list[int] | None = None
        self._partial: dict[int, np.ndarray] = {}
        if counts is not None:
            per_granule, self._partial = counts
            self._cum = list(itertools.accumulate(per_granule, initial=0))

    def _granule_pages(self, g: int) -> int:
        return min(self._granule_npages, self._npages - g * self._granule_npages)

    @staticmethod
    def _running(part: np.ndarray) -> np.ndarray:
        """Cached pages before each page of ``part`` (a bool per page), and the total: ``len(part) + 1`` counts."""
        return np.concatenate(([0], np.cumsum(part, dtype=np.int64)))

    def _granules(self, fd: int, file_nbytes: int) -> tuple[list[int], dict[int, np.ndarray]] | None:
        per_granule: list[int] = []
        partial: dict[int, np.ndarray] = {}
        granule = self._granule_npages * PAGE_NBYTES
        for g, off in enumerate(range(0, file_nbytes, granule)):
            nbytes = min(granule, file_nbytes - off)
            cached = cached_pages(fd, off, nbytes)
            if cached is None:
                return None
            if 0 < cached < self._granule_pages(g):
                part = resident_pages(fd, file_nbytes, off, nbytes)  # asked page by page only here
                if part is None:
                    return None
                partial[g] = self._running(part)
                cached = int(partial[g][-1])
            per_granule.append(min(cached, self._granule_pages(g)))
        return per_granule, partial

    def _from_pages(self, pages: np.ndarray) -> tuple[list[int], dict[int, np.ndarray]]:
        per_granule: list[int] = []
        partial: dict[int, np.ndarray] = {}
        step = self._granule_npages
        for g, lo in enumerate(range(0, len(pages), step)):
            part = pages[lo:lo + step]
            cached = int(np.count_nonzero(part))
            if 0 < cached < len(part):
                partial[g] = self._running(part)
            per_granule.append(cached)
        return per_granule, partial

    def _cached_before(self, page: int) -> int:
        """Cached pages among the file's first ``page`` pages (0 <= page <= its pages)."""
        g, within = divmod(page, self._granule_npages)
        n = self._cum[g]
        if within:
            part = self._partial.get(g)
            if part is not None:
                n += int(part[within])
            elif self._cum[g + 1] - n >= self._granule_pages(g):  # wholly cached
                n += within
        return n

    def fraction(self, file_offset: int, nbytes: int) -> float:
        """Fraction of the pages of ``[file_offset, file_offset + nbytes)`` in the cache (0.0 if unknown)."""
        if self._cum is None or nbytes <= 0:
            return 0.0
        lo = file_offset // PAGE_NBYTES
        hi = min(self._npages, (file_offset + nbytes + PAGE_NBYTES - 1) // PAGE_NBYTES)
        if hi <= lo:
            return 0.0
        return (self._cached_before(hi) - self._cached_before(lo)) / (hi - lo)


def drop_from_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to evict a file's clean pages (posix_fadvise(2) POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class CacheDecision:
    """What a load does with the page cache: ``mode`` ``"keep"`` or ``"bypass"``, and ``reason``, in words."""

    mode: str
    reason: str


def mem_available_nbytes() -> int:
    """Bytes of memory available to new allocations without swapping (MemAvailable of /proc/meminfo, proc(5),
    through ``psutil.virtual_memory().available``)."""
    return int(psutil.virtual_memory().available)


def decide_cache(policy: str, nbytes: int, *, direct: str = "auto") -> CacheDecision:
    """Resolve a page-cache policy for a load that reads ``nbytes`` bytes of a file.

    Args:
        policy: ``"keep"``, ``"bypass"`` or ``"auto"`` (``keep`` when ``nbytes`` is at most
            :data:`CACHE_KEEP_FRACTION` of :func:`mem_available_nbytes`, else ``bypass``).
        nbytes: bytes the load reads from the file.
        direct: the O_DIRECT setting (``FLASHPACK_DIRECT``); ``"on"`` makes ``auto`` bypass.

    Returns:
        A :class:`CacheDecision` (``mode`` is ``"keep"`` or ``"bypass"``).

    Raises:
        ValueError: ``policy`` is not one of ``auto``, ``keep``, ``bypass``.
    """
    if policy not in CACHE_POLICIES:
        raise ValueError(f"cache={policy!r}: expected one of {', '.join(CACHE_POLICIES)}")
    if policy != "auto":
        return CacheDecision(policy, f"cache={policy!r} asked for")
    if direct == "on":
        return CacheDecision("bypass", "FLASHPACK_DIRECT=on asks for O_DIRECT")
    avail = mem_available_nbytes()
    pct = round(CACHE_KEEP_FRACTION * 100)
    if nbytes <= avail * CACHE_KEEP_FRACTION:
        return CacheDecision("keep", f"{nbytes} bytes to read <= {pct}% of MemAvailable ({avail} bytes)")
    return CacheDecision("bypass", f"{nbytes} bytes to read > {pct}% of MemAvailable ({avail} bytes)")


# --------------------------------------------------------------------------- filling the cache ahead


def _madvise(address: int, nbytes: int, advice: int) -> int:
    """madvise(2) on ``[address, address + nbytes)``; returns 0 or the errno."""
    if _libc.madvise(address, nbytes, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


#: Bytes one posix_fadvise(2) ``WILLNEED`` is assumed to read when the device's limits cannot be found
#: (:func:`readahead_limit_nbytes`): the default ``read_ahead_kb`` (128), below which no default limit falls.
DEFAULT_READAHEAD_LIMIT_NBYTES = 128 * 1024


#: linux/virtio_balloon.h: the balloon reports free pages to the hypervisor (Linux 5.7; virtio 1.2, "Free Page
#: Reporting"). The driver's ``features`` file in sysfs holds one ``0``/``1`` per feature bit, bit 0 first.
VIRTIO_BALLOON_F_REPORTING = 5


def free_page_reporting(sysfs: str = "/sys", buddyinfo: str = "/proc/buddyinfo") -> str:
    """Whether this (virtual) machine hands free memory back to its hypervisor: the virtio balloon device that
    offers ``VIRTIO_BALLOON_F_REPORTING`` (read from sysfs, ``/sys/bus/virtio/drivers/virtio_balloon/*/features``),
    or ``""`` when none does. With it (mm/page_reporting.c), free blocks of at least ``page_reporting_order``
    pages (``/sys/module/page_reporting/parameters``; 2 MiB here) that stay free about 2 s are reported, the host
    discards them, and the first touch of that memory afterwards is served by the host again.

    A ``page_reporting_order`` above the largest order the buddy allocator has (the columns of /proc/buddyinfo,
    11 on x86-64) reports nothing: an administrator's way to switch reporting off; that counts as none.

    Args:
        sysfs: where sysfs is mounted (tests pass a tree of their own).
        buddyinfo: /proc/buddyinfo (tests pass their own).

    Returns:
        The device's name (``"virtio0"``), or ``""``.
    """
    try:
        with open(os.path.join(sysfs, "module", "page_reporting", "parameters", "page_reporting_order")) as f:
            order = int(f.read().strip())
        with open(buddyinfo) as f:
            orders = max(len(line.split()) - 4 for line in f)
        if order >= orders > 0:
            return ""
    except (OSError, ValueError):
        pass  # no such parameter (older kernels: a fixed pageblock order): reporting as the device says
    drivers = os.path.join(sysfs, "bus", "virtio", "drivers", "virtio_balloon")
    try:
        devices = sorted(d for d in os.listdir(drivers) if d.startswith("virtio"))
    except OSError:
        return ""
    for dev in devices:
        try:
            with open(os.path.join(drivers, dev, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > VIRTIO_BALLOON_F_REPORTING and bits[VIRTIO_BALLOON_F_REPORTING] == "1":
            return dev
    return ""


def readahead_limit_nbytes(fd: int) -> int:
    """The most bytes one posix_fadvise(2) ``POSIX_FADV_WILLNEED`` reads of ``fd``'s file: the kernel cuts each
    advice to ``max(io_pages, ra_pages)`` of the file's backing device (mm/readahead.c, ``force_page_cache_ra``;
    measured here: a 64 MiB advice read 8 MiB), which sysfs shows as the device queue's ``max_sectors_kb`` and
    ``read_ahead_kb`` (Documentation/ABI/stable/sysfs-block). A partition's limits are its disk's.

    Returns:
        Bytes (a multiple of the 4096-byte page), or :data:`DEFAULT_READAHEAD_LIMIT_NBYTES` when the file is not
        on a block device sysfs names (NFS, FUSE, btrfs's anonymous device numbers, tmpfs).
    """
    st = os.fstat(fd)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for queue in (dev + "/queue", dev + "/../queue"):
        try:
            kib = [int(_read_text(f"{queue}/{name}")) for name in ("read_ahead_kb", "max_sectors_kb")]
        except (OSError, ValueError):
            continue
        # whole pages: the kernel reads whole pages of each advice, so a piece of 509 KiB would leave the page
        # between it and the next unread
        return max(max(kib) * 1024 // PAGE_NBYTES * PAGE_NBYTES, PAGE_NBYTES)
    return DEFAULT_READAHEAD_LIMIT_NBYTES


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_ahead(fd: int, file_offset: int, nbytes: int, limit_nbytes: int = DEFAULT_READAHEAD_LIMIT_NBYTES) -> bool:
    """Start reading ``[file_offset, file_offset + nbytes)`` (bytes) of ``fd``'s file into the page cache and
    return without waiting: posix_fadvise(2) ``POSIX_FADV_WILLNEED``, one advice per ``limit_nbytes``
    (:func:`readahead_limit_nbytes`: the kernel reads no more than that of one advice), each submitting the reads of
    the pages not cached yet and skipping the cached ones. A copy that reaches a page still being read waits for
    that page alone.

    Nothing is mapped or touched, so a file truncated meanwhile costs nothing here (advice past the end is ignored)
    and the copy meets the short read itself.

    Returns:
        Whether the kernel took the advice (``False``: ``ESPIPE``, ``EINVAL`` for a file system without
        readahead; the copies then read whatever is missing themselves).
    """
    if nbytes <= 0:
        return False
    step = max(limit_nbytes, PAGE_NBYTES)
    try:
        for off in range(file_offset, file_offset + nbytes, step):
            os.posix_fadvise(fd, off, min(step, file_offset + nbytes - off), os.POSIX_FADV_WILLNEED)
    except OSError:
        return False
    return True


class Prefetcher:
    """Reads byte ranges of a file into the page cache ahead of the buffered copies that follow, in one
    helper thread, in the order the ranges are added.

    Each range is faulted in with ``madvise(MADV_POPULATE_READ)`` (Linux 5.14+, madvise(2)) on a read-only
    shared mapping of the file: the kernel reads it with its readahead, straight into the page cache, at
    O_DIRECT speed and without a copy; then :meth:`add`'s latch is set and a worker copies the range out of
    the cache with preadv(2). The mapping is never touched: past the end of a truncated file madvise fails
    with ``EFAULT`` instead of raising SIGBUS, and the copy gets a short read. When the kernel refuses the
    advice (``EINVAL`` before 5.14), ranges are advised with :func:`read_ahead` (posix_fadvise(2) ``WILLNEED``)
    instead, once per process noticed in :attr:`method`.

    Why a helper thread: MADV_POPULATE_READ blocks its caller until the range is read; one thread running
    ahead keeps the disk busy while the copy workers copy the ranges behind it. The lead is bounded by whoever
    adds ranges: the ``threads`` reader adds each extent as it is queued, up to ``queue_depth`` extents ahead of
    the copies (with a lead of only the extents being copied, a cold GiB took 1.46-1.66 s here).

    Why not posix_fadvise(2) ``WILLNEED`` alone, which returns at once: the next load copies out of what it
    cached slower (it reads through mm/readahead.c ``force_page_cache_ra``, which allocates folios of the
    mapping's minimum order, single pages on ext4, where faulting a sequential mapping reads large folios: the
    likely cause). Measured here, 1 GiB, a fresh process each (compare.py's cold and
    restart, medians of 6): WILLNEED cold 0.66-0.77 s and restart 0.35 s; this prefetcher 0.80 s and 0.23 s.

    Args:
        fd: a descriptor of the file, open for reading (owned by the caller, kept open until :meth:`close`).
        file_nbytes: the file's size when opened (the mapping's length).

    Attributes:
        method: ``"populate_read"`` or ``"willneed"``: how ranges are read ahead.
    """

    def __init__(self, fd: int, file_nbytes: int):
        self._fd = fd
        self._nbytes = file_nbytes
        self._limit_nbytes = 0  # of one WILLNEED advice (readahead_limit_nbytes), found when first needed
        self._addr = 0
        self.method = "willneed" if _populate_refused else "populate_read"
        if file_nbytes > 0 and not _populate_refused:
            addr = _libc.mmap(None, file_nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == _MAP_FAILED:
                self.method = "willneed"
            else:
                self._addr = addr
                # sequential readahead on the faults (VM_SEQ_READ): without it the kernel reads around each
                # faulting page and gives up reading ahead after 100 misses (mm/filemap.c, MMAP_LOTSAMISS)
                _madvise(addr, file_nbytes, mmap.MADV_SEQUENTIAL)
        # held with `with self._lock` (a C lock); the helper thread waits on _bell. No threading.Condition: its
        # Python code, cut by a KeyboardInterrupt, left a lock held, so the helper never woke and close() waited for
        # it forever (found by a review interrupting 300 loads; flashpack.io.sync)
        self._lock = threading.Lock()
        self._bell = Bell()
        self._todo: collections.deque = collections.deque()
        self._helper: HelperThread | None = None  # None: not started
        self._closed = False

    def add(self, file_offset: int, nbytes: int) -> Latch:
        """Queue ``[file_offset, file_offset + nbytes)`` (bytes) to be read into the cache.

        Returns:
            A latch (:class:`flashpack.io.sync.Latch`) set once the range was read ahead, or the attempt failed,
            or :meth:`close` was called.
        """
        ev = Latch()
        with self._lock:
            if self._closed:
                ev.set()
                return ev
            self._todo.append((file_offset, nbytes, ev))
            if self._helper is None:
                self._start()
        self._bell.ring()
        return ev

    def _fill(self, file_offset: int, nbytes: int) -> None:
        global _populate_refused
        lo = max(0, file_offset - file_offset % PAGE_NBYTES)
        hi = min(file_offset + nbytes, self._nbytes)
        if hi <= lo:
            return
        if self.method == "populate_read":
            err = _madvise(self._addr + lo, hi - lo, MADV_POPULATE_READ)
            if err == 0:
                # unmap the range again: the pages stay in the page cache, but no longer count in this process's
                # RSS (madvise(2): MADV_DONTNEED on a shared file mapping drops the mapping, not the file's pages)
                _madvise(self._addr + lo, hi - lo, mmap.MADV_DONTNEED)
                return
            if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                return  # EFAULT (truncated), EIO, EINTR...: the copy meets the error itself, with its offset
            _populate_refused = True
            self.method = "willneed"
        if not self._limit_nbytes:
            self._limit_nbytes = readahead_limit_nbytes(self._fd)
        read_ahead(self._fd, lo, hi - lo, self._limit_nbytes)

    def _start(self) -> None:
        """Start the helper thread (``_lock`` held). :class:`flashpack.io.sync.HelperThread` is kept first, so that
        close() joins it whatever moment an interrupt cut the start short (one never launched is abandoned)."""
        self._helper = HelperThread()
        self._helper.start(self._run)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                item = self._todo.popleft() if self._todo else None
            if item is None:
                self._bell.wait()  # rung by add() and close(), also between the check above and this wait
                continue
            file_offset, nbytes, ev = item
            try:
                self._fill(file_offset, nbytes)
            finally:
                ev.set()

    def close(self) -> None:
        """Stop (the range being read ahead finishes first), set every waiting latch, unmap; idempotent."""
        with self._lock:
            self._closed = True
            self._bell.ring()  # first: an interrupt after it cannot leave the helper asleep
            todo, self._todo = list(self._todo), collections.deque()
        for *_, ev in todo:
            ev.set()
        helper = self._helper
        # to the end even if interrupted: the caller closes the descriptor next, which the helper may still be using
        interrupted = run_to_end(helper.join) if helper is not None else None
        addr, self._addr = self._addr, 0
        if addr:
            _libc.munmap(addr, self._nbytes)
        if interrupted is not None:
            raise interrupted
