"""Host memory for load destinations: one place that allocates the CPU bytes a load reads into.

A fresh anonymous region costs a page fault and a zeroed page per 4 KiB on first touch; for a load from the
page cache that fault-and-zero work, not the copy, is most of the time. :func:`host_buffer` therefore maps
``nbytes`` of private anonymous memory aligned to 2 MiB and asks for transparent huge pages
(``madvise(MADV_HUGEPAGE)``, madvise(2); honoured when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``), so the region faults in 2 MiB at a time. :meth:`HostBuffer.populate` pre-faults a
window with ``MADV_POPULATE_WRITE`` (Linux 5.14+, madvise(2)), falling back to touching one byte per page.

The returned tensor owns the mapping: it is unmapped when the last tensor viewing it is freed.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

import torch

from ..io.pagecache import libc
from ..settings import MiB, PAGE_NBYTES

#: Size and alignment of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
HUGE_PAGE_NBYTES = 2 * MiB
#: Destinations smaller than this come from torch's allocator (a mapping per small load costs more than it saves).
MIN_MAPPED_NBYTES = 4 * MiB
#: linux/mman.h (Linux 5.14); Python's mmap module does not name it before 3.13.
MADV_POPULATE_WRITE = 23

_libc = libc  # the shared binding (flashpack.io.pagecache)
_populate_refused = False


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
            ``"4k+populate"``, ``"4k+touch"`` (huge pages refused), ``"torch"`` (torch's allocator, never
            pre-faulted: the reads fault it in).
    """

    tensor: torch.Tensor
    huge_pages: bool
    kind: str

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def populate(self, offset: int, nbytes: int) -> None:
        """Pre-fault bytes ``[offset, offset + nbytes)`` (widened to whole pages) so reads into them do not
        fault. Thread-safe; a no-op for a ``"torch"`` buffer. Never raises: a refusal falls back to touching."""
        global _populate_refused
        if self.kind == "torch" or nbytes <= 0:
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


def host_buffer(nbytes: int, *, huge_pages: str = "auto") -> HostBuffer:
    """Allocate an uninitialised load destination of ``nbytes`` bytes of host memory.

    Args:
        nbytes: bytes (>= 0).
        huge_pages: ``"auto"``: a mapping in transparent huge pages (``MADV_HUGEPAGE``) when free 2 MiB blocks
            cover twice ``nbytes`` (:func:`free_huge_nbytes`), else torch's allocator; ``"on"``: always ask for
            huge pages (a refusal is not an error); ``"off"``: torch's allocator (4 KiB pages faulted by the reads).

    Returns:
        A :class:`HostBuffer` whose ``tensor`` is a CPU uint8 tensor of ``nbytes`` bytes, 4096-aligned (what
        O_DIRECT needs, open(2)), private and writable.

    Raises:
        MemoryError / OSError (``ENOMEM``): the mapping cannot be made.
    """
    if nbytes < MIN_MAPPED_NBYTES or huge_pages == "off" or (huge_pages == "auto"
                                                             and free_huge_nbytes() < 2 * nbytes):
        # 4 KiB pages: faulted in by the reader threads in parallel, which beat pre-faulting them from one
        # thread (1 GiB cached load here: 0.37 s against 0.42 s)
        return HostBuffer(aligned_empty(nbytes), False, "torch")
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_NBYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # the storage keeps `region` alive; freed with it
    start = (-whole.data_ptr()) % HUGE_PAGE_NBYTES
    tensor = whole[start:start + nbytes]
    huge = _madvise(tensor.data_ptr(), nbytes + (-nbytes) % PAGE_NBYTES, mmap.MADV_HUGEPAGE) == 0
    kind = ("thp" if huge else "4k") + ("+touch" if _populate_refused else "+populate")
    return HostBuffer(tensor, huge, kind)


def aligned_empty(nbytes: int, align: int = PAGE_NBYTES) -> torch.Tensor:
    """An uninitialised CPU uint8 tensor of ``nbytes`` from torch's allocator whose first byte is
    ``align``-aligned (O_DIRECT needs page-aligned buffer addresses, open(2); torch only promises 64)."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    off = (-raw.data_ptr()) % align
    return raw[off:off + nbytes]


def resident_nbytes() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``), for tests and perf scripts."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


__all__ = ["HUGE_PAGE_NBYTES", "HostBuffer", "aligned_empty", "host_buffer", "resident_nbytes"]
