"""Pure functions: weight map -> the byte regions to read, the read extents, and where each lands; and the
share arithmetic of distributed loads (which rank reads which part of the destination).

A load reads a set of *regions* (4096-aligned file ranges, merged where they touch) into one
destination buffer laid end to end; each region is cut into *extents* of at most ``extent_nbytes``
(one read request each), starting afresh at each checksum chunk when verifying. Checksum *chunks* are verified
once every extent overlapping them is in.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Iterable

from .format import Chunk, WeightMap
from .settings import PAGE_NBYTES


def round_down(n: int, a: int = PAGE_NBYTES) -> int:
    return n - n % a


def round_up(n: int, a: int = PAGE_NBYTES) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Region:
    """File bytes ``[file_offset, file_offset + nbytes)`` land at ``buffer_offset`` of the destination.
    ``file_offset`` and ``nbytes`` are multiples of 4096 (the end may lie past EOF; reads are clipped)."""

    file_offset: int
    nbytes: int
    buffer_offset: int


@dataclass(frozen=True)
class ReadExtent:
    """One read request: ``nbytes`` at ``file_offset`` into ``buffer_offset``; ``chunks`` are the indices
    (into :attr:`LoadPlan.chunks`) of the checksum chunks it overlaps."""

    file_offset: int
    nbytes: int
    buffer_offset: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class LoadPlan:
    regions: tuple[Region, ...]
    extents: tuple[ReadExtent, ...]
    chunks: tuple[Chunk, ...]
    #: For each chunk, how many extents overlap it (verify when that many have completed).
    chunk_extent_counts: tuple[int, ...]
    buffer_nbytes: int

    @functools.cached_property
    def _region_starts(self) -> list[int]:
        # computed once: buffer_offset runs once per tensor, and a partial load can have many regions
        return [r.file_offset for r in self.regions]

    @property
    def read_nbytes(self) -> int:
        return sum(e.nbytes for e in self.extents)

    def buffer_offset(self, file_offset: int) -> int:
        """Where file byte ``file_offset`` lands in the destination buffer.

        Raises:
            KeyError: the byte is not in any region of this plan.
        """
        i = bisect.bisect_right(self._region_starts, file_offset) - 1
        if i < 0 or file_offset >= self.regions[i].file_offset + self.regions[i].nbytes:
            raise KeyError(file_offset)
        r = self.regions[i]
        return r.buffer_offset + file_offset - r.file_offset


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted((round_down(lo), round_up(hi)) for lo, hi in ranges if hi > lo):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def make_plan(wm: WeightMap, keys: Iterable[str] | None = None, *, extent_nbytes: int, verify: bool) -> LoadPlan:
    """Plan the reads of a load.

    Args:
        wm: a validated weight map.
        keys: stored keys to load (aliases already resolved to their targets); ``None`` for all.
        extent_nbytes: most bytes per read request (a multiple of 4096).
        verify: read whole checksum chunks around the wanted tensors so they can be verified.

    Returns:
        A :class:`LoadPlan`; its ``buffer_nbytes`` is a multiple of 4096.
    """
    all_chunks = list(wm.chunks())
    if keys is None:
        wanted_spans = [(b.offset, b.offset + b.nbytes) for b in wm.blocks]
    else:
        wanted_spans = [(wm.tensors[k].offset, wm.tensors[k].offset + wm.tensors[k].nbytes)
                        for k in keys if wm.tensors[k].nbytes]
    checks = verify and wm.checksum_algorithm is not None
    if checks:
        merged = _merge(wanted_spans)  # sorted, disjoint: one bisect per chunk instead of a scan of every span
        starts = [lo for lo, _ in merged]

        def wanted(c) -> bool:
            i = bisect.bisect_left(starts, c.offset + c.nbytes) - 1  # last span starting before the chunk ends
            return i >= 0 and merged[i][1] > c.offset

        chunks = [c for c in all_chunks if wanted(c)]
        spans = [(c.offset, c.offset + c.nbytes) for c in chunks]
    else:
        chunks, spans = [], wanted_spans

    regions: list[Region] = []
    extents: list[ReadExtent] = []
    pos = 0
    # verifying: extents also start where each chunk starts (4096-aligned: blocks are, chunk_nbytes is a multiple),
    # so with extent_nbytes >= chunk_nbytes an extent holds one whole chunk that its reader can hash as it lands
    chunk_starts = [c.offset for c in chunks]
    for lo, hi in _merge(spans):
        regions.append(Region(lo, hi - lo, pos))
        cuts = [lo, *chunk_starts[bisect.bisect_right(chunk_starts, lo):bisect.bisect_left(chunk_starts, hi)]]
        for a, b in zip(cuts, cuts[1:] + [hi]):
            for off in range(a, b, extent_nbytes):
                end = min(off + extent_nbytes, b, wm.file_nbytes)
                if end > off:
                    extents.append(ReadExtent(off, end - off, pos + off - lo, ()))
        pos += hi - lo

    counts = [0] * len(chunks)
    if chunks:
        starts = [c.offset for c in chunks]
        linked = []
        for e in extents:
            i = max(0, bisect.bisect_right(starts, e.file_offset) - 1)
            ids = []
            while i < len(chunks) and chunks[i].offset < e.file_offset + e.nbytes:
                c = chunks[i]
                if c.offset + c.nbytes > e.file_offset:
                    ids.append(i)
                    counts[i] += 1
                i += 1
            linked.append(ReadExtent(e.file_offset, e.nbytes, e.buffer_offset, tuple(ids)))
        extents = linked
    return LoadPlan(tuple(regions), tuple(extents), tuple(chunks), tuple(counts), pos)


# --------------------------------------------------------------------------- shares of a distributed load


def share_nbytes(buffer_nbytes: int, world: int) -> int:
    """Bytes of each rank's share of a ``buffer_nbytes`` destination: ``ceil(B / W)`` rounded up to 4096."""
    return round_up(-(-buffer_nbytes // world), PAGE_NBYTES) if buffer_nbytes else 0


def share_bounds(buffer_nbytes: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s share in destination-buffer bytes (both multiples of 4096 or the end)."""
    s = share_nbytes(buffer_nbytes, world)
    return min(rank * s, buffer_nbytes), min((rank + 1) * s, buffer_nbytes)


def chunk_offsets(plan: LoadPlan) -> list[int]:
    """Where each of ``plan.chunks`` starts in destination-buffer bytes (one bisect per chunk)."""
    starts = [r.file_offset for r in plan.regions]
    out = []
    for c in plan.chunks:
        r = plan.regions[bisect.bisect_right(starts, c.offset) - 1]
        out.append(r.buffer_offset + c.offset - r.file_offset)
    return out


def share_plan(plan: LoadPlan, lo: int, hi: int) -> tuple[LoadPlan, list[tuple[Chunk, int]]]:
    """The part of ``plan`` that lands in buffer bytes ``[lo, hi)``, re-based so ``lo`` is byte 0.

    Returns:
        ``(sub, later)``: ``sub`` reads exactly the plan's file bytes that land in the share and verifies
        the chunks lying wholly inside it; ``later`` lists ``(chunk, buffer offset)`` for the chunks that
        start inside the share but end after it (verified once the exchange has brought their tail).
    """
    regions, extents = [], []
    for r in plan.regions:
        a, b = max(lo, r.buffer_offset), min(hi, r.buffer_offset + r.nbytes)
        if a < b:
            regions.append(Region(r.file_offset + a - r.buffer_offset, b - a, a - lo))
    for e in plan.extents:
        a, b = max(lo, e.buffer_offset), min(hi, e.buffer_offset + e.nbytes)
        if a < b:
            extents.append((e.file_offset + a - e.buffer_offset, b - a, a - lo))
    inside: list[tuple[Chunk, int]] = []
    later: list[tuple[Chunk, int]] = []
    for c, a in zip(plan.chunks, chunk_offsets(plan)):
        if lo <= a < hi:
            (inside if a + c.nbytes <= hi and c.nbytes else later).append((c, a - lo))
    starts = [a for _, a in inside]  # increasing: chunks and regions are both in file order
    counts = [0] * len(inside)
    linked = []
    for f, n, bo in extents:
        i = max(0, bisect.bisect_right(starts, bo) - 1)
        ids = []
        while i < len(inside) and starts[i] < bo + n:
            if starts[i] + inside[i][0].nbytes > bo:
                ids.append(i)
                counts[i] += 1
            i += 1
        linked.append(ReadExtent(f, n, bo, tuple(ids)))
    sub = LoadPlan(tuple(regions), tuple(linked), tuple(c for c, _ in inside), tuple(counts), hi - lo)
    return sub, [(c, a + lo) for c, a in later]
