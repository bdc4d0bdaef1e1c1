"""Which pages of a file are in the page cache, from mincore(2).

mincore(2) reports residency for a mapping without touching its pages, so mapping a file just to
ask never faults, never reads and never risks SIGBUS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

from ..settings import PAGE_NBYTES

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int


def resident_pages(fd: int, file_nbytes: int) -> np.ndarray | None:
    """One bool per 4096-byte page of the file: is it in the page cache now? ``None`` if unknown."""
    if file_nbytes == 0:
        return np.zeros(0, dtype=bool)
    if mmap.PAGESIZE != PAGE_NBYTES:
        return None
    try:
        mm = mmap.mmap(fd, file_nbytes, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        npages = (file_nbytes + PAGE_NBYTES - 1) // PAGE_NBYTES
        vec = (ctypes.c_ubyte * npages)()
        rc = _libc.mincore(ctypes.addressof(anchor), file_nbytes, vec)
        del anchor
        if rc != 0:
            return None
        return (np.frombuffer(vec, dtype=np.uint8) & 1).astype(bool)
    finally:
        mm.close()


class ResidencyMap:
    """A snapshot of a file's page-cache residency, taken once at open."""

    def __init__(self, fd: int, file_nbytes: int):
        pages = resident_pages(fd, file_nbytes)
        self._cum = None if pages is None else np.concatenate(([0], np.cumsum(pages, dtype=np.int64)))

    def fraction(self, file_offset: int, nbytes: int) -> float:
        """Fraction of the pages of ``[file_offset, file_offset + nbytes)`` in the cache (0.0 if unknown)."""
        if self._cum is None or nbytes <= 0:
            return 0.0
        lo = file_offset // PAGE_NBYTES
        hi = min(len(self._cum) - 1, (file_offset + nbytes + PAGE_NBYTES - 1) // PAGE_NBYTES)
        if hi <= lo:
            return 0.0
        return float(self._cum[hi] - self._cum[lo]) / (hi - lo)


def drop_from_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to evict a file's clean pages (posix_fadvise(2) POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
