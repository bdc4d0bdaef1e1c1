"""Host loads: a plan's extents read by a reader straight into page-aligned CPU memory (filled with userfaultfd's
``UFFDIO_COPY`` from the page cache when the destination is a :class:`~flashpack.io.uffd.FillRegion`), checksum
chunks verified as their extents complete, hashed by the reader's worker threads as the bytes land where an extent
holds a whole chunk (:func:`read_into`); or the zero-copy mode, a private copy-on-write mapping of the file
(:func:`mmap_payload`)."""

from __future__ import annotations

import os

import torch
import xxhash

from ..format import WeightMap, check_chunk_digest, verify_chunk
from ..io import Extent, open_pack_reader, read_all
from ..io.multi import counted
from ..plan import LoadPlan, Region
from ..settings import Settings
from ..source import check_same_file, open_regular, pread_into
from .common import LoadStats


def _extents(plan: LoadPlan, buf: memoryview, verify: bool = False) -> list[Extent]:
    """The reader's extents of ``plan`` into ``buf``; with ``verify``, an extent that starts where a checksum chunk
    starts and holds all of it (and no other) asks its reader to hash the chunk as it lands (``Extent.hasher``)."""
    out = []
    for i, e in enumerate(plan.extents):
        ext = Extent(e.file_offset, e.nbytes, buf[e.buffer_offset:e.buffer_offset + e.nbytes], i)
        if verify and len(e.chunks) == 1:
            c = plan.chunks[e.chunks[0]]
            if c.digest is not None and c.offset == e.file_offset and 0 < c.nbytes <= e.nbytes \
                    and plan.chunk_extent_counts[e.chunks[0]] == 1:
                ext.hasher, ext.hash_nbytes = xxhash.xxh3_64, c.nbytes
        out.append(ext)
    return out


#: Destination bytes pre-faulted (``populate``) ahead of the reads submitted into them, per step.
WINDOW_NBYTES = 64 * 1024 * 1024


def _read_windowed(reader, plan: LoadPlan, extents: list[Extent], on_complete, populate) -> None:
    """:func:`flashpack.io.read_all` that submits the extents one destination window at a time, each window
    pre-faulted by ``populate(buffer_offset, nbytes)`` first (in this thread, while the reader reads the
    windows before it), and verifies completions between windows. Errors as ``read_all``: the first one is
    raised after every in-flight read has finished."""
    first: BaseException | None = None

    def handle(completions) -> None:
        nonlocal first
        for c in completions:
            if c.error is not None:
                first = first or c.error
            elif first is None and on_complete is not None:
                try:
                    on_complete(c.extent)
                except BaseException as e:  # noqa: BLE001 - raised after draining
                    first = e

    try:
        i, n = 0, len(extents)
        while i < n and first is None:
            lo = plan.extents[extents[i].tag].buffer_offset
            j, hi = i, lo
            while j < n and (j == i or hi - lo < WINDOW_NBYTES):
                e = plan.extents[extents[j].tag]
                hi = max(hi, e.buffer_offset + e.nbytes)
                j += 1
            populate(lo, hi - lo)
            reader.submit(extents[i:j])
            i = j
            handle(reader.wait(0))
        while reader.in_flight:
            if first is not None:
                reader.cancel_pending()
            handle(reader.wait())
    except BaseException:
        reader.close()  # KeyboardInterrupt while waiting: drain before propagating
        raise
    if first is not None:
        raise first


def read_into(wm: WeightMap, plan: LoadPlan, dest: torch.Tensor, *, backend: str | None, verify: bool,
              stats: LoadStats, cfg: Settings, populate=None, progress=None, cache: str = "bypass",
              fill=None) -> None:
    """Read a plan's extents into ``dest``, verifying chunks as they complete.

    Args:
        wm, plan: the weight map (its ``file_id`` is checked against the opened file) and the plan.
        dest: a page-aligned CPU uint8 tensor of at least ``plan.buffer_nbytes`` bytes.
        backend: the reader (``None``: ``cfg.backend``); verify: check checksum chunks; stats: filled in.
        cfg: the load's settings.
        populate: ``populate(buffer_offset, nbytes)`` pre-faults destination bytes
            (:meth:`flashpack.loading.memory.HostBuffer.populate`); when given, extents are submitted one
            64 MiB window at a time, each populated first. ``None``: all at once, faulted by the reads.
        progress: ``None`` or a :class:`flashpack.progress.Progress` told the bytes of each finished extent.
        cache: the reader's page-cache mode, ``"bypass"`` or ``"keep"`` (:func:`flashpack.loading.common.cache_mode`).
        fill: ``None``, or the :class:`~flashpack.io.uffd.FillRegion` ``dest`` lies in (``cache="keep"``): the
            reader fills it with ``UFFDIO_COPY``; it is released here once every read has finished (or failed),
            so ``dest`` is ordinary memory when this returns or raises.

    Raises:
        ChecksumMismatchError, ReadError (``ESTALE`` when the file changed since its weight map was read),
        BackendUnavailableError. Every in-flight read has finished before an error propagates.
    """
    if not plan.extents:
        if fill is not None:
            fill.release()
        return
    remaining = list(plan.chunk_extent_counts)

    def done(ext: Extent) -> None:
        for ci in plan.extents[ext.tag].chunks:
            remaining[ci] -= 1
            if remaining[ci] == 0:
                c = plan.chunks[ci]
                if ext.digest is not None and ext.hash_nbytes == c.nbytes:  # hashed by the reader as it landed
                    check_chunk_digest(wm, c, ext.digest)
                    stats.chunks_hashed_by_reader += 1
                else:
                    bo = plan.buffer_offset(c.offset)
                    verify_chunk(wm, c, buf[bo:bo + c.nbytes])
                stats.chunks_verified += 1

    try:
        buf = memoryview(dest.numpy()).cast("B")
        with open_pack_reader(wm, backend, cfg=cfg, cache=cache, **({} if fill is None else {"fill": fill})) \
                as reader:  # a sharded pack: every shard in one load
            stats.backend = reader.name
            try:
                counting = counted(reader, progress)
                if populate is None:
                    read_all(counting, _extents(plan, buf, verify), done if verify else None)
                else:
                    _read_windowed(counting, plan, _extents(plan, buf, verify), done if verify else None, populate)
            finally:
                stats.add_reader(reader.stats)
    finally:
        if fill is not None:
            fill.release()  # after every read: nothing may touch a still-registered missing page


def mmap_payload(wm: WeightMap, plan: LoadPlan, verify: bool, stats: LoadStats) -> tuple[torch.Tensor, LoadPlan]:
    """Zero-copy: a private copy-on-write mapping of the whole file; the plan is re-based on it.

    Returns:
        ``(whole file as a CPU uint8 tensor, the plan with every region at its file offset)``.

    Raises:
        ReadError (``ESTALE``): the file changed since its weight map was read; (``EIO`` and others) a chunk
        could not be read while verifying. ChecksumMismatchError. NotARegularFileError.

    Notes:
        With ``verify``, every checksum chunk is read with ``pread(2)`` into a scratch buffer and checked
        before the mapping is handed out, so a damaged or unreadable file (EIO) is a named error, not a
        SIGBUS. Pages are still mapped lazily afterwards: if the file is truncated, or a page becomes
        unreadable, while the mapping is alive, touching that page raises SIGBUS and kills the process (mmap(2)).
    """
    fd, _ = open_regular(wm.path)
    try:
        check_same_file(wm, fd)
        if verify:
            stats.chunks_verified += _verify_by_pread(wm, plan, fd)
        # map the very file just checked (its /proc/self/fd link), not whatever the path names by now
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=False, nbytes=wm.file_nbytes)
    finally:
        os.close(fd)
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    rebased = LoadPlan(tuple(Region(r.file_offset, r.nbytes, r.file_offset) for r in plan.regions), (), plan.chunks,
                       plan.chunk_extent_counts, wm.file_nbytes)
    stats.backend = "mmap"
    return whole, rebased


def _verify_by_pread(wm: WeightMap, plan: LoadPlan, fd: int) -> int:
    """Read each of the plan's checksum chunks with preadv(2) into one scratch buffer and verify it; returns
    the number verified. Raises ReadError naming file and offset (a read error, or a short read: source.pread_into)."""
    if not plan.chunks:
        return 0
    scratch = memoryview(bytearray(max(c.nbytes for c in plan.chunks)))
    for c in plan.chunks:
        pread_into(fd, scratch[:c.nbytes], c.offset, wm.path)
        verify_chunk(wm, c, scratch[:c.nbytes])
    return len(plan.chunks)


__all__ = ["mmap_payload", "read_into"]
