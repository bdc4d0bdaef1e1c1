"""Filling fresh memory without zeroing it first: userfaultfd(2) ``UFFDIO_COPY`` from a mapping of the file.

A load into fresh anonymous memory pays, per 4 KiB page, a page fault and a zeroed page before the copy
overwrites it; on a cached load that fault-and-zero work, not the copy, is most of the time. A region registered
with a userfaultfd in "missing" mode can instead be filled with ``ioctl(UFFDIO_COPY)`` (ioctl_userfaultfd(2)):
the kernel allocates each page, copies the source bytes into it and maps it, in one call for a whole extent, with
no zeroing and no fault per page. The source is a read-only shared mapping of the file (the page cache itself),
read by the kernel: past the end of a file truncated meanwhile the copy fails with ``EFAULT`` (a kernel access,
fixed up), never SIGBUS. Measured on the 2-vCPU VM this was built on (README, Performance): 1 GiB from the page
cache by two threads in 0.21 s against 0.31 s for preadv(2) into fresh pages (medians of 5, fresh processes).

Safety rules, all kept here and in :func:`flashpack.io.base.read_extent`:

- the region is registered with ``UFFD_USER_MODE_ONLY`` (Linux 5.11+; needs no privilege, even with
  ``vm.unprivileged_userfaultfd = 0``): a *kernel* access to a missing page (a preadv(2) or O_DIRECT read into it)
  fails with ``EFAULT`` instead of waiting, so only the fill writes into it while it is registered;
- nothing in this process handles user faults on the region, so user code must not touch a missing page while it
  is registered: the region is released (:meth:`FillRegion.release`: ``UFFDIO_UNREGISTER``, then the descriptor
  is closed) as soon as the load's reads are done, or at the first failed copy, after which the
  remaining bytes are read with preadv(2) and the region behaves as ordinary memory;
- a kernel without userfaultfd, a seccomp filter that forbids it (Docker's default profile does, without
  ``CAP_SYS_PTRACE``) or any refusal makes :meth:`FillRegion.create` raise ``OSError``: the caller allocates
  ordinary memory instead.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import select
import struct
import threading

from ..settings import PAGE_NBYTES
from .pagecache import libc

#: userfaultfd(2)'s system call number (asm/unistd_64.h; asm-generic/unistd.h for arm64). Only architectures whose
#: ioctl numbers follow asm-generic/ioctl.h (as :func:`_iowr` computes them); elsewhere the fill is not offered.
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "arm64": 282}
#: linux/userfaultfd.h
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
UFFDIO_REGISTER_MODE_MISSING = 1
_UFFDIO_COPY_NR = 0x03


def _iowr(nr: int, size: int) -> int:
    """``_IOWR(UFFDIO, nr, size)`` (asm-generic/ioctl.h) for x86-64 and arm64."""
    return (3 << 30) | (size << 16) | (UFFD_API << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)  # struct uffdio_api {u64 api, features, ioctls}
UFFDIO_REGISTER = _iowr(0x00, 32)  # struct uffdio_register {u64 start, len, mode, ioctls}
UFFDIO_COPY = _iowr(_UFFDIO_COPY_NR, 40)  # struct uffdio_copy {u64 dst, src, len, mode; s64 copy}
UFFDIO_UNREGISTER = (2 << 30) | (16 << 16) | (UFFD_API << 8) | 0x01  # _IOR(UFFDIO, 1, struct uffdio_range)
_COPY = struct.Struct("<QQQQq")

_syscall = libc.syscall
_syscall.restype = ctypes.c_long


def _userfaultfd() -> int:
    """A userfaultfd descriptor limited to user-mode faults, close-on-exec (userfaultfd(2)).

    Raises:
        OSError: ENOSYS (no such system call on this kernel or architecture), EPERM (forbidden by a seccomp filter
            or by ``vm.unprivileged_userfaultfd`` on kernels before 5.11), EINVAL (``UFFD_USER_MODE_ONLY`` unknown).
    """
    nr = SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"userfaultfd: system call number unknown on {platform.machine()}")
    fd = _syscall(nr, os.O_CLOEXEC | UFFD_USER_MODE_ONLY)
    if fd < 0:
        err = ctypes.get_errno() or errno.ENOSYS
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    return fd


class FillRegion:
    """Fresh memory registered with a userfaultfd, to be filled with ``UFFDIO_COPY``: private anonymous memory
    (:meth:`create`) or the shared mapping of a fresh memory file (:meth:`over`).

    From :meth:`create`, ``mapping`` (a Python ``mmap`` object) owns the memory: wrap it (``torch.frombuffer``,
    ``memoryview``) to use it; it is unmapped when the last such view dies. From :meth:`over`, the caller owns the
    mapping and ``mapping`` is ``None``. Thread-safe:
    several threads may :meth:`copy` into disjoint pages at once; :meth:`release` may race with them (their copies
    then fail and they read the rest themselves).

    Attributes:
        mapping: the memory (``None`` for a region registered :meth:`over` a mapping the caller owns); address: its
            first byte (page-aligned); nbytes: its size (a multiple of 4096).
    """

    def __init__(self, mapping: mmap.mmap | None, uffd: int, address: int = 0, nbytes: int = 0):
        self.mapping = mapping
        if mapping is not None:
            address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))  # the export ends with the temporary
            nbytes = len(mapping)
        self.address = address
        self.nbytes = nbytes
        self._uffd = uffd
        # owns the descriptor: its C deallocator closes it when the region is dropped unreleased, with no Python
        # __del__ for a KeyboardInterrupt to cut short (one landed at its first bytecode: the descriptor leaked, the
        # region stayed registered and the Ctrl-C was swallowed; found by review). select.epoll.fromfd stores any
        # descriptor and only ever closes it (used for nothing else here); io.FileIO would too, but its finalizer
        # clears a pending KeyboardInterrupt (measured: the Ctrl-C was lost).
        self._owner = select.epoll.fromfd(uffd)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, nbytes: int) -> "FillRegion":
        """Map ``nbytes`` (rounded up to 4096) of private anonymous memory and register all of it.

        Raises:
            OSError: the kernel refused (see :func:`_userfaultfd`; ``UFFDIO_API``/``UFFDIO_REGISTER`` errors), or
                the registration does not offer ``UFFDIO_COPY``; the mapping is then freed.
            ValueError: ``nbytes`` <= 0.
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        nbytes += -nbytes % PAGE_NBYTES
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return cls._register(mapping, 0, 0)

    @classmethod
    def over(cls, address: int, nbytes: int) -> "FillRegion":
        """Register an existing mapping ``[address, address + nbytes)`` (page-aligned; ``nbytes`` is rounded up to
        4096) that has no page yet: a shared mapping of a fresh memory file (memfd_create(2)), whose shmem pages
        ``UFFDIO_COPY`` then allocates and fills (userfaultfd(2) supports shmem since Linux 4.11). Each 4 KiB page
        otherwise costs a fault and a zeroed page; measured on the 2-vCPU VM this was built on, 2 GiB from the page
        cache by the reader's threads: 0.58-0.60 s against 0.93-1.08 s faulted (pwrite(2) into the file was no
        better, 0.94-1.0 s: writes to one shmem file hold its inode lock, so two threads do not overlap).

        The caller owns the mapping and keeps it alive until :meth:`release`; nothing may touch a page of it meanwhile
        (the class docstring). ``mapping`` is ``None`` for such a region.

        Raises:
            OSError: as :meth:`create` (``EINVAL``: the range is not a mapping userfaultfd can register).
            ValueError: ``nbytes`` <= 0 or ``address`` not page-aligned.
        """
        if nbytes <= 0 or address % PAGE_NBYTES:
            raise ValueError(f"a region needs a page-aligned address and bytes: got {address:#x}, {nbytes} bytes")
        return cls._register(None, address, nbytes + (-nbytes) % PAGE_NBYTES)

    @classmethod
    def _register(cls, mapping: mmap.mmap | None, address: int, nbytes: int) -> "FillRegion":
        self = cls(mapping, _userfaultfd(), address, nbytes)
        uffd = self._uffd
        try:
            fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("<QQQ", UFFD_API, 0, 0)))
            reg = bytearray(struct.pack("<QQQQ", self.address, self.nbytes, UFFDIO_REGISTER_MODE_MISSING, 0))
            fcntl.ioctl(uffd, UFFDIO_REGISTER, reg)
            if not struct.unpack("<QQQQ", reg)[3] & (1 << _UFFDIO_COPY_NR):
                raise OSError(errno.EOPNOTSUPP, "userfaultfd: UFFDIO_COPY is not offered for this memory")
        except BaseException:
            self._uffd = -1
            self._owner.close()  # closing unregisters whatever was registered
            raise
        return self

    @property
    def uffd(self) -> int:
        """The userfaultfd descriptor, or -1 once released. A copy through a number read before a release fails
        (``ENOENT`` after the unregister; a number reused meanwhile is not registered over this range): it never
        writes elsewhere."""
        return self._uffd

    @property
    def released(self) -> bool:
        return self._uffd < 0

    def covers(self, address: int, nbytes: int) -> bool:
        """Whether bytes ``[address, address + nbytes)`` lie in the region and it is still registered."""
        return not self.released and self.address <= address and address + nbytes <= self.address + self.nbytes

    def copy(self, address: int, src_address: int, nbytes: int) -> tuple[int, int]:
        """Fill ``nbytes`` at ``address`` (both page-aligned, inside the region) from ``src_address``.

        Returns:
            ``(bytes copied, errno)``: errno 0 when all were; else why the rest was not (``EFAULT``: the source is
            unreadable, e.g. past the end of a truncated file; ``EEXIST``: a page is already present; ``ENOENT``
            or ``EBADF``: the region was released meanwhile). Never raises.
        """
        done = 0
        while done < nbytes:
            uffd = self._uffd  # -1, or a descriptor number a release may close (and reuse) meanwhile: a copy
            if uffd < 0:       # through a reused number fails (not a userfaultfd), it never writes elsewhere
                return done, errno.ENOENT
            arg = bytearray(_COPY.pack(address + done, src_address + done, nbytes - done, 0, 0))
            err = 0
            try:
                fcntl.ioctl(uffd, UFFDIO_COPY, arg)  # releases the GIL for the call
            except OSError as e:
                err = e.errno or errno.EIO
            copied = _COPY.unpack(arg)[4]
            if copied > 0:
                done += copied
                if err in (0, errno.EAGAIN):
                    continue
            if err == 0:  # nothing copied and no error: do not spin
                err = -copied if copied < 0 else errno.EIO
            return done, err
        return done, 0

    def release(self) -> None:
        """Unregister the whole region (``UFFDIO_UNREGISTER``, then close the descriptor); missing pages then fault
        in as ordinary zeroed memory. Idempotent, thread-safe.

        The explicit unregister matters: closing alone unregisters only at the descriptor's last reference, which
        another thread's copy in flight may still hold, so a read into the region right after would fail (EFAULT).
        The unregister takes the memory map's write lock, so it returns after any copy in flight; a copy started
        later fails (``ENOENT``)."""
        with self._lock:
            uffd = self._uffd
            if uffd < 0:
                return
            try:  # unregister *before* saying so: a reader that sees :attr:`released` (:meth:`covers` false) reads
                # into the region with preadv(2) or a ring at once, which fails (EFAULT) while it is still registered
                fcntl.ioctl(uffd, UFFDIO_UNREGISTER, bytearray(struct.pack("<QQ", self.address, self.nbytes)))
            except OSError:
                pass  # closing below still unregisters, at the last reference
            finally:
                self._uffd = -1
                self._owner.close()


def probe() -> tuple[bool, str]:
    """Whether a :class:`FillRegion` can be made here, and if not why (one page mapped and registered)."""
    try:
        FillRegion.create(PAGE_NBYTES).release()
    except OSError as e:
        return False, str(e)
    return True, ""


__all__ = ["FillRegion", "probe"]
