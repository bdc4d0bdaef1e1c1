"""The ``threads`` backend: a pool of threads, each issuing large ``preadv(2)`` calls.

Each worker reads one whole extent at a time (:func:`flashpack.io.base.read_extent`): O_DIRECT into
the destination for cold, aligned ranges, buffered for cached ranges and tails. ``os.preadv``
releases the GIL, so the workers' reads overlap with each other and with the caller's work.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from typing import Iterable

from ..settings import settings
from .base import Completion, Extent, Reader, ReaderStats, collect_futures, read_extent


def probe() -> tuple[bool, str]:
    """Always available: it needs only ``os.preadv`` (Linux, Python >= 3.7)."""
    return (hasattr(os, "preadv"), "os.preadv is missing on this platform" if not hasattr(os, "preadv") else "")


class ThreadsReader(Reader):
    """Args: ``path``; ``direct`` (``auto``/``on``/``off``); ``threads`` workers (also the queue depth).

    Raises:
        OSError: the file cannot be opened.
    """

    name = "threads"

    def __init__(self, path, *, direct: str | None = None, threads: int | None = None, queue_depth: int | None = None):
        cfg = settings()
        super().__init__(path, direct=direct or cfg.direct)
        self.threads = threads or queue_depth or cfg.threads
        self._pool = cf.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flashpack-read")
        self._pending: dict[cf.Future, Extent] = {}

    @property
    def features(self) -> frozenset[str]:
        return super().features | {f"threads={self.threads}"}

    def _work(self, ext: Extent) -> ReaderStats:
        st = ReaderStats()
        read_extent(self.files, ext, st)
        return st

    def submit(self, extents: Iterable[Extent]) -> None:
        for ext in extents:
            self._pending[self._pool.submit(self._work, ext)] = ext

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        return collect_futures(self._pending, timeout_s, self.stats)

    def cancel_pending(self) -> None:
        for fut in self._pending:
            fut.cancel()

    def _close(self) -> None:
        self.cancel_pending()
        self._pool.shutdown(wait=True)
        self._pending.clear()
