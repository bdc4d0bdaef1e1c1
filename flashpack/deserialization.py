"""``flashpack.load``, ``flashpack.verify`` and ``assign_from_file`` (a pack into an ``nn.Module``; fal's flashpack
defines it here too): the top of a load. It reads the weight map once (:mod:`flashpack.source`), plans the load once
(:func:`flashpack.loading.common.prepare`) and hands it to one of the load stages: host memory
(:mod:`flashpack.loading.host`), a private mapping (``mmap=True``), a CUDA device through the staging ring
(:mod:`flashpack.loading.staged`) or the ranks of a process group (:mod:`flashpack.loading.distributed`).
The module name is fal's.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from .errors import FlashPackError, ModelMismatchError, ModelNotFoundError, UsageError
from .format import DTYPE_ITEMSIZE, DTYPE_NAMES, TENSOR_ALIGN, WeightMap, torch_dtype, verify_chunk
from .io import Extent, open_reader, read_all
from .io.sync import DeferredInterrupts, HelperThread, Latch
from .loading.common import LoadStats, aligned_empty, assemble, cache_mode, parse_device, prepare, reconstruct
from .loading.distributed import group_for, load_distributed
from .loading.host import mmap_payload, read_into
from .loading.memory import host_buffer
from .loading.staged import load_payload_cuda
from .progress import Progress
from .remote import is_repo_id, resolve_hub_pack
from .settings import CACHE_POLICIES, PAGE_NBYTES, settings
from .source import ShardedWeightMap, is_index_path, read_pack, read_pack_map, read_weight_map, resolve_pack_path

# --------------------------------------------------------------------------- loading


def load(path: str | os.PathLike | WeightMap, *, device: str | torch.device = "cpu", backend: str | None = None,
         keys: Iterable[str] | None = None, verify: bool | None = None, mmap: bool = False,
         process_group=None, src_rank: int | None = None,
         stats: LoadStats | None = None, progress=None, cache: str | None = None, subfolder: str | None = None,
         revision: str | None = None, local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
         token: str | bool | None = None) -> dict[str, torch.Tensor]:
    """Load a flashpack file (or a fal flashpack 0.2-0.4 file) into a state_dict.

    Args:
        path: the file, a sharded pack's index, a folder holding one pack, a Hugging Face Hub repo id
            (``"org/name"``, see :func:`flashpack.remote.is_repo_id`; a local path of that name always wins), or
            the file's :class:`~flashpack.format.WeightMap` from :func:`read_weight_map` (read once and reused;
            the payload reads check it is still the same file). A repo id is fetched with
            ``huggingface_hub.snapshot_download``: its ``model.flashpack`` (of a sharded pack, its index and the
            shards holding ``keys``), else the one ``*.flashpack`` of the folder (:func:`flashpack.remote.resolve_hub_pack`).
        subfolder: a folder inside the repo (or inside the local folder ``path``) holding the pack.
        revision, local_files_only, cache_dir, token: for a repo id, as for ``huggingface_hub.snapshot_download``
            (``HF_HUB_OFFLINE=1`` also keeps it offline); ignored for a local path.
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
        progress: ``progress(bytes done, bytes total)`` as the file's bytes come in (host and CUDA loads;
            ``None``: no callback). A tqdm bar in bytes is shown for loads over 1 GiB when stderr is a
            terminal, unless ``FLASHPACK_PROGRESS=0``.
        cache: page-cache policy (default ``FLASHPACK_CACHE``, ``auto``): ``"keep"`` reads through the page cache,
            each range read ahead with madvise(2) ``MADV_POPULATE_READ`` (kernel readahead, no copy) by a helper
            thread as it is queued, then copied out with preadv(2) or ``UFFDIO_COPY``, so a cold load runs near disk speed and leaves the file cached for the next
            one; ``"bypass"`` reads uncached ranges with O_DIRECT and leaves nothing cached; ``"auto"`` keeps when
            the bytes read are at most half of MemAvailable, else bypasses. Cached ranges are always copied out of
            the cache by several threads. ``stats.cache`` and ``stats.cache_reason`` say what was decided and why.
            In a process group, ranks on one host that see the same file each read it through the cache when it
            is kept (see :mod:`flashpack.loading.distributed`). Ignored with ``mmap=True``.

    A sharded pack (``path`` its ``.flashpack.index.json``, or a folder holding it) loads as one plan: every
    needed shard's extents in flight together (one reader per shard, :class:`flashpack.io.multi.ShardsReader`),
    one destination allocation, each shard's checksums; ``keys=`` opens only the shards holding those keys.

    Returns:
        ``dict[str, Tensor]`` in file order, stored keys first, then aliases. Every tensor is a view into one
        allocation on ``device``; an alias is the same tensor object as its target. On the CPU the memory is
        ordinary, private and writable (in-place ops and optimizer steps work), and each dtype block of the file
        has a storage of its own over it, so ``torch.save`` of the result (or of a model filled from it) works
        with several dtypes; on CUDA all tensors share one storage (:func:`flashpack.loading.common.reconstruct`).

    Raises:
        FormatError (``ValueError``): the file breaks an invariant of docs/FORMAT.md, or a checksum fails.
        DtypeError: a wanted tensor's dtype is missing from this torch (names key and dtype).
        KeyError: a name in ``keys`` is not in the file.
        ReadError (``OSError``): a read failed or came back short, naming file and offset.
        BackendUnavailableError (``RuntimeError``): the named backend cannot run here, with the reason.
        FlashPackError: ``device`` is CUDA but torch has no CUDA.
        ValueError: ``cache`` is not ``auto``, ``keep`` or ``bypass``.
        ModelNotFoundError (``FileNotFoundError``): a repo id that is not cached while offline, cannot be
            fetched, or holds no pack (naming the id and what to do); a missing ``subfolder``.
        KeyboardInterrupt: while the payload is read (host or CUDA), Ctrl-C in the main thread, with Python's
            default handler, is held back (:class:`flashpack.io.sync.DeferredInterrupts`): the load stops at its
            next finished extent (or at the end), cleans up to the end (threads joined, memory and descriptors
            freed) and raises it then.
        No tensor is returned when anything fails.
    """
    path = _local_pack(path, keys, subfolder=subfolder, revision=revision, local_files_only=local_files_only,
                       cache_dir=cache_dir, token=token)
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
    if isinstance(path, WeightMap):
        wm = path
    else:
        where = resolve_pack_path(path)  # a folder: its one pack
        # a sharded pack: the merged map of the shards holding ``keys``
        wm = read_pack_map(where, keys=keys) if is_index_path(where) else read_weight_map(where)
    job = prepare(wm, keys, verify=verify, cfg=cfg)
    plan = job.plan
    if mmap and isinstance(wm, ShardedWeightMap):
        if dev.type != "cpu":
            raise FlashPackError(f"{wm.path}: mmap=True maps the files into host memory; it needs device='cpu', got {dev}")
        return _mmap_shards(job, stats)
    if mmap:
        if dev.type != "cpu":
            raise FlashPackError(f"{wm.path}: mmap=True maps the file into host memory; it needs device='cpu', got {dev}")
        buffer, plan = mmap_payload(wm, plan, job.verify, stats)
    else:
        mode = cache_mode(cache, plan.read_nbytes, cfg, stats)
        # Ctrl-C held back while the reads run, so it cannot cut their cleanup (a review found nine ways it did);
        # the load stops at its next finished extent instead (Progress calls interrupts.check)
        with DeferredInterrupts() as interrupts:
            bar = Progress(plan.read_nbytes, progress, cfg, f"load {os.path.basename(wm.path)}",
                           stop=interrupts.check if interrupts.active else None)
            try:
                if dev.type == "cuda":
                    buffer = load_payload_cuda(wm, plan, dev, backend=backend, verify=job.verify, stats=stats,
                                               cfg=cfg, progress=bar, cache=mode)
                else:
                    dest = host_buffer(plan.buffer_nbytes, huge_pages=cfg.huge_pages, fill=mode == "keep",
                                       userfaultfd=cfg.userfaultfd)
                    stats.memory = dest.kind
                    buffer = dest.tensor
                    read_into(wm, plan, buffer, backend=backend, verify=job.verify, stats=stats, cfg=cfg,
                              progress=bar, populate=dest.prefault, cache=mode, fill=dest.region)
            finally:
                bar.close()
    return assemble(job, buffer, plan)


def _local_pack(path, keys, *, subfolder: str | None, **hub):
    """``path`` as a local path: a Hub repo id fetched (:func:`flashpack.remote.resolve_hub_pack`), a local folder
    with ``subfolder`` applied, anything else as it is."""
    if is_repo_id(path):
        return resolve_hub_pack(path, subfolder=subfolder, keys=keys, **hub)
    if subfolder and path is not None and not isinstance(path, WeightMap):
        folder = os.path.join(os.fspath(path), subfolder)
        if not os.path.isdir(folder):
            raise ModelNotFoundError(f"{folder}: no such folder; check subfolder={subfolder!r} and the path")
        return folder
    return path


def _mmap_shards(job, stats: LoadStats) -> dict[str, torch.Tensor]:
    """``mmap=True`` for a sharded pack: each shard mapped on its own (one mapping per shard file)."""
    wm = job.wm
    tensors: dict[str, torch.Tensor] = {}
    for shard in wm.shards:
        stored = [k for k in job.stored if k in shard.tensors]
        if not stored:
            continue
        sub = prepare(shard, stored, verify=job.verify, cfg=job.cfg)
        buffer, plan = mmap_payload(shard, sub.plan, job.verify, stats)
        tensors.update(reconstruct(shard, stored, buffer, plan, job.dtypes))
    return {k: tensors[wm.aliases.get(k, k)] for k in job.wanted}


def _name(path) -> str:
    return path.path if isinstance(path, WeightMap) else os.fspath(path) if path is not None else "<no path>"


# --------------------------------------------------------------------------- a load started early


class _Cancelled(Exception):
    """Raised by :class:`EarlyLoad`'s progress hook to stop a load nobody wants any more."""


class EarlyLoad:
    """A CPU :func:`load` of a pack started on a background thread, so that reading the file overlaps building the
    module it fills: ``from_pretrained_flashpack`` and ``from_flashpack`` build the skeleton (Python on the calling
    thread, ~14 ms for BERT, ~50 ms for a 1 GiB Llama here) while the reader's worker threads copy the bytes from the
    disk or the page cache. :func:`assign_from_file` takes the result through its ``early=`` argument.

    Use it as a context manager: leaving the block without :meth:`take` having handed the tensors out (the build
    failed, the pack did not match the model) cancels the load and waits for its thread, so no read outlives the
    call and the memory is freed. Cancelling stops the load at its next finished extent (its progress hook raises),
    and the load's own cleanup runs (every read finished, the userfaultfd region released).

    Known limit: ``ignore_*`` options select keys by their stored names here; when the model's library renames keys
    (an older checkpoint layout) and an ignore option matches only a renamed name, the key sets differ, the early
    result is dropped and the pack is read a second time (correct, slower).

    Args:
        wm: the pack's weight map (read once by the caller; the load checks the file is still that file).
        keys: the keys to load (stored keys and aliases).
        backend, verify, cache: as for :func:`load`. The target is always the CPU.

    Attributes:
        keys: the keys requested, in order.
    """

    def __init__(self, wm: WeightMap, keys: Iterable[str], *, backend: str | None = None, verify: bool | None = None,
                 cache: str | None = None):
        self.wm = wm
        self.keys = list(keys)
        self._options = (backend, verify, cache)
        self._renames: dict[str, str] = {}
        self._cancel = Latch()
        self._result: dict[str, torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._taken = False

        def progress(done: int, total: int) -> None:
            if self._cancel.is_set():
                raise _Cancelled()

        def run() -> None:
            try:
                self._result = load(wm, keys=self.keys, backend=backend, verify=verify, cache=cache, progress=progress)
            except BaseException as e:  # handed to the caller by take()
                self._error = e

        # an interrupt right after the thread started: the load runs to its end unreferenced and is freed
        self._thread = HelperThread()
        self._thread.start(run)

    def running(self) -> bool:
        """Whether the load's thread is still running."""
        return self._thread.running()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the load's thread to end (loaded, failed or cancelled), at most ``timeout_s`` seconds (``None``:
        without limit); whether it ended."""
        return self._thread.join(timeout_s)

    def rename(self, renames: dict[str, str]) -> None:
        """Name the loaded tensors as the model does: ``{stored key: model key}``
        (:func:`flashpack.integrations._shared.rename_weight_map` renamed the weight map the same way)."""
        self._renames = dict(renames)

    def serves(self, wm: WeightMap, *, backend: str | None = None, verify: bool | None = None,
               cache: str | None = None) -> bool:
        """Whether this load reads the same pack as ``wm`` (the same files: path and
        :func:`flashpack.source.file_identity` of each, shards included) with the same ``backend``/``verify``/``cache``
        options, so its result may stand for ``load(wm, ...)``. Keys are checked by :meth:`take`."""
        return _pack_identity(wm) == _pack_identity(self.wm) and (backend, verify, cache) == self._options

    def take(self, keys: list[str]) -> dict[str, torch.Tensor] | None:
        """The loaded state_dict restricted to ``keys``, in that order, after waiting for the load.

        Returns ``None`` (and cancels the load) when the load holds other keys than exactly ``keys`` (after
        :meth:`rename`), or when it was already taken or cancelled: the caller then loads ``keys`` itself, and no
        unwanted tensor keeps memory alive.

        Raises:
            Whatever the load raised (ChecksumMismatchError, ReadError, ...).
        """
        if self._taken or self._cancel.is_set():
            return None
        names = [self._renames.get(k, k) for k in self.keys]
        if set(names) != set(keys) or len(names) != len(keys):
            self.cancel()
            return None
        self.wait()
        if self._error is not None:
            raise self._error
        sd = self._result
        self._result, self._taken = None, True
        renamed = {self._renames.get(k, k): t for k, t in sd.items()}
        return {k: renamed[k] for k in keys}

    def cancel(self) -> None:
        """Stop the load (at its next finished extent), wait for its thread and drop what it loaded."""
        self._cancel.set()
        self.wait()
        self._result = self._error = None

    def __enter__(self) -> "EarlyLoad":
        return self

    def __exit__(self, *exc) -> None:
        if not self._taken:
            self.cancel()


def _pack_identity(wm: WeightMap) -> tuple:
    """The files a weight map describes: (path, file_id) of each (every shard of a sharded pack)."""
    files = wm.shards if isinstance(wm, ShardedWeightMap) else [wm]
    return tuple((os.path.realpath(w.path), w.file_id) for w in files)


def start_early_load(wm: WeightMap, device, *, backend: str | None = None, verify: bool | None = None,
                     mmap: bool = False, process_group=None, use_distributed_loading: bool = False,
                     ignore_names: Iterable[str] | None = None, ignore_prefixes: Iterable[str] | None = None,
                     ignore_suffixes: Iterable[str] | None = None, **assign_options):
    """Start an :class:`EarlyLoad` of every key of ``wm`` that the ``ignore_*`` options keep, for a call
    ``assign_from_file(model, wm, device, ..., early=...)`` with the same options once the model is built.

    Args:
        wm: the pack's weight map; device: the target (``torch.device`` or anything it accepts).
        backend, verify, mmap, process_group, use_distributed_loading, ignore_*: the options the
            :func:`assign_from_file` call will get; any other of its options (``strict``, ...) is accepted and
            does not matter here.

    Returns:
        A context manager: the running ``EarlyLoad``, or ``None`` (``contextlib.nullcontext``) when the load
        cannot start before the model exists: a target other than the CPU, ``mmap=True``, distributed loading (a
        group, fal's ``use_distributed_loading``, or ``FLASHPACK_DISTRIBUTED=1`` with an initialised default group),
        or no key to load. Leaving the block cancels a load that :meth:`EarlyLoad.take` did not hand out.
    """
    if torch.device(device if device is not None else "cpu").type != "cpu" or mmap or use_distributed_loading \
            or process_group is not None or group_for(None, settings()) is not None:
        return contextlib.nullcontext()
    ignored = ignore_filter(ignore_names, ignore_prefixes, ignore_suffixes)
    keys = [k for k in wm.keys() if not ignored(k)]
    if not keys:
        return contextlib.nullcontext()
    return EarlyLoad(wm, keys, backend=backend, verify=verify)


# --------------------------------------------------------------------------- into a model


def model_targets(model: torch.nn.Module):
    """Parameters and persistent buffers by state_dict key; ties grouped by object identity.

    Returns:
        (groups, kinds): ``groups`` maps id(tensor) -> list of keys sharing that object (tied weights);
        ``kinds`` maps key -> ("param"|"buffer", the current tensor).
    """
    groups, kinds, *_ = _model_slots(model)
    return groups, kinds


def _model_slots(model: torch.nn.Module):
    """:func:`model_targets` plus ``owners``: key -> (the module holding it, its name there), ``loose``: the
    non-persistent buffers as (module, name, tensor), each module once, and ``device``: the device of the model's
    first parameter (else buffer) not on ``meta``, or ``None``; all found in one walk over the modules
    (``get_submodule`` per key took ~7 ms of a 336-key Llama's assignment; ``model.parameters()`` and
    ``model.buffers()`` walked again to find the device of an all-meta model took ~1.3 ms of BERT's)."""
    groups: dict[int, list[str]] = {}
    kinds: dict[str, tuple[str, torch.Tensor]] = {}
    owners: dict[str, tuple[torch.nn.Module, str]] = {}
    loose: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    device = None
    modules = list(model.named_modules(remove_duplicate=False))
    # parameters first, in named_parameters(remove_duplicate=False) order: module by module, as named_modules walks
    for mod_name, mod in modules:
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            if device is None and p.device.type != "meta":
                device = p.device
            key = f"{mod_name}.{pname}" if mod_name else pname
            groups.setdefault(id(p), []).append(key)
            kinds[key] = ("param", p)
            owners[key] = (mod, pname)
    seen: set[int] = set()
    buffer_device = None
    for mod_name, mod in modules:
        first = id(mod) not in seen
        seen.add(id(mod))
        for bname, b in mod._buffers.items():
            if b is None:
                continue
            if buffer_device is None and b.device.type != "meta":
                buffer_device = b.device
            if bname in mod._non_persistent_buffers_set:
                if first:
                    loose.append((mod, bname, b))
                continue
            key = f"{mod_name}.{bname}" if mod_name else bname
            if key in kinds:
                continue
            groups.setdefault(id(b), []).append(key)
            kinds[key] = ("buffer", b)
            owners[key] = (mod, bname)
    return groups, kinds, owners, loose, device if device is not None else buffer_device


def check_mmap_device(device, where) -> None:
    """The rule of ``mmap=True`` for models: the weights stay in a private mapping of the pack in CPU memory, so the
    target must be the CPU. Checked before any file is opened or any CUDA call is made.

    Args:
        device: the target (anything ``torch.device`` accepts, or ``None`` for the CPU).
        where: the pack or folder, named in the message.

    Raises:
        UsageError (``ValueError``): ``device`` is not the CPU; the message names ``where`` and what to pass instead.
    """
    dev = torch.device(device if device is not None else "cpu")
    if dev.type != "cpu":
        raise UsageError(
            f"{os.fspath(where)}: mmap=True keeps the weights in a private mapping of the pack in CPU memory, but the "
            f"target device is {dev}; load to the CPU (device_map='cpu') for a zero-copy load, or leave mmap=False to "
            f"load onto {dev}")


def assign_from_file(model: torch.nn.Module, path: str | os.PathLike | WeightMap, device=None,
                     strict: bool | None = None, strict_params: bool = True, strict_buffers: bool = False,
                     keep_flash_ref_on_model: bool = False, silent: bool = True, num_streams: int | None = None,
                     chunk_bytes: int | None = None, ignore_names: Iterable[str] | None = None,
                     ignore_prefixes: Iterable[str] | None = None, ignore_suffixes: Iterable[str] | None = None,
                     use_distributed_loading: bool = False, distributed_sharded: bool = False,
                     distributed_shard_strategy: str | None = None, rank: int | None = None,
                     local_rank: int | None = None, world_size: int | None = None, coerce_dtype: bool = False, *,
                     backend: str | None = None, verify: bool | None = None, mmap: bool = False,
                     process_group=None, keys: Iterable[str] | None = None, early: EarlyLoad | None = None):
    """Load a flashpack file and assign its tensors into ``model`` as zero-copy views.

    Parameters become new ``nn.Parameter`` objects (``requires_grad`` kept) over the loaded memory;
    persistent buffers are replaced by the loaded tensors; non-persistent buffers keep their values.
    Parameters tied in the model (one object under several names) stay tied: every name gets the same
    new ``Parameter``, filled from whichever of the names the file stores (aliases included).

    Args:
        model: the module, on any device or on ``meta`` (built without allocating weights).
        path: the file, a sharded pack's index or a folder holding one pack (:func:`flashpack.source.read_pack`),
            or a :class:`~flashpack.format.WeightMap` (read once and reused).
        device: where the weights go; default: the device of the model's first non-meta tensor, else CPU.
        strict: ``True``: raise when parameters or persistent buffers are missing or keys are unexpected;
            ``False``: warn instead, naming anything left on the meta device. ``None`` (default, fal's rule):
            ``strict_params`` decides for parameters, ``strict_buffers`` for buffers, and unexpected keys raise
            when either is true.
        strict_params: with ``strict=None``, raise on missing parameters (default ``True``).
        strict_buffers: with ``strict=None``, raise on missing persistent buffers (default ``False``: a
            missing buffer keeps the value the model's ``__init__`` gave it).
        keep_flash_ref_on_model: also set ``model._flash_shared_storage`` (the loaded state_dict) and
            ``model._flash_shared_storage_meta`` (the :class:`~flashpack.format.WeightMap`), as fal does.
        silent: ``False`` prints one summary line on stdout (keys assigned, elements, ignored and missing).
        num_streams, chunk_bytes: fal's performance knobs; accepted and ignored (this reader sizes its
            queue and staging from the ``FLASHPACK_*`` settings, see :mod:`flashpack.settings`).
        ignore_names, ignore_prefixes, ignore_suffixes: keys equal to / starting with / ending with one of
            these are neither loaded from the file nor counted as missing in the model.
        use_distributed_loading: load through ``torch.distributed`` (``process_group="default"``), first
            initialising the default group from ``rank``/``local_rank``/``world_size`` (or the ``RANK``,
            ``LOCAL_RANK``, ``WORLD_SIZE`` variables) when it is not yet initialised and the world is > 1.
        distributed_sharded: with distributed loading, every rank reads about 1/world_size of the file
            (``True``) or rank 0 reads it all and broadcasts (``False``, fal's default).
        distributed_shard_strategy: fal's ``"contiguous"`` or ``"windows"``; accepted, the division is this
            library's own (validated, otherwise ignored).
        rank, local_rank, world_size: for ``use_distributed_loading`` (see above).
        coerce_dtype: on a dtype difference, cast the file's tensor to the model's dtype (a copy) instead of
            raising.
        backend, verify, process_group: as for :func:`load`.
        mmap: zero-copy CPU load (:func:`load`'s ``mmap=True``): the parameters and buffers become views of a
            private copy-on-write mapping of the pack, nothing is copied up front; they are writable and writes
            never reach the file. ``device`` (or the model's device) must be the CPU. Checksums are checked (every
            chunk read once with pread before the mapping is handed out) only with ``verify=True``. Caveat: if
            the file is truncated or replaced in place while the model is alive, touching a lost page raises
            SIGBUS and kills the process (mmap(2)); keep the pack unchanged while the model uses it.
        keys: assign only these keys (the rest count as missing).
        early: an :class:`EarlyLoad` of this pack (same files and ``verify``/``backend``, CPU target) started
            before ``model`` was built; its tensors are used when it loaded exactly the keys assigned here, else it
            is cancelled and those keys are loaded as usual. Ignored with ``mmap=True`` or distributed loading.

    Returns:
        ``torch.nn.modules.module._IncompatibleKeys(missing_keys, unexpected_keys)``, like ``load_state_dict``.

    Raises:
        ModelMismatchError (``ValueError``): a shape or dtype differs (naming the key and both values),
            tied names hold different values in the file, or (strict) keys are missing/unexpected.
            Checked before the model is changed: on error the model is untouched.
        ValueError: ``distributed_shard_strategy`` is not ``"contiguous"``, ``"windows"`` or ``None``.
        UsageError (``ValueError``): ``mmap=True`` with a device other than the CPU (before any file is read).
        Everything :func:`load` raises.
    """
    if distributed_shard_strategy not in (None, "contiguous", "windows"):
        raise ValueError(f"distributed_shard_strategy must be 'contiguous', 'windows' or None, "
                         f"got {distributed_shard_strategy!r}")
    groups, kinds, owners, loose, first_device = _model_slots(model)
    # default: the device of the model's first parameter or buffer not on meta, else the CPU
    dev = torch.device(device) if device is not None else first_device or torch.device("cpu")
    if mmap:
        check_mmap_device(dev, path.path if isinstance(path, WeightMap) else path)
    if isinstance(path, WeightMap):
        wm = path
    else:
        where = resolve_pack_path(path)  # a folder: its one pack
        # a sharded pack: the merged map of only the shards holding ``keys``
        wm = read_pack_map(where, keys=keys, missing_ok=True) if is_index_path(where) else read_weight_map(where)
    path = wm.path
    ignored = ignore_filter(ignore_names, ignore_prefixes, ignore_suffixes)
    src_rank = None
    if use_distributed_loading:
        process_group = process_group if process_group is not None else _init_distributed(rank, local_rank,
                                                                                            world_size)
        src_rank = None if distributed_sharded or process_group is None else 0

    file_keys = {k for k in wm.keys() if not ignored(k)}
    unexpected = [k for k in wm.keys() if k not in kinds and k in file_keys]
    if keys is not None:  # only these are assigned: every other model key counts as missing
        keys = list(dict.fromkeys([keys] if isinstance(keys, str) else keys))
        file_keys &= set(keys)
    missing = [k for k in kinds if k not in file_keys and not ignored(k)]
    # A tie whose names are partly in the file is not missing: the stored name fills all (case C03a).
    tied_ok = {k for names in groups.values() if any(n in file_keys for n in names) for k in names}
    missing = [k for k in missing if k not in tied_ok]
    strict_p = strict_params if strict is None else strict
    strict_b = strict_buffers if strict is None else strict
    strict_u = (strict_params or strict_buffers) if strict is None else strict
    fatal_missing = [k for k in missing if (strict_p if kinds[k][0] == "param" else strict_b)]
    if fatal_missing or (strict_u and unexpected):
        raise ModelMismatchError(
            f"{path} does not match {type(model).__name__}: missing keys {fatal_missing[:20]}"
            f"{' ...' if len(fatal_missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass strict=False to load what matches"
            + ("" if strict is not None else " (strict=None: missing buffers are allowed unless strict_buffers=True)")
        )
    coerce: set[str] = set()
    for k in (set(kinds) & file_keys):
        t, (_, cur) = wm.tensors[wm.aliases.get(k, k)], kinds[k]
        if tuple(cur.shape) != t.shape:
            raise ModelMismatchError(f"{path}: key {k!r}: shape {list(t.shape)} in the file, {list(cur.shape)} in the model")
        fdt = torch_dtype(t.dtype, key=k, path=path)
        if fdt != cur.dtype:
            if coerce_dtype:
                coerce.add(k)
                continue
            raise ModelMismatchError(f"{path}: key {k!r}: dtype {fdt} in the file, {cur.dtype} in the model; "
                                     f"build the model with the file's dtype, repack with target_dtype, "
                                     f"or pass coerce_dtype=True to cast while loading")
    load_keys = [k for k in wm.keys() if k in kinds and k in file_keys]
    # non-persistent buffers built elsewhere follow the weights: found now, while an early load still reads
    follow = [(mod, bname) for mod, bname, b in loose if b.device.type != "meta" and b.device != dev] \
        if dev.type != "meta" else []
    # The weight map checked above is the one loaded: a file replaced in between is detected, not mixed in.
    sd = None
    if early is not None:
        if dev.type == "cpu" and not mmap and process_group is None \
                and early.serves(wm, backend=backend, verify=verify):
            sd = early.take(load_keys)
        else:
            early.cancel()
    if sd is None:
        sd = load(wm, device=dev, backend=backend, keys=load_keys, verify=verify, mmap=mmap,
                  process_group=process_group, src_rank=src_rank)
    for k in coerce:  # coerce_dtype: one cast copy per differing key
        sd[k] = sd[k].to(kinds[k][1].dtype)

    sources = []  # check every tie before changing the model: on error it stays untouched
    for names in groups.values():
        present = [n for n in names if n in sd]
        if not present:
            continue
        src = sd[present[0]]
        for n in present[1:]:
            other = sd[n]
            if other is not src and not torch.equal(other, src):
                raise ModelMismatchError(
                    f"{path}: {present[0]!r} and {n!r} are tied in the model but hold different values in the file; "
                    f"untie them in the model or repack the file"
                )
        sources.append((names, src))
    used: set[int] = set()
    for i, (names, src) in enumerate(sources):
        if id(src) in used:  # tied (aliased) in the file but not in the model: give each its own memory
            src = src.clone()
            sources[i] = (names, src)
        used.add(id(src))
    for names, src in sources:
        kind, cur = kinds[names[0]]
        new = torch.nn.Parameter(src, requires_grad=cur.requires_grad) if kind == "param" else src
        for n in names:
            mod, leaf = owners[n]
            if kind == "param":
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new
    for mod, bname in follow:
        mod._buffers[bname] = mod._buffers[bname].to(dev)
    if keep_flash_ref_on_model:
        model._flash_shared_storage = sd
        model._flash_shared_storage_meta = wm
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"] \
        if (missing or unexpected) else []
    if missing or unexpected:
        if strict is False or unexpected or still_meta:
            warnings.warn(
                f"{path}: loaded {'with strict=False' if strict is False else 'leniently'}: missing keys "
                f"{missing[:20]}, unexpected keys {unexpected[:20]}"
                + (f"; still on the meta device (no data): {still_meta[:20]}" if still_meta else ""),
                stacklevel=2,
            )
    if not silent:
        n_elems = sum(t.numel() for t in sd.values())
        print(f"flashpack: assigned {len(sd)} keys ({n_elems} elements) from {path} to {type(model).__name__} on "
              f"{dev}; {len(missing)} missing, {len(unexpected)} unexpected, "
              f"{len(wm.keys()) - len([k for k in wm.keys() if not ignored(k)])} ignored")
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def _init_distributed(rank: int | None, local_rank: int | None, world_size: int | None):
    """fal's ``use_distributed_loading``: the default process group, initialised from the arguments or the
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` variables when it is not yet; ``None`` (a plain load) for a world of 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return "default"
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    local_rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", rank))
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return None
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world_size)
    else:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    return "default"


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
        path: the file; or a sharded pack's index (or its folder): the index, every shard's weight map
            checksum and keys against it, then every shard as a file.
        backend: reader backend, as for :func:`load`.
        buffer_nbytes: host memory used, in bytes (rounded to whole checksum chunks).

    Returns:
        A :class:`VerifyReport` (for a sharded pack: ``path`` is the index, counts summed over the shards,
        ``source`` is ``"flashpack-sharded"``). Files without checksums (fal's) are checked for layout only.

    Raises:
        FormatError naming the first bad field, block or chunk (and its shard); ShardMissingError; ReadError.
    """
    path = resolve_pack_path(path)
    if is_index_path(path):
        return _verify_sharded(path, backend=backend, buffer_nbytes=buffer_nbytes)
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
    with DeferredInterrupts() as interrupts, open_reader(path, backend, expect=wm.file_id, cfg=cfg) as reader:
        for i in range(0, len(chunks), per):
            interrupts.check()  # Ctrl-C: between batches, so the reader closes uncut
            batch = chunks[i:i + per]
            exts = []
            for j, c in enumerate(batch):
                end = min(c.offset + c.nbytes + (-(c.offset + c.nbytes)) % PAGE_NBYTES, wm.file_nbytes)
                exts.append(Extent(c.offset, end - c.offset, mv[j * stride:j * stride + end - c.offset], c))
            read_all(reader, exts, lambda e: verify_chunk(wm, e.tag, e.dest[:e.tag.nbytes]))
            report.chunks_verified += len(batch)
            report.bytes_verified += sum(c.nbytes for c in batch)
    return report


# --------------------------------------------------------------------------- fal's names


def option_strings(value: Iterable[str] | str | None) -> tuple[str, ...]:
    """One of fal's ``ignore_*`` options (``None``, a lone string, or an iterable of strings) as a tuple."""
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def ignore_filter(ignore_names: Iterable[str] | None = None, ignore_prefixes: Iterable[str] | None = None,
                  ignore_suffixes: Iterable[str] | None = None):
    """fal's ``ignore_*`` rule as a predicate: ``key -> True`` when ``key`` equals one of ``ignore_names``,
    starts with one of ``ignore_prefixes`` or ends with one of ``ignore_suffixes`` (a lone string counts as a
    one-element list)."""
    names = set(option_strings(ignore_names))
    prefixes, suffixes = option_strings(ignore_prefixes), option_strings(ignore_suffixes)
    if not (names or prefixes or suffixes):
        return lambda key: False
    return lambda key: key in names or key.startswith(prefixes) or key.endswith(suffixes)


def fal_metadata(wm: WeightMap) -> dict[str, Any]:
    """The weight map in the schema of fal's ``flashpack_v4`` footer (what fal's ``get_flashpack_file_metadata``
    returns), for any file this library reads.

    Returns:
        ``{"format": "flashpack_v4", "align_bytes", "total_payload_bytes", "total_elems", "macroblocks":
        [{dtype, offset_bytes, length_bytes, length_elems}], "index": [{name, shape, offset, length,
        macroblock}]}``. ``dtype`` is a torch name (``"bfloat16"``); ``offset_bytes`` is absolute in the file
        (bytes); ``offset``/``length`` count elements inside the macroblock, as in fal's files;
        ``total_payload_bytes`` is the end of the last block (bytes). Aliases appear as index entries at their
        target's place. ``align_bytes`` is this format's tensor alignment (64) for this library's files (0 for fal's;
        :func:`get_flashpack_file_metadata` returns fal's footer as stored). User metadata, if any, is under ``"metadata"``.
    """
    blocks = {b.dtype: i for i, b in enumerate(wm.blocks)}
    macroblocks = [{"dtype": DTYPE_NAMES[b.dtype], "offset_bytes": b.offset, "length_bytes": b.nbytes,
                    "length_elems": b.nbytes // DTYPE_ITEMSIZE[b.dtype]} for b in wm.blocks]
    index = []
    for key in wm.keys():
        t = wm.tensors[wm.aliases.get(key, key)]
        item = DTYPE_ITEMSIZE[t.dtype]
        mb = blocks.get(t.dtype)
        offset = 0 if mb is None or t.nbytes == 0 else (t.offset - wm.blocks[mb].offset) // item
        index.append({"name": key, "shape": list(t.shape), "offset": offset, "length": t.nbytes // item,
                      "macroblock": 0 if mb is None else mb})
    doc: dict[str, Any] = {
        "format": "flashpack_v4",
        "align_bytes": TENSOR_ALIGN if wm.source == "flashpack" else 0,
        "total_payload_bytes": max((b.offset + b.nbytes for b in wm.blocks), default=0),
        "total_elems": sum(m["length_elems"] for m in macroblocks),
        "macroblocks": macroblocks,
        "index": index,
    }
    if wm.metadata:
        doc["metadata"] = dict(wm.metadata)
    return doc


def get_flashpack_file_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """fal's name: the footer of a fal file as stored (``flashpack_v3``/``v4``), or :func:`fal_metadata` of
    this library's file. Reads only the weight map.

    Raises:
        NotAFlashPackError, FormatError (both ``ValueError``, as fal raises ``ValueError``); ``OSError``.
    """
    wm = read_weight_map(path)
    if wm.source.startswith("fal-"):
        import json

        with open(wm.path, "rb") as f:
            f.seek(wm.index_offset)
            return json.loads(f.read(wm.index_nbytes - 16).decode("utf-8"))
    return fal_metadata(wm)


def is_flashpack_file(path: str | os.PathLike) -> bool:
    """fal's name: ``True`` when ``path`` is a readable flashpack file (this library's or fal's) whose weight map
    passes validation; ``False`` for anything else (no exception, as in fal)."""
    try:
        read_weight_map(path)
    except (OSError, ValueError, FlashPackError):
        return False
    return True


def read_flashpack_file(path: str | os.PathLike, device: str | torch.device = "cpu", chunk_bytes: int | None = None,
                        num_streams: int | None = None, silent: bool = True,
                        metadata: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fal's low-level read, here :func:`load` plus :func:`get_flashpack_file_metadata`.

    Args:
        path, device: as for :func:`load`.
        chunk_bytes, num_streams, silent: fal's knobs; accepted and ignored.
        metadata: ignored (the weight map is read and validated from the file).

    Returns:
        ``(state_dict, meta)``: unlike fal, the first item is the ``dict[str, Tensor]`` :func:`load` returns
        (not fal's ``FlashTensorStorage``); :func:`iterate_from_flash_tensor` accepts it with ``meta``.
    """
    wm = read_weight_map(path)
    return load(wm, device=device), get_flashpack_file_metadata(wm.path)


def read_flashpack_file_distributed(path: str | os.PathLike, device: str | torch.device = "cuda", src: int = 0,
                                    chunk_bytes: int | None = None, num_streams: int | None = None,
                                    silent: bool = True, metadata: dict[str, Any] | None = None,
                                    sharded: bool = False, shard_strategy: str | None = None,
                                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fal's distributed read over the initialised default ``torch.distributed`` group: rank ``src`` reads the
    file and broadcasts it (``sharded=False``), or every rank reads about 1/world_size and the ranks exchange
    the bytes (``sharded=True``). Every rank returns the whole state_dict on ``device``.

    Args:
        chunk_bytes, num_streams, silent, metadata: accepted and ignored; ``shard_strategy`` is validated
            (``"contiguous"``, ``"windows"`` or ``None``) and otherwise ignored.

    Returns:
        ``(state_dict, meta)`` as :func:`read_flashpack_file`; ``meta`` only where the file was read (``src``
        unsharded), ``{}`` elsewhere.

    Raises:
        FlashPackError: torch.distributed is not initialised. ValueError: a bad ``shard_strategy``.
    """
    if shard_strategy not in (None, "contiguous", "windows"):
        raise ValueError(f"shard_strategy must be 'contiguous', 'windows' or None, got {shard_strategy!r}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise FlashPackError(f"{os.fspath(path)}: read_flashpack_file_distributed needs torch.distributed to be "
                             f"initialised first (torch.distributed.init_process_group)")
    reads = sharded or dist.get_rank() == src
    sd = load(path, device=device, process_group="default", src_rank=None if sharded else src)
    return sd, (get_flashpack_file_metadata(path) if reads else {})


def iterate_from_flash_tensor(flash_tensor, metadata: dict[str, Any] | None = None,
                              ignore_names: Iterable[str] | None = None, ignore_prefixes: Iterable[str] | None = None,
                              ignore_suffixes: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """fal's iterator: ``(key, tensor)`` pairs of what :func:`read_flashpack_file` returned, skipping ignored
    keys (rule of :func:`ignore_filter`). ``metadata`` is accepted for fal's signature; the keys come from the
    state_dict."""
    ignored = ignore_filter(ignore_names, ignore_prefixes, ignore_suffixes)
    for key, tensor in flash_tensor.items():
        if not ignored(key):
            yield key, tensor


def revert_from_file(path: str | os.PathLike, silent: bool = True) -> dict[str, torch.Tensor]:
    """fal's name: the whole state_dict of ``path`` on the CPU, every tensor in its own memory (no views, no
    shared storage: ready for ``safetensors.torch.save_file``), checksums verified.

    Raises:
        Everything :func:`load` raises.
    """
    sd = load(path, verify=True)
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        c = torch.empty(t.shape, dtype=t.dtype)
        if t.numel():
            c.reshape(-1).view(torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
        out[k] = c
    return out


def _verify_sharded(path: str, *, backend: str | None, buffer_nbytes: int) -> VerifyReport:
    pack = read_pack(path)  # index invariants, each shard's weight map checksum and keys
    total = VerifyReport(path, "flashpack-sharded", 0, 0, len(pack.weight_map.aliases), 0, 0, 0,
                         pack.weight_map.checksum_algorithm)
    for shard_path, _ in pack.shards:
        r = verify(shard_path, backend=backend, buffer_nbytes=buffer_nbytes)
        total.file_nbytes += r.file_nbytes
        total.tensors += r.tensors
        total.blocks += r.blocks
        total.chunks_verified += r.chunks_verified
        total.bytes_verified += r.bytes_verified
    return total


__all__ = ["EarlyLoad", "LoadStats", "VerifyReport", "assign_from_file", "check_mmap_device", "fal_metadata", "get_flashpack_file_metadata",
           "ignore_filter", "is_flashpack_file", "iterate_from_flash_tensor", "load", "model_targets",
           "read_flashpack_file", "read_flashpack_file_distributed", "read_weight_map", "revert_from_file", "start_early_load", "verify"]
