"""Host loads: a plan's extents read by a reader straight into page-aligned CPU memory, checksum chunks
verified as their extents complete (:func:`read_into`); or the zero-copy mode, a private copy-on-write
mapping of the file (:func:`mmap_payload`)."""

from __future__ import annotations

import os

import torch

from ..format import WeightMap, verify_chunk
from ..io import Extent, open_pack_reader, read_all
from ..io.multi import counted
from ..plan import LoadPlan, Region
from ..settings import Settings
from ..source import check_same_file
from .common import LoadStats


def _extents(plan: LoadPlan, buf: memoryview) -> list[Extent]:
    return [Extent(e.file_offset, e.nbytes, buf[e.buffer_offset:e.buffer_offset + e.nbytes], i)
            for i, e in enumerate(plan.extents)]


def read_into(wm: WeightMap, plan: LoadPlan, dest: torch.Tensor, *, backend: str | None, verify: bool,
              stats: LoadStats, cfg: Settings, progress=None) -> None:
    """Read a plan's extents into ``dest``, verifying chunks as they complete.

    Args:
        wm, plan: the weight map (its ``file_id`` is checked against the opened file) and the plan.
        dest: a page-aligned CPU uint8 tensor of at least ``plan.buffer_nbytes`` bytes.
        backend: the reader (``None``: ``cfg.backend``); verify: check checksum chunks; stats: filled in.
        cfg: the load's settings.
        progress: ``None`` or a :class:`flashpack.progress.Progress` told the bytes of each finished extent.

    Raises:
        ChecksumMismatchError, ReadError (``ESTALE`` when the file changed since its weight map was read),
        BackendUnavailableError. Every in-flight read has finished before an error propagates.
    """
    if not plan.extents:
        return
    buf = memoryview(dest.numpy()).cast("B")
    remaining = list(plan.chunk_extent_counts)

    def done(ext: Extent) -> None:
        for ci in plan.extents[ext.tag].chunks:
            remaining[ci] -= 1
            if remaining[ci] == 0:
                c = plan.chunks[ci]
                bo = plan.buffer_offset(c.offset)
                verify_chunk(wm, c, buf[bo:bo + c.nbytes])
                stats.chunks_verified += 1

    with open_pack_reader(wm, backend, cfg=cfg) as reader:  # a sharded pack: every shard in one load
        stats.backend = reader.name
        try:
            read_all(counted(reader, progress), _extents(plan, buf), done if verify else None)
        finally:
            stats.add_reader(reader.stats)


def mmap_payload(wm: WeightMap, plan: LoadPlan, verify: bool, stats: LoadStats) -> tuple[torch.Tensor, LoadPlan]:
    """Zero-copy: a private copy-on-write mapping of the whole file; the plan is re-based on it.

    Returns:
        ``(whole file as a CPU uint8 tensor, the plan with every region at its file offset)``.

    Raises:
        ReadError (``ESTALE``): the file changed since its weight map was read. ChecksumMismatchError.

    Notes:
        If the file is truncated, or a page cannot be read (EIO), while the mapping is alive, touching
        that page raises SIGBUS and kills the process (mmap(2)).
    """
    fd = os.open(wm.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        check_same_file(wm, fd)
        # map the very file just checked (its /proc/self/fd link), not whatever the path names by now
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=False, nbytes=wm.file_nbytes)
    finally:
        os.close(fd)
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    rebased = LoadPlan(tuple(Region(r.file_offset, r.nbytes, r.file_offset) for r in plan.regions), (), plan.chunks,
                       plan.chunk_extent_counts, wm.file_nbytes)
    stats.backend = "mmap"
    if verify:
        mv = memoryview(whole.numpy()).cast("B")
        for c in plan.chunks:
            verify_chunk(wm, c, mv[c.offset:c.offset + c.nbytes])
            stats.chunks_verified += 1
    return whole, rebased


__all__ = ["mmap_payload", "read_into"]
