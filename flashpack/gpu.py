"""Staged loads: file -> reader -> staging ring -> sink, for CUDA (pinned slots, streams, events) and,
with the same scheduler, for a host copy engine (tests and CPU smoke runs without a GPU).

:func:`load_payload_cuda` is what ``flashpack.load(path, device="cuda")`` (and ``assign_from_file``,
``from_flashpack``) call; it returns one CUDA uint8 tensor holding the plan's regions, and the tensors
of the state_dict are views onto it.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

from .deserialization import LoadStats, _add_stats, _resolve_keys, assemble
from .source import check_same_file, read_weight_map
from .format import WeightMap, torch_dtype
from .io import open_reader
from .plan import LoadPlan, make_plan, round_up
from .ring import (
    Pinner,
    Sink,
    StagingRing,
    cut_pieces,
    default_hash_threads,
    min_slot_nbytes,
    run_staged,
)
from .settings import settings

#: Copy streams per CUDA load.
NUM_STREAMS = 2


def _ring_shape(plan: LoadPlan, wm: WeightMap, slot_nbytes: int | None, num_slots: int | None,
                verify: bool):
    """(slot bytes, slots wanted, pieces): slots no larger than the plan needs and never smaller than
    a checksum chunk, so each chunk is verified on one slot."""
    cfg = settings()
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
                        stats: LoadStats, slot_nbytes: int | None = None, num_slots: int | None = None,
                        pinner: Pinner | None = None, hash_threads: int | None = None) -> StagingRing | None:
    """Run one staged load of ``plan`` into ``sink`` (the sink owns the destination).

    Args:
        wm, plan: the weight map and its plan (as :func:`flashpack.load` makes them).
        sink: where slot bytes go; drained here, closed by the caller.
        backend, verify, stats: as for :func:`flashpack.load`.
        slot_nbytes, num_slots: ring shape (default ``FLASHPACK_SLOT_NBYTES``/``FLASHPACK_NUM_SLOTS``).
        pinner: pins the ring (``None``: pageable slots).
        hash_threads: threads verifying the chunks of one slot (default: half the cores, at most 8).

    Returns:
        The (closed) ring, for inspection; ``None`` when the plan holds no bytes (nothing is allocated
        or pinned for an empty plan).

    Raises:
        Everything :func:`flashpack.load` raises; every read and copy has finished and every slot is
        back before an error propagates.
    """
    if plan.buffer_nbytes == 0 or not plan.regions:
        return None
    cfg = settings()
    slot, want, pieces = _ring_shape(plan, wm, slot_nbytes, num_slots, verify)
    verify = verify and bool(plan.chunks)
    threads = default_hash_threads() if hash_threads is None else hash_threads
    ring = StagingRing(want, slot, pinner=pinner, cap_nbytes=cfg.pinned_cap_nbytes)
    try:
        with open_reader(wm.path, backend) as reader:
            check_same_file(wm, reader.files.fd)
            stats.backend = reader.name
            try:
                stats.chunks_verified += run_staged(reader, wm, plan, pieces, ring, sink, verify=verify,
                                                    read_nbytes=min(cfg.extent_nbytes, slot), hash_threads=threads)
            finally:
                _add_stats(stats, reader.stats)
    finally:
        ring.close()
    return ring


def load_payload_cuda(wm: WeightMap, plan: LoadPlan, device: torch.device, *, backend: str | None, verify: bool,
                      stats: LoadStats, slot_nbytes: int | None = None, num_slots: int | None = None,
                      num_streams: int = NUM_STREAMS) -> torch.Tensor:
    """Read a plan's regions into one new CUDA allocation through a pinned staging ring.

    Args:
        wm, plan: the weight map and its plan.
        device: a CUDA device.
        backend, verify, stats: as for :func:`flashpack.load`.
        slot_nbytes, num_slots: ring shape (default ``FLASHPACK_SLOT_NBYTES``, ``FLASHPACK_NUM_SLOTS``).
        num_streams: copy streams.

    Returns:
        A uint8 tensor of ``plan.buffer_nbytes`` bytes on ``device``, allocated on the caller's current
        stream; every copy into it has completed. It never aliases a staging slot.

    Raises:
        As :func:`flashpack.load`. Pinned memory beyond ``FLASHPACK_PINNED_CAP_NBYTES`` or refused by the
        system gives fewer slots or pageable slots with one ``RuntimeWarning``, not an error.

    Notes:
        Pinned host memory of a load is at most slots x slot bytes; it is kept for the next load of the
        same shape (:func:`flashpack.ring.release_pinned_memory` frees it).
    """
    from .sinks import CudaPinner, CudaSink

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
            load_payload_staged(wm, plan, sink, backend=backend, verify=verify, stats=stats, slot_nbytes=slot_nbytes,
                                num_slots=num_slots, pinner=CudaPinner())
        finally:
            sink.close()
    return dest


def load_payload_host(wm: WeightMap, plan: LoadPlan, *, backend: str | None, verify: bool, stats: LoadStats,
                      slot_nbytes: int | None = None, num_slots: int | None = None, num_workers: int = 2,
                      max_delay_s: float = 0.0, seed: int | None = None, pinner: Pinner | None = None,
                      hash_threads: int | None = None) -> torch.Tensor:
    """The same staged load with a host copy engine: a new CPU uint8 tensor of ``plan.buffer_nbytes``.

    Args:
        num_workers, max_delay_s, seed: the copy engine (see :class:`flashpack.sinks.HostCopySink`).
        pinner: a test pinner (default: pageable slots).
        Others as :func:`load_payload_cuda`.

    Raises:
        As :func:`flashpack.load`; also ``AssertionError`` when the engine saw a slot handed out again
        while its copy ran (a ring bug).
    """
    from .deserialization import aligned_empty
    from .sinks import HostCopySink

    dest = aligned_empty(plan.buffer_nbytes)
    if plan.buffer_nbytes == 0:
        return dest
    with HostCopySink(dest, num_workers=num_workers, max_delay_s=max_delay_s, seed=seed) as sink:
        load_payload_staged(wm, plan, sink, backend=backend, verify=verify, stats=stats, slot_nbytes=slot_nbytes,
                            num_slots=num_slots, pinner=pinner, hash_threads=hash_threads)
    if sink.violations:
        raise AssertionError("; ".join(sink.violations))
    return dest


def load_staged(path: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str | None = None,
                keys: Iterable[str] | None = None, verify: bool | None = None, stats: LoadStats | None = None,
                **ring_options) -> dict[str, torch.Tensor]:
    """:func:`flashpack.load` through the staging ring for any device: ``cuda`` takes the CUDA sink,
    ``cpu`` the host copy engine (``ring_options`` go to :func:`load_payload_host`). For tests and the
    perf scripts; ``flashpack.load`` reads CPU loads straight into their destination instead."""
    from .deserialization import _parse_device

    path = os.fspath(path)
    dev = _parse_device(device)
    cfg = settings()
    verify = cfg.verify if verify is None else verify
    stats = stats if stats is not None else LoadStats()
    wm = read_weight_map(path)
    wanted, stored = _resolve_keys(wm, keys)
    dtypes = {k: torch_dtype(wm.tensors[k].dtype, key=k, path=path) for k in stored}
    plan = make_plan(wm, None if keys is None else stored, extent_nbytes=cfg.extent_nbytes, verify=verify)
    if dev.type == "cuda":
        buffer = load_payload_cuda(wm, plan, dev, backend=backend, verify=verify, stats=stats, **ring_options)
    else:
        buffer = load_payload_host(wm, plan, backend=backend, verify=verify, stats=stats, **ring_options)
    return assemble(wm, wanted, stored, buffer, plan, dtypes)


__all__ = ["load_payload_cuda", "load_payload_host", "load_payload_staged", "load_staged"]
