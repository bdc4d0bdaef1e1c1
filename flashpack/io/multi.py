"""Several files read as one: :class:`ShardsReader` drives one reader per shard of a sharded pack together,
behind the ordinary :class:`~flashpack.io.protocol.Reader` protocol, over the *virtual* offsets of a merged
weight map (:class:`~flashpack.source.ShardedWeightMap`: shard ``i`` at ``[bases[i], bases[i] + size)``).

Why one reader per shard driven together, rather than an extent that names its file: every consumer of a
plan (the host load, the staging scheduler, distributed shares, verification) already speaks "extent at a
file offset" against one reader; a merged map with virtual offsets keeps all of them unchanged, and each
backend keeps its own per-file state (O_DIRECT descriptor, page-cache residency map, identity check,
registered files). ``submit`` routes each extent to its shard's reader; ``wait`` collects from every reader
with reads in flight (each backend only refills its queue inside ``wait``/``submit``, so all are polled:
a non-blocking pass over all, then short blocking slices in turn). The queue depth and threads of the load
are split between the shards, so the whole load keeps the same number of reads in flight as a one-file load.

An extent never crosses shards (the merged map leaves a gap between them); the part of an extent past its
shard's end (page rounding of the last region) is not read, as a one-file reader clips reads at EOF.
"""

from __future__ import annotations

import time
from typing import Iterable

from ..source import ShardedWeightMap, shard_maps
from .protocol import Completion, Extent, Reader, ReaderStats

#: Longest blocking wait on one shard's reader while others also have reads in flight, in seconds.
SLICE_S = 0.001


class ShardsReader:
    """A :class:`~flashpack.io.protocol.Reader` over the virtual offsets of a merged weight map.

    Args:
        wm: a :class:`~flashpack.source.ShardedWeightMap`.
        open_one: ``open_one(shard_map, share_of_readers)`` opens the reader of one shard (its identity
            checked against ``shard_map.file_id``); ``share_of_readers`` is the shard count, to split the
            queue depth and threads by.

    Errors of a shard's read name the shard's file (they come from its own reader).
    """

    name = "shards"

    def __init__(self, wm: ShardedWeightMap, open_one):
        self._wm = wm
        self._readers: list[Reader] = []
        try:
            for shard, _ in shard_maps(wm):
                self._readers.append(open_one(shard, len(wm.shards)))
        except BaseException:
            self.close()
            raise
        self.name = self._readers[0].name if self._readers else "shards"
        self._ready: list[Completion] = []
        self._turn = 0
        self._closed = False

    @property
    def readers(self) -> list[Reader]:
        """One reader per shard, in shard order."""
        return list(self._readers)

    @property
    def stats(self) -> ReaderStats:
        total = ReaderStats()
        for r in self._readers:
            total.add(r.stats)
        return total

    @property
    def path(self) -> str:
        return self._wm.path

    @property
    def file_nbytes(self) -> int:
        return self._wm.file_nbytes

    @property
    def features(self) -> frozenset[str]:
        out: set[str] = {f"shards={len(self._readers)}"}
        for r in self._readers:
            out |= r.features
        return frozenset(out)

    @property
    def in_flight(self) -> int:
        return len(self._ready) + sum(r.in_flight for r in self._readers)

    def submit(self, extents: Iterable[Extent]) -> None:
        if self._closed:
            raise ValueError("submit on a closed reader")
        per: dict[int, list[Extent]] = {}
        for e in extents:
            s, local = self._wm.locate(e.file_offset)
            size = self._wm.shards[s].file_nbytes
            n = max(0, min(e.nbytes, size - local))
            if n == 0:  # wholly past the shard's end: padding, nothing to read
                self._ready.append(Completion(e))
                continue
            hashed = e.hasher is not None and 0 < e.hash_nbytes <= n
            per.setdefault(s, []).append(Extent(local, n, e.dest[:n] if e.dest.nbytes != n else e.dest, e,
                                                e.hasher if hashed else None, e.hash_nbytes if hashed else 0))
        for s, exts in per.items():
            self._readers[s].submit(exts)

    @staticmethod
    def _outer(cs: list[Completion]) -> list[Completion]:
        for c in cs:
            c.extent.tag.digest = c.extent.digest
        return [Completion(c.extent.tag, c.error) for c in cs]

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        out, self._ready = self._ready, []
        active = [r for r in self._readers if r.in_flight]
        for r in active:
            out += self._outer(r.wait(0))
        if out or not active or timeout_s == 0:
            return out
        if len(active) == 1:
            return self._outer(active[0].wait(timeout_s))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            active = [r for r in self._readers if r.in_flight]
            if not active:
                return out
            self._turn = (self._turn + 1) % len(active)
            for i, r in enumerate(active[self._turn:] + active[:self._turn]):
                out += self._outer(r.wait(SLICE_S if i == 0 else 0))
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    def cancel_pending(self) -> None:
        for r in self._readers:
            r.cancel_pending()

    def close(self) -> None:
        """Close every shard's reader (each drains its reads first); idempotent."""
        self._closed = True
        first: BaseException | None = None
        for r in self._readers:
            try:
                r.close()
            except BaseException as e:  # noqa: BLE001 - every reader is closed, then the first error raised
                first = first or e
        self._ready = []
        if first is not None:
            raise first

    def __enter__(self) -> "ShardsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_count(value: int, shards: int) -> int:
    """``value`` (a queue depth or thread count) divided between ``shards`` readers, rounded up, at least 1."""
    return max(1, -(-value // max(1, shards)))


__all__ = ["CountingReader", "SLICE_S", "ShardsReader", "counted", "split_count"]


class CountingReader:
    """A reader that reports the bytes of each extent finished without error to ``add(nbytes)`` (a
    :meth:`flashpack.progress.Progress.add`); everything else is the wrapped reader's."""

    def __init__(self, reader: Reader, add):
        self._r = reader
        self._add = add

    def __getattr__(self, name):
        return getattr(self._r, name)

    @property
    def in_flight(self) -> int:
        return self._r.in_flight

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        out = self._r.wait(timeout_s)
        n = sum(c.extent.nbytes for c in out if c.error is None)
        if n:
            self._add(n)
        return out

    def __enter__(self) -> "CountingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._r.close()


def counted(reader: Reader, progress) -> Reader:
    """``reader`` itself when ``progress`` is ``None`` (or listens to nobody), else a :class:`CountingReader`."""
    if progress is None or not getattr(progress, "active", True):
        return reader
    return CountingReader(reader, progress.add)
