"""Device loads straight out of the page cache: a read-only shared mapping of the pack, cut into *windows*
(slot-sized pieces, :func:`flashpack.staging.scheduler.cut_pieces`), each registered with the device and
copied from by the device's copy engine, with no CPU copy of the payload.

Per window, in a bounded pipeline (at most ``max_windows`` windows populated or registered at once):

1. **populate**: ``madvise(MADV_POPULATE_READ)`` faults the window's page-table entries in (reading it
   from the disk through readahead when it is not cached). madvise(2): Linux >= 5.14; where an access would
   raise SIGBUS (a page beyond the end of a file that was truncated meanwhile, an I/O error) it returns
   ``EFAULT`` instead, which becomes a :class:`~flashpack.errors.ReadError` naming the file and the offset;
2. **register**: a :class:`Registrar` page-locks the window for the device (``cudaHostRegister``, see
   :class:`flashpack.staging.sinks.CudaRegistrar`) and gives the host tensor the device copies from; a
   refusal is a return value, and the windows not copied yet are handed back for the staging ring;
3. **copy**: ``sink.copy_from(tensor, dest_offset)`` starts the device copy and returns a fence;
4. **unregister** once that fence is done.

The CPU never loads or stores through the mapping: checksum chunks are verified on hash threads that read
the bytes again with ``preadv(2)`` into a scratch buffer (a truncated file gives a short read, a named
error, never SIGBUS), and after the last copy the file's identity (device, inode, size, mtime) is checked
again, so a file rewritten during the load raises ``ESTALE`` instead of returning mixed bytes.

Everything here is device-agnostic and runs on a CPU with :class:`flashpack.testing.HostRegistrar` and
:class:`flashpack.testing.HostCopySink`.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from ..errors import ReadError, short_read_error
from ..format import WeightMap, verify_chunk
from ..io import pagecache
from ..io.pagecache import MAP_FAILED, libc
from ..io.sync import Gate, Task, run_to_end
from ..io.threads import named_pool, wait_all
from ..plan import LoadPlan
from ..settings import PAGE_NBYTES
from ..source import check_same_file, open_regular
from .ring import Fence
from .scheduler import Piece

#: madvise(2) advice: populate (prefault) page tables readable, Linux >= 5.14 (include/uapi/asm-generic/mman-common.h).
MADV_POPULATE_READ = 22
#: A load takes the mapped path in ``auto`` mode when at least this fraction of its plan's pages is in the
#: page cache (mincore(2)); the same rule as O_DIRECT vs buffered in :class:`flashpack.io.base.FileHandles`.
MIN_RESIDENT_FRACTION = 0.5
#: How often the scheduler looks at fences and verifications while it waits for a window, in seconds.
POLL_S = 0.001

_libc, _MAP_FAILED = libc, MAP_FAILED  # the shared binding (flashpack.io.pagecache)

# Indirection so tests can fake the kernel (an old kernel refusing the advice).
_madvise = _libc.madvise

# --------------------------------------------------------------------------- accounting

_lock = threading.Lock()
_registered_now = 0
_registered_peak = 0


def registered_nbytes() -> tuple[int, int]:
    """``(current, peak)`` bytes of page-cache windows registered with a device by mapped loads in this
    process; the peak is since the last :func:`reset_registered_peak`."""
    with _lock:
        return _registered_now, _registered_peak


def reset_registered_peak() -> None:
    global _registered_peak
    with _lock:
        _registered_peak = _registered_now


def _count(delta: int) -> None:
    global _registered_now, _registered_peak
    with _lock:
        _registered_now += delta
        _registered_peak = max(_registered_peak, _registered_now)


# --------------------------------------------------------------------------- the mapping


class FileMapping:
    """A read-only shared mapping (``PROT_READ``, ``MAP_SHARED``; mmap(2)) of ``wm.file_nbytes`` bytes of
    the pack, and the descriptor it was made from. Nothing in this class reads through the mapping.

    Use :meth:`open`; a context manager (:meth:`close` unmaps and closes the descriptor; idempotent).
    """

    def __init__(self, wm: WeightMap, fd: int, address: int):
        self.wm = wm
        self.path = wm.path
        self.fd = fd
        self.address = address
        self.nbytes = wm.file_nbytes

    @classmethod
    def open(cls, wm: WeightMap) -> "FileMapping | str":
        """Open and map the file whose weight map is ``wm``; a string (the reason) when it cannot be
        mapped (mmap(2) ``ENODEV``: a file system without mmap, an empty file, a page size other than 4096).

        Raises:
            OSError: the file cannot be opened.
            ReadError (``ESTALE``): the file is not the one whose weight map was read (source.check_same_file).
        """
        if wm.file_nbytes <= 0:
            return "the file is empty"
        if mmap.PAGESIZE != PAGE_NBYTES:
            return f"the page size is {mmap.PAGESIZE}, not {PAGE_NBYTES}"
        fd, _ = open_regular(wm.path)
        try:
            check_same_file(wm, fd)
            addr = _libc.mmap(None, wm.file_nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == _MAP_FAILED:
                e = ctypes.get_errno()
                os.close(fd)
                return f"mmap(2) failed: {errno.errorcode.get(e, e)} ({os.strerror(e)})"
        except BaseException:
            os.close(fd)
            raise
        return cls(wm, fd, addr)

    def resident_fraction(self, plan: LoadPlan) -> float:
        """Fraction of the plan's pages in the page cache now (mincore(2) through
        :mod:`flashpack.io.pagecache`; faults nothing); 0.0 when unknown."""
        res = pagecache.ResidencyMap(self.fd, self.nbytes)
        total = hit = 0.0
        for r in plan.regions:
            n = max(0, min(r.file_offset + r.nbytes, self.nbytes) - r.file_offset)
            total += n
            hit += n * res.fraction(r.file_offset, n)
        return hit / total if total else 0.0

    def populate(self, file_offset: int, nbytes: int) -> str | None:
        """Fault in the page-table entries of file bytes ``[file_offset, file_offset + nbytes)`` with
        ``madvise(MADV_POPULATE_READ)`` (madvise(2), Linux >= 5.14), reading uncached pages from the disk.

        Returns:
            ``None`` when populated; the reason when the kernel does not offer the advice (``EINVAL``:
            Linux < 5.14), so the caller can stage through the ring instead.

        Raises:
            ReadError: ``EFAULT`` (madvise(2): populating failed because an access would have raised
                SIGBUS: the page lies beyond the end of a file truncated meanwhile, or could not be read),
                ``EHWPOISON``, ``ENOMEM`` or another errno, naming the file and the byte range.
            ValueError: the range is not page-aligned or lies outside the mapping.
        """
        if file_offset % PAGE_NBYTES or file_offset < 0 or nbytes <= 0 or file_offset + nbytes > self.nbytes:
            raise ValueError(f"window [{file_offset}, {file_offset + nbytes}) is not a page-aligned part of the "
                             f"{self.nbytes}-byte mapping")
        for _ in range(100):  # EINTR / EAGAIN: interrupted or transient; try again
            if _madvise(self.address + file_offset, nbytes, MADV_POPULATE_READ) == 0:
                return None
            e = ctypes.get_errno()
            if e not in (errno.EINTR, errno.EAGAIN):
                break
        if e in (errno.EINVAL, errno.ENOSYS):
            return f"madvise(MADV_POPULATE_READ) refused ({errno.errorcode.get(e, e)}: needs Linux 5.14 or later)"
        what = ("an access would raise SIGBUS: the file was truncated while it was being loaded, or a page could "
                "not be read" if e == errno.EFAULT else os.strerror(e))
        raise ReadError(e, f"could not read bytes [{file_offset}, {file_offset + nbytes}) through the page cache "
                           f"(madvise MADV_POPULATE_READ: {errno.errorcode.get(e, e)}: {what}); load it again", self.path)

    def pread_exact(self, buf: memoryview, file_offset: int) -> None:
        """Read ``len(buf)`` file bytes at ``file_offset`` into ``buf`` with preadv(2), resuming short reads.

        Raises:
            ReadError: end of file before ``len(buf)`` bytes (truncated meanwhile; see errors.short_read_error).
        """
        done, n = 0, len(buf)
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], file_offset + done)
            if got <= 0:
                raise short_read_error(self.path, file_offset, n, done)
            done += got

    def check_same_file(self) -> None:
        """Raise ``ReadError(ESTALE)`` unless the file is still the one whose weight map was read."""
        check_same_file(self.wm, self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            _libc.munmap(self.address, self.nbytes)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FileMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- windows, registrars, sinks


def host_tensor_at(address: int, nbytes: int) -> torch.Tensor:
    """A CPU uint8 tensor over ``nbytes`` bytes at ``address`` (no copy, nothing read: the caller keeps the
    memory alive and never lets the CPU read it when it is a file mapping)."""
    return torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(address), dtype=torch.uint8)


@dataclass(eq=False)
class Window:
    """One piece of the plan as a part of the mapping: ``address`` is its first byte in this process,
    ``tensor`` the host uint8 tensor of ``piece.nbytes`` the device copies from (set by the registrar),
    ``handle`` whatever the registrar needs to unregister it, ``fence`` the copy's fence."""

    piece: Piece
    address: int
    tensor: torch.Tensor | None = None
    handle: object = None
    fence: Fence | None = None
    registered: bool = field(default=False)


class Registrar(Protocol):
    """Page-locks windows for a device. ``register`` sets ``window.tensor`` (and ``window.handle``) and
    returns ``None``, or returns the reason it was refused (never raises for a refusal); ``unregister`` is
    called once per registered window, only after the window's copy fence is done. Both may run on any thread."""

    name: str

    def register(self, window: Window) -> str | None: ...

    def unregister(self, window: Window) -> None: ...


class WindowSink(Protocol):
    """A sink that copies from a registered host tensor: ``copy_from(src, dest_offset) -> fence``
    (:class:`flashpack.staging.sinks.CudaSink`, :class:`flashpack.testing.HostCopySink`)."""

    def copy_from(self, src: torch.Tensor, dest_offset: int) -> Fence: ...

    def drain(self) -> None: ...


@dataclass
class MappedRun:
    """What :func:`run_mapped` did: ``verified`` checksum chunks; ``windows`` registered; ``nbytes`` copied;
    ``refused`` the reason a populate or registration was refused (``None`` when none was) and ``left`` the
    pieces then not copied, in file order, for the staging ring."""

    verified: int = 0
    windows: int = 0
    nbytes: int = 0
    refused: str | None = None
    left: list[Piece] = field(default_factory=list)


def window_bound(num_slots: int, slot_nbytes: int, cap_nbytes: int) -> int:
    """Most windows registered at once: ``FLASHPACK_NUM_SLOTS``, fewer when the pinned-memory cap
    ``FLASHPACK_PINNED_CAP_NBYTES`` holds fewer windows of ``slot_nbytes`` (at least one)."""
    return max(1, min(num_slots, cap_nbytes // slot_nbytes))


# --------------------------------------------------------------------------- the scheduler


def run_mapped(mapping: FileMapping, plan: LoadPlan, windows: Sequence[Piece], sink: WindowSink,
               registrar: Registrar, *, verify: bool, max_windows: int, prep_threads: int = 2,
               hash_threads: int = 1) -> MappedRun:
    """Copy ``windows`` of ``mapping`` into ``sink``: populate -> register -> copy -> fence -> unregister.

    Args:
        mapping: the open mapping of ``plan``'s file.
        plan: the plan the windows were cut from (its checksum chunks).
        windows: pieces from :func:`~flashpack.staging.scheduler.cut_pieces`; each file offset is page-aligned.
        sink: starts the device copies; drained here, not closed.
        registrar: registers windows with the device.
        verify: verify every window's checksum chunks (read with preadv(2) on ``hash_threads`` threads,
            in parallel with the copies).
        max_windows: most windows populated or registered at once (>= 1).
        prep_threads: threads populating and registering windows ahead of the copies.
        hash_threads: threads verifying chunks.

    Returns:
        A :class:`MappedRun`. On a refusal (an old kernel, ``cudaHostRegister`` refused), the windows not
        copied are in ``left`` and everything copied so far is complete and unregistered.

    Raises:
        ReadError (a window could not be populated, a short read while verifying, ``ESTALE`` when the file
        changed during the load), ChecksumMismatchError, a copy error, or KeyboardInterrupt: the first one,
        only after every started copy has finished, every registered window is unregistered and no thread
        started here is still running.
    """
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    run = MappedRun()
    pending = collections.deque(windows)
    prepping: collections.deque[tuple[Window, Task]] = collections.deque()
    copying: collections.deque[Window] = collections.deque()
    checks: collections.deque[Task] = collections.deque()
    error: BaseException | None = None
    # the process's kept pools (flashpack.io.threads.named_pool): Task waits are safe when a KeyboardInterrupt lands,
    # concurrent.futures' are not (flashpack.io.sync), and no thread is started per load
    prep = named_pool("window", max(1, prep_threads))
    hashers = named_pool("verify", max(1, hash_threads)) if verify else None
    scratch = threading.local()

    def prepare(w: Window) -> str | None:
        why = mapping.populate(w.piece.file_offset, w.piece.nbytes)
        if why is not None:
            return why
        why = registrar.register(w)
        if why is None:
            w.registered = True
            _count(w.piece.nbytes)
            registered.append(w)  # on a pool thread, where no interrupt lands: `finally` finds it whatever happens
        return why

    def unregister(w: Window) -> None:
        if w.registered:
            w.registered = False
            w.tensor = None
            try:
                registrar.unregister(w)
            finally:
                _count(-w.piece.nbytes)

    def check(ci: int) -> None:
        c = plan.chunks[ci]
        buf = getattr(scratch, "buf", None)
        if buf is None or len(buf) < c.nbytes:
            scratch.buf = buf = memoryview(bytearray(c.nbytes))
        mapping.pread_exact(buf[:c.nbytes], c.offset)
        verify_chunk(mapping.wm, c, buf[:c.nbytes])

    def retire_done() -> None:
        while copying and copying[0].fence is not None and copying[0].fence.done():
            unregister(copying.popleft())
        while checks and checks[0].done():
            exc = checks.popleft().exception()
            if exc is not None:
                raise exc
            run.verified += 1

    registered: list[Window] = []  # every window registered by this run, unregistered by the end
    gate = Gate()
    prepare_task, check_task = gate.wrap(prepare), gate.wrap(check)
    try:
        while True:
            retire_done()
            while error is None and run.refused is None and pending and len(prepping) + len(copying) < max_windows:
                p = pending.popleft()
                w = Window(p, mapping.address + p.file_offset)
                prepping.append((w, prep.submit(prepare_task, w)))
            if prepping:
                w, fut = prepping[0]
                if not fut.done() and (copying or checks):
                    fut.wait(POLL_S)
                    continue
                prepping.popleft()
                why = fut.result()  # raises the populate error
                if why is not None:
                    run.refused = run.refused or why
                    run.left.append(w.piece)
                elif run.refused is not None:
                    unregister(w)
                    run.left.append(w.piece)
                else:
                    run.windows += 1
                    copying.append(w)  # before the copy starts: unregistered in `finally` even if it raises
                    w.fence = sink.copy_from(w.tensor, w.piece.buffer_offset)
                    run.nbytes += w.piece.nbytes
                    if hashers is not None:
                        checks.extend(hashers.submit(check_task, ci) for ci in w.piece.chunks)
            elif copying:
                copying[0].fence.wait()
            elif checks:
                checks[0].wait()
            else:
                break
    except BaseException as e:  # noqa: BLE001 - raised after draining
        error = e
    finally:
        run_to_end(lambda: wait_all([fut for _, fut in prepping]))  # no window task still runs past this point
        for w, fut in prepping:  # windows prepared but not copied
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001
                error = error or e
            run_to_end(lambda: unregister(w))
        prepping.clear()
        try:
            sink.drain()
        except BaseException as e:  # noqa: BLE001
            error = error or e
        for w in copying:
            try:
                if w.fence is not None:
                    w.fence.wait()
            except BaseException as e:  # noqa: BLE001
                error = error or e
            run_to_end(lambda: unregister(w))
        copying.clear()
        if hashers is not None:
            run_to_end(lambda: wait_all(checks))
            for f in checks:
                if f.exception() is not None:
                    error = error or f.exception()
                else:
                    run.verified += 1
        run_to_end(gate.close)  # a task an interrupt kept us from recording has ended too (or will never start)
        for w in registered:  # a window an interrupt kept out of prepping/copying (submitted but not recorded, or
            if w.registered:  # taken from prepping and not yet in copying): its copy, if any, was drained above
                run_to_end(lambda: unregister(w))
        registered.clear()
    if error is None:
        mapping.check_same_file()  # a file rewritten meanwhile: ESTALE, not mixed bytes
    if error is not None:
        raise error
    if run.refused is not None:
        run.left.extend(pending)
        run.left.sort(key=lambda p: p.file_offset)
    return run



__all__ = ["FileMapping", "MADV_POPULATE_READ", "MIN_RESIDENT_FRACTION", "MappedRun", "Registrar", "Window",
           "WindowSink", "host_tensor_at", "registered_nbytes", "reset_registered_peak", "run_mapped", "window_bound"]
