"""The source of a load: open a pack, read and validate its weight map through one descriptor, and the
file identity that every later payload read is checked against.

Stage 2 of the pipeline (after :mod:`flashpack.format`): it does I/O on the header and the weight map only;
it knows nothing about tensors, readers or devices.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .errors import (
    NotAFlashPackError,
    NotARegularFileError,
    ReadError,
    ShardIndexError,
    ShardMismatchError,
    ShardMissingError,
    UsageError,
    WeightMapError,
    short_read_error,
)
from .format import (
    FAL_MAGIC,
    HEADER_NBYTES,
    MAGIC,
    MAX_INDEX_NBYTES,
    BlockInfo,
    Chunk,
    TensorInfo,
    WeightMap,
    decode_fal_footer,
    decode_header,
    decode_weight_map,
    load_json,
)
from .settings import PAGE_NBYTES

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_regular(st: os.stat_result, path: str) -> None:
    """Raise unless ``st`` describes a regular file.

    Raises:
        IsADirectoryError: a folder. NotARegularFileError: a FIFO, socket or device (or anything else).
    """
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a flashpack file", path)
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise NotARegularFileError(f"{path}: not a regular file ({kind}); flashpack reads regular files only", path)


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking and return ``(fd, fstat)`` once it is known to be a
    regular file. ``O_NONBLOCK`` keeps a FIFO without a writer from hanging ``open(2)``; it is cleared
    again before returning, so reads behave as usual. ``O_NOCTTY`` keeps a terminal device from becoming
    the controlling terminal. The caller closes the descriptor.

    Raises:
        FileNotFoundError, PermissionError and other ``OSError`` from ``open(2)``; IsADirectoryError (a
        folder); NotARegularFileError (a FIFO, socket or device), before any byte is read.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        check_regular(st, path)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` (a writable byte buffer) with the file's bytes at ``offset``, resuming short reads
    (preadv(2)).

    Raises:
        ReadError naming the file, offset and length: the read failed (``EIO``...) or came back short.
    """
    nbytes, done = view.nbytes, 0
    while done < nbytes:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        except OSError as e:
            raise ReadError(e.errno or errno.EIO, f"read of {nbytes - done} bytes at byte offset {offset + done} "
                            f"failed: {e.strerror or e}", path) from e
        if n == 0:
            raise short_read_error(path, offset, nbytes, done)
        done += n


def _pread_exact(fd: int, nbytes: int, offset: int, path: str) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` into one buffer allocated up front (no intermediate copies).

    Raises:
        ReadError naming the file, offset and length: the read failed (``EIO``...) or came back short.
    """
    out = bytearray(nbytes)
    with memoryview(out) as view:
        pread_into(fd, view, offset, path)
    return out


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime in ns, ctime in ns): changes when the file is replaced or rewritten. The ctime
    (inode change time, stat(2)) catches an in-place rewrite of the same size whose mtime was set back
    (``cp -p`` over the file, ``os.utime``): setting the mtime changes the ctime, and nothing can set it back."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_identity(fd: int, expect: tuple[int, ...], path: str) -> None:
    """Raise unless the open descriptor ``fd`` is the file whose :func:`file_identity` was ``expect``.

    Raises:
        ReadError (``ESTALE``): the file was replaced, truncated or rewritten since ``expect`` was taken.
    """
    now = file_identity(os.fstat(fd))
    if now != tuple(expect):
        raise ReadError(errno.ESTALE, f"the file was replaced, truncated or rewritten while it was being loaded "
                                      f"({expect[2]} bytes when its weight map was read, {now[2]} bytes now; "
                                      f"its weight map and payload would not match); load it again", path)


def check_same_file(wm: WeightMap, fd: int) -> None:
    """Raise unless ``fd`` is the file (same inode, size, mtime and ctime) whose weight map ``wm`` is.

    Raises:
        ReadError (``ESTALE``): the file was replaced or rewritten since its weight map was read.
    """
    if wm.file_id is not None:
        check_identity(fd, wm.file_id, wm.path)


def read_weight_map_fd(fd: int, path: str) -> WeightMap:
    """Read and validate the weight map through an open descriptor, recording the file's identity so the
    payload reads can check they read the same file (:func:`check_same_file`).

    Every length the file states (``index_nbytes``, a fal footer's length) is checked against its limit
    (:data:`~flashpack.format.MAX_INDEX_NBYTES`) and against the file's size before anything is read,
    and is read into one preallocated buffer: a small (or sparse) hostile file cannot make this allocate
    more than the limit.

    Raises:
        IsADirectoryError; NotARegularFileError (FIFO, socket, device); ReadError (a failed or short read,
        naming file and offset); FormatError subclasses for the invariants I1-I14.
    """
    st = os.fstat(fd)
    check_regular(st, path)
    wm = _read_weight_map_fd(fd, path, st.st_size)
    wm.file_id = file_identity(st)
    return wm


def _read_weight_map_fd(fd: int, path: str, size: int) -> WeightMap:
    head = _pread_exact(fd, min(size, HEADER_NBYTES), 0, path)
    if head[:8] == MAGIC:
        header = decode_header(head, path, size)  # checks index_nbytes against the limit and the size
        index = _pread_exact(fd, header.index_nbytes, header.index_offset, path)
        return decode_weight_map(header, index, path)
    if size >= 16:
        tail = _pread_exact(fd, 16, size - 16, path)
        if tail[8:] == FAL_MAGIC:
            footer_nbytes = int.from_bytes(tail[:8], "little")
            footer_offset = size - 16 - footer_nbytes
            if footer_offset < 0:
                raise NotAFlashPackError(f"{path}: fal flashpack footer length {footer_nbytes} exceeds the file size "
                                         f"{size} (the length is the 8 bytes at byte {size - 16})")
            if footer_nbytes > MAX_INDEX_NBYTES:
                raise WeightMapError(f"{path}: fal flashpack footer of {footer_nbytes} bytes at byte {footer_offset} "
                                     f"exceeds the {MAX_INDEX_NBYTES}-byte limit; the file is damaged or hostile "
                                     f"(nothing was read)")
            footer = _pread_exact(fd, footer_nbytes, footer_offset, path)
            return decode_fal_footer(footer, path, size, footer_offset)
    return decode_header(head, path, size)  # raises NotAFlashPackError / HeaderError


def read_weight_map(path: str | os.PathLike) -> WeightMap:
    """Read and validate only the weight map of a flashpack file (or a fal flashpack file).

    Reads the 4096-byte header and the weight map, whatever the file size; checks invariants I1-I14.
    The file is opened with :func:`open_regular`, so a FIFO, socket or device fails at once instead of
    hanging.

    Raises:
        FormatError subclasses (also ``ValueError``) naming the file and what is wrong;
        NotARegularFileError; ReadError (naming file and byte offset); ``OSError`` from opening the file.
    """
    path = os.fspath(path)
    fd, _ = open_regular(path)
    try:
        return read_weight_map_fd(fd, path)
    finally:
        os.close(fd)



# --------------------------------------------------------------------------- sharded packs
#
# A sharded pack is NAME-00001-of-0000N.flashpack ... plus NAME.flashpack.index.json (docs/FORMAT.md,
# "Sharded packs"). Each shard is an ordinary pack; the index maps every key to its shard and records the
# xxh3_64 of each shard's weight map (the header's index digest), so shards of two saves are never mixed.

#: ``"format"`` of a sharded pack's index.
INDEX_FORMAT = "flashpack-index"
INDEX_VERSION = 1
#: Suffix of a sharded pack's index: ``model.flashpack`` -> ``model.flashpack.index.json``.
INDEX_SUFFIX = ".index.json"
PACK_SUFFIX = ".flashpack"
#: Virtual offsets of consecutive shards in a merged map are at least this far apart, so no read region of
#: one shard ever touches the next one (regions are merged when they touch).
SHARD_GAP_NBYTES = PAGE_NBYTES


def index_path_for(path: str | os.PathLike) -> str:
    """The index of the sharded pack saved as ``path``: ``dir/model.flashpack`` -> ``dir/model.flashpack.index.json``."""
    return os.fspath(path) + INDEX_SUFFIX


def shard_stem(path: str | os.PathLike) -> str:
    """``dir/model.fp16.flashpack`` -> ``model.fp16`` (the shards are ``model.fp16-00001-of-00003.flashpack``)."""
    base = os.path.basename(os.fspath(path))
    return base[: -len(PACK_SUFFIX)] if base.endswith(PACK_SUFFIX) and len(base) > len(PACK_SUFFIX) else base


def shard_name(path: str | os.PathLike, i: int, n: int) -> str:
    """File name (no folder) of shard ``i`` (0-based) of ``n`` of the pack saved as ``path``:
    ``model-00001-of-00003.flashpack`` (5 digits, or more past 99999 shards)."""
    w = max(5, len(str(n)))
    return f"{shard_stem(path)}-{i + 1:0{w}d}-of-{n:0{w}d}{PACK_SUFFIX}"


def shard_name_pattern(path: str | os.PathLike) -> "re.Pattern[str]":
    """Matches the file names of every shard (any count) of the pack saved as ``path``, and what a save killed
    midway leaves: hidden temporary shards (``.model-00001-of-00003.flashpack.<token>.tmp``), links being put
    in place, temporary indexes and packs of :func:`flashpack.atomic.atomic_path` (one writer per name at a
    time). Nothing else: a user's file that merely looks similar is never matched."""
    stem = re.escape(shard_stem(path))
    shard = rf"{stem}-\d{{5,}}-of-\d{{5,}}\.flashpack"
    # atomic_path's own temporaries (".NAME.fpk-XXXXXXXX.tmp") are cleaned by flashpack.atomic, under their lock
    return re.compile(rf"^(?:{shard}(?:\.[0-9a-f]+\.link)?"  # a shard; a link being put in place
                      rf"|\.{shard}\.[0-9a-f]{{12}}\.tmp)$")  # a temporary shard of a killed save


@dataclass
class ShardedWeightMap(WeightMap):
    """The weight maps of some shards of a sharded pack merged into one *virtual* file: shard ``i``'s bytes
    sit at virtual offsets ``[bases[i], bases[i] + shards[i].file_nbytes)`` (bases 4096-aligned, with a gap of
    at least :data:`SHARD_GAP_NBYTES` between shards), so one :class:`~flashpack.plan.LoadPlan` covers every
    shard and no plan region or read extent crosses from one shard into the next.

    ``path`` is the index; ``file_id`` is ``None`` (each shard's map keeps its own identity, checked when a
    reader opens it). Readers translate virtual offsets back with :meth:`locate`.
    """

    shards: list[WeightMap] = field(default_factory=list)
    bases: list[int] = field(default_factory=list)
    #: per merged block: (shard index, block index in that shard)
    block_origin: list[tuple[int, int]] = field(default_factory=list)

    def locate(self, offset: int) -> tuple[int, int]:
        """(shard index, offset in that shard's file) of virtual byte ``offset``.

        Raises:
            ValueError: ``offset`` lies before the first shard.
        """
        i = bisect.bisect_right(self.bases, offset) - 1
        if i < 0:
            raise ValueError(f"{self.path}: virtual offset {offset} is before the first shard")
        return i, offset - self.bases[i]

    def chunks(self) -> Iterator[Chunk]:
        """Every shard's chunks (each with its own shard's chunk size), at virtual offsets, in order."""
        b0 = 0
        for wm, base in zip(self.shards, self.bases):
            for c in wm.chunks():
                yield Chunk(b0 + c.block, c.index, base + c.offset, c.nbytes, c.digest)
            b0 += len(wm.blocks)

    def resolve_chunk(self, chunk: Chunk) -> tuple[WeightMap, Chunk]:
        s, b = self.block_origin[chunk.block]
        base = self.bases[s]
        return self.shards[s], Chunk(b, chunk.index, chunk.offset - base, chunk.nbytes, chunk.digest)


def merge_weight_maps(index_path: str, shards: list[WeightMap], aliases: dict[str, str] | None = None) -> WeightMap:
    """One :class:`ShardedWeightMap` over ``shards`` (in order); ``aliases`` adds the index's aliases whose
    target lies in another of these shards. A single shard without extra aliases is returned as it is.

    Raises:
        ShardIndexError: a key stored in two shards.
    """
    if len(shards) == 1 and not aliases:
        return shards[0]
    tensors: dict[str, TensorInfo] = {}
    all_aliases: dict[str, str] = {}
    blocks: list[BlockInfo] = []
    origin: list[tuple[int, int]] = []
    bases: list[int] = []
    pos = 0
    for s, wm in enumerate(shards):
        bases.append(pos)
        for k, t in wm.tensors.items():
            if k in tensors:
                raise ShardIndexError(f"{index_path}: key {k!r} is stored in two shards ({wm.path} and another); "
                                      f"the set is damaged: save it again")
            tensors[k] = TensorInfo(k, t.dtype, t.shape, t.offset + pos if t.nbytes else t.offset, t.nbytes)
        all_aliases.update(wm.aliases)
        for b, blk in enumerate(wm.blocks):
            blocks.append(BlockInfo(blk.dtype, blk.offset + pos, blk.nbytes, blk.checksums))
            origin.append((s, b))
        pos += -(-wm.file_nbytes // PAGE_NBYTES) * PAGE_NBYTES + SHARD_GAP_NBYTES
    for a, t in (aliases or {}).items():
        if t in tensors and a not in tensors:
            all_aliases.setdefault(a, t)
    algo = next((wm.checksum_algorithm for wm in shards if wm.checksum_algorithm), None)
    first = shards[0]
    return ShardedWeightMap(path=index_path, file_nbytes=pos - SHARD_GAP_NBYTES, source=first.source,
                            version=first.version, byte_order=first.byte_order, metadata=dict(first.metadata),
                            tensors=tensors, aliases=all_aliases, blocks=blocks, checksum_algorithm=algo,
                            chunk_nbytes=first.chunk_nbytes, shards=list(shards), bases=bases, block_origin=origin)


@dataclass(frozen=True)
class ShardRecord:
    """One shard an index lists: its file name (no folder), size in bytes, and weight map xxh3_64."""

    file: str
    file_nbytes: int
    weight_map_digest: int


@dataclass
class ShardIndex:
    """A parsed, validated ``NAME.flashpack.index.json``.

    Attributes:
        path: the index file.
        shards: the shards in order.
        weight_map: every key (stored tensors and aliases) -> the shard file holding its bytes.
        aliases: alias key -> stored key (the alias is recorded in its target's shard).
        total_size: bytes of tensor data stored in all shards (aliases and padding not counted).
    """

    path: str
    shards: list[ShardRecord]
    weight_map: dict[str, str]
    aliases: dict[str, str]
    total_size: int

    def shard_path(self, i: int) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), self.shards[i].file)


def encode_index(shards: list[ShardRecord], weight_map: dict[str, str], aliases: dict[str, str],
                 total_size: int) -> bytes:
    """The bytes of an index (UTF-8 JSON, keys in the given order)."""
    doc = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "metadata": {"total_size": total_size, "total_file_nbytes": sum(r.file_nbytes for r in shards)},
        "shards": [{"file": r.file, "file_nbytes": r.file_nbytes, "weight_map_xxh3_64": f"{r.weight_map_digest:016x}"}
                   for r in shards],
        "weight_map": weight_map,
        "aliases": aliases,
    }
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()


def decode_index(data: bytes, path: str) -> ShardIndex:
    """Parse and validate an index (docs/FORMAT.md, "Sharded packs", invariants S1-S6).

    Raises:
        ShardIndexError: naming the index and the field that is wrong.
    """
    def bad(msg: str) -> ShardIndexError:
        return ShardIndexError(f"{path}: sharded pack index: {msg}")

    try:  # bounded nesting, integer size, no NaN (format.load_json): a hostile index is a named error
        doc = load_json(data, path, "sharded pack index", 0)
    except WeightMapError as e:
        raise bad(f"not usable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise bad(f"'format' is not {INDEX_FORMAT!r} (is this a safetensors index? convert the checkpoint with "
                  f"`flashpack convert`)")
    if doc.get("version") != INDEX_VERSION:
        raise bad(f"version {doc.get('version')!r}, this flashpack reads version {INDEX_VERSION}; upgrade flashpack")
    raw, wmap, aliases, meta = doc.get("shards"), doc.get("weight_map"), doc.get("aliases", {}), doc.get("metadata")
    if not isinstance(raw, list) or not raw:
        raise bad("'shards' must be a non-empty list")
    if not isinstance(wmap, dict) or not isinstance(aliases, dict) or not isinstance(meta, dict):
        raise bad("'weight_map', 'aliases' and 'metadata' must be objects")
    shards: list[ShardRecord] = []
    for i, r in enumerate(raw):
        try:
            name, nbytes, digest = r["file"], r["file_nbytes"], r["weight_map_xxh3_64"]
        except (TypeError, KeyError) as e:
            raise bad(f"shard {i} lacks field {e}") from None
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                or "\0" in name):
            raise bad(f"shard {i}: file {name!r} must be a plain file name in the index's folder")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise bad(f"shard {i}: file_nbytes {nbytes!r} is not a non-negative integer")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{16}", digest):
            raise bad(f"shard {i}: weight_map_xxh3_64 {digest!r} is not 16 hex digits")
        shards.append(ShardRecord(name, nbytes, int(digest, 16)))
    names = {r.file for r in shards}
    if len(names) != len(shards):
        raise bad("a shard file is listed twice")
    for k, v in wmap.items():
        if not isinstance(v, str) or v not in names:
            raise bad(f"key {k!r} maps to {v!r}, which is not a listed shard")
    for a, t in aliases.items():
        if not isinstance(t, str) or t not in wmap or t in aliases or a not in wmap or wmap[a] != wmap[t]:
            raise bad(f"alias {a!r} -> {t!r}: the target must be a stored key of the same shard")
    total = meta.get("total_size", 0)
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise bad(f"metadata.total_size {total!r} is not a non-negative integer")
    return ShardIndex(path, shards, dict(wmap), dict(aliases), total)


def read_index(path: str | os.PathLike) -> ShardIndex:
    """Read and validate a sharded pack's index file.

    Raises:
        ShardIndexError; OSError (``FileNotFoundError`` when it does not exist).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(MAX_INDEX_NBYTES + 1)
    if len(data) > MAX_INDEX_NBYTES:
        raise ShardIndexError(f"{path}: sharded pack index exceeds the {MAX_INDEX_NBYTES}-byte limit")
    return decode_index(data, path)


def is_index_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a sharded pack's index (ends with ``.index.json``)."""
    return os.fspath(path).endswith(INDEX_SUFFIX)


def find_pack_in_folder(folder: str) -> str:
    """The one pack in ``folder``: its ``*.flashpack.index.json`` if there is exactly one, else its one
    ``*.flashpack`` file that is not a shard.

    Raises:
        IsADirectoryError: none (``filename`` is the folder). UsageError: several (the message lists them).
    """
    names = sorted(os.listdir(folder))
    idx = [n for n in names if n.endswith(PACK_SUFFIX + INDEX_SUFFIX) and not n.startswith(".")]
    if len(idx) == 1:
        return os.path.join(folder, idx[0])
    shard_re = re.compile(r"-\d{5,}-of-\d{5,}\.flashpack$")
    packs = [n for n in names if n.endswith(PACK_SUFFIX) and not n.startswith(".") and not shard_re.search(n)]
    if not idx and len(packs) == 1:
        return os.path.join(folder, packs[0])
    found = idx + packs
    if not found:
        raise IsADirectoryError(errno.EISDIR, "is a folder holding no .flashpack file and no .flashpack.index.json; "
                                              "give the path of a pack", folder)
    raise UsageError(f"{folder}: several packs in this folder ({found}); give the path of one (a .flashpack file "
                     f"or a .flashpack.index.json)")


@dataclass
class Pack:
    """What :func:`read_pack` found: one file, or a sharded pack (some or all of its shards).

    Attributes:
        path: the single file, or the index.
        index: the parsed index (``None`` for a single file).
        shards: ``(shard path, WeightMap)`` of every shard read, in index order (one entry for a single file).
        key_shard: every key (stored or alias) -> its position in ``shards``, for the shards read.
        weight_map: the one map a load plans with: the single file's own, or a :class:`ShardedWeightMap`
            merging the shards read (virtual offsets; see :func:`merge_weight_maps`).
    """

    path: str
    index: ShardIndex | None
    shards: list[tuple[str, WeightMap]]
    key_shard: dict[str, int]
    weight_map: WeightMap

    @property
    def sharded(self) -> bool:
        return self.index is not None


def resolve_pack_path(path: str | os.PathLike) -> str:
    """A file or index as given; a folder -> its one pack (:func:`find_pack_in_folder`).

    Raises:
        IsADirectoryError: a folder with no pack. UsageError: a folder with several. FileNotFoundError: nothing
        at ``path``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return find_pack_in_folder(path)
    if not os.path.exists(path) and not is_index_path(path) and os.path.isfile(index_path_for(path)):
        return index_path_for(path)  # "model.flashpack" saved sharded: its index
    return path


def shards_for_keys(index: ShardIndex, keys: Iterable[str] | str | None, *, missing_ok: bool = False) -> list[int]:
    """Indices (in index order) of the shards holding ``keys`` (aliases resolved); all for ``None``.

    Raises:
        KeyError: a key the index does not list (the first ten are named), unless ``missing_ok``.
    """
    if keys is None:
        return list(range(len(index.shards)))
    wanted = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in wanted if k not in index.weight_map]
    wanted = [k for k in wanted if k in index.weight_map]
    if missing and not missing_ok:
        raise KeyError(f"{index.path}: keys not in the pack: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    files = {index.weight_map[k] for k in wanted}
    return [i for i, r in enumerate(index.shards) if r.file in files]


def read_shard(index: ShardIndex, i: int) -> WeightMap:
    """Read shard ``i`` of ``index`` and check it is the shard the index lists.

    Raises:
        ShardMissingError: the shard file is missing. ShardMismatchError: its weight map checksum, or the keys
        it stores, differ from the index's (a shard of another save). FormatError naming the shard.
    """
    rec = index.shards[i]
    path = index.shard_path(i)
    try:
        fd, _ = open_regular(path)
    except FileNotFoundError:
        raise ShardMissingError(errno.ENOENT, f"shard {i + 1} of {len(index.shards)} listed by {index.path} is "
                                              f"missing; download or copy the whole set", path) from None
    try:
        wm = read_weight_map_fd(fd, path)
        if wm.source != "flashpack":
            raise ShardMismatchError(f"{path}: a shard must be a flashpack file, this is a {wm.source} file")
        digest = decode_header(_pread_exact(fd, HEADER_NBYTES, 0, path), path, os.fstat(fd).st_size).index_digest
    finally:
        os.close(fd)
    if digest != rec.weight_map_digest or wm.file_nbytes != rec.file_nbytes:
        raise ShardMismatchError(
            f"{path}: this shard is not the one {index.path} lists (weight map xxh3_64 {digest:016x}, "
            f"{wm.file_nbytes} bytes; the index expects {rec.weight_map_digest:016x}, {rec.file_nbytes} bytes): "
            f"shards of two saves are mixed; save the pack again or copy the whole set")
    mine = {k for k, f in index.weight_map.items() if f == rec.file}
    have = set(wm.tensors) | set(wm.aliases)
    if mine != have:
        odd = sorted(mine ^ have)[:5]
        raise ShardMismatchError(f"{path}: its keys differ from those {index.path} maps to it (e.g. {odd}); "
                                 f"save the pack again or copy the whole set")
    return wm


def read_pack(path: str | os.PathLike, *, keys: Iterable[str] | str | None = None, missing_ok: bool = False) -> Pack:
    """Open a pack for loading: a ``.flashpack`` file, a sharded pack's ``.flashpack.index.json``, or a folder
    holding one of these (:func:`find_pack_in_folder`).

    For a sharded pack only the index and the weight maps of the shards that hold ``keys`` (all shards for
    ``None``) are read: a partial load never opens, or needs, the other shards.

    Args:
        path: file, index or folder.
        keys: the keys (aliases included) a load will ask for, or ``None`` for all.
        missing_ok: keys the index does not list are ignored instead of raising ``KeyError``.

    Returns:
        A :class:`Pack`: ``shards`` is ``[(shard path, WeightMap), ...]``, ``key_shard`` maps each key of the
        shards read to its position in ``shards``, ``weight_map`` is the merged map to plan with.

    Raises:
        ShardIndexError, ShardMismatchError, ShardMissingError, FormatError (all naming the file or shard),
        KeyError (a key the index does not list), IsADirectoryError (a folder with no pack), UsageError (a folder
        with several), OSError.
    """
    path = resolve_pack_path(path)
    if not is_index_path(path):
        wm = read_weight_map(path)
        return Pack(path, None, [(path, wm)], {k: 0 for k in wm.keys()}, wm)
    index = read_index(path)
    picked = shards_for_keys(index, keys, missing_ok=missing_ok)
    maps = [read_shard(index, i) for i in picked]
    key_shard = {k: j for j, wm in enumerate(maps) for k in wm.keys()}
    merged = merge_weight_maps(index.path, maps, index.aliases)
    return Pack(path, index, [(wm.path, wm) for wm in maps], key_shard, merged)


def read_pack_map(path: str | os.PathLike | WeightMap, *, keys: Iterable[str] | str | None = None,
                  missing_ok: bool = False) -> WeightMap:
    """The weight map a load plans with: a :class:`WeightMap` as given, else ``read_pack(path, keys=keys).weight_map``
    (a single file's own map, or the merged map of a sharded pack's needed shards)."""
    if isinstance(path, WeightMap):
        return path
    return read_pack(path, keys=keys, missing_ok=missing_ok).weight_map


def shard_maps(wm: WeightMap) -> list[tuple[WeightMap, int]]:
    """``[(shard map, virtual base), ...]`` of a merged map; ``[(wm, 0)]`` for an ordinary one."""
    if isinstance(wm, ShardedWeightMap):
        return list(zip(wm.shards, wm.bases))
    return [(wm, 0)]


__all__ = ["INDEX_FORMAT", "INDEX_SUFFIX", "INDEX_VERSION", "Pack", "ShardIndex", "ShardRecord", "ShardedWeightMap",
           "check_identity", "check_regular", "check_same_file", "open_regular", "pread_into", "decode_index", "encode_index", "file_identity", "find_pack_in_folder",
           "index_path_for", "is_index_path", "merge_weight_maps", "read_index", "read_pack", "read_pack_map",
           "read_shard", "read_weight_map", "read_weight_map_fd", "resolve_pack_path", "shard_maps", "shard_name",
           "shard_name_pattern", "shard_stem", "shards_for_keys"]
