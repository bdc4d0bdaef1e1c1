"""Loading: file -> weight map -> plan -> reader -> destination buffer -> tensors -> model.

Public entry points: :func:`load`, :func:`read_weight_map`, :func:`verify`, :func:`assign_from_file`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import FlashPackError, ModelMismatchError
from .format import WeightMap, torch_dtype, verify_chunk
from .io import Extent, ReaderStats, open_reader, read_all
from .plan import LoadPlan, make_plan
from .source import check_same_file, read_weight_map
from .settings import PAGE_NBYTES, settings

# --------------------------------------------------------------------------- payload into memory


def aligned_empty(nbytes: int, align: int = PAGE_NBYTES) -> torch.Tensor:
    """An uninitialised CPU uint8 tensor of ``nbytes`` whose first byte is ``align``-aligned
    (O_DIRECT needs page-aligned buffer addresses; torch's allocator only promises 64)."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    off = (-raw.data_ptr()) % align
    return raw[off:off + nbytes]


@dataclass
class LoadStats:
    """What one load did: bytes requested from the file, by which path, and which backend."""

    backend: str = ""
    bytes_read: int = 0
    bytes_direct: int = 0
    bytes_buffered: int = 0
    chunks_verified: int = 0


def _extents(plan: LoadPlan, buf: memoryview) -> list[Extent]:
    return [Extent(e.file_offset, e.nbytes, buf[e.buffer_offset:e.buffer_offset + e.nbytes], i)
            for i, e in enumerate(plan.extents)]


def read_into(wm: WeightMap, plan: LoadPlan, dest: torch.Tensor, *, backend: str | None, verify: bool,
              stats: LoadStats) -> None:
    """Read a plan's extents into a page-aligned CPU uint8 tensor, verifying chunks as they complete.

    Raises:
        ChecksumMismatchError, ReadError, BackendUnavailableError. Every in-flight read has finished
        before an error propagates.
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

    with open_reader(wm.path, backend) as reader:
        check_same_file(wm, reader.files.fd)
        stats.backend = reader.name
        try:
            read_all(reader, _extents(plan, buf), done if verify else None)
        finally:
            _add_stats(stats, reader.stats)


def _add_stats(stats: LoadStats, rs: ReaderStats) -> None:
    stats.bytes_read += rs.bytes_read
    stats.bytes_direct += rs.bytes_direct
    stats.bytes_buffered += rs.bytes_buffered


def _mmap_payload(wm: WeightMap, plan: LoadPlan, verify: bool, stats: LoadStats) -> tuple[torch.Tensor, LoadPlan]:
    """Zero-copy: a private copy-on-write mapping of the whole file; the plan is re-based on it."""
    from .plan import Region

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


# --------------------------------------------------------------------------- tensors


def _parse_device(device) -> torch.device:
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlashPackError(
            f"cannot load to {dev}: this torch ({torch.__version__}) has no usable CUDA device "
            f"(torch.cuda.is_available() is False); load to 'cpu' or install a CUDA build of torch"
        )
    if dev.type not in ("cpu", "cuda"):
        raise FlashPackError(f"loading to device type {dev.type!r} is not supported (cpu, cuda)")
    return dev


def reconstruct(wm: WeightMap, keys: list[str], buffer: torch.Tensor, plan: LoadPlan,
                dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Zero-copy tensors onto ``buffer`` (uint8, any device) for every stored key in ``keys``.

    Each tensor shares ``buffer``'s storage but is made with ``set_`` rather than as a view, so it has its
    own autograd version counter: an in-place update of one (a BatchNorm running mean in training) does not
    invalidate the others saved for backward. Zero-size tensors get their own empty tensor (never a view of
    an empty buffer).
    """
    out: dict[str, torch.Tensor] = {}
    storage = buffer.untyped_storage()
    for k in keys:
        t = wm.tensors[k]
        dt = dtypes[k]
        if t.nbytes == 0:
            out[k] = torch.empty(t.shape, dtype=dt, device=buffer.device)
            continue
        byte_offset = buffer.storage_offset() + plan.buffer_offset(t.offset)
        if byte_offset % dt.itemsize:  # cannot happen for this format's 64-byte alignment; kept for safety
            bo = plan.buffer_offset(t.offset)
            out[k] = buffer[bo:bo + t.nbytes].clone().view(dt).view(t.shape)
            continue
        out[k] = torch.empty(0, dtype=dt, device=buffer.device).set_(storage, byte_offset // dt.itemsize, t.shape)
    return out


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str | None = None,
         keys: Iterable[str] | None = None, verify: bool | None = None, mmap: bool = False,
         process_group=None, src_rank: int | None = None,
         stats: LoadStats | None = None, _weight_map: WeightMap | None = None) -> dict[str, torch.Tensor]:
    """Load a flashpack file (or a fal flashpack 0.2-0.4 file) into a state_dict.

    Args:
        path: the file.
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
        process_group: distributed loading over ``torch.distributed`` (see :mod:`flashpack.distributed`): each
            rank reads about 1/world_size of the file and the ranks exchange the bytes.
        src_rank: with ``process_group``: only this rank reads the file and broadcasts it (for storage only one
            node can see); ``path`` is ignored on the other ranks.
        stats: a :class:`LoadStats` to fill in (bytes read, backend used).

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
        No tensor is returned when anything fails.
    """
    path = os.fspath(path) if path is not None else None
    dev = _parse_device(device)
    cfg = settings()
    if mmap:
        verify = bool(verify)
    verify = cfg.verify if verify is None else verify
    stats = stats if stats is not None else LoadStats()
    pg = _resolve_process_group(process_group, cfg)
    if pg is not None:
        if mmap:
            raise FlashPackError(f"{path}: mmap=True maps the file in this process; it cannot be combined with a process group")
        from .distributed import load_distributed

        return load_distributed(path, device=dev, backend=backend, keys=keys, verify=verify,
                                process_group=pg, stats=stats, src_rank=src_rank)
    if src_rank is not None:
        raise FlashPackError("src_rank needs a process group (process_group=... or 'default')")
    if path is None:
        raise TypeError("path is required")

    wm = _weight_map if _weight_map is not None else read_weight_map(path)
    wanted, stored = _resolve_keys(wm, keys)
    dtypes = {k: torch_dtype(wm.tensors[k].dtype, key=k, path=path) for k in stored}
    plan = make_plan(wm, None if keys is None else stored, extent_nbytes=cfg.extent_nbytes, verify=verify)
    if mmap:
        if dev.type != "cpu":
            raise FlashPackError(f"{path}: mmap=True maps the file into host memory; it needs device='cpu', got {dev}")
        buffer, plan = _mmap_payload(wm, plan, verify, stats)
    elif dev.type == "cuda":
        from .gpu import load_payload_cuda

        buffer = load_payload_cuda(wm, plan, dev, backend=backend, verify=verify, stats=stats)
    else:
        buffer = aligned_empty(plan.buffer_nbytes)
        read_into(wm, plan, buffer, backend=backend, verify=verify, stats=stats)
    return assemble(wm, wanted, stored, buffer, plan, dtypes)


def assemble(wm: WeightMap, wanted: list[str], stored: list[str], buffer: torch.Tensor, plan: LoadPlan,
             dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The returned state_dict: views for stored keys, and each wanted alias bound to its target."""
    tensors = reconstruct(wm, stored, buffer, plan, dtypes)
    return {k: tensors[wm.aliases.get(k, k)] for k in wanted}


def _resolve_keys(wm: WeightMap, keys: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(keys to return, stored keys to read) for a ``keys=`` argument."""
    if keys is None:
        return wm.keys(), list(wm.tensors)
    wanted = list(dict.fromkeys([keys] if isinstance(keys, str) else keys))
    missing = [k for k in wanted if k not in wm.tensors and k not in wm.aliases]
    if missing:
        raise KeyError(f"{wm.path}: keys not in the file: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    stored = list(dict.fromkeys(wm.aliases.get(k, k) for k in wanted))
    return wanted, stored


def _resolve_process_group(process_group, cfg):
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
    with open_reader(path, backend) as reader:
        check_same_file(wm, reader.files.fd)
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


# --------------------------------------------------------------------------- models


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    mod_path, _, leaf = name.rpartition(".")
    return (model.get_submodule(mod_path) if mod_path else model), leaf


def model_targets(model: torch.nn.Module):
    """Parameters and persistent buffers by state_dict key; ties grouped by object identity.

    Returns:
        (groups, kinds): ``groups`` maps id(tensor) -> list of keys sharing that object (tied weights);
        ``kinds`` maps key -> ("param"|"buffer", the current tensor).
    """
    groups: dict[int, list[str]] = {}
    kinds: dict[str, tuple[str, torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        kinds[name] = ("param", p)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for bname, b in mod._buffers.items():
            if b is None or bname in mod._non_persistent_buffers_set:
                continue
            key = f"{mod_name}.{bname}" if mod_name else bname
            if key in kinds:
                continue
            groups.setdefault(id(b), []).append(key)
            kinds[key] = ("buffer", b)
    return groups, kinds


def _default_device(model: torch.nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def assign_from_file(model: torch.nn.Module, path: str | os.PathLike, device=None, *, strict: bool = True,
                     backend: str | None = None, verify: bool | None = None, mmap: bool = False,
                     process_group=None, keys: Iterable[str] | None = None):
    """Load a flashpack file and assign its tensors into ``model`` as zero-copy views.

    Parameters become new ``nn.Parameter`` objects (``requires_grad`` kept) over the loaded memory;
    persistent buffers are replaced by the loaded tensors; non-persistent buffers keep their values.
    Parameters tied in the model (one object under several names) stay tied: every name gets the same
    new ``Parameter``, filled from whichever of the names the file stores (aliases included).

    Args:
        model: the module, on any device or on ``meta`` (built without allocating weights).
        path: the file.
        device: where the weights go; default: the device of the model's first non-meta tensor, else CPU.
        strict: raise when keys are missing or unexpected; with ``False`` warn instead, naming anything
            left on the meta device.
        backend, verify, mmap, process_group: as for :func:`load`.
        keys: assign only these keys (the rest count as missing).

    Returns:
        ``torch.nn.modules.module._IncompatibleKeys(missing_keys, unexpected_keys)``, like ``load_state_dict``.

    Raises:
        ModelMismatchError (``ValueError``): a shape or dtype differs (naming the key and both values),
            tied names hold different values in the file, or (``strict``) keys are missing/unexpected.
            Checked before the model is changed: on error the model is untouched.
        Everything :func:`load` raises.
    """
    path = os.fspath(path)
    dev = torch.device(device) if device is not None else _default_device(model)
    groups, kinds = model_targets(model)

    wm = read_weight_map(path)
    file_keys = set(wm.keys())
    unexpected = [k for k in wm.keys() if k not in kinds]
    if keys is not None:  # only these are assigned: every other model key counts as missing
        keys = list(dict.fromkeys([keys] if isinstance(keys, str) else keys))
        file_keys &= set(keys)
    missing = [k for k in kinds if k not in file_keys]
    # A tie whose names are partly in the file is not missing: the stored name fills all (case C03a).
    tied_ok = {k for names in groups.values() if any(n in file_keys for n in names) for k in names}
    missing = [k for k in missing if k not in tied_ok]
    if strict and (missing or unexpected):
        raise ModelMismatchError(
            f"{path} does not match {type(model).__name__}: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass strict=False to load what matches"
        )
    for k in (set(kinds) & file_keys):
        t, (_, cur) = wm.tensors[wm.aliases.get(k, k)], kinds[k]
        if tuple(cur.shape) != t.shape:
            raise ModelMismatchError(f"{path}: key {k!r}: shape {list(t.shape)} in the file, {list(cur.shape)} in the model")
        fdt = torch_dtype(t.dtype, key=k, path=path)
        if fdt != cur.dtype:
            raise ModelMismatchError(f"{path}: key {k!r}: dtype {fdt} in the file, {cur.dtype} in the model; "
                                     f"build the model with the file's dtype or repack with target_dtype")
    load_keys = [k for k in wm.keys() if k in kinds and k in file_keys]
    # The weight map checked above is the one loaded: a file replaced in between is detected, not mixed in.
    sd = load(path, device=dev, backend=backend, keys=load_keys, verify=verify, mmap=mmap, process_group=process_group,
              _weight_map=None if process_group is not None else wm)

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
            mod, leaf = _owner(model, n)
            if kind == "param":
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new

    if dev.type != "meta":  # non-persistent buffers built elsewhere follow the weights
        for mod in model.modules():
            for bname in list(mod._non_persistent_buffers_set):
                b = mod._buffers.get(bname)
                if b is not None and b.device.type != "meta" and b.device != dev:
                    mod._buffers[bname] = b.to(dev)
    if not strict and (missing or unexpected):
        still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
        warnings.warn(
            f"{path}: loaded with strict=False: missing keys {missing[:20]}, unexpected keys {unexpected[:20]}"
            + (f"; still on the meta device (no data): {still_meta[:20]}" if still_meta else ""),
            stacklevel=2,
        )
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


__all__ = ["LoadStats", "VerifyReport", "aligned_empty", "assign_from_file", "load", "read_weight_map", "verify"]
