"""Writing: ``pack_to_file`` turns a state_dict (or a module) into a ``.flashpack`` file, atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import xxhash

from .atomic import atomic_path
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


def pack_to_file(state_dict_or_model, destination_path: str | os.PathLike, target_dtype: torch.dtype | None = None,
                 name_order: list[str] | None = None, align_bytes: int | None = None, silent: bool = True,
                 num_workers: int | None = None, *, metadata: Mapping[str, str] | None = None,
                 chunk_nbytes: int = CHUNK_NBYTES) -> int:
    """Write a module's state_dict, or a state_dict, to ``destination_path`` as a flashpack file.

    The argument names are those of fal's flashpack (diffusers passes them by keyword).

    Args:
        state_dict_or_model: an ``nn.Module`` (its ``state_dict()``) or a mapping of key -> tensor, on any
            device (moved to the CPU piece by piece); a value may be a :class:`LazyTensor`, read only
            when written. Tensors sharing storage with the same offset,
            shape and strides (tied weights) are stored once and recorded as aliases.
        destination_path: the file. Written atomically: a temporary file in the same folder, fsync, rename;
            on any error the temporary file is removed and an existing destination is untouched. The file
            mode follows the umask.
        target_dtype: cast floating-point tensors (including float8) to this dtype; integer, bool and
            complex tensors keep theirs. Also accepted as the third positional argument.
        name_order: fal's key selection and order: only these keys are written, in this order (keys not in the
            state_dict are skipped; a tied key whose target is left out is stored as its own tensor).
        align_bytes: fal's tensor alignment in bytes; accepted and ignored (this format aligns blocks to 4096
            and tensors to 64 bytes). Must be >= 0.
        silent: ``False`` prints one summary line on stdout.
        num_workers: fal's writer thread count; accepted and ignored (the writer streams one piece at a time).
        metadata: free-form ``str -> str`` pairs stored in the weight map.
        chunk_nbytes: checksum chunk size in bytes (a multiple of 4096).

    Returns:
        The file's size in bytes.

    Raises:
        TypeError: keys or values of the wrong type; metadata that is not ``str -> str``.
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
                pos = p.info.offset + p.info.nbytes
            block_infos.append(BlockInfo(dtype_name(dt), start, nbytes, hasher.close()))
        order = {k: i for i, k in enumerate(state_dict)}
        infos = sorted((p.info for p in planned), key=lambda t: order[t.key])  # weight map in state_dict order
        index = encode_weight_map(metadata=meta, tensors=infos, aliases=aliases,
                                  blocks=block_infos, chunk_nbytes=chunk_nbytes)
        _write_all(fd, index)
        file_nbytes = pos + len(index)
        # The header goes in last: a crash before this leaves no valid-looking file (I1 fails).
        os.pwrite(fd, encode_header(file_nbytes, pos, len(index), xxhash.xxh3_64_intdigest(index)), 0)
    if not silent:
        print(f"flashpack: packed {len(state_dict)} keys ({len(aliases)} aliases, {len(blocks)} blocks) into {path}: "
              f"{file_nbytes} bytes")
    return file_nbytes
