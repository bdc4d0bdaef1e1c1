"""Staged loads: file -> reader -> staging ring -> sink. :func:`load_payload_cuda` is what
``flashpack.load(path, device="cuda")`` (and ``assign_from_file``, ``from_flashpack``) call: it returns one CUDA
uint8 tensor holding the plan's regions, and the tensors of the state_dict are views onto it.
:func:`load_payload_staged` runs the same load into any sink (:class:`flashpack.testing.HostCopySink` on a
machine without a GPU)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..format import WeightMap
from ..io import open_pack_reader
from ..io.base import notice_once
from ..io.multi import counted
from ..plan import LoadPlan, round_up
from ..settings import Settings, settings
from ..source import ShardedWeightMap
from ..staging.ring import Pinner, Sink, StagingRing
from ..staging.mapped import MIN_RESIDENT_FRACTION, FileMapping, Registrar, run_mapped, window_bound
from ..staging.scheduler import Piece, cut_pieces, default_hash_threads, min_slot_nbytes, run_staged
from ..staging.sinks import CudaPinner, CudaRegistrar, CudaSink
from .common import LoadStats

#: Copy streams per CUDA load.
NUM_STREAMS = 2


def ring_shape(plan: LoadPlan, wm: WeightMap, cfg: Settings, slot_nbytes: int | None, num_slots: int | None,
               verify: bool):
    """(slot bytes, slots wanted, pieces): slots no larger than the plan needs and never smaller than
    a checksum chunk, so each chunk is verified on one slot.

    Raises:
        ValueError: ``slot_nbytes`` is not a positive multiple of 4096.
    """
    slot = slot_nbytes or cfg.slot_nbytes
    if slot % 4096 or slot <= 0:
        raise ValueError(f"slot_nbytes must be a positive multiple of 4096, got {slot}")
    if verify and plan.chunks:
        slot = max(slot, min_slot_nbytes(plan))
    slot = min(slot, round_up(plan.buffer_nbytes))
    pieces = cut_pieces(plan, slot, wm.file_nbytes)
    want = min(num_slots or cfg.num_slots, max(1, len(pieces)))
    return slot, want, pieces


def load_payload_staged(wm: WeightMap, plan: LoadPlan, sink: Sink, *, backend: str | None, verify: bool,
                        stats: LoadStats, cfg: Settings | None = None, slot_nbytes: int | None = None,
                        num_slots: int | None = None, pinner: Pinner | None = None,
                        hash_threads: int | None = None, pieces: Sequence[Piece] | None = None,
                        progress=None, cache: str = "bypass") -> StagingRing | None:
    """Run one staged load of ``plan`` into ``sink`` (the sink owns the destination).

    Args:
        wm, plan: the weight map and its plan (as :func:`flashpack.loading.common.prepare` makes them).
        sink: where slot bytes go; drained here, closed by the caller.
        backend, verify, stats: as for :func:`flashpack.load`; cfg: the load's settings (``None``: read now).
        slot_nbytes, num_slots: ring shape (default ``FLASHPACK_SLOT_NBYTES``/``FLASHPACK_NUM_SLOTS``).
        pinner: pins the ring (``None``: pageable slots).
        hash_threads: threads verifying the chunks of one slot (default: half the cores, at most 8).
        pieces: only these pieces of the plan (cut with the same ring shape; :func:`load_payload_mapped`
            passes the ones its windows did not copy); default every piece.
        progress: ``None`` or a :class:`flashpack.progress.Progress` told the bytes of each finished read.
        cache: the reader's page-cache mode, ``"bypass"`` or ``"keep"`` (:func:`flashpack.loading.common.cache_mode`).

    Returns:
        The (closed) ring, for inspection; ``None`` when the plan holds no bytes (nothing is allocated
        or pinned for an empty plan).

    Raises:
        Everything :func:`flashpack.load` raises; every read and copy has finished and every slot is
        back before an error propagates.
    """
    if plan.buffer_nbytes == 0 or not plan.regions:
        return None
    cfg = cfg or settings()
    slot, want, every = ring_shape(plan, wm, cfg, slot_nbytes, num_slots, verify)
    pieces = every if pieces is None else list(pieces)
    if not pieces:
        return None
    want = min(want, len(pieces))
    verify = verify and bool(plan.chunks)
    threads = default_hash_threads() if hash_threads is None else hash_threads
    ring = StagingRing(want, slot, pinner=pinner, cap_nbytes=cfg.pinned_cap_nbytes)
    try:
        with open_pack_reader(wm, backend, cfg=cfg, cache=cache) as reader:  # a sharded pack: every shard in one load
            stats.backend = reader.name
            try:
                stats.chunks_verified += run_staged(counted(reader, progress), wm, plan, pieces, ring, sink, verify=verify,
                                                    read_nbytes=min(cfg.extent_nbytes, slot), hash_threads=threads)
            finally:
                stats.add_reader(reader.stats)
    finally:
        ring.close()
    return ring


def load_payload_mapped(wm: WeightMap, plan: LoadPlan, sink: Sink, registrar: Registrar, *, backend: str | None,
                        verify: bool, stats: LoadStats, cfg: Settings | None = None, slot_nbytes: int | None = None,
                        num_slots: int | None = None, pinner: Pinner | None = None, hash_threads: int | None = None,
                        mapped: str = "auto", progress=None, cache: str = "bypass") -> str:
    """Load ``plan`` into ``sink`` from registered page-cache windows when the file is cached, else (and for
    whatever a refusal leaves) through the staging ring (:func:`load_payload_staged`).

    Args:
        sink: a :class:`~flashpack.staging.ring.Sink` that also has ``copy_from``
            (:class:`~flashpack.staging.mapped.WindowSink`); drained here, closed by the caller.
        registrar: registers windows with the device (:class:`flashpack.staging.sinks.CudaRegistrar`).
        mapped: ``"auto"``: windows when at least :data:`~flashpack.staging.mapped.MIN_RESIDENT_FRACTION` of
            the plan's pages are in the page cache (mincore(2)) and no reader ``backend`` was named;
            ``"on"``: windows whatever the cache holds (``madvise(MADV_POPULATE_READ)`` reads the rest);
            ``"off"``: the ring only. Windows are ring slots (``FLASHPACK_SLOT_NBYTES``), at most
            ``FLASHPACK_NUM_SLOTS`` registered at once (fewer under ``FLASHPACK_PINNED_CAP_NBYTES``).
        Others: as for :func:`load_payload_staged`.

    Returns:
        Which path carried the bytes: ``"mapped"``, ``"ring"``, ``"mapped+ring"`` (a refusal midway), or
        ``"none"`` (an empty plan). ``stats.backend`` is ``"mapped"`` when no reader ran.

    Raises:
        As :func:`flashpack.load`, and as :func:`flashpack.staging.mapped.run_mapped`: ``ReadError`` when a
        window cannot be populated (the file was truncated meanwhile: never SIGBUS) or ``ESTALE`` when the
        file changed during the load; ``ValueError`` for an unknown ``mapped``. A refusal (no mmap, Linux <
        5.14, ``cudaHostRegister`` refused) is no error: one WARNING per process (io.base.notice_once) says
        why, and the ring loads the rest.
    """
    if mapped not in ("auto", "on", "off"):
        raise ValueError(f"mapped must be 'auto', 'on' or 'off', got {mapped!r}")
    if plan.buffer_nbytes == 0 or not plan.regions:
        return "none"
    cfg = cfg or settings()
    left: list[Piece] | None = None
    why = None
    copied = 0
    if not isinstance(wm, ShardedWeightMap) and (mapped == "on" or (mapped == "auto" and backend in (None, "auto"))):
        slot, want, pieces = ring_shape(plan, wm, cfg, slot_nbytes, num_slots, verify)
        mapping = FileMapping.open(wm)
        if isinstance(mapping, str):
            why = mapping
        else:
            with mapping:
                if mapped == "on" or mapping.resident_fraction(plan) >= MIN_RESIDENT_FRACTION:
                    threads = default_hash_threads() if hash_threads is None else hash_threads
                    run = run_mapped(mapping, plan, pieces, sink, registrar, verify=verify and bool(plan.chunks),
                                     max_windows=window_bound(want, slot, cfg.pinned_cap_nbytes), hash_threads=threads)
                    stats.chunks_verified += run.verified
                    stats.bytes_read += run.nbytes
                    stats.bytes_buffered += run.nbytes
                    left, why, copied = run.left, run.refused, run.nbytes
                    if progress is not None:
                        progress.add(run.nbytes)
                    if not left:
                        stats.backend = "mapped"
                        return "mapped"
    if why is not None:
        notice_once("staged-mapped-refused", f"flashpack: copying {wm.path} to the device straight from the page cache "
                                             f"was refused ({why}); staging it through the pinned ring instead")
    load_payload_staged(wm, plan, sink, backend=backend, verify=verify, stats=stats, cfg=cfg,
                        slot_nbytes=slot_nbytes, num_slots=num_slots, pinner=pinner, hash_threads=hash_threads,
                        pieces=left, progress=progress, cache=cache)
    if copied:
        stats.backend = "mapped+" + stats.backend
        return "mapped+ring"
    return "ring"


def load_payload_cuda(wm: WeightMap, plan: LoadPlan, device: torch.device, *, backend: str | None, verify: bool,
                      stats: LoadStats, cfg: Settings, slot_nbytes: int | None = None, num_slots: int | None = None,
                      num_streams: int = NUM_STREAMS, mapped: str = "auto", progress=None,
                      cache: str = "bypass") -> torch.Tensor:
    """Read a plan's regions into one new CUDA allocation: from the page cache through read-only registered
    windows of a file mapping when the file is cached, else through a pinned staging ring
    (:func:`load_payload_mapped`).

    Args:
        wm, plan: the weight map and its plan.
        device: a CUDA device.
        backend, verify, stats, cfg, cache: as for :func:`load_payload_staged`.
        slot_nbytes, num_slots: ring shape (default ``FLASHPACK_SLOT_NBYTES``, ``FLASHPACK_NUM_SLOTS``).
        num_streams: copy streams.
        mapped: ``"auto"`` (default), ``"on"`` or ``"off"``: see :func:`load_payload_mapped`.
        progress: ``None`` or a :class:`flashpack.progress.Progress`.

    Returns:
        A uint8 tensor of ``plan.buffer_nbytes`` bytes on ``device``, allocated on the caller's current
        stream; every copy into it has completed. It never aliases a staging slot.

    Raises:
        As :func:`flashpack.load`. Pinned memory beyond ``FLASHPACK_PINNED_CAP_NBYTES`` or refused by the
        system gives fewer slots or pageable slots with one ``RuntimeWarning``, not an error.

    Notes:
        Pinned host memory of a load is at most slots x slot bytes; it is kept for the next load of the
        same shape (:func:`flashpack.staging.ring.release_pinned_memory` frees it).
    """
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        caller = torch.cuda.current_stream(device)
        dest = torch.empty(plan.buffer_nbytes, dtype=torch.uint8, device=device)
        if plan.buffer_nbytes == 0:
            return dest
        ready = torch.cuda.Event()
        ready.record(caller)  # after the allocation: recycled memory is free of pending writers (C24)
        sink = CudaSink(dest, ready=ready, caller_stream=caller, num_streams=num_streams)
        try:
            load_payload_mapped(wm, plan, sink, CudaRegistrar(device), backend=backend, verify=verify, stats=stats,
                                cfg=cfg, slot_nbytes=slot_nbytes, num_slots=num_slots, pinner=CudaPinner(),
                                mapped=mapped, progress=progress, cache=cache)
        finally:
            sink.close()
    return dest


__all__ = ["NUM_STREAMS", "load_payload_cuda", "load_payload_mapped", "load_payload_staged", "ring_shape"]
