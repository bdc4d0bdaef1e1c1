"""What every load shares: the prelude (device, keys, dtypes, plan: :func:`prepare`), the statistics it fills
in (:class:`LoadStats`), and the last step, rebuilding every
tensor as a zero-copy view of the loaded bytes (:func:`assemble`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import FlashPackError
from ..format import WeightMap, torch_dtype
from ..io import ReaderStats
from ..io.pagecache import decide_cache
from ..plan import LoadPlan, make_plan
from ..settings import Settings
from .memory import aligned_empty


@dataclass
class LoadStats:
    """What one load did.

    Attributes:
        backend: the reader that ran (``"uring"``, ``"threads"``, ``"mmap"``).
        bytes_read: bytes requested from the file (this rank's, in a distributed load).
        bytes_direct, bytes_buffered: of those, read with O_DIRECT / through the page cache.
        chunks_verified: checksum chunks verified.
        memory: how the host destination was allocated (:attr:`flashpack.loading.memory.HostBuffer.kind`), or
            ``""`` when the load had none of its own (CUDA, mmap).
        cache: the page-cache policy the load ran with, ``"keep"`` or ``"bypass"`` (``""``: none, ``mmap=True``),
            and ``cache_reason`` why (:func:`flashpack.io.pagecache.decide_cache`, plus the host sharing of a
            distributed load).
        bytes_prefetched: bytes read ahead into the page cache before their copy (``keep``), and ``prefetch``
            how: ``"populate_read"`` (madvise(2) ``MADV_POPULATE_READ`` by a helper thread, each extent queued as the
            reader queues it, up to ``queue_depth`` ahead of the copies), ``"willneed"`` (posix_fadvise(2), when
            the kernel refuses the former), ``""`` when nothing was.
        chunks_hashed_by_reader: of ``chunks_verified``, those the reader's worker threads hashed as the bytes
            landed (``Extent.hasher``); the loading thread hashed the rest after their reads completed.
        bytes_filled: of ``bytes_buffered``, bytes copied from the page cache into a ``"uffd"`` destination with
            userfaultfd's ``UFFDIO_COPY`` (:mod:`flashpack.io.uffd`).
        extents_native: extents a worker thread copied (and hashed) in one C call, ``fp_copy_extent``
            (native/fp_copy.c), the GIL released once; 0 where the shim lacks it (built without xxhash.h), for
            O_DIRECT reads, and for small extents an io_uring ring read itself.
    """

    backend: str = ""
    bytes_read: int = 0
    bytes_direct: int = 0
    bytes_buffered: int = 0
    chunks_verified: int = 0
    memory: str = ""
    cache: str = ""
    cache_reason: str = ""
    bytes_prefetched: int = 0
    prefetch: str = ""
    bytes_filled: int = 0
    chunks_hashed_by_reader: int = 0
    extents_native: int = 0

    def add_reader(self, rs: ReaderStats) -> None:
        """Add a reader's byte counts."""
        self.bytes_read += rs.bytes_read
        self.bytes_direct += rs.bytes_direct
        self.bytes_buffered += rs.bytes_buffered
        self.bytes_prefetched += rs.bytes_prefetched
        self.prefetch = rs.prefetch or self.prefetch
        self.bytes_filled += rs.bytes_filled
        self.extents_native += rs.extents_native


def cache_mode(policy: str | None, nbytes: int, cfg: Settings, stats: LoadStats) -> str:
    """Resolve the page-cache policy of a load reading ``nbytes`` bytes (``policy`` ``None``: ``cfg.cache``,
    ``FLASHPACK_CACHE``) with :func:`flashpack.io.pagecache.decide_cache`; record it in ``stats.cache`` and
    ``stats.cache_reason``.

    Returns:
        ``"keep"`` or ``"bypass"``, the reader's ``cache`` option.

    Raises:
        ValueError: ``policy`` is not ``auto``, ``keep`` or ``bypass``.
    """
    decision = decide_cache(policy or cfg.cache, nbytes, direct=cfg.direct)
    stats.cache, stats.cache_reason = decision.mode, decision.reason
    return decision.mode


def parse_device(device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device`` or ``None`` (CPU) as a ``torch.device``.

    Raises:
        FlashPackError: CUDA asked for but this torch has none, or a device type other than cpu/cuda.
    """
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlashPackError(
            f"cannot load to {dev}: this torch ({torch.__version__}) has no usable CUDA device "
            f"(torch.cuda.is_available() is False); load to 'cpu' or install a CUDA build of torch"
        )
    if dev.type not in ("cpu", "cuda"):
        raise FlashPackError(f"loading to device type {dev.type!r} is not supported (cpu, cuda)")
    return dev


def resolve_keys(wm: WeightMap, keys: Iterable[str] | str | None) -> tuple[list[str], list[str]]:
    """(keys to return, stored keys to read) for a ``keys=`` argument (one string means that one key).

    Raises:
        KeyError: a name is not in the file (the first ten are named).
    """
    if keys is None:
        return wm.keys(), list(wm.tensors)
    wanted = list(dict.fromkeys([keys] if isinstance(keys, str) else keys))
    missing = [k for k in wanted if k not in wm.tensors and k not in wm.aliases]
    if missing:
        raise KeyError(f"{wm.path}: keys not in the file: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    stored = list(dict.fromkeys(wm.aliases.get(k, k) for k in wanted))
    return wanted, stored


@dataclass
class LoadJob:
    """One load, planned: what to return, what to read and how.

    Attributes:
        wm: the validated weight map (it records the file's identity).
        wanted: keys to return, in file order (aliases included); ``stored``: the stored keys behind them.
        dtypes: stored key -> torch dtype.
        plan: the regions, extents and checksum chunks to read.
        verify: whether checksums are verified.
        cfg: the settings, read once for this load.
    """

    wm: WeightMap
    wanted: list[str]
    stored: list[str]
    dtypes: dict[str, torch.dtype]
    plan: LoadPlan
    verify: bool
    cfg: Settings


def prepare(wm: WeightMap, keys: Iterable[str] | str | None, *, verify: bool | None, cfg: Settings) -> LoadJob:
    """The prelude of every load: keys resolved, dtypes looked up, the plan made.

    Raises:
        KeyError: an unknown key. DtypeError: a wanted tensor's dtype is missing from this torch.
    """
    verify = cfg.verify if verify is None else verify
    wanted, stored = resolve_keys(wm, keys)
    dtypes = {k: torch_dtype(wm.tensors[k].dtype, key=k, path=wm.path) for k in stored}
    plan = make_plan(wm, None if keys is None else stored, extent_nbytes=cfg.extent_nbytes, verify=verify)
    return LoadJob(wm, wanted, stored, dtypes, plan, verify, cfg)


def reconstruct(wm: WeightMap, keys: list[str], buffer: torch.Tensor, plan: LoadPlan,
                dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Zero-copy tensors onto ``buffer`` (uint8, any device) for every stored key in ``keys``.

    On the CPU, each run of same-dtype tensors that lie one after another in ``buffer`` (a dtype block of the
    file) gets a storage of its own over that span of ``buffer`` (``torch.frombuffer``, no copy; the span keeps the
    whole allocation alive): ``torch.save`` of a state_dict refuses one storage viewed as several dtypes
    ("Cannot save multiple tensors or storages that view the same data as different types"), and a saved tensor
    then carries its block, not the whole load. On CUDA every tensor shares ``buffer``'s storage. Each tensor is
    made with ``set_`` rather than as a view, so it has its own autograd version counter: an in-place update of one
    (a BatchNorm running mean in training) does not invalidate the others saved for backward. Zero-size tensors get
    their own empty tensor (never a view of an empty buffer, case C05).
    """
    out: dict[str, torch.Tensor] = {}
    placed: list[tuple[int, str]] = []
    for k in keys:
        t = wm.tensors[k]
        if t.nbytes == 0:
            out[k] = torch.empty(t.shape, dtype=dtypes[k], device=buffer.device)
        else:
            placed.append((plan.buffer_offset(t.offset), k))
    if not placed:
        return out
    placed.sort()
    if buffer.device.type != "cpu":  # one storage; its first byte lies storage_offset bytes before the buffer's
        blocks = [(-buffer.storage_offset(), buffer.untyped_storage(), placed)]
    else:
        whole = memoryview(buffer.numpy())
        blocks = []
        for run in _dtype_runs(wm, placed, dtypes):
            lo, hi = run[0][0], max(bo + wm.tensors[k].nbytes for bo, k in run)
            blocks.append((lo, torch.frombuffer(whole[lo:hi], dtype=torch.uint8).untyped_storage(), run))
    for origin, storage, run in blocks:
        for bo, k in run:
            t, dt = wm.tensors[k], dtypes[k]
            byte_offset = bo - origin  # within ``storage``
            if byte_offset % dt.itemsize:  # cannot happen with this format's 64-byte alignment; kept for safety
                out[k] = buffer[bo:bo + t.nbytes].clone().view(dt).view(t.shape)
                continue
            out[k] = torch.empty(0, dtype=dt, device=buffer.device).set_(storage, byte_offset // dt.itemsize, t.shape)
    return out


def _dtype_runs(wm: WeightMap, placed: list[tuple[int, str]],
                dtypes: dict[str, torch.dtype]) -> list[list[tuple[int, str]]]:
    """``placed`` ((buffer offset, key), sorted by offset) cut into runs of one dtype, each tensor after the last."""
    runs = [[placed[0]]]
    for bo, k in placed[1:]:
        prev_bo, prev = runs[-1][-1]
        if dtypes[k] == dtypes[prev] and bo >= prev_bo + wm.tensors[prev].nbytes:
            runs[-1].append((bo, k))
        else:
            runs.append([(bo, k)])
    return runs


def assemble(job: LoadJob, buffer: torch.Tensor, plan: LoadPlan | None = None) -> dict[str, torch.Tensor]:
    """The returned state_dict: views for the stored keys, and each wanted alias bound to its target (the same
    tensor object). ``plan`` overrides ``job.plan`` when the bytes were laid out differently (a mapping)."""
    tensors = reconstruct(job.wm, job.stored, buffer, plan or job.plan, job.dtypes)
    return {k: tensors[job.wm.aliases.get(k, k)] for k in job.wanted}


__all__ = ["LoadJob", "LoadStats", "aligned_empty", "assemble", "cache_mode", "parse_device", "prepare", "reconstruct",
           "resolve_keys"]
