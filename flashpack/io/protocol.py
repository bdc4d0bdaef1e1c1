"""What every reader backend is: the :class:`Reader` protocol, the records it takes and returns, and the
one helper that turns a negative C return into an ``OSError``.

A reader reads *extents* (a byte range of one file into a caller-owned writable buffer):

* ``submit(extents)`` queues extents; it does not block on I/O.
* ``wait(timeout_s=None)`` blocks until at least one submitted extent is finished (or ``timeout_s``
  seconds pass) and returns the finished ones as :class:`Completion` (``error`` is ``None`` or the
  exception for that extent); it returns ``[]`` at once when nothing is in flight.
* ``in_flight``: extents submitted and not yet returned by ``wait``.
* ``cancel_pending()``: extents not yet started complete with ``concurrent.futures.CancelledError``.
* ``close()`` drains every read in flight, then releases threads, rings and descriptors; idempotent.
  A reader is also a context manager that closes on exit.
* ``features``: the named capabilities active in this reader (``"o_direct"`` or ``"buffered"``,
  ``"queue_depth=N"``, ``"threads=N"``, ``"registered_files"``, ...), the same names
  :func:`flashpack.io.backends` reports for a reader opened now.

Options, with the same name and meaning in every backend (a backend that has no use for one accepts
and ignores it, so one set of options suits all):

=====================  ===========================================================================
``direct``             ``auto``/``on``/``off`` O_DIRECT policy (default ``FLASHPACK_DIRECT``)
``queue_depth``        extents in flight at once, 1 to ``MAX_QUEUE_DEPTH`` (``FLASHPACK_QUEUE_DEPTH``)
``threads``            worker threads: the ``threads`` backend's readers, ``uring``'s page-cache
                       copiers (``FLASHPACK_THREADS``)
``registered_buffers`` ``uring``: READ_FIXED into registered buffers (``FLASHPACK_URING_BUFFERS``)
``registered_files``   ``uring``: register the descriptors with the ring (``FLASHPACK_URING_FILES``)
``cache``              ``bypass`` (default: the ``direct`` policy, O_DIRECT for uncached ranges) or
                       ``keep`` (read through the page cache, each extent read ahead by a
                       :class:`~flashpack.io.pagecache.Prefetcher` as it is queued);
                       loads resolve ``FLASHPACK_CACHE`` (``auto``) into one of the two
=====================  ===========================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, runtime_checkable


@dataclass(eq=False)
class Extent:
    """Read ``nbytes`` bytes at file byte ``file_offset`` into ``dest[:nbytes]``.

    ``dest`` is a writable C-contiguous buffer that the caller keeps alive and untouched until the
    extent's completion is returned. ``tag`` is the caller's, returned unchanged.

    ``hasher`` (optional, e.g. ``xxhash.xxh3_64``): a reader that copies in worker threads hashes
    ``dest[:hash_nbytes]`` there, piece by piece as it lands (still in the CPU cache), and sets ``digest`` to
    ``hasher().intdigest()`` before the completion is returned. A reader that does not (reads completed by the
    kernel, a failed read) leaves ``digest`` ``None``: the caller hashes the bytes itself.
    """

    file_offset: int
    nbytes: int
    dest: memoryview
    tag: Any = None
    hasher: Callable[[], Any] | None = None
    hash_nbytes: int = 0
    digest: int | None = None


@dataclass(eq=False)
class Completion:
    """One finished extent; ``error`` is ``None`` or why it failed (a ``ReadError``, ``ValueError``...)."""

    extent: Extent
    error: BaseException | None = None


@dataclass
class ReaderStats:
    """Byte counts of one reader; ``bytes_read`` is what came from the file for this load.

    ``bytes_prefetched``: bytes read ahead into the page cache (``cache="keep"``) before their copy, and
    ``prefetch`` how (``"populate_read"``, ``"willneed"``, ``""`` when nothing was). ``bytes_filled``: of
    ``bytes_buffered``, those copied from the page cache with userfaultfd's ``UFFDIO_COPY`` (:mod:`flashpack.io.uffd`).
    ``extents_native``: of ``extents``, those a worker thread handed to the C copy (``fp_copy_extent``,
    native/fp_copy.c: copied and hashed in one call; a fill that stopped partway is finished by the Python steps).
    """

    bytes_direct: int = 0
    bytes_buffered: int = 0
    extents: int = 0
    direct_fallbacks: int = 0
    bytes_prefetched: int = 0
    prefetch: str = ""
    bytes_filled: int = 0
    extents_native: int = 0

    @property
    def bytes_read(self) -> int:
        return self.bytes_direct + self.bytes_buffered

    def add(self, other: "ReaderStats") -> None:
        self.bytes_direct += other.bytes_direct
        self.bytes_buffered += other.bytes_buffered
        self.extents += other.extents
        self.direct_fallbacks += other.direct_fallbacks
        self.bytes_prefetched += other.bytes_prefetched
        self.prefetch = other.prefetch or self.prefetch
        self.bytes_filled += other.bytes_filled
        self.extents_native += other.extents_native


@runtime_checkable
class Reader(Protocol):
    """A reader of one file (see the module docstring). Not thread-safe: one thread drives a reader."""

    name: str
    stats: ReaderStats

    @property
    def path(self) -> str: ...

    @property
    def file_nbytes(self) -> int: ...

    @property
    def features(self) -> frozenset[str]: ...

    @property
    def in_flight(self) -> int: ...

    def submit(self, extents: Iterable[Extent]) -> None: ...

    def wait(self, timeout_s: float | None = None) -> list[Completion]: ...

    def cancel_pending(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Reader": ...

    def __exit__(self, *exc: object) -> None: ...


def c_error(rc: int, what: str, path: str | os.PathLike | None = None, cls: type[OSError] = OSError) -> OSError:
    """The exception for a C function's negative return ``rc`` (``-errno``).

    Args:
        rc: the return value, < 0.
        what: what failed, e.g. ``"io_uring submit"``; the message is ``"<what> failed: <strerror>"``.
        path: the file involved, set as ``filename``.
        cls: ``OSError`` or a subclass taking ``(errno, message, filename)`` (``ReadError``).

    Returns:
        ``cls(-rc, message, path)`` with ``errno`` set.
    """
    err = -rc
    return cls(err, f"{what} failed: {os.strerror(err)}", None if path is None else os.fspath(path))
