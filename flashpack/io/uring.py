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

Extents whose pages are already cached go to a :class:`~flashpack.io.threads.ThreadsReader` this reader
owns (``threads`` workers over the same descriptors): a buffered io_uring read of cached pages
completes inline in the one submitting thread, which caps a warm load at one core's copy speed
(3.5 GiB/s against 11.6 GiB/s for 4 threads, measured on an H200 host).

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
from ..settings import GiB, Settings
from ..settings import settings as _settings
from .base import Completion, Extent, ReaderBase, buffer_address, common_features, extent_dest, notice_once
from .protocol import c_error
from .threads import ThreadsReader

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
        raise c_error(rc, "io_uring_setup")
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


def planned_features(cfg: Settings) -> frozenset[str]:
    """What a :class:`UringReader` opened now with ``cfg`` reports when nothing is refused at open: the
    common features plus what the probe ring accepted (``registered_files``, ``coop_taskrun``)."""
    feats = set(common_features(cfg.direct != "off", cfg.queue_depth, cfg.threads))
    if cfg.uring_files and _probe_flags.get("registered_files"):
        feats.add("registered_files")
    if cfg.uring_buffers:
        feats.add("registered_buffers")
    if _probe_flags.get("coop_taskrun"):
        feats.add("coop_taskrun")
    return frozenset(feats)


class UringReader(ReaderBase):
    """Reads extents of one file through an io_uring ring.

    Args:
        path, cfg, direct, expect: see :class:`~flashpack.io.base.ReaderBase`.
        queue_depth: extents in flight at once: the ring's request slots plus the extents being copied
            out of the page cache (default ``FLASHPACK_QUEUE_DEPTH``, at most ``MAX_QUEUE_DEPTH``).
        threads: worker threads of the owned :class:`~flashpack.io.threads.ThreadsReader` that copies
            extents whose pages are cached (default ``FLASHPACK_THREADS``); started on first use.
        registered_buffers: register destination buffers for READ_FIXED (default
            ``FLASHPACK_URING_BUFFERS``). A registered buffer's owner is kept alive, pinned, until
            :meth:`close`; buffers longer than 1 GiB are registered in 1 GiB windows.
        registered_files: register the descriptors with the ring (default ``FLASHPACK_URING_FILES``).

    Raises:
        BackendUnavailableError: no ring can be made here (the message says why and what to do).
        OSError: the file cannot be opened. ReadError (``ESTALE``): it is not ``expect``.
        ValueError: an option is out of range.

    Notes:
        Not thread-safe: one thread drives a reader. Destinations must be writable, C-contiguous and
        at least ``nbytes`` long, and stay untouched until their completion is returned.
    """

    name = "uring"
    _ring = None
    _copier: ThreadsReader | None = None

    def __init__(self, path, *, cfg: Settings | None = None, registered_buffers: bool | None = None,
                 registered_files: bool | None = None, **options):
        ok, reason = probe()  # before opening the file: an unavailable backend costs no descriptor
        if not ok:
            raise BackendUnavailableError(f"backend 'uring' is unavailable: {reason}")
        cfg = cfg if cfg is not None else _settings()
        self._queue: deque[Extent] = deque()
        self._active: dict[int, Extent] = {}
        self._cancelled: list[Completion] = []
        self._next_tag = 0
        self._fixed: dict[tuple[int, int], tuple[int, memoryview] | None] = {}
        self._fixed_nbytes = 0
        self._use_fixed = False
        self._fixed_files = False
        self._coop = False
        super().__init__(path, cfg=cfg, **options)
        try:
            ffi, lib = _uring.ffi, _uring.lib
            try:
                self._ring, flags = setup_ring(self.queue_depth)
            except OSError as e:
                raise BackendUnavailableError(
                    f"backend 'uring' is unavailable: {_setup_refused_reason(e.errno or errno.EIO, io_uring_disabled())}"
                ) from e
            self._coop = bool(flags & lib.FP_SETUP_COOP_TASKRUN)
            rc = lib.fp_ring_set_files(self._ring, self._files.direct_fd, self._files.fd,
                                       int(cfg.uring_files if registered_files is None else registered_files))
            if rc < 0:
                raise c_error(rc, f"giving {self.path} to the io_uring ring", self.path)
            self._fixed_files = rc == 1
            if cfg.uring_buffers if registered_buffers is None else registered_buffers:
                rc = lib.fp_ring_buffers_init(self._ring, FIXED_BUFFER_SLOTS)
                self._use_fixed = rc == 0
                if rc < 0:
                    log.debug("flashpack: io_uring buffer table refused (%s); no registered buffers", os.strerror(-rc))
            self._reqs = ffi.new("struct fp_read[]", self.queue_depth)
            self._dones = ffi.new("struct fp_done[]", self.queue_depth)
        except BaseException:
            self.close()
            raise

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        return probe()

    @classmethod
    def planned_features(cls, cfg: Settings) -> frozenset[str]:
        return planned_features(cfg)

    @property
    def features(self) -> frozenset[str]:
        feats = set(super().features)
        if self._fixed_files:
            feats.add("registered_files")
        if self._use_fixed:
            feats.add("registered_buffers")
        if self._coop:
            feats.add("coop_taskrun")
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

    def _copying(self) -> int:
        return 0 if self._copier is None else self._copier.in_flight

    def _ring_busy(self) -> bool:
        """Whether the ring holds anything: extents in flight, or no-ops of failed submissions."""
        return self._ring is not None and _uring.lib.fp_ring_in_flight(self._ring) > 0

    def _copy(self, extents: list[Extent]) -> None:
        if self._copier is None:
            self._copier = ThreadsReader.sharing(self._files, self.stats, queue_depth=self.queue_depth,
                                                 threads=self.threads)
        self._copier.submit(extents)

    def _pump(self) -> None:
        """Hand queued extents to free ring slots or to the copier (never blocks).

        Extents for the copier count against ``queue_depth`` like ring reads, and go to it together at the end, so
        that consecutive ones can go to one worker as a batch."""
        lib = _uring.lib
        k = 0
        taken: list[Extent] = []
        to_copy: list[Extent] = []
        while self._queue and len(self._active) + self._copying() + len(to_copy) + k < self.queue_depth:
            ext = self._queue.popleft()
            try:
                mv = extent_dest(ext)
                if mv.nbytes < ext.nbytes or not mv.c_contiguous or mv.readonly or ext.nbytes < 0:
                    raise ValueError(f"destination of {mv.nbytes} bytes (readonly={mv.readonly}, "
                                     f"contiguous={mv.c_contiguous}) cannot take {ext.nbytes} bytes")
                addr = buffer_address(mv) if ext.nbytes else 0
            except (TypeError, ValueError, AttributeError) as e:  # AttributeError: not a memoryview
                self._cancelled.append(Completion(ext, ValueError(f"bad extent at byte offset {ext.file_offset} "
                                                                  f"of {self.path}: {e}")))
                continue
            fill = self._files.fill
            if fill is not None and ext.nbytes and fill.covers(addr, ext.nbytes):
                to_copy.append(ext)  # UFFDIO_COPY by the copier's threads: a ring read cannot write into the region
                continue
            direct = self._files.use_direct(ext.file_offset, ext.nbytes, addr)
            if not direct and ext.nbytes >= POOL_MIN_NBYTES:
                to_copy.append(ext)
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
        if to_copy:
            self._copy(to_copy)
        if not k:
            return
        rc = lib.fp_ring_submit(self._ring, k, self._reqs)
        if rc < 0:  # none was taken (fp_ring_submit never leaves a prepared SQE behind a negative return)
            err = c_error(rc, "io_uring submit", self.path, ReadError)
            self._cancelled.extend(Completion(ext, err) for ext in taken)
            return
        for i, ext in enumerate(taken[:rc]):
            self._active[self._reqs[i].tag] = ext
        self._queue.extendleft(reversed(taken[rc:]))  # slots still busy with failed submissions: later

    @property
    def in_flight(self) -> int:
        return len(self._queue) + len(self._active) + self._copying() + len(self._cancelled)

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        out, self._cancelled = self._cancelled, []
        if not self._closed:
            self._pump()
        if self._closed or not self._ring_busy():
            if not out and self._copying():
                out = self._copier.wait(timeout_s)
                self._pump()
            out.extend(self._cancelled)
            self._cancelled = []
            return out
        lib = _uring.lib
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._copying():
                out.extend(self._copier.wait(0))
            if out:
                slice_ms, min_done = 0, 0  # collect what is ready, do not block
            else:
                slice_ms, min_done = (POOL_POLL_MS if self._copying() else REAP_SLICE_MS), 1
                if deadline is not None:
                    slice_ms = max(0, min(slice_ms, int((deadline - time.monotonic()) * 1000)))
            n = lib.fp_ring_reap(self._ring, min_done, slice_ms, self._dones, self.queue_depth)
            if n < 0:
                raise c_error(n, "io_uring wait", self.path, ReadError)
            for i in range(n):
                c = self._finish(self._dones[i])
                if c is not None:
                    out.append(c)
            self._pump()
            if (out or self._cancelled or (deadline is not None and time.monotonic() >= deadline)
                    or not (self._ring_busy() or self._copying())):
                out.extend(self._cancelled)
                self._cancelled = []
                return out

    def _finish(self, d) -> Completion | None:
        """The completion for one fp_done record; ``None`` (logged) for a tag this reader never gave."""
        ext = self._active.pop(d.tag, None)
        if ext is None:
            log.debug("flashpack: io_uring completion for unknown tag %d on %s ignored", d.tag, self.path)
            return None
        lib = _uring.lib
        st = self.stats
        st.extents += 1
        st.bytes_direct += d.nbytes_direct
        st.bytes_buffered += d.nbytes_buffered
        if d.flags & lib.FP_DONE_DIRECT_REFUSED:
            st.direct_fallbacks += 1
            if self._files.direct_fd >= 0:
                self._files.drop_direct(os.strerror(d.direct_error))
        if d.error and d.flags & lib.FP_DONE_NOT_SUBMITTED:
            return Completion(ext, ReadError(
                d.error, f"io_uring submit failed: {os.strerror(d.error)} (extent of {ext.nbytes} bytes at byte "
                         f"offset {ext.file_offset}, {d.nbytes_direct + d.nbytes_buffered} bytes read before)",
                self.path))
        if d.error:
            return Completion(ext, ReadError(
                d.error, f"read of {d.fail_nbytes} bytes at byte offset {d.fail_offset} failed: "
                         f"{os.strerror(d.error)} (extent of {ext.nbytes} bytes at byte offset {ext.file_offset})",
                self.path))
        if d.flags & lib.FP_DONE_SHORT:
            return Completion(ext, short_read_error(self.path, ext.file_offset, ext.nbytes,
                                                    d.nbytes_direct + d.nbytes_buffered))
        return Completion(ext)

    def cancel_pending(self) -> None:
        err = cf.CancelledError("read cancelled after an earlier error")
        self._cancelled.extend(Completion(ext, err) for ext in self._queue)
        self._queue.clear()
        if self._copier is not None:
            self._copier.cancel_pending()

    def ring_stats(self) -> dict[str, int]:
        """SQEs prepared, resubmissions and blocking waits of this reader's ring so far."""
        if self._ring is None:
            return {}
        st = _uring.ffi.new("struct fp_ring_stats *")
        _uring.lib.fp_ring_get_stats(self._ring, st)
        return {"sqes": st.sqes, "resubmits": st.resubmits, "enter_waits": st.enter_waits}

    def _close(self) -> None:
        self._queue.clear()
        if self._copier is not None:
            self._copier.close()  # every copy finished before the buffers go back
        ring, self._ring = self._ring, None
        if ring is not None:
            _uring.ffi.release(ring)  # fp_ring_close: waits for every read in flight, then frees
        self._active.clear()
        self._cancelled = []
        for hit in self._fixed.values():
            if hit is not None:
                hit[1].release()
        self._fixed.clear()
