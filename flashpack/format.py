"""The byte layout of a ``.flashpack`` file: dtype table, header, weight map, validation.

Pure functions over bytes and dicts; this module never opens a file. docs/FORMAT.md is the
specification; the invariant numbers (I1-I15) in the errors raised here refer to it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import xxhash

from .errors import (
    ChecksumMismatchError,
    DtypeError,
    HeaderError,
    LayoutError,
    NotAFlashPackError,
    TrailingBytesError,
    TruncatedFileError,
    UnsupportedVersionError,
    WeightMapError,
)

#: First 8 bytes of every flashpack file (PNG-style: a high byte, then CR LF to catch text-mode damage).
MAGIC = b"\x89FPACK\r\n"
#: Last 8 bytes of a file written by fal's flashpack 0.2-0.4 (read-only compatibility).
FAL_MAGIC = b"FLASHPK\x00"
FORMAT_VERSION = 1
HEADER_NBYTES = 4096
BLOCK_ALIGN = 4096
TENSOR_ALIGN = 64
#: Default checksum chunk: 8 MiB of a block.
CHUNK_NBYTES = 8 * 1024 * 1024
CHECKSUM_ALGORITHM = "xxh3_64"
#: Largest checksum chunk a reader accepts (verification buffers hold whole chunks).
MAX_CHUNK_NBYTES = 1024 * 1024 * 1024
#: Dimensions must fit torch's int64 sizes.
MAX_DIM = 2**63 - 1
#: Largest weight map a reader accepts (a 100,000-tensor model needs about 10 MiB); also the largest
#: fal flashpack footer. Checked against the header before a byte of the weight map is read.
MAX_INDEX_NBYTES = 256 * 1024 * 1024
#: Bound on every product of dimensions (0 counted as 1): torch's strides and storage sizes are int64,
#: so a shape past it cannot be built even with zero elements.
MAX_SHAPE_PRODUCT = 2**63 - 1
#: Longest integer literal accepted in a weight map or fal footer (2**64 has 20 digits).
_MAX_INT_DIGITS = 20
#: Checksums are 16 lowercase hex digits, nothing else (no sign, prefix, space or underscore).
_HEX16 = re.compile(r"[0-9a-f]{16}")

# magic, version, header_nbytes, file_nbytes, index_offset, index_nbytes, index_xxh3_64, header_xxh3_64
_HEADER = struct.Struct("<8sIIQQQQQ")
_HEADER_HASHED = _HEADER.size - 8  # the header checksum covers bytes [0, 48)

# --------------------------------------------------------------------------- dtypes

#: Dtype names in the file (safetensors' names where safetensors has one) -> torch attribute names.
DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C32": "complex32",
    "C64": "complex64",
    "C128": "complex128",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
    "BITS8": "bits8",
    "BITS16": "bits16",
    "BITS1X8": "bits1x8",
    "BITS2X4": "bits2x4",
    "BITS4X2": "bits4x2",
    **{f"U{n}": f"uint{n}" for n in range(1, 8)},
    **{f"I{n}": f"int{n}" for n in range(1, 8)},
}
#: Bytes per element of each dtype name (fixed by the name, so a file can be checked even on a torch
#: that lacks the dtype). Sub-byte dtypes (U1-U7, I1-I7, F4, BITS*) occupy one byte per element in torch.
DTYPE_ITEMSIZE: dict[str, int] = {
    name: (2 if name in ("U16", "I16", "F16", "BF16", "BITS16") else
           4 if name in ("U32", "I32", "F32", "C32") else
           8 if name in ("U64", "I64", "F64", "C64") else
           16 if name == "C128" else 1)
    for name in DTYPE_NAMES
}


def torch_dtype(name: str, *, key: str | None = None, path: str | None = None):
    """Map a file dtype name to the ``torch.dtype`` of this torch build.

    Raises:
        DtypeError: the name is not in :data:`DTYPE_NAMES`, or this torch has no such dtype (an
            older torch without ``float8_e8m0fnu``, say). The message names the key and file.
    """
    import torch

    where = f" (key {key!r}{f' in {path}' if path else ''})" if key is not None else (f" in {path}" if path else "")
    attr = DTYPE_NAMES.get(name)
    if attr is None:
        raise DtypeError(f"unknown dtype {name!r}{where}; known: {', '.join(DTYPE_NAMES)}")
    dt = getattr(torch, attr, None)
    if dt is None:
        raise DtypeError(
            f"dtype {name!r} (torch.{attr}){where} is not available in torch {torch.__version__}; "
            f"upgrade torch to load this tensor"
        )
    return dt


def dtype_name(dtype) -> str:
    """Map a ``torch.dtype`` to its file name (``torch.bfloat16`` -> ``"BF16"``).

    Raises:
        DtypeError: quantized dtypes (they need a scale and zero point that a plain tensor file has
            no place for) and any dtype missing from the table.
    """
    attr = str(dtype).removeprefix("torch.")
    for name, a in DTYPE_NAMES.items():
        if a == attr:
            return name
    raise DtypeError(f"dtype {dtype} cannot be stored in a flashpack file (quantized and unknown dtypes are not supported)")


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: ``nbytes`` bytes at absolute file byte ``offset``, row-major."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BlockInfo:
    """A contiguous dtype block: ``nbytes`` bytes from file byte ``offset``; ``checksums`` has one
    xxh3_64 digest per ``chunk_nbytes`` chunk (None for files that carry no checksums)."""

    dtype: str
    offset: int
    nbytes: int
    checksums: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Chunk:
    """A checksummed piece of a block: the unit of reading and verification."""

    block: int
    index: int
    offset: int
    nbytes: int
    digest: int | None


@dataclass
class WeightMap:
    """Everything a reader knows about a file before reading its payload.

    ``source`` is ``"flashpack"`` for this library's files, ``"fal-flashpack-v3"`` or
    ``"fal-flashpack-v4"`` for files written by fal's flashpack.
    """

    path: str
    file_nbytes: int
    source: str
    version: int
    byte_order: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    aliases: dict[str, str]
    blocks: list[BlockInfo]
    checksum_algorithm: str | None = None
    chunk_nbytes: int = CHUNK_NBYTES
    index_offset: int = 0
    index_nbytes: int = 0
    payload_start: int = field(default=0)
    #: (device, inode, size, mtime_ns, ctime_ns) of the file when the weight map was read; set by the reader
    #: (:func:`flashpack.source.file_identity`).
    file_id: tuple[int, int, int, int, int] | None = None

    @property
    def payload_nbytes(self) -> int:
        """Bytes of tensor data actually stored (aliases and padding not counted)."""
        return sum(t.nbytes for t in self.tensors.values())

    def keys(self) -> list[str]:
        """Every key a load returns: stored tensors in file order, then aliases."""
        return [*self.tensors, *self.aliases]

    def resolve_chunk(self, chunk: Chunk) -> "tuple[WeightMap, Chunk]":
        """The weight map of the file that holds ``chunk`` and the chunk in that file's own offsets: this map
        and the chunk itself here; a sharded pack's merged map names the shard (so errors name it)."""
        return self, chunk

    def chunks(self) -> Iterator[Chunk]:
        """The chunks of every block, in file order."""
        for b, blk in enumerate(self.blocks):
            n = max(1, math.ceil(blk.nbytes / self.chunk_nbytes))
            for i in range(n):
                off = blk.offset + i * self.chunk_nbytes
                yield Chunk(b, i, off, min(self.chunk_nbytes, blk.offset + blk.nbytes - off),
                            None if blk.checksums is None else blk.checksums[i])


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    version: int
    header_nbytes: int
    file_nbytes: int
    index_offset: int
    index_nbytes: int
    index_digest: int


def encode_header(file_nbytes: int, index_offset: int, index_nbytes: int, index_digest: int) -> bytes:
    """The 4096-byte header (zero-padded)."""
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_NBYTES, file_nbytes, index_offset, index_nbytes,
                        index_digest, 0)[:_HEADER_HASHED]
    head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    return head + bytes(HEADER_NBYTES - len(head))


def decode_header(data: bytes, path: str, actual_nbytes: int) -> Header:
    """Check invariants I1-I5 on the first bytes of a file.

    Args:
        data: at least the first 56 bytes of the file (fewer means the file is too short); when it holds
            the whole 4096-byte header, its reserved bytes 56-4095 are checked to be zero (I3).
        path: for messages.
        actual_nbytes: the file's size now (``os.fstat``).

    Raises:
        NotAFlashPackError (I1), HeaderError (I2, I3), UnsupportedVersionError (I4),
        TruncatedFileError / TrailingBytesError (I5), WeightMapError (I6: ``index_nbytes`` over
        :data:`MAX_INDEX_NBYTES`, raised before the weight map is read).
    """
    if data[:8] == MAGIC and len(data) < _HEADER.size:
        raise TruncatedFileError(
            f"{path}: truncated: the file has {actual_nbytes} bytes, fewer than the {_HEADER.size}-byte header; "
            f"copy or download it again"
        )
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise NotAFlashPackError(
            f"{path}: not a flashpack file (no flashpack magic at byte 0, no fal flashpack footer); "
            f"convert it first with `flashpack convert`"
        )
    magic, version, header_nbytes, file_nbytes, index_offset, index_nbytes, index_digest, digest = _HEADER.unpack_from(data)
    if xxhash.xxh3_64_intdigest(data[:_HEADER_HASHED]) != digest:
        raise HeaderError(f"{path}: header checksum mismatch in bytes [0, {_HEADER_HASHED}); the file is damaged")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{path}: format version {version}, this flashpack reads version {FORMAT_VERSION}; upgrade flashpack"
        )
    if header_nbytes != HEADER_NBYTES or index_offset < HEADER_NBYTES or index_offset + index_nbytes != file_nbytes:
        raise HeaderError(
            f"{path}: inconsistent header (header_nbytes={header_nbytes}, index_offset={index_offset}, "
            f"index_nbytes={index_nbytes}, file_nbytes={file_nbytes}); the file is damaged"
        )
    if actual_nbytes < file_nbytes:
        raise TruncatedFileError(
            f"{path}: truncated: the header says {file_nbytes} bytes, the file has {actual_nbytes} "
            f"({file_nbytes - actual_nbytes} missing); copy or download it again"
        )
    if actual_nbytes > file_nbytes:
        raise TrailingBytesError(
            f"{path}: {actual_nbytes - file_nbytes} trailing bytes after byte {file_nbytes} where the file "
            f"should end (the header says {file_nbytes} bytes, the file has {actual_nbytes}); "
            f"the file was appended to or damaged"
        )
    if len(data) >= HEADER_NBYTES:
        reserved = bytes(data[_HEADER.size:HEADER_NBYTES])
        if reserved.count(0) != len(reserved):
            first = _HEADER.size + next(i for i, b in enumerate(reserved) if b)
            raise HeaderError(f"{path}: reserved header byte {first} is not zero (bytes [{_HEADER.size}, "
                              f"{HEADER_NBYTES}) must be zero); the file is damaged")
    if index_nbytes > MAX_INDEX_NBYTES:
        raise WeightMapError(f"{path}: weight map of {index_nbytes} bytes at byte {index_offset} exceeds the "
                             f"{MAX_INDEX_NBYTES}-byte limit; the file is damaged or hostile (nothing was read)")
    return Header(version, header_nbytes, file_nbytes, index_offset, index_nbytes, index_digest)


# --------------------------------------------------------------------------- weight map


def encode_weight_map(*, metadata: Mapping[str, str], tensors: list[TensorInfo], aliases: Mapping[str, str],
                      blocks: list[BlockInfo], chunk_nbytes: int = CHUNK_NBYTES) -> bytes:
    """The weight map as compact UTF-8 JSON (field reference: docs/FORMAT.md)."""
    doc = {
        "format": "flashpack",
        "version": FORMAT_VERSION,
        "byte_order": "little",
        "metadata": dict(metadata),
        "checksum": {"algorithm": CHECKSUM_ALGORITHM, "chunk_nbytes": chunk_nbytes},
        "blocks": [
            {"dtype": b.dtype, "offset": b.offset, "nbytes": b.nbytes,
             "checksums": [f"{d:016x}" for d in (b.checksums or ())]}
            for b in blocks
        ],
        "tensors": {t.key: {"dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                    for t in tensors},
        "aliases": dict(aliases),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _JSONLimit(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _JSONLimit(f"an integer of {len(text.lstrip('-'))} digits (at most {_MAX_INT_DIGITS} are accepted)")
    return int(text)


def _parse_constant(text: str):
    raise _JSONLimit(f"{text} is not JSON (NaN and Infinity are not accepted)")


def load_json(data: bytes | bytearray | memoryview, path: str, what: str, offset: int) -> Any:
    """Parse untrusted UTF-8 JSON (a weight map, a fal footer, a shard index).

    Integers longer than 20 digits, ``NaN``/``Infinity`` and nesting deeper than the interpreter's
    recursion limit are refused (they would raise ``ValueError``, ``OverflowError`` or ``RecursionError``
    deeper down). Callers check the strings they keep with :func:`check_text`.

    Raises:
        WeightMapError naming ``path``, ``what`` and the byte ``offset`` where the JSON starts.
    """
    try:
        text = bytes(data).decode("utf-8")
        doc = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except RecursionError:
        raise WeightMapError(f"{path}: {what} at byte {offset} is nested too deeply to be parsed "
                             f"(more than about {sys.getrecursionlimit()} levels); the file is damaged or hostile") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and _JSONLimit are ValueErrors
        raise WeightMapError(f"{path}: {what} at byte {offset} is not UTF-8 JSON: {e}") from None
    return doc


def check_text(s: str, path: str, what: str) -> str:
    """Refuse a string that is not valid Unicode text (a lone surrogate such as ``"\\ud800"`` comes out
    of JSON escapes but cannot be encoded as UTF-8, printed or written back).

    Raises:
        WeightMapError naming ``path`` and ``what`` (with the string escaped).
    """
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise WeightMapError(f"{path}: {what} {ascii(s)} is not valid UTF-8 text (it holds a lone surrogate)") from None
    return s


def decode_weight_map(header: Header, index: bytes, path: str) -> WeightMap:
    """Parse and validate the weight map of a flashpack file (invariants I6-I14).

    Raises:
        WeightMapError (I6, I7, I13, I14), DtypeError (I9, unknown names only), LayoutError (I8, I10-I12).
    """
    if header.index_nbytes > MAX_INDEX_NBYTES:
        raise WeightMapError(f"{path}: weight map of {header.index_nbytes} bytes exceeds the {MAX_INDEX_NBYTES}-byte limit")
    if xxhash.xxh3_64_intdigest(index) != header.index_digest:
        raise WeightMapError(
            f"{path}: weight map checksum mismatch (bytes [{header.index_offset}, {header.file_nbytes})); the file is damaged"
        )
    doc = load_json(index, path, "weight map", header.index_offset)

    def need(obj: Any, name: str, kind: type | tuple, where: str) -> Any:
        if not isinstance(obj, dict) or name not in obj:
            raise WeightMapError(f"{path}: weight map: {where} lacks field {name!r}")
        v = obj[name]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise WeightMapError(f"{path}: weight map: {where}.{name} has the wrong type ({type(v).__name__})")
        return v

    if need(doc, "format", str, "root") != "flashpack":
        raise WeightMapError(f"{path}: weight map format is {doc['format']!r}, expected 'flashpack'")
    if need(doc, "version", int, "root") != header.version:
        raise UnsupportedVersionError(f"{path}: weight map version {doc['version']} differs from the header's {header.version}")
    byte_order = need(doc, "byte_order", str, "root")
    if byte_order != "little":
        raise WeightMapError(f"{path}: byte order {byte_order!r} is not supported (only 'little')")
    metadata = need(doc, "metadata", dict, "root")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightMapError(f"{path}: weight map metadata must map strings to strings")
    for k, v in metadata.items():
        check_text(k, path, "metadata key")
        check_text(v, path, f"metadata[{ascii(k)}] value")
    ck = need(doc, "checksum", dict, "root")
    algorithm = need(ck, "algorithm", str, "checksum")
    chunk_nbytes = need(ck, "chunk_nbytes", int, "checksum")
    if algorithm != CHECKSUM_ALGORITHM:
        raise WeightMapError(f"{path}: checksum algorithm {algorithm!r} is not supported (expected {CHECKSUM_ALGORITHM!r})")
    if chunk_nbytes <= 0 or chunk_nbytes % BLOCK_ALIGN or chunk_nbytes > MAX_CHUNK_NBYTES:
        raise WeightMapError(f"{path}: checksum chunk_nbytes {chunk_nbytes} is not a positive multiple of "
                             f"{BLOCK_ALIGN} of at most {MAX_CHUNK_NBYTES}")

    blocks: list[BlockInfo] = []
    for i, b in enumerate(need(doc, "blocks", list, "root")):
        where = f"blocks[{i}]"
        dt = need(b, "dtype", str, where)
        off = need(b, "offset", int, where)
        nb = need(b, "nbytes", int, where)
        sums = need(b, "checksums", list, where)
        if len(sums) != max(1, math.ceil(nb / chunk_nbytes)):
            raise WeightMapError(f"{path}: {where} ({dt}) has {len(sums)} checksums, expected {math.ceil(nb / chunk_nbytes)}")
        bad = next((j for j, s in enumerate(sums) if not (isinstance(s, str) and _HEX16.fullmatch(s))), None)
        if bad is not None:
            raise WeightMapError(f"{path}: {where} ({dt}) checksums[{bad}] = {sums[bad]!r} is not 16 hex digits (lowercase, nothing else)")
        digests = tuple(int(s, 16) for s in sums)
        blocks.append(BlockInfo(dt, off, nb, digests))

    tensors: dict[str, TensorInfo] = {}
    for key, t in need(doc, "tensors", dict, "root").items():
        check_text(key, path, "key")
        where = f"tensors[{key!r}]"
        shape = need(t, "shape", list, where)
        if not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise LayoutError(f"{path}: key {key!r}: shape {shape} must be a list of non-negative integers "
                              f"(each at most 2**63 - 1)")
        tensors[key] = TensorInfo(key, need(t, "dtype", str, where), tuple(shape),
                                  need(t, "offset", int, where), need(t, "nbytes", int, where))
    aliases = need(doc, "aliases", dict, "root")
    for a, target in aliases.items():
        check_text(a, path, "alias")
        if not isinstance(target, str) or target not in tensors:
            raise WeightMapError(f"{path}: alias {a!r} points to {target!r}, which is not a stored tensor")
        if a in tensors:
            raise WeightMapError(f"{path}: key {a!r} is both a stored tensor and an alias")

    wm = WeightMap(path=path, file_nbytes=header.file_nbytes, source="flashpack", version=header.version,
                   byte_order=byte_order, metadata=dict(metadata), tensors=tensors, aliases=dict(aliases),
                   blocks=blocks, checksum_algorithm=algorithm, chunk_nbytes=chunk_nbytes,
                   index_offset=header.index_offset, index_nbytes=header.index_nbytes, payload_start=HEADER_NBYTES)
    validate_layout(wm, block_align=BLOCK_ALIGN, tensor_align=TENSOR_ALIGN)
    return wm


def validate_layout(wm: WeightMap, *, block_align: int, tensor_align: int) -> None:
    """Check invariants I8-I12: every block and tensor lies inside the payload region, aligned, without
    overlaps, with ``nbytes == prod(shape) * itemsize`` for a known dtype, and a shape torch can build
    (the product of its dimensions, 0 counted as 1, at most :data:`MAX_SHAPE_PRODUCT`: I10).

    Raises:
        LayoutError, DtypeError.
    """
    path, end = wm.path, wm.index_offset
    prev_end = wm.payload_start
    by_dtype: dict[str, BlockInfo] = {}
    for i, b in enumerate(wm.blocks):
        if b.dtype not in DTYPE_NAMES:
            raise DtypeError(f"{path}: block {i} has unknown dtype {b.dtype!r}")
        if b.offset % block_align or b.offset < prev_end or b.nbytes <= 0 or b.offset + b.nbytes > end:
            raise LayoutError(
                f"{path}: block {i} ({b.dtype}) at bytes [{b.offset}, {b.offset + b.nbytes}) is misaligned, "
                f"empty, overlaps the previous block or leaves the payload region [{wm.payload_start}, {end})"
            )
        if b.dtype in by_dtype:
            raise LayoutError(f"{path}: two blocks of dtype {b.dtype}")
        by_dtype[b.dtype] = b
        prev_end = b.offset + b.nbytes
    spans = []
    for key, t in wm.tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise DtypeError(f"{path}: key {key!r} has unknown dtype {t.dtype!r}; known: {', '.join(DTYPE_NAMES)}")
        expect = math.prod(t.shape) * DTYPE_ITEMSIZE[t.dtype]
        if t.nbytes != expect:
            raise LayoutError(
                f"{path}: key {key!r}: nbytes {t.nbytes} does not match shape {list(t.shape)} x "
                f"{DTYPE_ITEMSIZE[t.dtype]} bytes ({t.dtype}) = {expect}"
            )
        if math.prod(max(d, 1) for d in t.shape) > MAX_SHAPE_PRODUCT:
            raise LayoutError(f"{path}: key {key!r}: shape {list(t.shape)} cannot be built: the product of its "
                              f"dimensions (0 counted as 1) exceeds 2**63 - 1, so its strides overflow int64")
        if t.nbytes == 0:
            if t.offset < 0 or t.offset > end:
                raise LayoutError(f"{path}: key {key!r}: offset {t.offset} out of range")
            continue
        b = by_dtype.get(t.dtype)
        if b is None or t.offset < b.offset or t.offset + t.nbytes > b.offset + b.nbytes:
            raise LayoutError(
                f"{path}: key {key!r} ({t.dtype}) at bytes [{t.offset}, {t.offset + t.nbytes}) is outside "
                f"its dtype block" + (f" [{b.offset}, {b.offset + b.nbytes})" if b else " (there is none)")
            )
        if (t.offset - b.offset) % tensor_align or t.offset % DTYPE_ITEMSIZE[t.dtype]:
            raise LayoutError(f"{path}: key {key!r}: offset {t.offset} is not {tensor_align}-byte aligned in its block")
        spans.append((t.offset, t.offset + t.nbytes, key))
    spans.sort()
    for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise LayoutError(f"{path}: keys {ka!r} [{a0}, {a1}) and {kb!r} [{b0}, {b1}) overlap")


def verify_chunk(wm: WeightMap, chunk: Chunk, data) -> None:
    """Check invariant I15 for one chunk whose bytes are ``data`` (any buffer of ``chunk.nbytes``).

    Raises:
        ChecksumMismatchError naming the file, block, byte range and the keys stored there.
    """
    if chunk.digest is None:
        return
    check_chunk_digest(wm, chunk, xxhash.xxh3_64_intdigest(data))


def check_chunk_digest(wm: WeightMap, chunk: Chunk, got: int) -> None:
    """Check invariant I15 for one chunk whose XXH3-64 (seed 0) was computed as ``got`` (by a reader, as the
    bytes landed: :attr:`flashpack.io.protocol.Extent.hasher`).

    Raises:
        ChecksumMismatchError naming the file, block, byte range and the keys stored there.
    """
    if chunk.digest is not None and got != chunk.digest:
        wm, chunk = wm.resolve_chunk(chunk)  # a shard of a sharded pack: name the shard, in its own offsets
        lo, hi = chunk.offset, chunk.offset + chunk.nbytes
        keys = [k for k, t in wm.tensors.items() if t.nbytes and t.offset < hi and t.offset + t.nbytes > lo]
        shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        raise ChecksumMismatchError(
            f"{wm.path}: checksum mismatch in block {chunk.block} ({wm.blocks[chunk.block].dtype}) chunk "
            f"{chunk.index}, bytes [{lo}, {hi}) (expected {chunk.digest:016x}, got {got:016x}); "
            f"affected keys: {shown or 'none (padding)'}; the file is damaged: copy or convert it again"
        )


# --------------------------------------------------------------------------- fal's flashpack files

_FAL_TORCH_NAMES = {a: n for n, a in DTYPE_NAMES.items()}


def decode_fal_footer(footer: bytes, path: str, file_nbytes: int, footer_offset: int) -> WeightMap:
    """Parse the JSON footer of a file written by fal's flashpack 0.2-0.4 (``flashpack_v3``/``v4``).

    Offsets and lengths in its ``index`` are element counts within a block ("macroblock"); they are
    turned into absolute byte ranges here and validated like this format's own (I8-I12, with fal's
    alignment). Such files carry no checksums. Every count must be a JSON integer (not ``1.5``, ``"0"``,
    ``true`` or ``null``); ``metadata`` must be an object (or absent/``null``).

    Raises:
        WeightMapError (bad JSON, a missing or ill-typed field), UnsupportedVersionError (an unknown
        ``format``), DtypeError, LayoutError; each names the file and the field.
    """
    doc = load_json(footer, path, "fal flashpack footer", footer_offset)
    if not isinstance(doc, dict):
        raise WeightMapError(f"{path}: fal flashpack footer is not a JSON object (at byte {footer_offset})")
    fmt = doc.get("format")

    def dname(v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise WeightMapError(f"{path}: fal flashpack footer is missing or has a malformed field: "
                                 f"{where} must be a dtype name string, got {type(v).__name__}")
        attr = v.removeprefix("torch.")
        if attr not in _FAL_TORCH_NAMES:
            raise DtypeError(f"{path}: fal flashpack dtype {v!r} is unknown ({where})")
        return _FAL_TORCH_NAMES[attr]

    def field(obj: Any, name: str, where: str, *, default: Any = None) -> Any:
        if not isinstance(obj, dict):
            raise WeightMapError(f"{path}: fal flashpack footer is missing or has a malformed field: "
                                 f"{where} is not an object")
        if name not in obj:
            if default is not None:
                return default
            raise WeightMapError(f"{path}: fal flashpack footer is missing or has a malformed field: "
                                 f"KeyError({name!r}) ({where} lacks it)")
        return obj[name]

    def integer(obj: Any, name: str, where: str, *, default: int | None = None) -> int:
        v = field(obj, name, where, default=default)
        if not _is_int(v):
            raise WeightMapError(f"{path}: fal flashpack footer is missing or has a malformed field: "
                                 f"{where}.{name} = {v!r} is not a JSON integer")
        return v

    def array(obj: Any, name: str, where: str) -> list:
        v = field(obj, name, where)
        if not isinstance(v, list):
            raise WeightMapError(f"{path}: fal flashpack footer is missing or has a malformed field: "
                                 f"{where}.{name} is not a list ({type(v).__name__})")
        return v

    if fmt == "flashpack_v3":
        dt = dname(field(doc, "target_dtype", "root"), "target_dtype")
        total = integer(doc, "total_elems", "root")
        if total < 0:
            raise LayoutError(f"{path}: fal flashpack total_elems {total} is negative")
        raw_blocks = [(dt, 0, total * DTYPE_ITEMSIZE[dt])]
    elif fmt == "flashpack_v4":
        raw_blocks = []
        for i, mb in enumerate(array(doc, "macroblocks", "root")):
            where = f"macroblocks[{i}]"
            dt = dname(field(mb, "dtype", where), f"{where}.dtype")
            nb = integer(mb, "length_bytes", where)
            if nb < 0:
                raise LayoutError(f"{path}: fal macroblock {i}: negative length_bytes {nb}")
            raw_blocks.append((dt, integer(mb, "offset_bytes", where), nb))
            if integer(mb, "length_elems", where, default=nb // DTYPE_ITEMSIZE[dt]) * DTYPE_ITEMSIZE[dt] != nb:
                raise LayoutError(f"{path}: fal macroblock {i}: length_elems and length_bytes disagree")
    else:
        raise UnsupportedVersionError(f"{path}: fal flashpack footer format {fmt!r} is not supported (flashpack_v3, flashpack_v4)")
    tensors: dict[str, TensorInfo] = {}
    for i, rec in enumerate(array(doc, "index", "root")):
        where = f"index[{i}]"
        name = field(rec, "name", where)
        if not isinstance(name, str) or name in tensors:
            raise LayoutError(f"{path}: fal flashpack {where} name {name!r} is not a string or appears twice")
        check_text(name, path, "key")
        where = f"index[{i}] ({name!r})"
        mbi = integer(rec, "macroblock", where, default=0)
        if not 0 <= mbi < len(raw_blocks):
            raise LayoutError(f"{path}: key {name!r}: macroblock {mbi} does not exist")
        dt, boff, _ = raw_blocks[mbi]
        item = DTYPE_ITEMSIZE[dt]
        dims = array(rec, "shape", where)
        if not all(_is_int(d) for d in dims):
            raise WeightMapError(f"{path}: fal flashpack footer is missing or has a malformed field: key {name!r}: "
                                 f"shape {dims!r} must be a list of JSON integers")
        if not all(0 <= d <= MAX_DIM for d in dims):
            raise LayoutError(f"{path}: key {name!r}: negative dimension in shape {dims} (or one over 2**63 - 1)")
        shape = tuple(dims)
        length = integer(rec, "length", where)
        if length != math.prod(shape):
            raise LayoutError(f"{path}: key {name!r}: length {length} does not match shape {list(shape)}")
        offset = integer(rec, "offset", where)
        tensors[name] = TensorInfo(name, dt, shape, boff + offset * item if length else 0, length * item)

    metadata = doc.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise WeightMapError(f"{path}: fal flashpack footer: metadata is a {type(metadata).__name__}, not an object")
    meta: dict[str, str] = {}
    for k, v in metadata.items():
        check_text(k, path, "metadata key")
        meta[k] = check_text(v if isinstance(v, str) else str(v), path, f"metadata[{ascii(k)}] value")

    # fal's blocks are 128-byte aligned, not page-aligned; empty ones hold nothing to read.
    blocks = [BlockInfo(dt, off, nb, None) for dt, off, nb in raw_blocks if nb > 0]
    wm = WeightMap(path=path, file_nbytes=file_nbytes, source=f"fal-{fmt.replace('_', '-')}", version=0,
                   byte_order=sys.byteorder, metadata=meta,
                   tensors=tensors, aliases={}, blocks=blocks, checksum_algorithm=None,
                   index_offset=footer_offset, index_nbytes=file_nbytes - footer_offset, payload_start=0)
    validate_layout(wm, block_align=1, tensor_align=1)
    return wm
