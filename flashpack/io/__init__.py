"""Reader backends: the :class:`Reader` protocol, a small registry, ``backends()`` to see what runs here,
``open_reader`` to get one.

=============  ==============================================================================
``uring``      io_uring through the cffi shim in ``native/`` (needs liburing at build time and a
               kernel and container that allow io_uring)
``threads``    a thread pool of O_DIRECT ``preadv(2)`` calls; always available on Linux
=============  ==============================================================================

``backend="auto"`` (or ``FLASHPACK_BACKEND=auto``) takes ``uring`` when it is available, else
``threads`` with one log line naming why io_uring could not be used; a backend named explicitly
never falls back: it raises :class:`~flashpack.errors.BackendUnavailableError` with the reason.
:func:`open_reader` with ``auto`` opens ``threads`` for a file wholly in the page cache when it is opened
(cachestat(2)): both backends copy cached extents with the same worker threads, so the ring (and, in a fresh
process, the probe that makes one: 0.3-0.9 ms here) would only cost time.

The options every backend takes (``direct``, ``queue_depth``, ``threads``, ``registered_buffers``,
``registered_files``) are listed in :mod:`flashpack.io.protocol`.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass

from ..errors import BackendUnavailableError
from ..settings import MAX_QUEUE_DEPTH, Settings, settings
from . import pagecache
from ..source import ShardedWeightMap
from .base import FileIdentity, ReaderBase, notice_once, read_all
from .multi import ShardsReader, split_count
from .protocol import Completion, Extent, Reader, ReaderStats, c_error
from .threads import ThreadsReader
from .uring import UringReader

#: Backend name -> reader class. Each class has ``probe() -> (available, reason)`` and
#: ``planned_features(cfg)``, the features an instance opened now reports.
_REGISTRY: dict[str, type[ReaderBase]] = {cls.name: cls for cls in (UringReader, ThreadsReader)}
#: ``auto`` tries these in order.
AUTO_ORDER = ("uring", "threads")


@dataclass(frozen=True)
class BackendInfo:
    """One backend: whether it can run here, why not (``""`` when it can), and the features a reader
    opened now would report (empty when unavailable)."""

    name: str
    available: bool
    reason: str
    features: frozenset[str] = frozenset()


def backend_info(name: str, cfg: Settings | None = None) -> BackendInfo:
    """Probe one backend (cheap; the ``uring`` probe is cached per process).

    Args:
        name: ``uring`` or ``threads``.
        cfg: settings read once by the caller (default: read now); they decide the planned features.

    Raises:
        BackendUnavailableError: ``name`` is not a backend.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    ok, reason = cls.probe()
    feats = cls.planned_features(cfg if cfg is not None else settings()) if ok else frozenset()
    return BackendInfo(name, ok, reason, feats)


def backends(cfg: Settings | None = None) -> dict[str, BackendInfo]:
    """Every backend, with whether it can run here, why not, and its features."""
    cfg = cfg if cfg is not None else settings()
    return {name: backend_info(name, cfg) for name in _REGISTRY}


def resolve_backend(backend: str | None = None, cfg: Settings | None = None) -> str:
    """Turn ``"auto"``/``None`` (or ``FLASHPACK_BACKEND``) into a backend name that can run here.

    Raises:
        BackendUnavailableError: a backend named explicitly cannot run; the message gives the reason.
    """
    cfg = cfg if cfg is not None else settings()
    name = (backend or cfg.backend or "auto").lower()
    if name != "auto":
        info = backend_info(name, cfg)
        if not info.available:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {info.reason}")
        return name
    for cand in AUTO_ORDER:
        info = backend_info(cand, cfg)
        if info.available:
            return cand
        if cand == "uring":
            notice_once("auto-uring", f"flashpack: io_uring unavailable ({info.reason}); using the threads backend")
    raise BackendUnavailableError("no reader backend can run here")  # pragma: no cover - threads always can


def wholly_cached(path) -> bool:
    """Whether every page of the file at ``path`` is in the page cache now (cachestat(2), Linux 6.5+; one system
    call, nothing mapped). ``False`` when it cannot be told (an older kernel, a file that cannot be opened, an empty
    file): a hint for choosing a reader, never a promise (pages may be evicted a moment later)."""
    try:  # O_NONBLOCK: a FIFO without a writer must not hang open(2) (loads refuse it above, naming the file)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except (OSError, TypeError, ValueError):
        return False
    try:
        st = os.fstat(fd)
        nbytes = st.st_size
        if not stat.S_ISREG(st.st_mode) or nbytes <= 0:
            return False
        got = pagecache.cached_pages(fd, 0, nbytes)
        return got is not None and got >= -(-nbytes // mmap.PAGESIZE)  # cachestat counts pages of this size
    finally:
        os.close(fd)


def open_reader(path, backend: str | None = None, *, expect: FileIdentity | None = None,
                cfg: Settings | None = None, **options) -> Reader:
    """Open ``path`` with a backend (``auto``, ``uring`` or ``threads``).

    Args:
        path: the file.
        backend: a backend name, ``"auto"``, or ``None`` for ``cfg.backend``. ``auto`` opens ``threads`` when
            the file is wholly in the page cache (:func:`wholly_cached`): every extent is then copied out of the
            cache by the worker threads that the ``uring`` backend would hand it to as well; the reader is told so
            (``all_cached=True``, see :class:`~flashpack.io.base.FileHandles`) instead of asking the kernel again.
        expect: ``None``, or ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` that the opened descriptor must
            still have (taken when the weight map was read).
        cfg: settings read once by the caller; ``None`` reads them once now.
        options: ``direct``, ``queue_depth``, ``threads``, ``registered_buffers``, ``registered_files``
            (see :mod:`flashpack.io.protocol`); ``cache``, ``fill``, ``all_cached`` (see
            :class:`~flashpack.io.base.ReaderBase`).

    Raises:
        BackendUnavailableError: the backend named cannot run here.
        OSError: the file cannot be opened.
        ReadError: ``ESTALE``, the opened file is not ``expect`` (replaced, truncated or rewritten).
        ValueError: an option is out of range. TypeError: an unknown option.
    """
    cfg = cfg if cfg is not None else settings()
    name = (backend or cfg.backend or "auto").lower()
    if name == "auto" and wholly_cached(path):
        name, options["all_cached"] = "threads", True  # the reader's residency snapshot need not ask again
    return _REGISTRY[resolve_backend(name, cfg)](path, cfg=cfg, expect=expect, **options)


def open_pack_reader(wm, backend: str | None = None, *, cfg: Settings | None = None, **options) -> Reader:
    """The reader of a load's weight map: the file's own (:func:`open_reader`, identity checked against
    ``wm.file_id``), or for a sharded pack's merged map (:class:`~flashpack.source.ShardedWeightMap`) a
    :class:`~flashpack.io.multi.ShardsReader` over one reader per shard, each checked against its shard's
    identity, with the queue depth and threads split between them (the load keeps as many reads in flight
    as a one-file load).

    Raises:
        As :func:`open_reader`, naming the shard that failed.
    """
    cfg = cfg if cfg is not None else settings()
    if not isinstance(wm, ShardedWeightMap):
        return open_reader(wm.path, backend, expect=wm.file_id, cfg=cfg, **options)

    def one(shard, n):
        opts = dict(options)
        opts.setdefault("queue_depth", split_count(cfg.queue_depth, n))
        opts.setdefault("threads", split_count(cfg.threads, n))
        return open_reader(shard.path, backend, expect=shard.file_id, cfg=cfg, **opts)

    return ShardsReader(wm, one)


__all__ = ["AUTO_ORDER", "BackendInfo", "Completion", "Extent", "FileIdentity", "MAX_QUEUE_DEPTH", "Reader",
           "ReaderStats", "backend_info", "backends", "c_error", "open_pack_reader", "open_reader", "read_all",
           "resolve_backend", "wholly_cached"]
