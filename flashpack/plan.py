"""Pure functions: weight map -> the byte regions to read, the read extents, and where each lands.

A load reads a set of *regions* (4096-aligned file ranges, merged where they touch) into one
destination buffer laid end to end; each region is cut into *extents* of at most ``extent_nbytes``
(one read request each). Checksum *chunks* are verified once every extent overlapping them is in.
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
    for lo, hi in _merge(spans):
        regions.append(Region(lo, hi - lo, pos))
        for off in range(lo, hi, extent_nbytes):
            end = min(off + extent_nbytes, hi, wm.file_nbytes)
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
