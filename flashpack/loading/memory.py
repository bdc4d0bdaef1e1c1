"""Host memory for load destinations: one place that allocates the CPU bytes a load reads into.

A fresh anonymous region costs a page fault and a zeroed page per 4 KiB on first touch; for a load from the
page cache that fault-and-zero work, not the copy, is most of the time. :func:`host_buffer` therefore maps
``nbytes`` of private anonymous memory aligned to 2 MiB and asks for transparent huge pages
(``madvise(MADV_HUGEPAGE)``, madvise(2); honoured when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``), so the region faults in 2 MiB at a time. :meth:`HostBuffer.populate` pre-faults a
window with ``MADV_POPULATE_WRITE`` (Linux 5.14+, madvise(2)), falling back to touching one byte per page.

For a load that copies everything out of the page cache (``cache="keep"``, ``fill=True``), huge pages are not
pre-faulted: the reader threads' preadv(2) copies fault each 2 MiB page in as they land (zeroing and copying in
parallel, one thread per page). Where huge pages are not chosen, :func:`host_buffer` tries a region filled with
userfaultfd's ``UFFDIO_COPY`` (:mod:`flashpack.io.uffd`): no zeroed page and no fault per 4 KiB at all
(``FLASHPACK_USERFAULTFD``). Measured on the 2-vCPU VM, 1 GiB cached, verified, fresh processes: huge pages
faulted by the reads 0.154-0.168 s, UFFDIO_COPY 0.214-0.260 s, huge pages pre-faulted window by window by the
loading thread 0.194-0.257 s (free page reporting switched off for the run, see below).

``huge_pages="auto"`` (the default) asks for huge pages only where they are fast to get: transparent huge pages
are enabled (:func:`thp_enabled`), free 2 MiB blocks cover twice the load (/proc/buddyinfo) and the machine does
not hand free memory back to a hypervisor (:func:`reports_free_pages`). On a VM that does (virtio-balloon free
page reporting), free 2 MiB blocks are the ones reported, and the host faults them in again on first touch:
measured there, fresh huge pages filled at 0.4-0.6 GB/s after a few idle seconds against 10 GB/s, while 4 KiB
pages come from the small free blocks, which are never reported.

The returned tensor owns the mapping: it is unmapped when the last tensor viewing it is freed.

Ranks of one host loading the same file share one destination (:func:`shared_buffer`, :func:`seal_shared`,
:func:`map_shared`): one process fills a sealed memory file, the others map it copy-on-write.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import mmap
import os
from dataclasses import dataclass

import torch

from ..io.pagecache import free_page_reporting, libc
from ..io.uffd import FillRegion
from ..settings import MiB, PAGE_NBYTES

#: Size and alignment of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
HUGE_PAGE_NBYTES = 2 * MiB
#: Destinations smaller than this come from torch's allocator (a mapping per small load costs more than it saves).
MIN_MAPPED_NBYTES = 4 * MiB
#: Destinations smaller than this are not filled with userfaultfd (torch's allocator instead). Measured on the AMD
#: EPYC VM, cached packs, medians of 8-10 fresh processes: 16 MiB 9.1 ms filled against 11.1 ms from torch's
#: allocator (repeated loads in one process 7.4-10.8 ms against 6.0-14.1 ms), 8 MiB 7.9 against 8.5 ms, 4 MiB
#: level (5.6 ms); below one mapping's worth (``MIN_MAPPED_NBYTES``) the region costs more than it saves. (On the
#: earlier Intel VM glibc's heap reuse made torch's allocator win at 16 MiB in repeated loads: 5-7 against 7-10 ms.)
MIN_FILL_NBYTES = MIN_MAPPED_NBYTES
#: linux/mman.h (Linux 5.14); Python's mmap module does not name it before 3.13.
MADV_POPULATE_WRITE = 23

_libc = libc  # the shared binding (flashpack.io.pagecache)
_populate_refused = False
#: Why userfaultfd regions cannot be made in this process ("" until refused once; then not tried again): private
#: anonymous memory, and the shared memory of :func:`shared_buffer`.
_fill_refused = ""
_shared_fill_refused = ""
log = logging.getLogger("flashpack")


def _madvise(address: int, nbytes: int, advice: int) -> int:
    """madvise(2) on ``[address, address + nbytes)``; returns 0 or the errno."""
    if _libc.madvise(address, nbytes, advice) == 0:
        return 0
    return ctypes.get_errno()


@dataclass
class HostBuffer:
    """A load destination in host memory.

    Attributes:
        tensor: the bytes, a CPU uint8 tensor of the asked size whose first byte is 4096-aligned (2 MiB-aligned
            when mapped). Views of it keep the memory alive.
        huge_pages: ``MADV_HUGEPAGE`` was accepted for it.
        kind: how it was made and is pre-faulted: ``"thp+populate"``, ``"thp+touch"`` (huge pages),
            ``"4k+populate"``, ``"4k+touch"`` (huge pages refused), ``"thp+fault"``, ``"4k+fault"`` (for a load
            copying from the page cache: the reads fault them in), ``"torch"`` (torch's allocator) and ``"memfd"``
            (shared with the other ranks of a host, :func:`shared_buffer`), never pre-faulted: the reads fault
            them in; ``"uffd"``: a fresh mapping registered with a userfaultfd, filled by the reader with
            ``UFFDIO_COPY`` (:mod:`flashpack.io.uffd`), and ``"memfd+uffd"``, shared memory registered the same
            way; ``region`` is then the registration, released by the load once its reads are done.
        region: the :class:`~flashpack.io.uffd.FillRegion` of a ``"uffd"`` or ``"memfd+uffd"`` buffer, else
            ``None``.
    """

    tensor: torch.Tensor
    huge_pages: bool
    kind: str
    region: FillRegion | None = None

    @property
    def prefault(self):
        """:meth:`populate` for a buffer the load should pre-fault window by window (``read_into``'s ``populate``),
        ``None`` for one the reads themselves fault in or fill (``"torch"``, ``"memfd"``, ``"uffd"``, ``"*+fault"``)."""
        return None if self.kind in ("torch", "memfd", "uffd", "memfd+uffd") or self.kind.endswith("+fault") \
            else self.populate

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def populate(self, offset: int, nbytes: int) -> None:
        """Pre-fault bytes ``[offset, offset + nbytes)`` (widened to whole pages) so reads into them do not
        fault. Thread-safe; a no-op for a ``"torch"``, ``"memfd"``, ``"uffd"`` or ``"memfd+uffd"`` buffer. Never raises: a refusal falls back to touching."""
        global _populate_refused
        if self.kind in ("torch", "memfd", "uffd", "memfd+uffd") or nbytes <= 0:
            return
        lo = offset - offset % PAGE_NBYTES
        hi = min(self.nbytes, offset + nbytes)
        if hi <= lo:
            return
        if not _populate_refused:
            err = _madvise(self.tensor.data_ptr() + lo, hi - lo + (-(hi - lo)) % PAGE_NBYTES, MADV_POPULATE_WRITE)
            if err == 0:
                return
            if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # a kernel before 5.14
                _populate_refused = True
                self.kind = self.kind.replace("populate", "touch")
        self.tensor[lo:hi:PAGE_NBYTES].zero_()  # one write per page faults it in


def free_huge_nbytes() -> int:
    """Bytes of free memory in blocks of at least 2 MiB (``/proc/buddyinfo``, proc(5)): what transparent huge
    pages can take without the kernel first compacting memory; 0 when unknown."""
    total = 0
    try:
        with open("/proc/buddyinfo") as f:
            for line in f:
                counts = line.split()[4:]
                for order, n in enumerate(counts):
                    if PAGE_NBYTES << order >= HUGE_PAGE_NBYTES:
                        total += int(n) * (PAGE_NBYTES << order)
    except (OSError, ValueError):
        return 0
    return total


def host_buffer(nbytes: int, *, huge_pages: str = "auto", fill: bool = False, userfaultfd: bool = True) -> HostBuffer:
    """Allocate an uninitialised load destination of ``nbytes`` bytes of host memory.

    Args:
        nbytes: bytes (>= 0).
        huge_pages: ``"auto"``: a mapping in transparent huge pages (``MADV_HUGEPAGE``) when free 2 MiB blocks
            cover twice ``nbytes`` (:func:`free_huge_nbytes`), transparent huge pages are enabled
            (:func:`thp_enabled`) and the machine does not report free pages to a hypervisor
            (:func:`reports_free_pages`); ``"on"``: always ask for huge pages (a refusal is not an
            error); ``"off"``: never (torch's allocator, 4 KiB pages faulted by the reads, or ``"uffd"``).
        fill: a reader will copy every byte from the page cache (``cache="keep"``): huge pages are then left to
            the reads to fault in (kind ``"thp+fault"``); without huge pages, for ``nbytes`` of at least
            ``MIN_FILL_NBYTES`` (4 MiB) and with ``userfaultfd``, a ``"uffd"`` region is tried first
            (:class:`~flashpack.io.uffd.FillRegion`); where the kernel refuses, once per process, the reason is
            logged at DEBUG level and the other kinds are used.
        userfaultfd: whether a ``"uffd"`` region may be used (``FLASHPACK_USERFAULTFD``).

    Returns:
        A :class:`HostBuffer` whose ``tensor`` is a CPU uint8 tensor of ``nbytes`` bytes, 4096-aligned (what
        O_DIRECT needs, open(2)), private and writable.

    Raises:
        MemoryError / OSError (``ENOMEM``): the mapping cannot be made.
    """
    global _fill_refused
    huge_wanted = nbytes >= MIN_MAPPED_NBYTES and (
        huge_pages == "on"
        or huge_pages == "auto" and not reports_free_pages() and free_huge_nbytes() >= 2 * nbytes and thp_enabled())
    if fill and userfaultfd and not huge_wanted and nbytes >= MIN_FILL_NBYTES and not _fill_refused:
        try:
            region = FillRegion.create(nbytes)
        except OSError as e:
            _fill_refused = str(e) or "refused"
            log.debug("flashpack: userfaultfd refused (%s); fresh destinations are faulted in by the reads",
                      _fill_refused)
        else:
            whole = torch.frombuffer(region.mapping, dtype=torch.uint8)  # owns the mapping, unmapped with its views
            return HostBuffer(whole[:nbytes], False, "uffd", region)
    if not huge_wanted:
        # 4 KiB pages: faulted in by the reader threads in parallel, which beat pre-faulting them from one
        # thread (1 GiB cached load here: 0.37 s against 0.42 s)
        return HostBuffer(aligned_empty(nbytes), False, "torch")
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_NBYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # the storage keeps `region` alive; freed with it
    start = (-whole.data_ptr()) % HUGE_PAGE_NBYTES
    tensor = whole[start:start + nbytes]
    huge = _madvise(tensor.data_ptr(), nbytes + (-nbytes) % PAGE_NBYTES, mmap.MADV_HUGEPAGE) == 0
    kind = ("thp" if huge else "4k") + ("+fault" if fill else "+touch" if _populate_refused else "+populate")
    return HostBuffer(tensor, huge, kind)


@functools.cache
def reports_free_pages() -> bool:
    """:func:`free_page_reporting` of ``/sys``, read once per process (a device is not added under a running load)."""
    return bool(free_page_reporting())


def thp_enabled(path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> bool:
    """Whether ``MADV_HUGEPAGE`` can give huge pages: the active mode (in brackets) of ``path`` is ``always`` or
    ``madvise`` (Documentation/admin-guide/mm/transhuge.rst); ``never``, or no such file, is False."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def aligned_empty(nbytes: int, align: int = PAGE_NBYTES) -> torch.Tensor:
    """An uninitialised CPU uint8 tensor of ``nbytes`` from torch's allocator whose first byte is
    ``align``-aligned (O_DIRECT needs page-aligned buffer addresses, open(2); torch only promises 64)."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    off = (-raw.data_ptr()) % align
    return raw[off:off + nbytes]


# --------------------------------------------------------------------------- memory shared by the ranks of a host

#: The seals a shared destination carries once filled (fcntl(2), "File Sealing"; memfd_create(2)): its bytes can
#: no longer be written through any descriptor or shared mapping, and its size is fixed, so a copy-on-write mapping
#: of it can neither change under a reader nor raise SIGBUS.
SHARED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


#: The longest name memfd_create(2) accepts, in bytes (NAME_MAX less the "memfd:" prefix); longer ones are cut.
MEMFD_NAME_MAX = 249


@dataclass(frozen=True)
class SharedHandle:
    """Where another process of this host finds a sealed shared destination: the creating process's ``pid``
    and descriptor number ``fd`` (opened by others as ``/proc/<pid>/fd/<fd>``, proc(5)), the memfd's
    ``(st_dev, st_ino)`` to check that the descriptor opened is that one, and its size in bytes."""

    pid: int
    fd: int
    dev: int
    ino: int
    nbytes: int


def shared_buffer(nbytes: int, name: str = "flashpack", *, userfaultfd: bool = False) -> tuple[int, HostBuffer]:
    """A load destination other processes of this host can map: an anonymous memory file (memfd_create(2),
    ``MFD_ALLOW_SEALING``) of ``nbytes`` bytes, mapped shared and writable here.

    Args:
        nbytes: bytes (> 0); name: a label for /proc/<pid>/maps (cut to :data:`MEMFD_NAME_MAX` bytes).
        userfaultfd: register the mapping with a userfaultfd (the distributed load passes
            ``FLASHPACK_USERFAULTFD``), for ``nbytes`` of at least ``MIN_FILL_NBYTES`` (4 MiB), so a ``cache="keep"``
            load given ``fill=buffer.region`` fills its shmem pages with ``UFFDIO_COPY``
            (:meth:`flashpack.io.uffd.FillRegion.over`) instead of faulting them in. Until the region is released,
            nothing in this process may touch the tensor (a missing page would wait forever; a kernel write into it
            fails with ``EFAULT``). Where the kernel refuses (no userfaultfd, a seccomp filter, no shmem support), the
            reason is logged at DEBUG level once and the reads fault the pages in; a passing shortage (``ENOMEM``,
            ``EMFILE``) is not remembered.

    Returns:
        ``(fd, buffer)``: the memfd (close-on-exec; the caller closes it) and a :class:`HostBuffer` of kind
        ``"memfd+uffd"`` (``region`` set: give it to the load as ``fill=``, which releases it) or ``"memfd"``
        (4 KiB shmem pages faulted in by the reader threads, as for ``"torch"``) whose tensor is a CPU uint8 tensor
        of ``nbytes`` bytes, page-aligned. Drop every reference to the tensor before :func:`seal_shared`.

    Raises:
        OSError: memfd_create(2) or ftruncate(2) failed (``ENOMEM``, ``EMFILE``, ...); ValueError: ``nbytes`` <= 0.
    """
    global _shared_fill_refused
    if nbytes <= 0:
        raise ValueError(f"a shared destination needs at least one byte, got {nbytes}")
    # memfd_create(2) refuses (EINVAL) a name over 249 bytes; the name is only a label (/proc/<pid>/maps)
    fd = os.memfd_create(os.fsencode(name)[:MEMFD_NAME_MAX], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=True, nbytes=nbytes)
    except BaseException:
        os.close(fd)
        raise
    tensor = torch.empty(0, dtype=torch.uint8).set_(storage)
    if userfaultfd and nbytes >= MIN_FILL_NBYTES and not _shared_fill_refused:
        try:
            return fd, HostBuffer(tensor, False, "memfd+uffd", FillRegion.over(tensor.data_ptr(), nbytes))
        except OSError as e:  # a kernel or seccomp filter without userfaultfd on shmem
            if e.errno not in (errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EAGAIN):
                _shared_fill_refused = str(e) or "refused"
            log.debug("flashpack: userfaultfd refused for shared memory (%s); its pages are faulted in by the "
                      "reads", e)
    return fd, HostBuffer(tensor, False, "memfd")


def seal_shared(fd: int) -> SharedHandle:
    """Seal a filled :func:`shared_buffer` (:data:`SHARED_SEALS`) and describe it for the other processes.

    Raises:
        OSError: ``EBUSY`` while a writable shared mapping of it is still alive (a reference to the buffer's
            tensor was kept); fcntl(2).
    """
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SHARED_SEALS)
    st = os.fstat(fd)
    return SharedHandle(os.getpid(), fd, st.st_dev, st.st_ino, st.st_size)


def map_shared(handle: SharedHandle) -> torch.Tensor:
    """A private copy-on-write mapping of another process's sealed shared destination: the same physical pages
    until this process writes one (then that page is its own), never a copy up front.

    Returns:
        A CPU uint8 tensor of ``handle.nbytes`` bytes that owns the mapping (unmapped with its last view);
        writable, and writes stay in this process (mmap(2) ``MAP_PRIVATE``).

    Raises:
        OSError: the creator's descriptor cannot be opened from here (another pid namespace, ``EACCES``, the
            process is gone: ``ENOENT``), or what was opened is not that memfd, or it is not sealed
            (``ESTALE``, naming what differs).
    """
    fd = os.open(f"/proc/{handle.pid}/fd/{handle.fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if (st.st_dev, st.st_ino, st.st_size) != (handle.dev, handle.ino, handle.nbytes) or seals & SHARED_SEALS != SHARED_SEALS:
            raise OSError(errno.ESTALE, f"/proc/{handle.pid}/fd/{handle.fd} is not the sealed shared memory of "
                                        f"{handle.nbytes} bytes it should be (device/inode {st.st_dev}/{st.st_ino}, "
                                        f"{st.st_size} bytes, seals {seals:#x})")
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=False, nbytes=handle.nbytes)
    finally:
        os.close(fd)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def resident_nbytes() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``), for tests and perf scripts."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


__all__ = ["HUGE_PAGE_NBYTES", "HostBuffer", "SharedHandle", "aligned_empty", "free_page_reporting", "host_buffer",
           "map_shared", "reports_free_pages", "resident_nbytes", "seal_shared", "shared_buffer", "thp_enabled"]
