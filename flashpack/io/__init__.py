"""Reader backends: a small registry, ``backends()`` to see what runs here, ``open_reader`` to get one.

=============  ==============================================================================
``uring``      io_uring through the cffi shim in ``native/`` (needs liburing at build time and a
               kernel and container that allow io_uring)
``threads``    a thread pool of O_DIRECT ``preadv(2)`` calls; always available on Linux
=============  ==============================================================================

``backend="auto"`` (or ``FLASHPACK_BACKEND=auto``) takes ``uring`` when it is available, else
``threads`` with one log line naming why io_uring could not be used; a backend named explicitly
never falls back: it raises :class:`~flashpack.errors.BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import BackendUnavailableError
from ..settings import settings
from .base import Completion, Extent, Reader, ReaderStats, notice_once, read_all

#: Backend name -> module; each module has ``probe() -> (available, reason)`` and a Reader class.
_REGISTRY = {"uring": ("flashpack.io.uring", "UringReader"), "threads": ("flashpack.io.threads", "ThreadsReader")}
#: ``auto`` tries these in order.
AUTO_ORDER = ("uring", "threads")


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str
    features: frozenset[str] = frozenset()


def _module(name: str):
    try:
        return importlib.import_module(_REGISTRY[name][0]), ""
    except ImportError as e:
        return None, f"cannot import {_REGISTRY[name][0]}: {e}"


def backend_info(name: str) -> BackendInfo:
    """Probe one backend (cheap; cached by the backend module where the probe is costly)."""
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    mod, why = _module(name)
    if mod is None:
        return BackendInfo(name, False, why)
    ok, reason = mod.probe()
    feats = frozenset(getattr(mod, "probe_features", lambda: frozenset())()) if ok else frozenset()
    return BackendInfo(name, ok, reason, feats)


def backends() -> dict[str, BackendInfo]:
    """Every backend, with whether it can run here, why not, and its features."""
    return {name: backend_info(name) for name in _REGISTRY}


def resolve_backend(backend: str | None = None) -> str:
    """Turn ``"auto"``/``None`` (or ``FLASHPACK_BACKEND``) into a backend name that can run here.

    Raises:
        BackendUnavailableError: a backend named explicitly cannot run; the message gives the reason.
    """
    name = (backend or settings().backend or "auto").lower()
    if name != "auto":
        info = backend_info(name)
        if not info.available:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {info.reason}")
        return name
    for cand in AUTO_ORDER:
        info = backend_info(cand)
        if info.available:
            return cand
        if cand == "uring":
            notice_once("auto-uring", f"flashpack: io_uring unavailable ({info.reason}); using the threads backend")
    raise BackendUnavailableError("no reader backend can run here")  # pragma: no cover - threads always can


def open_reader(path, backend: str | None = None, *, expect=None, cfg=None, **options) -> Reader:
    """Open ``path`` with a backend (``auto``, ``uring`` or ``threads``).

    Raises:
        BackendUnavailableError, OSError; ReadError (ESTALE) when ``expect`` is not the opened file's identity.
    """
    name = resolve_backend(backend)
    mod, _ = _module(name)
    reader = getattr(mod, _REGISTRY[name][1])(path, **options)
    if expect is not None:
        from ..source import check_same_file  # TEMPORARY until the io rework lands

        class _W:
            file_id = expect
            path = reader.path
        try:
            check_same_file(_W, reader.files.fd)
        except BaseException:
            reader.close()
            raise
    return reader


__all__ = ["BackendInfo", "Completion", "Extent", "Reader", "ReaderStats", "backend_info", "backends",
           "open_reader", "read_all", "resolve_backend"]
