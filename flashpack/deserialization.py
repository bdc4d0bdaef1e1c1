"""``flashpack.load`` and ``flashpack.verify``: the top of a load. It reads the weight map once
(:mod:`flashpack.source`), plans the load once (:func:`flashpack.loading.common.prepare`) and hands it to one of
the load stages: host memory (:mod:`flashpack.loading.host`), a private mapping (``mmap=True``), a CUDA device
through the staging ring (:mod:`flashpack.loading.staged`) or the ranks of a process group
(:mod:`flashpack.loading.distributed`). The module name is fal's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import FlashPackError
from .format import WeightMap, verify_chunk
from .io import Extent, open_reader, read_all
from .loading.common import LoadStats, aligned_empty, assemble, cache_mode, parse_device, prepare
from .loading.distributed import group_for, load_distributed
from .loading.host import mmap_payload, read_into
from .loading.memory import host_buffer
from .loading.staged import load_payload_cuda
from .settings import CACHE_POLICIES, PAGE_NBYTES, settings
from .source import read_weight_map

# --------------------------------------------------------------------------- loading


def load(path: str | os.PathLike | WeightMap, *, device: str | torch.device = "cpu", backend: str | None = None,
         keys: Iterable[str] | None = None, verify: bool | None = None, mmap: bool = False,
         process_group=None, src_rank: int | None = None,
         stats: LoadStats | None = None, cache: str | None = None) -> dict[str, torch.Tensor]:
    """Load a flashpack file (or a fal flashpack 0.2-0.4 file) into a state_dict.

    Args:
        path: the file, or its :class:`~flashpack.format.WeightMap` from :func:`read_weight_map` (read once
            and reused; the payload reads check it is still the same file).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        backend: reader backend: ``"auto"`` (default, or ``FLASHPACK_BACKEND``), ``"uring"``, ``"threads"``.
        keys: load only these keys (aliases included); only their byte ranges (whole checksum chunks
            when verifying) are read. ``None`` loads everything.
        verify: check the payload's xxh3_64 chunk checksums while loading; default ``FLASHPACK_VERIFY``
            (on). Files written by fal's flashpack carry none.
        mmap: zero-copy mode (CPU only): tensors are views of a private copy-on-write mapping of the file,
            like ``torch.load(mmap=True)``: writable, writes never reach the file, nothing is copied up front.
            Caveat: if another process truncates the file while the mapping is alive, touching the lost
            pages raises SIGBUS and kills the process. Checksums are verified (touching every page) only when
            ``verify=True`` is passed explicitly; ``FLASHPACK_VERIFY`` does not apply to this mode.
        process_group: distributed loading over ``torch.distributed`` (see :mod:`flashpack.loading.distributed`): each
            rank reads about 1/world_size of the file and the ranks exchange the bytes.
        src_rank: with ``process_group``: only this rank reads the file and broadcasts it (for storage only one
            node can see); ``path`` is ignored on the other ranks.
        stats: a :class:`LoadStats` to fill in (bytes read, backend used, cache policy and why).
        cache: page-cache policy (default ``FLASHPACK_CACHE``, ``auto``): ``"keep"`` reads through the page cache,
            each range read ahead with madvise(2) ``MADV_POPULATE_READ`` (kernel readahead, no copy) before it is
            copied out with preadv(2), so a cold load runs near disk speed and leaves the file cached for the next
            one; ``"bypass"`` reads uncached ranges with O_DIRECT and leaves nothing cached; ``"auto"`` keeps when
            the bytes read are at most half of MemAvailable, else bypasses. Cached ranges are always copied out of
            the cache by several threads. ``stats.cache`` and ``stats.cache_reason`` say what was decided and why.
            In a process group, ranks on one host that see the same file each read it through the cache when it
            is kept (see :mod:`flashpack.loading.distributed`). Ignored with ``mmap=True``.

    Returns:
        ``dict[str, Tensor]`` in file order, stored keys first, then aliases. Tensors of one dtype are
        views into one allocation on ``device``; an alias is the same tensor object as its target. On the
        CPU the memory is ordinary, private and writable (in-place ops and optimizer steps work).

    Raises:
        FormatError (``ValueError``): the file breaks an invariant of docs/FORMAT.md, or a checksum fails.
        DtypeError: a wanted tensor's dtype is missing from this torch (names key and dtype).
        KeyError: a name in ``keys`` is not in the file.
        ReadError (``OSError``): a read failed or came back short, naming file and offset.
        BackendUnavailableError (``RuntimeError``): the named backend cannot run here, with the reason.
        FlashPackError: ``device`` is CUDA but torch has no CUDA.
        ValueError: ``cache`` is not ``auto``, ``keep`` or ``bypass``.
        No tensor is returned when anything fails.
    """
    dev = parse_device(device)
    cfg = settings()
    if cache is not None and cache not in CACHE_POLICIES:
        raise ValueError(f"cache={cache!r}: expected one of {', '.join(CACHE_POLICIES)}")
    if mmap:
        verify = bool(verify)
    stats = stats if stats is not None else LoadStats()
    pg = group_for(process_group, cfg)
    if pg is not None:
        if mmap:
            raise FlashPackError(f"{_name(path)}: mmap=True maps the file in this process; it cannot be combined "
                                 f"with a process group")
        return load_distributed(path, device=dev, backend=backend, keys=keys, verify=verify,
                                process_group=pg, stats=stats, src_rank=src_rank, cfg=cfg, cache=cache)
    if src_rank is not None:
        raise FlashPackError("src_rank needs a process group (process_group=... or 'default')")
    if path is None:
        raise TypeError("path is required")
    wm = path if isinstance(path, WeightMap) else read_weight_map(path)
    job = prepare(wm, keys, verify=verify, cfg=cfg)
    plan = job.plan
    if mmap:
        if dev.type != "cpu":
            raise FlashPackError(f"{wm.path}: mmap=True maps the file into host memory; it needs device='cpu', got {dev}")
        buffer, plan = mmap_payload(wm, plan, job.verify, stats)
    elif dev.type == "cuda":
        mode = cache_mode(cache, plan.read_nbytes, cfg, stats)
        buffer = load_payload_cuda(wm, plan, dev, backend=backend, verify=job.verify, stats=stats, cfg=cfg, cache=mode)
    else:
        mode = cache_mode(cache, plan.read_nbytes, cfg, stats)
        dest = host_buffer(plan.buffer_nbytes, huge_pages=cfg.huge_pages)
        stats.memory = dest.kind
        buffer = dest.tensor
        read_into(wm, plan, buffer, backend=backend, verify=job.verify, stats=stats, cfg=cfg,
                  populate=None if dest.kind == "torch" else dest.populate, cache=mode)
    return assemble(job, buffer, plan)


def _name(path) -> str:
    return path.path if isinstance(path, WeightMap) else os.fspath(path) if path is not None else "<no path>"


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    """What :func:`verify` checked."""

    path: str
    source: str
    file_nbytes: int
    tensors: int
    aliases: int
    blocks: int
    chunks_verified: int
    bytes_verified: int
    checksum_algorithm: str | None


def verify(path: str | os.PathLike, *, backend: str | None = None, buffer_nbytes: int = 64 * 1024 * 1024) -> VerifyReport:
    """Check every invariant of the file and every payload checksum, streaming through a small buffer.

    Args:
        path: the file.
        backend: reader backend, as for :func:`load`.
        buffer_nbytes: host memory used, in bytes (rounded to whole checksum chunks).

    Returns:
        A :class:`VerifyReport`. Files without checksums (fal's) are checked for layout only.

    Raises:
        FormatError naming the first bad field, block or chunk; ReadError.
    """
    path = os.fspath(path)
    cfg = settings()
    wm = read_weight_map(path)
    report = VerifyReport(path, wm.source, wm.file_nbytes, len(wm.tensors), len(wm.aliases), len(wm.blocks), 0, 0,
                          wm.checksum_algorithm)
    if wm.checksum_algorithm is None:
        return report
    chunks = list(wm.chunks())
    per = max(1, buffer_nbytes // wm.chunk_nbytes)
    buf = aligned_empty(per * (wm.chunk_nbytes + PAGE_NBYTES))
    mv = memoryview(buf.numpy()).cast("B")
    stride = wm.chunk_nbytes + PAGE_NBYTES
    with open_reader(path, backend, expect=wm.file_id, cfg=cfg) as reader:
        for i in range(0, len(chunks), per):
            batch = chunks[i:i + per]
            exts = []
            for j, c in enumerate(batch):
                end = min(c.offset + c.nbytes + (-(c.offset + c.nbytes)) % PAGE_NBYTES, wm.file_nbytes)
                exts.append(Extent(c.offset, end - c.offset, mv[j * stride:j * stride + end - c.offset], c))
            read_all(reader, exts, lambda e: verify_chunk(wm, e.tag, e.dest[:e.tag.nbytes]))
            report.chunks_verified += len(batch)
            report.bytes_verified += sum(c.nbytes for c in batch)
    return report


__all__ = ["LoadStats", "VerifyReport", "load", "read_weight_map", "verify"]
