"""Distributed loading over ``torch.distributed``: every rank ends with the whole state, the disk is read once.

``flashpack.load(path, process_group=pg)`` (or ``FLASHPACK_DISTRIBUTED=1`` with an initialised default
group) comes here. With ``W`` ranks in the group:

1. Every rank opens the file and validates its weight map, resolves ``keys`` and dtypes, and makes the
   same :class:`~flashpack.plan.LoadPlan`. The ranks then agree (one ``all_gather_object`` of a status):
   if any rank failed, or ranks see different files, *every* rank raises the same
   :class:`DistributedLoadError` naming the failing rank and the cause. No data collective runs first.
2. The plan's destination buffer (``B`` bytes) is cut into ``W`` equal shares of
   ``S = round_up(ceil(B / W), 4096)`` bytes (the last ones shorter or empty). Rank ``r`` reads the file
   bytes of ``[r*S, (r+1)*S)`` with the normal reader, straight into its own copy of the destination
   buffer, and verifies the checksum chunks lying wholly in its share. Second agreement.
3. The ranks exchange raw bytes as ``uint8`` (so fp8, e8m0, bool and complex travel intact whatever the
   backend supports): ``exchange="all_gather"`` is one ``all_gather_single``/``all_gather_into_tensor``
   into the destination buffer (padded to ``W*S`` bytes, less than ``W*4096`` bytes of padding), and
   ``exchange="broadcast"`` is one in-place ``broadcast`` per owner. ``"auto"`` takes ``broadcast`` on
   gloo (measured faster on the CPU, see ``perf/bench_dist.py``) and ``all_gather`` otherwise (NCCL).
4. The checksum chunks that straddle a share boundary (at most ``W - 1``) are verified by the rank whose
   share holds their first byte, now that all bytes are in; a third agreement if there are any.
5. Tensors are views into the buffer, exactly as in a single-process load (aliases included).

``src_rank`` mode (:func:`load_distributed` with ``src_rank=``): only that rank opens and reads the file
(storage only one node can see); it broadcasts the weight map, then the verified payload.

Devices and backends: the group is the caller's, initialised with any backend. For a CUDA target on a
group with NCCL for CUDA tensors, the exchange runs on the device (each rank reads its share into host
memory and copies it up); on a gloo-only group it runs in host memory and the result is copied to the
device. With NCCL, the caller must have called ``torch.cuda.set_device`` for the rank (the status
exchange uses the current device, as ``all_gather_object`` does). flashpack never calls
``init_process_group``, except in :func:`init_local_group`, a helper for tests and benchmarks.

Bounded failure: a rank that raises (missing file, damaged weight map, unknown key, read error,
checksum mismatch) still takes part in the next agreement, so no rank waits in a data collective for
it. A rank that dies or never calls the loader is only noticed after the group's own timeout (the
``timeout`` given to ``init_process_group``).
"""

from __future__ import annotations

import bisect
import os
import socket
from datetime import timedelta
from typing import Iterable

import torch
import xxhash

from .errors import FlashPackError
from .format import Chunk, WeightMap, torch_dtype, verify_chunk
from .plan import LoadPlan, ReadExtent, Region, make_plan, round_up
from .settings import PAGE_NBYTES, settings

EXCHANGES = ("auto", "all_gather", "broadcast")


class DistributedLoadError(FlashPackError, RuntimeError):
    """A distributed load failed on at least one rank; every rank of the group raises this same error.

    Attributes:
        failures: group rank -> ``"ExceptionType: message"`` for every rank that failed.
        stage: what the ranks were doing (``"opening and validating the file"``, ...).
    """

    def __init__(self, message: str, failures: dict[int, str], stage: str):
        super().__init__(message)
        self.failures = dict(failures)
        self.stage = stage


# --------------------------------------------------------------------------- the group


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise FlashPackError("this torch build has no torch.distributed; load without process_group")
    return dist


def resolve_group(process_group):
    """``None``/``"default"`` -> the default group (which must be initialised); anything else unchanged.

    Raises:
        FlashPackError: no default group is initialised.
    """
    dist = _dist()
    if process_group is None or process_group == "default":
        if not dist.is_initialized():
            raise FlashPackError("distributed loading needs torch.distributed to be initialised first "
                                 "(torch.distributed.init_process_group)")
        return dist.group.WORLD
    return process_group


def _comm_device(pg, target: torch.device) -> torch.device:
    """Where the exchange runs: the CUDA target when the group has NCCL for CUDA tensors, host memory
    when it has a CPU backend, else (NCCL only, CPU target) the current CUDA device."""
    dist = _dist()
    try:
        config = str(dist.get_backend_config(pg)).lower()
    except Exception:  # noqa: BLE001 - older torch, or a group torch does not track: ask the backend
        config = str(dist.get_backend(pg)).lower()
    per_device = dict(part.split(":", 1) for part in config.split(",") if ":" in part)
    if not per_device:
        per_device = {"cpu": config, "cuda": config}
    cuda_backend = per_device.get("cuda", "")
    cpu_backend = per_device.get("cpu", "")
    if target.type == "cuda" and cuda_backend and cuda_backend != "gloo":
        return target
    if cpu_backend and cpu_backend != "nccl":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _agree(pg, world: int, path: str, stage: str, err: BaseException | None, info=None) -> list:
    """All-gather ``(status, path, info)``; raise the same :class:`DistributedLoadError` on every rank if
    any rank failed (naming the failing rank, its path and the cause). Returns every rank's ``info``."""
    mine = (None if err is None else _describe(err), path, info)
    got: list = [None] * world
    _dist().all_gather_object(got, mine, group=pg)
    failures = {r: f"{s} (file {p})" for r, (s, p, _) in enumerate(got) if s is not None}
    if failures:
        first = min(failures)
        more = "; ".join(f"rank {r}: {failures[r]}" for r in sorted(failures) if r != first)
        raise DistributedLoadError(
            f"distributed load failed on rank {first} of {world} while {stage}: {failures[first]}"
            + (f"; also failed on {more}" if more else "")
            + "; every rank of the group raises this error (fix that rank's file or path and retry)",
            failures, stage) from err
    return [i for _, _, i in got]


# --------------------------------------------------------------------------- shares


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


def _fingerprint(wm: WeightMap, plan: LoadPlan) -> tuple[int, int, int]:
    """(file size, buffer size, digest of the weight map's layout and checksums): equal on every rank
    that sees the same file."""
    h = xxhash.xxh3_64()
    h.update(repr((wm.source, wm.chunk_nbytes, [(b.dtype, b.offset, b.nbytes, b.checksums) for b in wm.blocks],
                   [(t.key, t.dtype, t.shape, t.offset, t.nbytes) for t in wm.tensors.values()],
                   sorted(wm.aliases.items()), [(r.file_offset, r.nbytes) for r in plan.regions])).encode())
    return wm.file_nbytes, plan.buffer_nbytes, h.intdigest()


# --------------------------------------------------------------------------- the load


def _host_bytes(t: torch.Tensor) -> memoryview:
    return memoryview((t if t.device.type == "cpu" else t.cpu()).numpy()).cast("B")


def load_distributed(path: str | os.PathLike | None, *, device: str | torch.device = "cpu",
                     backend: str | None = None, keys: Iterable[str] | None = None, verify: bool | None = None,
                     process_group=None, stats=None, src_rank: int | None = None,
                     exchange: str = "auto") -> dict[str, torch.Tensor]:
    """Load a flashpack file on every rank of a process group, reading it from disk once in all.

    Collective: every rank of ``process_group`` must call it with the same ``keys``, ``verify``,
    ``src_rank`` and ``exchange`` (``path`` may differ, as long as it names the same file).

    Args:
        path: the file (ignored on ranks other than ``src_rank`` in ``src_rank`` mode; may be ``None`` there).
        device: ``"cpu"`` or a CUDA device of this rank.
        backend: reader backend, as for :func:`flashpack.load`.
        keys: load only these keys (aliases included); ``None`` loads everything.
        verify: check the chunk checksums (each chunk is hashed by one rank); default ``FLASHPACK_VERIFY``.
        process_group: an initialised ``torch.distributed`` group; ``None`` or ``"default"``: the default group.
        stats: a :class:`flashpack.LoadStats`; ``bytes_read`` counts the bytes *this rank* read from the file.
        src_rank: ``None``: every rank reads a share. A group rank: only that rank opens and reads the file,
            then broadcasts the weight map and the payload.
        exchange: ``"auto"``, ``"all_gather"`` or ``"broadcast"`` (see the module docstring).

    Returns:
        ``dict[str, Tensor]`` as :func:`flashpack.load` returns it, bit-identical on every rank.

    Raises:
        DistributedLoadError (``RuntimeError``): on every rank when any rank failed to open, validate or
            read the file, failed a checksum, or sees a different file; names the failing rank and cause.
            The group stays usable.
        FlashPackError: no initialised group; a bad ``exchange`` or ``src_rank``.
        Errors of the group itself (timeouts of a dead rank) propagate unchanged.
    """
    from .deserialization import LoadStats, _parse_device, _resolve_keys, aligned_empty, assemble, read_into, read_weight_map

    dist = _dist()
    pg = resolve_group(process_group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if exchange not in EXCHANGES:
        raise FlashPackError(f"exchange={exchange!r}: choose one of {', '.join(EXCHANGES)}")
    if src_rank is not None and not 0 <= src_rank < world:
        raise FlashPackError(f"src_rank={src_rank} is not a rank of this group of {world}")
    cfg = settings()
    verify = cfg.verify if verify is None else verify
    stats = stats if stats is not None else LoadStats()
    where = os.fspath(path) if path is not None else "<the file of rank %d>" % (src_rank or 0)
    dev = _parse_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    comm = _comm_device(pg, dev)

    def agree(stage, err, info=None):
        return _agree(pg, world, where, stage, err, info)

    # 1. weight map, keys, dtypes, plan on every rank; then agree
    wm = plan = None
    err: BaseException | None = None
    if src_rank is not None:
        if rank == src_rank:
            try:
                wm = read_weight_map(where)
            except Exception as e:  # noqa: BLE001 - reported to every rank
                err = e
        agree("opening and validating the file", err)
        box = [wm]
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, src_rank), group=pg)
        wm = box[0]
        where = wm.path
    try:
        if wm is None:
            wm = read_weight_map(where)
        wanted, stored = _resolve_keys(wm, keys)
        dtypes = {k: torch_dtype(wm.tensors[k].dtype, key=k, path=wm.path) for k in stored}
        plan = make_plan(wm, None if keys is None else stored, extent_nbytes=cfg.extent_nbytes, verify=verify)
        fp = _fingerprint(wm, plan)
    except Exception as e:  # noqa: BLE001 - reported to every rank
        err, fp = e, None
    fps = agree("opening and validating the file" if src_rank is None else "planning the load", err, fp)
    differ = {r: f"its file ({f[0]} bytes, layout/checksum digest {f[2]:016x}) differs from rank 0's "
                 f"({fps[0][0]} bytes, {fps[0][2]:016x})" for r, f in enumerate(fps) if f != fps[0]}
    if differ:
        raise DistributedLoadError(
            f"distributed load: ranks {sorted(differ)} of {world} see a different file from rank 0's "
            f"({'; '.join(f'rank {r}: {m}' for r, m in differ.items())}); give every rank the same file and keys",
            differ, "comparing the files")

    total = plan.buffer_nbytes
    if src_rank is not None:
        readers = {src_rank: (0, total)}
        share = total
    else:
        share = share_nbytes(total, world)
        readers = {r: share_bounds(total, world, r) for r in range(world)}
    method = exchange if exchange != "auto" else ("broadcast" if comm.type == "cpu" else "all_gather")
    if src_rank is not None:
        method = "broadcast"

    # 2. read this rank's share (host memory), verify its whole chunks; then agree
    padded = share * world if method == "all_gather" else total
    lo, hi = readers.get(rank, (0, 0))
    straddlers: list[tuple[Chunk, int]] = []
    err = None
    try:  # allocation too: a rank out of memory must still reach the agreement
        buffer = aligned_empty(padded) if comm.type == "cpu" else torch.empty(padded, dtype=torch.uint8, device=comm)
        sub, straddlers = share_plan(plan, lo, hi)
        if hi > lo:
            host = buffer[lo:hi] if comm.type == "cpu" else aligned_empty(hi - lo)
            read_into(wm, sub, host, backend=backend, verify=verify, stats=stats)
            if comm.type != "cpu":
                buffer[lo:hi].copy_(host)
    except Exception as e:  # noqa: BLE001 - reported to every rank
        err = e
    agree("reading its share of the file", err)

    # 3. exchange raw bytes
    if world > 1 and total:
        if method == "all_gather":
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(buffer, buffer[rank * share:(rank + 1) * share], group=pg)
        else:
            for r, (a, b) in readers.items():
                if b > a:
                    dist.broadcast(buffer[a:b], src=dist.get_global_rank(pg, r), group=pg)

    # 4. the chunks that straddle a share boundary, now whole; agree (same decision on every rank)
    err = None
    try:
        for c, a in straddlers:
            verify_chunk(wm, c, _host_bytes(buffer[a:a + c.nbytes]))
            stats.chunks_verified += 1
    except Exception as e:  # noqa: BLE001 - reported to every rank
        err = e
    if verify and world > 1 and src_rank is None and plan.chunks:
        agree("verifying the checksum chunks across a share boundary", err)
    elif err is not None:
        raise err

    # 5. tensors: views, as in a single-process load
    if buffer.device != dev:
        buffer = buffer[:total].to(dev)
    return assemble(wm, wanted, stored, buffer, plan, dtypes)


# --------------------------------------------------------------------------- helpers for tests and benchmarks


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for a test's ``init_method``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_local_group(rank: int, world_size: int, port: int, *, backend: str = "gloo", host: str = "127.0.0.1",
                     timeout_s: float = 60.0):
    """Initialise torch.distributed's default group over TCP on one machine, for tests and benchmarks.

    This is the only place flashpack calls ``init_process_group``, and only when called: loaders use the
    group the caller initialised. Call ``torch.distributed.destroy_process_group()`` when done.

    Args:
        rank, world_size: this process's rank and the number of processes.
        port: a TCP port on ``host`` agreed by every process (rank 0 listens there; see :func:`free_port`).
        backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA), or a device map such as ``"cpu:gloo,cuda:nccl"``.
        timeout_s: seconds a collective may wait for the other ranks before raising.

    Returns:
        The default group (``torch.distributed.group.WORLD``).
    """
    dist = _dist()
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


__all__ = ["DistributedLoadError", "free_port", "init_local_group", "load_distributed", "resolve_group",
           "share_bounds", "share_nbytes", "share_plan"]
