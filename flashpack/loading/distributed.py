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

Ranks on one host share the loaded bytes: the first agreement also gathers each rank's host name
(:func:`host_name`), the file's ``(st_dev, st_ino)`` and its page-cache decision
(:func:`flashpack.io.pagecache.decide_cache`, ``cache=``/``FLASHPACK_CACHE``). When every rank of the group is on
one host, sees the same file and decided ``keep``, steps 2-4 are replaced: rank 0 reads the whole plan through the
page cache (``cache="keep"``) into an anonymous memory file (memfd_create(2)), verifying it (its shmem pages filled
with ``UFFDIO_COPY`` where userfaultfd is allowed, :meth:`flashpack.io.uffd.FillRegion.over`), and seals it
(``F_SEAL_WRITE``/``SHRINK``/``GROW``, fcntl(2)); every rank then maps it copy-on-write (``MAP_PRIVATE`` of
``/proc/<pid>/fd/<fd>``, :func:`flashpack.loading.memory.map_shared`). The disk and the CPU copy run once for the
host, the ranks hold one physical copy until they write to it, and each rank's tensors are still private and
writable (a write copies that page for that rank only). A rank that cannot open rank 0's descriptor (another pid
namespace) reads the file itself through the page cache. Two agreements follow. (Each rank copying the file out
of the shared page cache instead costs W copies and W verifications: 1.9x one rank for two gloo ranks on a 2-core
VM, see ``perf/bench_dist.py``.) Otherwise (ranks on several hosts, or ``bypass``) the shares and the exchange
below run, each share read with the agreed mode.

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

import os
import socket
from typing import Iterable

import torch
import xxhash

from ..errors import DistributedLoadError, FlashPackError
from ..format import Chunk, WeightMap, verify_chunk
from ..plan import LoadPlan, share_bounds, share_nbytes, share_plan
from ..io.pagecache import decide_cache
from ..settings import CACHE_POLICIES, Settings, settings
from ..source import read_pack_map
from .common import LoadStats, aligned_empty, assemble, parse_device, prepare
from .host import read_into
from . import memory
from .memory import host_buffer

EXCHANGES = ("auto", "all_gather", "broadcast")


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


def group_for(process_group, cfg: Settings):
    """The group a load uses: ``None`` unless a group is given, ``"default"`` is asked for, or
    ``FLASHPACK_DISTRIBUTED=1`` and the default group is initialised.

    Raises:
        FlashPackError: ``"default"`` asked for but torch.distributed is not initialised.
    """
    if process_group is None and not cfg.distributed:
        return None
    import torch.distributed as dist

    if process_group is None or process_group == "default":
        if not (dist.is_available() and dist.is_initialized()):
            if process_group == "default":
                raise FlashPackError("process_group='default' needs torch.distributed to be initialised first")
            return None  # FLASHPACK_DISTRIBUTED=1 without a group: a plain load
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


def host_name() -> str:
    """This machine's name (``socket.gethostname()``, gethostname(2)): ranks reporting the same name and the
    same file ``(st_dev, st_ino)`` share one page cache."""
    return socket.gethostname()


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
                     exchange: str = "auto", cfg: Settings | None = None,
                     cache: str | None = None) -> dict[str, torch.Tensor]:
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
        cfg: the load's settings (``None``: :func:`flashpack.settings.settings` is read now).
        cache: page-cache policy, ``auto``/``keep``/``bypass`` (default ``FLASHPACK_CACHE``), as for
            :func:`flashpack.load`. When every rank is on one host with the same file and all decide ``keep``,
            rank 0 reads the file once into sealed shared memory that every rank maps copy-on-write, and nothing
            is exchanged (module docstring); ``stats.cache_reason`` and ``stats.memory`` (``"memfd+uffd"`` or
            ``"memfd"`` on rank 0, ``"memfd (mapped)"`` on the others) say so.

    Returns:
        ``dict[str, Tensor]`` as :func:`flashpack.load` returns it, bit-identical on every rank.

    Raises:
        DistributedLoadError (``RuntimeError``): on every rank when any rank failed to open, validate or
            read the file, failed a checksum, or sees a different file; names the failing rank and cause.
            The group stays usable.
        FlashPackError: no initialised group; a bad ``exchange`` or ``src_rank``.
        ValueError: ``cache`` is not ``auto``, ``keep`` or ``bypass`` (on every rank, before any collective).
        Errors of the group itself (timeouts of a dead rank) propagate unchanged.
    """
    dist = _dist()
    pg = resolve_group(process_group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if exchange not in EXCHANGES:
        raise FlashPackError(f"exchange={exchange!r}: choose one of {', '.join(EXCHANGES)}")
    if src_rank is not None and not 0 <= src_rank < world:
        raise FlashPackError(f"src_rank={src_rank} is not a rank of this group of {world}")
    cfg = cfg or settings()
    policy = cache or cfg.cache
    if policy not in CACHE_POLICIES:
        raise ValueError(f"cache={policy!r}: expected one of {', '.join(CACHE_POLICIES)}")
    stats = stats if stats is not None else LoadStats()
    given = path if isinstance(path, WeightMap) else None
    where = given.path if given else os.fspath(path) if path is not None else "<the file of rank %d>" % (src_rank or 0)
    dev = parse_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    comm = _comm_device(pg, dev)

    def agree(stage, err, info=None):
        return _agree(pg, world, where, stage, err, info)

    # 1. weight map, keys, dtypes, plan on every rank; then agree
    wm = job = None
    err: BaseException | None = None
    if src_rank is not None:
        if rank == src_rank:
            try:
                wm = given or read_pack_map(where, keys=keys)
            except Exception as e:  # noqa: BLE001 - reported to every rank
                err = e
        agree("opening and validating the file", err)
        box = [wm]
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, src_rank), group=pg)
        wm = box[0]
        where = wm.path
    try:
        if wm is None:
            wm = given or read_pack_map(where, keys=keys)
        job = prepare(wm, keys, verify=verify, cfg=cfg)
        decision = decide_cache(policy, job.plan.read_nbytes, direct=cfg.direct)
        same_file = (wm.file_id[0], wm.file_id[1]) if wm.file_id else os.path.realpath(wm.path)  # a sharded pack: its index
        info = (_fingerprint(wm, job.plan), (host_name(), same_file), decision.mode)
    except Exception as e:  # noqa: BLE001 - reported to every rank
        err, info = e, None
    infos = agree("opening and validating the file" if src_rank is None else "planning the load", err, info)
    fps = [i[0] for i in infos]
    differ = {r: f"its file ({f[0]} bytes, layout/checksum digest {f[2]:016x}) differs from rank 0's "
                 f"({fps[0][0]} bytes, {fps[0][2]:016x})" for r, f in enumerate(fps) if f != fps[0]}
    if differ:
        raise DistributedLoadError(
            f"distributed load: ranks {sorted(differ)} of {world} see a different file from rank 0's "
            f"({'; '.join(f'rank {r}: {m}' for r, m in differ.items())}); give every rank the same file and keys",
            differ, "comparing the files")

    plan, verify = job.plan, job.verify
    total = plan.buffer_nbytes
    hosts = {i[1] for i in infos}
    mode = "keep" if all(i[2] == "keep" for i in infos) else "bypass"
    stats.cache = mode
    stats.cache_reason = decision.reason if mode == decision.mode else f"another rank decided bypass ({decision.reason} here)"
    if mode == "keep" and len(hosts) == 1 and src_rank is None and world > 1:
        stats.cache_reason += f"; the {world} ranks share this host and file: rank 0 reads it once through the page cache"
        return _load_shared(job, dev, backend, stats, cfg, agree, rank)
    if world > 1 and src_rank is None:
        stats.cache_reason += f"; ranks on {len(hosts)} hosts or files: each reads a share, then the shares are exchanged"
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
            read_into(wm, sub, host, backend=backend, verify=verify, stats=stats, cfg=cfg, cache=mode)
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
    return assemble(job, buffer)


def _load_shared(job, dev: torch.device, backend: str | None, stats: LoadStats, cfg: Settings, agree, rank: int):
    """Every rank of one host: rank 0 reads the plan once into a sealed memory file (:func:`memory.shared_buffer`,
    through the page cache, verifying), the others map it copy-on-write (:func:`memory.map_shared`); a rank
    that cannot reach it (another pid namespace) reads the file itself. Two agreements."""
    nbytes = job.plan.buffer_nbytes
    if nbytes == 0:  # nothing to share (only empty tensors wanted)
        agree("reading the file into memory shared by the ranks of this host", None)
        return assemble(job, torch.empty(0, dtype=torch.uint8).to(dev))
    fd = -1
    try:
        err = handle = None
        if rank == 0:
            try:  # allocation too: a rank out of memory must still reach the agreement
                fd, dest = memory.shared_buffer(nbytes, name=f"flashpack:{os.path.basename(job.wm.path)}",
                                                userfaultfd=cfg.userfaultfd)
                try:
                    stats.memory = dest.kind
                    read_into(job.wm, job.plan, dest.tensor, backend=backend, verify=job.verify, stats=stats,
                              cfg=cfg, cache="keep", fill=dest.region)  # UFFDIO_COPY from the page cache, or faulted
                finally:
                    if dest.region is not None:  # released by read_into; here too if it was never reached
                        dest.region.release()
                del dest  # the writable shared mapping must be gone before the write seal
                handle = memory.seal_shared(fd)
            except Exception as e:  # noqa: BLE001 - reported to every rank
                err = e
        handle = agree("reading the file into memory shared by the ranks of this host", err, handle)[0]
        err = buffer = None
        try:
            try:
                buffer = memory.map_shared(handle)
                if rank:
                    stats.memory = "memfd (mapped)"
                    stats.cache_reason += " (rank 0 read it into shared memory; this rank maps it copy-on-write)"
            except OSError as e:  # not reachable from this rank: read the file itself, through the page cache
                stats.cache_reason += f" (rank 0's shared memory could not be mapped here ({e}): this rank read the file)"
                dest = host_buffer(nbytes, huge_pages=cfg.huge_pages, fill=True, userfaultfd=cfg.userfaultfd)
                stats.memory = dest.kind
                buffer = dest.tensor
                read_into(job.wm, job.plan, buffer, backend=backend, verify=job.verify, stats=stats, cfg=cfg,
                          populate=dest.prefault, cache="keep", fill=dest.region)
        except Exception as e:  # noqa: BLE001 - reported to every rank
            err = e
        agree("mapping the memory shared by the ranks of this host", err)
    finally:
        if fd >= 0:
            os.close(fd)  # every rank has mapped it (or failed): the mappings keep the memory alive
    if buffer.device != dev:
        buffer = buffer.to(dev)
    return assemble(job, buffer)


__all__ = ["group_for", "host_name", "load_distributed", "resolve_group"]
