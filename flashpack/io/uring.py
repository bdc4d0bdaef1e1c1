"""The ``uring`` backend: io_uring through the cffi shim ``flashpack._uring`` (source in ``native/``).

One ring per open file, with ``queue_depth`` extents in flight. ``submit`` hands extents to the ring
and returns at once; ``wait`` blocks in C (GIL released) until at least one extent is complete. The C
side resubmits short reads and EAGAIN at the exact offset reached, splits reads over 0x7ffff000
bytes, and reads any unaligned remainder of a direct extent on the buffered descriptor, so one call
moves many megabytes and Python sees one completion per extent. No helper thread: the kernel keeps
the queued reads going while the caller works between ``wait`` calls.

Degrades a feature, not the load: registered buffers refused (RLIMIT_MEMLOCK) are dropped with one
notice; registered files refused are dropped silently; O_DIRECT refused at open or read time falls
back to buffered reads (:class:`~flashpack.io.base.FileHandles`). Only when the ring itself cannot be
made is the backend unavailable, and :func:`probe` says why and how to fix it.

Requires Linux >= 5.6 (IORING_OP_READ) and liburing at build time.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import os
import resource
import time
from collections import deque
from typing import Iterable

from ..errors import BackendUnavailableError, ReadError, short_read_error
from ..settings import GiB, settings
from .base import Completion, Extent, Reader, ReaderStats, buffer_address, collect_futures, notice_once, read_extent

try:
    from .. import _uring
except ImportError as _e:  # built without liburing, or not built at all
    _uring = None
    _IMPORT_ERROR = str(_e)
else:
    _IMPORT_ERROR = ""

log = logging.getLogger("flashpack")

#: sysctl (Linux 6.6+): 0 io_uring allowed, 1 only for root and kernel.io_uring_group, 2 disabled.
IO_URING_DISABLED_PATH = "/proc/sys/kernel/io_uring_disabled"
#: The kernel refuses to register a buffer longer than 1 GiB; bigger buffers are registered in windows.
FIXED_WINDOW_NBYTES = 1 * GiB
#: Registered-buffer table size per ring.
FIXED_BUFFER_SLOTS = 64
#: A blocking wait in C returns to Python at least this often, so Ctrl-C is noticed.
REAP_SLICE_MS = 200
#: Extents read buffered (their pages are cached) at least this large go to the copy threads.
POOL_MIN_NBYTES = 1024 * 1024
#: How often wait() looks at the copy threads while the ring also has reads in flight.
POOL_POLL_MS = 2

#: Test hook: while not ``None``, every new ring rewrites read results as this says; keys are the
#: fields of ``struct fp_fault`` in native/fp_uring.c (max_res, direct_max_nbytes, direct_errno,
#: err_errno, err_offset, eof_offset). Reads are real; only their reported results change.
FAULTS: dict | None = None

_probe_cache: tuple[bool, str] | None = None
_probe_flags: dict = {}


def io_uring_disabled() -> int:
    """``kernel.io_uring_disabled`` (0 when the sysctl does not exist, before Linux 6.6)."""
    try:
        with open(IO_URING_DISABLED_PATH) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def setup_ring(depth: int):
    """Make a ring with ``depth`` slots (no files yet).

    Returns:
        ``(ring, setup_flags)``: the ring (a cffi pointer that frees itself when collected; free it
        sooner with ``_uring.ffi.release``) and the FP_SETUP_* flags the kernel accepted.

    Raises:
        OSError: io_uring_setup(2) failed (errno EPERM, ENOSYS, ENOMEM, ...).
    """
    ffi, lib = _uring.ffi, _uring.lib
    out = ffi.new("struct fp_ring **")
    rc = lib.fp_ring_open(depth, lib.FP_SETUP_COOP_TASKRUN, out)
    if rc < 0:
        raise OSError(-rc, f"io_uring_setup failed: {os.strerror(-rc)}")
    return ffi.gc(out[0], lib.fp_ring_close), rc


def _memlock_text() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    def fmt(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else f"{v} bytes"
    return f"RLIMIT_MEMLOCK is {fmt(soft)} soft / {fmt(hard)} hard"


def _setup_refused_reason(err: int, disabled: int) -> str:
    name = errno.errorcode.get(err, str(err))
    if err == errno.EPERM and disabled == 1:
        return ("io_uring is limited to privileged processes and members of kernel.io_uring_group "
                "(kernel.io_uring_disabled=1); add this user to the group whose id is in "
                "/proc/sys/kernel/io_uring_group, or allow everyone with `sysctl kernel.io_uring_disabled=0`")
    if err == errno.EPERM:
        return ("io_uring_setup was refused with EPERM, most likely by a seccomp filter (Docker's default "
                "profile blocks io_uring); run with --security-opt seccomp=unconfined or a profile allowing "
                "io_uring_setup, io_uring_enter and io_uring_register")
    if err == errno.ENOSYS:
        return ("this kernel has no io_uring (io_uring_setup: ENOSYS); it needs Linux >= 5.6 built with "
                "CONFIG_IO_URING=y")
    if err == errno.ENOMEM:
        return (f"io_uring ring setup failed with ENOMEM; kernels before 5.12 charge rings to RLIMIT_MEMLOCK "
                f"({_memlock_text()}); raise it with `ulimit -l`")
    return f"io_uring ring setup failed: {os.strerror(err)} ({name})"


def _probe() -> tuple[bool, str]:
    if _uring is None:
        return False, (f"the io_uring extension flashpack._uring is not built ({_IMPORT_ERROR}); install "
                       f"liburing-dev (Debian/Ubuntu) or liburing-devel (Fedora) and a C compiler, then "
                       f"reinstall flashpack (`pip install --force-reinstall --no-deps flashpack`, or "
                       f"`pip install -e .` in a checkout)")
    disabled = io_uring_disabled()
    if disabled == 2:
        return False, ("io_uring is disabled on this host (kernel.io_uring_disabled=2); enable it with "
                       "`sysctl kernel.io_uring_disabled=0`")
    try:
        ring, flags = setup_ring(2)
    except OSError as e:
        return False, _setup_refused_reason(e.errno or errno.EIO, disabled)
    try:
        _probe_flags["coop_taskrun"] = bool(flags & _uring.lib.FP_SETUP_COOP_TASKRUN)
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _probe_flags["registered_files"] = _uring.lib.fp_ring_set_files(ring, -1, fd, 1) == 1
        finally:
            os.close(fd)
    finally:
        _uring.ffi.release(ring)
    return True, ""


def probe() -> tuple[bool, str]:
    """Whether a ring can be made here, and if not why and how to fix it. Cached per process."""
    global _probe_cache
    if _probe_cache is None:
        _probe_cache = _probe()
    return _probe_cache


def reset_probe() -> None:
    """Forget the cached probe (tests; or after changing sysctls in a running process)."""
    global _probe_cache
    _probe_cache = None
    _probe_flags.clear()


def probe_features() -> set[str]:
    """Features a reader opened now would try: from the settings and what the probe ring accepted."""
    cfg = settings()
    feats = {f"queue_depth={cfg.queue_depth}"}
    if cfg.direct != "off":
        feats.add("o_direct")
    if cfg.uring_files and _probe_flags.get("registered_files"):
        feats.add("registered_files")
    if cfg.uring_buffers:
        feats.add("registered_buffers")
    if _probe_flags.get("coop_taskrun"):
        feats.add("coop_taskrun")
    return feats


class UringReader(Reader):
    """Reads extents of one file through an io_uring ring.

    Args:
        path: the file.
        direct: ``auto``/``on``/``off`` (default ``FLASHPACK_DIRECT``).
        queue_depth: extents in flight (default ``FLASHPACK_QUEUE_DEPTH``).
        registered_buffers: register destination buffers for READ_FIXED (default
            ``FLASHPACK_URING_BUFFERS``). A registered buffer's owner is kept alive, pinned, until
            :meth:`close`; buffers longer than 1 GiB are registered in 1 GiB windows.
        registered_files: register the descriptors with the ring (default ``FLASHPACK_URING_FILES``).
        threads: accepted and ignored, so one set of options suits every backend.

    Raises:
        BackendUnavailableError: no ring can be made here (the message says why and what to do).
        OSError: the file cannot be opened.

    Notes:
        Not thread-safe: one thread drives a reader. Destinations must be writable, C-contiguous and
        at least ``nbytes`` long, and stay untouched until their completion is returned.
    """

    name = "uring"
    _ring = None

    def __init__(self, path, *, direct: str | None = None, queue_depth: int | None = None,
                 registered_buffers: bool | None = None, registered_files: bool | None = None,
                 threads: int | None = None):
        cfg = settings()
        super().__init__(path, direct=direct or cfg.direct)
        self.queue_depth = int(queue_depth or cfg.queue_depth)
        self._queue: deque[Extent] = deque()
        self._active: dict[int, Extent] = {}
        # Extents served from the page cache are copied by a few threads: a buffered io_uring read of
        # cached pages completes inline in the one submitting thread, which caps a warm load at one
        # core's copy speed (3.5 GiB/s against 11.6 GiB/s for 4 threads, measured on an H200 host).
        self._threads = int(threads or cfg.threads)
        self._pool: cf.ThreadPoolExecutor | None = None
        self._copies: dict[cf.Future, Extent] = {}
        self._cancelled: list[Completion] = []
        self._next_tag = 0
        self._fixed: dict[tuple[int, int], tuple[int, memoryview] | None] = {}
        self._fixed_nbytes = 0
        self._use_fixed = False
        self._fixed_files = False
        try:
            ok, reason = probe()
            if not ok:
                raise BackendUnavailableError(f"backend 'uring' is unavailable: {reason}")
            ffi, lib = _uring.ffi, _uring.lib
            try:
                self._ring, _ = setup_ring(self.queue_depth)
            except OSError as e:
                raise BackendUnavailableError(
                    f"backend 'uring' is unavailable: {_setup_refused_reason(e.errno or errno.EIO, io_uring_disabled())}"
                ) from e
            rc = lib.fp_ring_set_files(self._ring, self.files.direct_fd, self.files.fd,
                                       int(cfg.uring_files if registered_files is None else registered_files))
            if rc < 0:
                raise OSError(-rc, f"cannot give {self.path} to the io_uring ring: {os.strerror(-rc)}", self.path)
            self._fixed_files = rc == 1
            if cfg.uring_buffers if registered_buffers is None else registered_buffers:
                rc = lib.fp_ring_buffers_init(self._ring, FIXED_BUFFER_SLOTS)
                self._use_fixed = rc == 0
                if rc < 0:
                    log.debug("flashpack: io_uring buffer table refused (%s); no registered buffers", os.strerror(-rc))
            if FAULTS is not None:
                fault = ffi.new("struct fp_fault *", {"direct_max_nbytes": -1, "err_offset": -1, "eof_offset": -1,
                                                      **FAULTS})
                lib.fp_ring_set_fault(self._ring, fault)
            self._reqs = ffi.new("struct fp_read[]", self.queue_depth)
            self._dones = ffi.new("struct fp_done[]", self.queue_depth)
        except BaseException:
            self.close()
            raise

    @property
    def features(self) -> frozenset[str]:
        feats = set(super().features) | {f"queue_depth={self.queue_depth}"}
        if self._fixed_files:
            feats.add("registered_files")
        if self._use_fixed:
            feats.add("registered_buffers")
        return frozenset(feats)

    # ------------------------------------------------------------------ registered buffers

    def _fixed_index(self, mv: memoryview, addr: int, nbytes: int) -> int | None:
        """The registered-buffer index whose window holds ``[addr, addr + nbytes)``, registering the
        window of the destination's owner on first use; ``None`` to read without one."""
        try:
            base = memoryview(mv.obj).cast("B")
            base_addr = buffer_address(base)
        except (TypeError, ValueError, BufferError):
            return None
        if base.readonly or not base_addr <= addr or addr + nbytes > base_addr + base.nbytes:
            return None
        start = base_addr + (addr - base_addr) // FIXED_WINDOW_NBYTES * FIXED_WINDOW_NBYTES
        end = min(start + FIXED_WINDOW_NBYTES, base_addr + base.nbytes)
        if addr + nbytes > end:
            return None
        key = (start, end)
        if key in self._fixed:
            hit = self._fixed[key]
            return None if hit is None else hit[0]
        used = sum(1 for v in self._fixed.values() if v is not None)
        if used >= FIXED_BUFFER_SLOTS:
            return None
        rc = _uring.lib.fp_ring_buffer_set(self._ring, used, start, end - start)
        if rc == -errno.ENOMEM:
            need = self._fixed_nbytes + (end - start)
            notice_once("uring-memlock",
                        f"flashpack: io_uring could not register destination buffers (ENOMEM): pinning them needs "
                        f"at least {need} bytes of locked memory and {_memlock_text()}; reading without "
                        f"registered buffers. Raise the limit (`ulimit -l`, LimitMEMLOCK= in a systemd unit, "
                        f"`--ulimit memlock=-1` for Docker) or set FLASHPACK_URING_BUFFERS=0")
            self._use_fixed = False
            return None
        if rc < 0:
            log.debug("flashpack: io_uring refused to register a buffer (%s); reading it unregistered",
                      os.strerror(-rc))
            self._fixed[key] = None
            return None
        self._fixed[key] = (used, base)
        self._fixed_nbytes += end - start
        return used

    # ------------------------------------------------------------------ the protocol

    def submit(self, extents: Iterable[Extent]) -> None:
        if self._closed:
            raise ValueError("submit on a closed reader")
        self._queue.extend(extents)
        self._pump()

    def _pump(self) -> None:
        """Hand queued extents to free ring slots (never blocks)."""
        lib = _uring.lib
        k = 0
        taken: list[Extent] = []
        while self._queue and len(self._active) + len(self._copies) + k < self.queue_depth:
            ext = self._queue.popleft()
            try:
                mv = ext.dest if ext.dest.nbytes == ext.nbytes else ext.dest[: ext.nbytes]
                if mv.nbytes < ext.nbytes or not mv.c_contiguous or mv.readonly or ext.nbytes < 0:
                    raise ValueError(f"destination of {mv.nbytes} bytes (readonly={mv.readonly}, "
                                     f"contiguous={mv.c_contiguous}) cannot take {ext.nbytes} bytes")
                addr = buffer_address(mv) if ext.nbytes else 0
            except (TypeError, ValueError) as e:
                self._cancelled.append(Completion(ext, ValueError(f"bad extent at byte offset {ext.file_offset} "
                                                                  f"of {self.path}: {e}")))
                continue
            direct = self.files.use_direct(ext.file_offset, ext.nbytes, addr)
            if not direct and ext.nbytes >= POOL_MIN_NBYTES:
                self._copy_in_pool(ext)
                continue
            req = self._reqs[k]
            req.tag = self._next_tag
            req.file_offset = ext.file_offset
            req.nbytes = ext.nbytes
            req.addr = addr
            req.flags = lib.FP_DIRECT if direct else 0
            req.buf_index = 0
            if self._use_fixed and ext.nbytes:
                idx = self._fixed_index(mv, addr, ext.nbytes)
                if idx is not None:
                    req.flags |= lib.FP_FIXED
                    req.buf_index = idx
            self._next_tag += 1
            taken.append(ext)
            k += 1
        if not k:
            return
        rc = lib.fp_ring_submit(self._ring, k, self._reqs)
        if rc < 0:
            err = ReadError(-rc, f"io_uring submit failed: {os.strerror(-rc)}", self.path)
            self._cancelled.extend(Completion(ext, err) for ext in taken)
            return
        for i, ext in enumerate(taken[:rc]):
            self._active[self._reqs[i].tag] = ext
        self._queue.extendleft(reversed(taken[rc:]))  # no free slot after all (cannot happen): retry later

    @property
    def in_flight(self) -> int:
        return len(self._queue) + len(self._active) + len(self._copies) + len(self._cancelled)

    def _copy_in_pool(self, ext: Extent) -> None:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="flashpack-copy")

        def work() -> ReaderStats:
            st = ReaderStats()
            read_extent(self.files, ext, st)
            return st

        self._copies[self._pool.submit(work)] = ext

    def _collect_copies(self, timeout_s: float | None) -> list[Completion]:
        return collect_futures(self._copies, timeout_s, self.stats)

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        out, self._cancelled = self._cancelled, []
        if self._closed or not self._active:
            self._pump()
            if not self._active:
                if not out and self._copies:
                    out = self._collect_copies(timeout_s)
                    self._pump()
                return out
        lib = _uring.lib
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            out.extend(self._collect_copies(0))
            if out:
                slice_ms, min_done = 0, 0  # collect what is ready, do not block
            elif deadline is None:
                slice_ms, min_done = (POOL_POLL_MS if self._copies else REAP_SLICE_MS), 1
            else:
                slice_ms, min_done = max(0, min(POOL_POLL_MS if self._copies else REAP_SLICE_MS,
                                                int((deadline - time.monotonic()) * 1000))), 1
            n = lib.fp_ring_reap(self._ring, min_done, slice_ms, self._dones, self.queue_depth)
            if n < 0:
                raise ReadError(-n, f"io_uring wait failed: {os.strerror(-n)}", self.path)
            for i in range(n):
                out.append(self._finish(self._dones[i]))
            self._pump()
            if out or (deadline is not None and time.monotonic() >= deadline) or not (self._active or self._copies):
                out.extend(self._cancelled)
                self._cancelled = []
                return out

    def _finish(self, d) -> Completion:
        ext = self._active.pop(d.tag)
        st = self.stats
        st.extents += 1
        st.bytes_direct += d.nbytes_direct
        st.bytes_buffered += d.nbytes_buffered
        if d.flags & _uring.lib.FP_DONE_DIRECT_REFUSED:
            st.direct_fallbacks += 1
            if self.files.direct_fd >= 0:
                self.files.drop_direct(os.strerror(d.direct_error))
        if d.error:
            return Completion(ext, ReadError(
                d.error, f"read of {d.fail_nbytes} bytes at byte offset {d.fail_offset} failed: "
                         f"{os.strerror(d.error)} (extent of {ext.nbytes} bytes at byte offset {ext.file_offset})",
                self.path))
        if d.flags & _uring.lib.FP_DONE_SHORT:
            return Completion(ext, short_read_error(self.path, ext.file_offset, ext.nbytes,
                                                    d.nbytes_direct + d.nbytes_buffered))
        return Completion(ext)

    def cancel_pending(self) -> None:
        err = cf.CancelledError("read cancelled after an earlier error")
        self._cancelled.extend(Completion(ext, err) for ext in self._queue)
        self._queue.clear()
        for fut in self._copies:
            fut.cancel()

    def ring_stats(self) -> dict[str, int]:
        """SQEs prepared, resubmissions and blocking waits of this reader's ring so far."""
        if self._ring is None:
            return {}
        st = _uring.ffi.new("struct fp_ring_stats *")
        _uring.lib.fp_ring_get_stats(self._ring, st)
        return {"sqes": st.sqes, "resubmits": st.resubmits, "enter_waits": st.enter_waits}

    def _close(self) -> None:
        self._queue.clear()
        if self._pool is not None:
            for fut in self._copies:
                fut.cancel()
            self._pool.shutdown(wait=True)  # every copy finished before the buffers go back
            self._copies.clear()
        ring, self._ring = self._ring, None
        if ring is not None:
            _uring.ffi.release(ring)  # fp_ring_close: waits for every read in flight, then frees
        self._active.clear()
        self._cancelled = []
        for hit in self._fixed.values():
            if hit is not None:
                hit[1].release()
        self._fixed.clear()
