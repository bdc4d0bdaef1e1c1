"""Writing: ``pack_to_file`` turns a state_dict (or a module) into a ``.flashpack`` file, atomically; or, with
``max_shard_nbytes``, into a sharded pack (``NAME-00001-of-0000N.flashpack`` ... + ``NAME.flashpack.index.json``),
atomic as a set."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import xxhash

from .atomic import atomic_path, fsync_folder
from .errors import FlashPackError
from .format import (
    BLOCK_ALIGN,
    CHUNK_NBYTES,
    HEADER_NBYTES,
    MAX_CHUNK_NBYTES,
    TENSOR_ALIGN,
    BlockInfo,
    TensorInfo,
    dtype_name,
    encode_header,
    encode_weight_map,
)
from .progress import Progress, ProgressCallback
from .settings import parse_shard_size, settings
from .source import (
    ShardRecord,
    encode_index,
    index_path_for,
    shard_name,
    shard_name_pattern,
)

#: Largest piece of one tensor moved to the CPU and written at a time (bounds extra memory).
WRITE_PIECE_NBYTES = 64 * 1024 * 1024
_ZEROS = bytes(BLOCK_ALIGN)


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _storage_key(t: torch.Tensor):
    """Identity of a tensor's bytes: equal keys mean the same view of the same storage (an alias)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.is_conj(), t.is_neg())  # a lazy conj/neg view of the same bytes holds other values


class LazyTensor:
    """A tensor known up front by shape and dtype whose bytes are produced only when they are written.

    Lets :func:`pack_to_file` stream a checkpoint that does not fit in memory (``flashpack convert``):
    the plan needs only shape and dtype; ``load()`` is called once, in the write pass, and its result is
    dropped as soon as its bytes are written. The same ``LazyTensor`` object under several keys is one
    tensor stored once, the other keys recorded as aliases.

    Args:
        shape: the tensor's shape.
        dtype: its ``torch.dtype``.
        load: a callable returning a tensor of that shape and dtype (any device, any strides).
    """

    __slots__ = ("shape", "dtype", "load")

    def __init__(self, shape, dtype: torch.dtype, load):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.load = load

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def materialize(self) -> torch.Tensor:
        """``load()``, checked against the promised shape and dtype.

        Raises:
            FlashPackError: the loaded tensor differs from what was promised.
        """
        t = self.load()
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(self.shape) or t.dtype != self.dtype:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise FlashPackError(f"lazy tensor promised {tuple(self.shape)} {self.dtype}, its loader gave {got}")
        return t


def _castable(dtype: torch.dtype) -> bool:
    """Whether ``target_dtype`` applies: floating-point dtypes, except packed sub-byte ones
    (``float4_e2m1fn_x2`` holds two values per byte; torch defines no cast for it)."""
    return dtype.is_floating_point and dtype != getattr(torch, "float4_e2m1fn_x2", None)


@dataclass
class _Planned:
    key: str
    tensor: torch.Tensor
    out_dtype: torch.dtype
    info: TensorInfo


def state_dict_of(obj) -> dict[str, torch.Tensor]:
    """``obj.state_dict()`` for a module (tied parameters appear under every name), else the mapping."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(keep_vars=False)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"expected an nn.Module or a state_dict mapping, got {type(obj).__name__}")


def _plan(state_dict: Mapping[str, torch.Tensor], target_dtype: torch.dtype | None, path: str):
    """Group tensors by stored dtype, lay out blocks and tensors, find aliases."""
    seen: dict = {}
    aliases: dict[str, str] = {}
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for key, t in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: state_dict keys must be strings, got {key!r}")
        if isinstance(t, LazyTensor):
            sk = ("lazy", id(t)) if t.numel() else None
        elif not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: value of key {key!r} is a {type(t).__name__}, not a tensor")
        elif t.device.type == "meta":
            raise FlashPackError(f"{path}: key {key!r} is on the meta device and has no data to write")
        elif t.is_quantized or t.is_sparse or t.layout != torch.strided:
            raise FlashPackError(f"{path}: key {key!r}: only dense strided tensors can be packed (got {t.layout}"
                                 f"{', quantized' if t.is_quantized else ''})")
        else:
            sk = _storage_key(t)
        if sk is not None and sk in seen:
            aliases[key] = seen[sk]
            continue
        if sk is not None:
            seen[sk] = key
        out = target_dtype if (target_dtype is not None and _castable(t.dtype)) else t.dtype
        dtype_name(out)  # raises for dtypes the format cannot hold
        groups.setdefault(out, []).append((key, t))

    planned: list[_Planned] = []
    blocks: list[tuple[torch.dtype, int, int]] = []
    offset = HEADER_NBYTES
    for dt, items in groups.items():
        name = dtype_name(dt)
        offset = _round_up(offset, BLOCK_ALIGN)
        start = pos = offset
        for key, t in items:
            nbytes = t.numel() * dt.itemsize
            if nbytes == 0:
                planned.append(_Planned(key, t, dt, TensorInfo(key, name, tuple(t.shape), 0, 0)))
                continue
            pos = _round_up(pos, TENSOR_ALIGN)
            planned.append(_Planned(key, t, dt, TensorInfo(key, name, tuple(t.shape), pos, nbytes)))
            pos += nbytes
        if pos > start:
            blocks.append((dt, start, pos - start))
            offset = pos
    return planned, blocks, aliases


class _ChunkHasher:
    """Feeds a block's bytes in order and keeps one xxh3_64 digest per ``chunk_nbytes``."""

    def __init__(self, chunk_nbytes: int):
        self.chunk = chunk_nbytes
        self.digests: list[int] = []
        self._h = xxhash.xxh3_64()
        self._fill = 0

    def update(self, data: memoryview) -> None:
        while data.nbytes:
            take = min(self.chunk - self._fill, data.nbytes)
            self._h.update(data[:take])
            self._fill += take
            data = data[take:]
            if self._fill == self.chunk:
                self.finish_chunk()

    def finish_chunk(self) -> None:
        self.digests.append(self._h.intdigest())
        self._h = xxhash.xxh3_64()
        self._fill = 0

    def close(self) -> tuple[int, ...]:
        if self._fill or not self.digests:
            self.finish_chunk()
        return tuple(self.digests)


#: Same-size integer dtypes to view a tensor's raw bits through.
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _pieces(t: torch.Tensor, out_dtype: torch.dtype) -> Iterable[memoryview]:
    """The tensor's bytes in logical row-major order, cast to ``out_dtype``, on the CPU, in pieces of at
    most :data:`WRITE_PIECE_NBYTES` (a contiguous tensor is sliced, never copied whole). A
    :class:`LazyTensor` is materialized here and dropped when its last piece is written."""
    if isinstance(t, LazyTensor):
        t = t.materialize()
    src = t.detach().resolve_conj().resolve_neg()  # lazy conj/neg views: bits must hold the real values
    if out_dtype == src.dtype and src.dtype.itemsize in _BITS_VIEW:
        # No cast: move raw bits. torch has no copy kernel for sub-byte/bits dtypes (uint4, bits8, ...),
        # so a non-contiguous one could not be made row-major in its own dtype.
        src = src.view(_BITS_VIEW[src.dtype.itemsize])
        out_dtype = src.dtype
    flat = src.reshape(-1)  # copies only if the tensor is not viewable as 1-D (non-contiguous)
    step = max(1, WRITE_PIECE_NBYTES // max(t.element_size(), out_dtype.itemsize))
    for i in range(0, flat.numel(), step):
        piece = flat[i:i + step].to(device="cpu", dtype=out_dtype).contiguous()
        yield memoryview(piece.view(torch.uint8).numpy()).cast("B")


def _write_all(fd: int, data) -> None:
    mv = memoryview(data).cast("B")
    while mv.nbytes:
        n = os.write(fd, mv)
        mv = mv[n:]


def _write_pack(state_dict: Mapping, path: str, target_dtype, meta: dict, chunk_nbytes: int,
                progress: Progress | None) -> tuple[int, int]:
    """Write one pack atomically at ``path``; returns ``(file bytes, xxh3_64 of its weight map)``."""
    planned, blocks, aliases = _plan(state_dict, target_dtype, path)

    with atomic_path(path) as tmp, open(tmp, "r+b", buffering=0) as f:
        fd = f.fileno()
        _write_all(fd, bytes(HEADER_NBYTES))
        pos = HEADER_NBYTES
        block_infos: list[BlockInfo] = []
        by_dtype: dict[torch.dtype, list[_Planned]] = {}
        for p in planned:
            by_dtype.setdefault(p.out_dtype, []).append(p)
        for dt, start, nbytes in blocks:
            _write_all(fd, bytes(start - pos))
            pos = start
            hasher = _ChunkHasher(chunk_nbytes)
            for p in by_dtype[dt]:
                if p.info.nbytes == 0:
                    continue
                pad = p.info.offset - pos
                if pad:
                    hasher.update(memoryview(_ZEROS)[:pad])
                    _write_all(fd, _ZEROS[:pad])
                for piece in _pieces(p.tensor, dt):
                    hasher.update(piece)
                    _write_all(fd, piece)
                    if progress is not None:
                        progress.add(piece.nbytes)
                pos = p.info.offset + p.info.nbytes
            block_infos.append(BlockInfo(dtype_name(dt), start, nbytes, hasher.close()))
        order = {k: i for i, k in enumerate(state_dict)}
        infos = sorted((p.info for p in planned), key=lambda t: order[t.key])  # weight map in state_dict order
        index = encode_weight_map(metadata=meta, tensors=infos, aliases=aliases,
                                  blocks=block_infos, chunk_nbytes=chunk_nbytes)
        _write_all(fd, index)
        file_nbytes = pos + len(index)
        digest = xxhash.xxh3_64_intdigest(index)
        # The header goes in last: a crash before this leaves no valid-looking file (I1 fails).
        os.pwrite(fd, encode_header(file_nbytes, pos, len(index), digest), 0)
    return file_nbytes, digest


def _stored_nbytes(state_dict: Mapping, target_dtype) -> tuple[dict[str, int], dict[str, str]]:
    """(stored key -> bytes it takes, alias -> stored key): the sizes a shard split counts, and the ties."""
    seen: dict = {}
    sizes: dict[str, int] = {}
    aliases: dict[str, str] = {}
    for key, t in state_dict.items():
        if isinstance(t, LazyTensor):
            sk = ("lazy", id(t)) if t.numel() else None
        elif isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided:
            sk = _storage_key(t)
        else:
            sk = None  # _plan raises the precise error for it
        if sk is not None and sk in seen:
            aliases[key] = seen[sk]
            continue
        if sk is not None:
            seen[sk] = key
        dt = getattr(t, "dtype", None)
        out = target_dtype if (target_dtype is not None and dt is not None and _castable(dt)) else dt
        sizes[key] = t.numel() * out.itemsize if out is not None and hasattr(t, "numel") else 0
    return sizes, aliases


def split_shards(state_dict: Mapping, max_shard_nbytes: int, target_dtype=None) -> list[list[str]]:
    """The keys of each shard, in state_dict order: stored tensors fill a shard until the next would take it
    past ``max_shard_nbytes`` payload bytes (a tensor larger than the limit gets a shard to itself; tensors are
    never split); an alias goes to the shard of its target (its first key), so every shard loads on its own.

    Returns:
        A list of key lists (one or more), each in state_dict order.
    """
    sizes, aliases = _stored_nbytes(state_dict, target_dtype)
    shard_of: dict[str, int] = {}
    fill, cur = 0, 0
    for key, n in sizes.items():
        if fill and fill + n > max_shard_nbytes:
            cur, fill = cur + 1, 0
        shard_of[key] = cur
        fill += n
    for a, t in aliases.items():
        shard_of[a] = shard_of[t]
    out: list[list[str]] = [[] for _ in range(cur + 1)]
    for key in state_dict:
        out[shard_of[key]].append(key)
    return out


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_stale_set(path: str, keep: Iterable[str] = ()) -> list[str]:
    """Remove what an earlier save of ``path`` left that the current one does not use: its index, its shards
    and hidden temporary shards (any count) not named in ``keep`` (file names). The index goes first, so a
    crash in between leaves no index pointing at missing shards. Returns the names removed."""
    folder = os.path.dirname(os.path.abspath(path))
    keep = set(keep)
    removed = []
    idx = index_path_for(path)
    if os.path.basename(idx) not in keep and os.path.exists(idx):
        _remove_quietly(idx)
        removed.append(os.path.basename(idx))
    pattern = shard_name_pattern(path)
    for name in sorted(os.listdir(folder)):
        if pattern.match(name) and name not in keep:
            _remove_quietly(os.path.join(folder, name))
            removed.append(name)
    if removed:
        fsync_folder(folder)
    return removed


def _link_into_place(src: str, dst: str) -> None:
    """Make ``dst`` name the file ``src`` names, replacing ``dst`` atomically and keeping ``src``."""
    tmp = f"{dst}.{secrets.token_hex(4)}.link"
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # no hard links here (some FUSE and network file systems): copy, then rename over
        import shutil

        shutil.copyfile(src, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        os.replace(tmp, dst)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _write_index(path: str, records: list[ShardRecord], weight_map: dict[str, str], aliases: dict[str, str],
                 total_size: int) -> None:
    data = encode_index(records, weight_map, aliases, total_size)
    with atomic_path(index_path_for(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _pack_sharded(state_dict: Mapping, path: str, groups: list[list[str]], target_dtype, meta: dict,
                  chunk_nbytes: int, progress: Progress | None) -> int:
    """Write a sharded set atomically (docs/FORMAT.md, "Sharded packs", "Saving"):

    1. every shard under a hidden temporary name (``.NAME-0000i-of-0000N.flashpack.<token>.tmp``), fsynced;
    2. the index, pointing at those temporary names (the new set is now the one a load finds);
    3. each temporary shard hard-linked onto its final name (replacing an old shard of that name, which
       the index no longer names);
    4. the index again, pointing at the final names;
    5. the temporary names, the old shards of this name not in the new set, and a one-file pack at ``path``
       removed.

    A crash at any step leaves an index naming a complete set: the old one (before 2) or the new one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    n = len(groups)
    token = secrets.token_hex(6)
    finals = [shard_name(path, i, n) for i in range(n)]
    temps = [f".{name}.{token}.tmp" for name in finals]
    records_tmp: list[ShardRecord] = []
    weight_map: dict[str, str] = {}
    aliases: dict[str, str] = {}
    total = written = 0
    try:
        for i, keys in enumerate(groups):
            sub = {k: state_dict[k] for k in keys}
            nbytes, digest = _write_pack(sub, os.path.join(folder, temps[i]), target_dtype, meta, chunk_nbytes,
                                         progress)
            records_tmp.append(ShardRecord(temps[i], nbytes, digest))
            written += nbytes
        sizes, ties = _stored_nbytes(state_dict, target_dtype)
        total = sum(sizes.values())
        for i, keys in enumerate(groups):
            for k in keys:
                weight_map[k] = finals[i]
        aliases = {a: t for a, t in ties.items()}
        _write_index(path, records_tmp, {k: temps[finals.index(f)] for k, f in weight_map.items()}, aliases, total)
    except BaseException:
        for t in temps:
            _remove_quietly(os.path.join(folder, t))
        raise
    for t, f in zip(temps, finals):
        _link_into_place(os.path.join(folder, t), os.path.join(folder, f))
    fsync_folder(folder)
    records = [ShardRecord(f, r.file_nbytes, r.weight_map_digest) for f, r in zip(finals, records_tmp)]
    _write_index(path, records, weight_map, aliases, total)
    keep = set(finals) | {os.path.basename(index_path_for(path))}
    remove_stale_set(path, keep)
    if os.path.isfile(path):
        _remove_quietly(path)  # an older one-file pack of the same name
        fsync_folder(folder)
    return written


def pack_to_file(state_dict_or_model, destination_path: str | os.PathLike, target_dtype: torch.dtype | None = None,
                 name_order: list[str] | None = None, align_bytes: int | None = None, silent: bool = True,
                 num_workers: int | None = None, *, metadata: Mapping[str, str] | None = None,
                 chunk_nbytes: int = CHUNK_NBYTES, max_shard_nbytes: int | str | None = None,
                 progress: ProgressCallback | None = None) -> int:
    """Write a module's state_dict, or a state_dict, to ``destination_path`` as a flashpack file, or as a sharded
    pack when it is larger than ``max_shard_nbytes``.

    The argument names are those of fal's flashpack (diffusers passes them by keyword).

    Args:
        state_dict_or_model: an ``nn.Module`` (its ``state_dict()``) or a mapping of key -> tensor, on any
            device (moved to the CPU piece by piece); a value may be a :class:`LazyTensor`, read only
            when written. Tensors sharing storage with the same offset,
            shape and strides (tied weights) are stored once and recorded as aliases.
        destination_path: the file. Written atomically: a temporary file in the same folder, fsync, rename;
            on any error the temporary file is removed and an existing destination is untouched. The file
            mode follows the umask. A sharded pack of the same name saved earlier (its index and shards) is
            removed once the new file is in place.
        target_dtype: cast floating-point tensors (including float8) to this dtype; integer, bool and
            complex tensors keep theirs. Also accepted as the third positional argument.
        name_order: fal's key selection and order: only these keys are written, in this order (keys not in the
            state_dict are skipped; a tied key whose target is left out is stored as its own tensor).
        align_bytes: fal's tensor alignment in bytes; accepted and ignored (this format aligns blocks to 4096
            and tensors to 64 bytes). Must be >= 0.
        silent: ``False`` prints one summary line on stdout.
        num_workers: fal's writer thread count; accepted and ignored (the writer streams one piece at a time).
        metadata: free-form ``str -> str`` pairs stored in the weight map (of every shard).
        chunk_nbytes: checksum chunk size in bytes (a multiple of 4096).
        max_shard_nbytes: ``None`` (default): one file. Else the most payload bytes per shard, an int or a
            Hugging Face size string (``"20GB"`` = 20 * 10^9 bytes, ``"5GiB"``); when the tensors take more,
            the pack is written as ``NAME-00001-of-0000N.flashpack`` ... next to ``destination_path``
            (``NAME`` is its file name without ``.flashpack``) plus ``destination_path + ".index.json"``, atomic
            as a set (docs/FORMAT.md, "Sharded packs"); ``destination_path`` itself is then not written (an
            older one-file pack there is removed). Tensors are never split: one larger than the limit gets a
            shard to itself. When everything fits, one ordinary file is written.
        progress: ``progress(bytes done, bytes total)`` as tensor bytes are written (``None``: no callback; a
            tqdm bar is shown anyway for more than 1 GiB on a terminal unless ``FLASHPACK_PROGRESS=0``).

    Returns:
        Bytes written: the file's size, or the sum of the shards' sizes.

    Raises:
        TypeError: keys or values of the wrong type; metadata that is not ``str -> str``.
        ValueError: a bad ``chunk_nbytes`` or ``max_shard_nbytes``.
        FlashPackError: a meta, sparse or quantized tensor, or a dtype the format cannot hold.
        OSError: the destination cannot be written; WriteError (an ``OSError`` and ``FlashPackError``) when
            a write, fsync or rename fails with ``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EIO`` or ``EROFS``: the
            message names the destination, which keeps its old content.

    Notes:
        Blocks start on 4096-byte boundaries, tensors on 64-byte boundaries inside their block; all bytes
        are little-endian, row-major (docs/FORMAT.md). Extra memory is bounded by one piece of
        :data:`WRITE_PIECE_NBYTES` (plus one whole tensor when it is non-contiguous or cast).
    """
    path = os.fspath(destination_path)
    if target_dtype is not None and not (isinstance(target_dtype, torch.dtype) and target_dtype.is_floating_point):
        raise TypeError(f"target_dtype must be a floating-point torch.dtype (torch.bfloat16, torch.float16, ...), "
                        f"got {target_dtype!r}")
    if chunk_nbytes <= 0 or chunk_nbytes % BLOCK_ALIGN or chunk_nbytes > MAX_CHUNK_NBYTES:
        raise ValueError(f"chunk_nbytes must be a multiple of {BLOCK_ALIGN} from {BLOCK_ALIGN} to {MAX_CHUNK_NBYTES}, "
                         f"got {chunk_nbytes}")
    limit = parse_shard_size(max_shard_nbytes)
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata must map str to str")
    if align_bytes is not None and align_bytes < 0:
        raise ValueError(f"align_bytes must be >= 0, got {align_bytes}")
    state_dict = state_dict_of(state_dict_or_model)
    if name_order is not None:
        state_dict = {k: state_dict[k] for k in dict.fromkeys(name_order) if k in state_dict}
        if not state_dict:
            raise ValueError(f"{path}: name_order names none of the state_dict's keys; nothing to pack")
    sizes, _ = _stored_nbytes(state_dict, target_dtype)
    bar = Progress(sum(sizes.values()), progress, settings(), f"save {os.path.basename(path)}")
    try:
        groups = split_shards(state_dict, limit, target_dtype) if limit is not None else None
        if groups is not None and len(groups) > 1:
            nbytes = _pack_sharded(state_dict, path, groups, target_dtype, meta, chunk_nbytes,
                                   bar if bar.active else None)
        else:
            nbytes, _ = _write_pack(state_dict, path, target_dtype, meta, chunk_nbytes, bar if bar.active else None)
            if os.path.exists(index_path_for(path)) or any(
                    shard_name_pattern(path).match(n) for n in os.listdir(os.path.dirname(os.path.abspath(path)))):
                remove_stale_set(path)  # a sharded pack of the same name saved earlier
        if not silent:
            print(f"flashpack: packed {len(state_dict)} keys into {path}"
                  f"{f' ({len(groups)} shards)' if groups is not None and len(groups) > 1 else ''}: {nbytes} bytes")
        return nbytes
    finally:
        bar.close()
