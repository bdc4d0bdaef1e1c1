"""Lazy reads of a pack: :class:`safe_open`, a handle with the surface of ``safetensors.safe_open`` (``keys``,
``metadata``, ``get_tensor``, ``get_slice(...)[rows, cols]``), and :func:`iter_tensors`, a bounded-memory stream
of ``(name, tensor)`` in file order (the weights-iterator contract of vLLM's and SGLang's loaders).

Both read only what is asked for. A slice reads the byte range of its rows; with checksums on it reads (and
verifies) the whole checksum chunks those rows lie in, since a chunk can only be verified whole.

Reads go through the package's reader layer (:func:`flashpack.io.open_reader`, one reader per file, opened on
the first read with ``expect=`` the identity recorded with the weight map), not plain ``os.pread``: the same
reader serves a 2 KiB row and a 1 GiB slice (large ranges go out as ``extent_nbytes`` pieces in flight together,
O_DIRECT where aligned and not cached), its byte counters are what :attr:`safe_open.stats` reports, and the
file-identity check is the one every load uses. Settings are read once per handle / per iterator.

Where a pack comes from: :func:`open_sources` turns a path (or a :class:`~flashpack.format.WeightMap`) into a
:class:`Sources`: a list of ``(path, WeightMap)`` files and a key -> file map. A single file is one source; a
sharded pack will be several (one function call in :func:`open_sources`), and nothing else here changes.
"""

from __future__ import annotations

import bisect
import operator
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from .errors import UsageError, WeightMapError
from .format import Chunk, TensorInfo, WeightMap, torch_dtype, verify_chunk
from .io import Extent, Reader, open_reader, read_all
from .io.sync import DeferredInterrupts
from .loading.common import LoadStats, parse_device
from .loading.memory import aligned_empty
from .settings import MiB, Settings, settings
from .source import ShardedWeightMap, check_same_file, read_pack

#: Default bytes of read buffers :func:`iter_tensors` keeps in flight, and the most bytes one batch of verified
#: chunks read by :class:`safe_open` holds (at least one chunk).
WINDOW_NBYTES = 64 * MiB
#: A strided row selection reads each row on its own when the rows skipped between two are at least this many
#: bytes (a shorter gap costs less to read than one more request); otherwise it reads the covering rows.
GAP_NBYTES = 64 * 1024
#: ``framework=`` names accepted (safetensors' names for PyTorch and NumPy).
FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "numpy", "numpy": "numpy"}


# --------------------------------------------------------------------------- sources


@dataclass
class Sources:
    """The files of one pack.

    Attributes:
        path: what the caller named (file, later an index or folder).
        files: ``[(path, WeightMap), ...]``; one entry for a single file.
        key_source: every key (stored and alias) -> index into ``files`` of the file that stores its bytes.
        aliases: alias -> stored key, over all files (an alias may point into another file).
    """

    path: str
    files: list[tuple[str, WeightMap]]
    key_source: dict[str, int]
    aliases: dict[str, str]

    @classmethod
    def of(cls, path: str, files: list[tuple[str, WeightMap]], aliases: dict[str, str] | None = None) -> "Sources":
        """Build the key -> file map from the files' weight maps (plus cross-file ``aliases``).

        Raises:
            WeightMapError (a ``ValueError``): a key stored in two files, or an alias to a key no file stores.
        """
        key_source: dict[str, int] = {}
        all_aliases: dict[str, str] = {}
        for i, (_, wm) in enumerate(files):
            for k in wm.tensors:
                if k in key_source:
                    raise WeightMapError(f"{path}: key {k!r} is stored in two files ({files[key_source[k]][0]} and {wm.path})")
                key_source[k] = i
            all_aliases.update(wm.aliases)
        all_aliases.update(aliases or {})
        for a, t in all_aliases.items():
            if t not in key_source:
                raise WeightMapError(f"{path}: alias {a!r} points to {t!r}, which no file of the pack stores")
            key_source.setdefault(a, key_source[t])
        return cls(path, files, key_source, all_aliases)

    def keys(self) -> list[str]:
        """Every key in file order: each file's stored keys by byte offset (zero-byte tensors first), then the
        aliases."""
        out = []
        for _, wm in self.files:
            out += [t.key for t in sorted(wm.tensors.values(), key=lambda t: (t.nbytes > 0, t.offset))]
        return out + list(self.aliases)

    def metadata(self) -> dict[str, str]:
        """The first file's metadata (every shard of a pack carries the same)."""
        return dict(self.files[0][1].metadata) if self.files else {}

    def locate(self, key: str) -> tuple[int, TensorInfo]:
        """(file index, stored tensor) behind ``key`` (an alias resolves to its target).

        Raises:
            KeyError: no file of the pack holds ``key`` (the message names the pack).
        """
        stored = self.aliases.get(key, key)
        i = self.key_source.get(stored) if isinstance(stored, str) else None
        if i is None:
            raise KeyError(f"{self.path}: File does not contain tensor {key}")
        return i, self.files[i][1].tensors[stored]


def open_sources(path: str | os.PathLike | WeightMap) -> Sources:
    """The files of the pack at ``path`` (read and validate their weight maps, invariants I1-I14).

    A single ``.flashpack`` file (ours or fal's v3/v4) or its :class:`WeightMap` is one source; a sharded pack
    (its ``.flashpack.index.json``, or a folder holding it) is one source per shard, each shard checked against
    the index (:func:`flashpack.source.read_pack`).

    Raises:
        FormatError subclasses naming the file or shard; ShardIndexError, ShardMismatchError, ShardMissingError;
        ``OSError`` (``FileNotFoundError``, ``IsADirectoryError``).
    """
    if isinstance(path, ShardedWeightMap):
        return Sources.of(path.path, [(s.path, s) for s in path.shards], dict(path.aliases))
    if isinstance(path, WeightMap):
        return Sources.of(path.path, [(path.path, path)])
    pack = read_pack(path)
    return Sources.of(pack.path, list(pack.shards), dict(pack.index.aliases) if pack.index else None)


# --------------------------------------------------------------------------- one file's reads


class _File:
    """One file of a pack, read on demand: a descriptor kept for the identity check, a reader opened on first
    use, the chunk table, and the last batch of verified chunks (so that small tensors of one chunk read it once)."""

    def __init__(self, path: str, wm: WeightMap, cfg: Settings, backend: str | None, window_nbytes: int):
        self.path, self.wm, self.cfg, self.backend = path, wm, cfg, backend
        self.window_nbytes = max(window_nbytes, wm.chunk_nbytes)
        self.chunks: list[Chunk] = list(wm.chunks()) if wm.checksum_algorithm is not None else []
        self.chunk_ends = [c.offset + c.nbytes for c in self.chunks]
        self.reader: Reader | None = None
        self.fd = os.open(wm.path, os.O_RDONLY | os.O_CLOEXEC)
        self.cached: tuple[int, int, torch.Tensor] | None = None  # verified file bytes [lo, hi)
        self.bytes_read = self.bytes_direct = self.bytes_buffered = self.chunks_verified = 0
        try:
            check_same_file(wm, self.fd)
        except BaseException:
            self.close()
            raise

    def _reader(self) -> Reader:
        if self.reader is None:
            self.reader = open_reader(self.wm.path, self.backend, expect=self.wm.file_id, cfg=self.cfg)
        return self.reader

    def _read(self, extents: list[Extent]) -> None:
        reader = self._reader()
        before = (reader.stats.bytes_read, reader.stats.bytes_direct, reader.stats.bytes_buffered)
        try:
            with DeferredInterrupts():  # a Ctrl-C lands after the reads drained, not inside the reader's cleanup
                read_all(reader, extents)
        except BaseException:
            self.reader = None  # every read has drained; a later call opens a fresh reader
            reader.close()
            raise
        finally:
            self.bytes_read += reader.stats.bytes_read - before[0]
            self.bytes_direct += reader.stats.bytes_direct - before[1]
            self.bytes_buffered += reader.stats.bytes_buffered - before[2]

    def cut(self, file_offset: int, nbytes: int, dest: memoryview, tag: Any = None) -> list[Extent]:
        step = self.cfg.extent_nbytes
        return [Extent(file_offset + i, min(step, nbytes - i), dest[i:i + min(step, nbytes - i)], tag)
                for i in range(0, nbytes, step)]

    def read_ranges(self, ranges: list[tuple[int, int, int]], out: memoryview, verify: bool) -> None:
        """Read file ranges ``(file_offset, nbytes, out_offset)`` (sorted, disjoint) into ``out``.

        With ``verify`` and a file that has checksums, the chunks overlapping the ranges are read whole, in
        batches of at most ``window_nbytes`` into a scratch buffer, verified, and the ranges copied out; else
        exactly the ranges are read, straight into ``out``.

        Raises:
            ReadError (``ESTALE``): the file was replaced or rewritten since its weight map was read (checked
            on the descriptor held since the handle opened, before every read, cached bytes included).
            ChecksumMismatchError; ReadError.
        """
        ranges = [r for r in ranges if r[1] > 0]
        if not ranges:
            return
        check_same_file(self.wm, self.fd)  # rewritten in place since the handle was opened: ESTALE
        if not verify or not self.chunks:
            exts = [e for off, n, dst in ranges for e in self.cut(off, n, out[dst:dst + n])]
            self._read(exts)
            return
        need: list[int] = []
        for off, n, _ in ranges:
            i = bisect.bisect_right(self.chunk_ends, off)
            while i < len(self.chunks) and self.chunks[i].offset < off + n:
                if not need or need[-1] != i:
                    need.append(i)
                i += 1
        batches: list[list[int]] = []
        for i in need:
            if batches:
                last = batches[-1]
                first = self.chunks[last[0]]
                c = self.chunks[i]
                if (i == last[-1] + 1 and c.offset == self.chunk_ends[last[-1]]
                        and c.offset + c.nbytes - first.offset <= self.window_nbytes):
                    last.append(i)
                    continue
            batches.append([i])
        for batch in batches:
            lo, hi = self.chunks[batch[0]].offset, self.chunk_ends[batch[-1]]
            data = self._verified(lo, hi, batch)
            for off, n, dst in ranges:
                a, b = max(off, lo), min(off + n, hi)
                if a < b:
                    out[dst + a - off:dst + b - off] = data[a - lo:b - lo]

    def _verified(self, lo: int, hi: int, batch: list[int]) -> memoryview:
        """File bytes ``[lo, hi)`` (whole chunks ``batch``), read and verified, or from the last batch."""
        if self.cached is not None and self.cached[0] <= lo and hi <= self.cached[1]:
            base = self.cached[0]
            return memoryview(self.cached[2].numpy()).cast("B")[lo - base:hi - base]
        self.cached = None
        buf = aligned_empty(hi - lo)
        mv = memoryview(buf.numpy()).cast("B")

        exts = self.cut(lo, hi - lo, mv)
        self._read(exts)
        for i in batch:
            c = self.chunks[i]
            verify_chunk(self.wm, c, mv[c.offset - lo:c.offset - lo + c.nbytes])
            self.chunks_verified += 1
        self.cached = (lo, hi, buf)
        return mv

    def close(self) -> None:
        self.cached = None
        if self.reader is not None:
            r, self.reader = self.reader, None
            r.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


# --------------------------------------------------------------------------- slicing


def _index_error_type(item: Any) -> IndexError:
    return IndexError(f"only integers, slices (`:`), ellipsis (`...`) and None are valid indices "
                      f"(got {type(item).__name__})")


def _normalize(index: Any, shape: tuple[int, ...]) -> list[Any]:
    """``index`` as a list with exactly one int/slice per dimension (Ellipsis expanded, Nones kept), ints
    made non-negative, slice bounds made ints.

    Raises:
        IndexError: an index of another type (a float, a bool, a list), two ellipses, too many indices, an int
            out of range. TypeError: a string. ValueError: a slice step of zero or below (as safetensors:
            "step must be greater than zero").
    """
    items = list(index) if isinstance(index, tuple) else [index]
    out: list[Any] = []
    for it in items:
        if it is None or it is Ellipsis:
            out.append(it)
        elif isinstance(it, slice):
            try:
                parts = [None if v is None else operator.index(v) for v in (it.start, it.stop, it.step)]
            except TypeError:
                raise TypeError("slice indices must be integers or None or have an __index__ method") from None
            if parts[2] is not None and parts[2] == 0:
                raise ValueError("slice step cannot be zero")
            if parts[2] is not None and parts[2] < 0:
                raise ValueError("step must be greater than zero")
            out.append(slice(*parts))
        elif isinstance(it, (str, bytes)):
            raise TypeError(f"a tensor cannot be indexed by a string ({it!r})")  # safetensors: TypeError too
        elif isinstance(it, bool):
            raise _index_error_type(it)
        else:
            try:
                out.append(operator.index(it))
            except TypeError:
                raise _index_error_type(it) from None
    if sum(it is Ellipsis for it in out) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    real = sum(isinstance(it, (int, slice)) for it in out)
    if real > len(shape):
        raise IndexError(f"too many indices for tensor of dimension {len(shape)}")
    fill = [slice(None)] * (len(shape) - real)
    if Ellipsis in out:
        k = out.index(Ellipsis)
        out[k:k + 1] = fill
    else:
        out += fill
    d = 0
    for j, it in enumerate(out):
        if isinstance(it, int):
            n = shape[d]
            if not -n <= it < n:
                raise IndexError(f"index {it} is out of bounds for dimension {d} with size {n}")
            out[j] = it % n if n else it
        if it is not None:
            d += 1
    return out


class LazySlice:
    """A tensor of an open :class:`safe_open` handle, not read yet; index it to read part of it (safetensors'
    ``PySafeSlice``).

    ``s[rows, cols]``, with ints, slices (step >= 1), ``...`` and ``None`` as in torch, returns a new contiguous
    tensor on the handle's device holding just those elements. Only the selected rows (dimension 0) are read:
    a row range (step 1, or an int) is one contiguous byte range; a strided one reads each row alone when the
    rows skipped between two are at least :data:`GAP_NBYTES`, else the covering rows; a cut in a later
    dimension reads the selected rows whole and cuts them in memory. With checksums verified (the handle's
    ``verify``), the whole checksum chunks holding those bytes are read and verified first (a chunk can only
    be checked whole; ``chunk_nbytes``, 8 MiB by default); with ``verify=False`` only the rows' bytes are read.
    """

    def __init__(self, handle: "safe_open", key: str):
        self._handle = handle
        self._key = key
        self._file, self._info = handle._sources.locate(key)

    def get_shape(self) -> list[int]:
        """The tensor's shape, as a list of ints (safetensors returns a list)."""
        return list(self._info.shape)

    def get_dtype(self) -> str:
        """The file's dtype name: ``"F32"``, ``"BF16"``, ``"F8_E4M3"``, ``"BOOL"``... (safetensors' names)."""
        return self._info.dtype

    def __getitem__(self, index: Any):
        """The elements ``index`` selects, read now.

        Returns:
            A contiguous tensor (``framework="numpy"``: an array) on the handle's device with torch's indexing
            result shape.

        Raises:
            IndexError: an int out of range, too many indices, an index type other than int/slice/``...``/None.
            ValueError: a slice step of zero or below. ChecksumMismatchError, ReadError (``OSError``).
            UsageError: the handle is closed.
        """
        t = self._info
        items = _normalize(index, t.shape)
        return self._handle._cut(self._file, t, items)

    def __repr__(self) -> str:
        return f"LazySlice({self._key!r}, shape={list(self._info.shape)}, dtype={self._info.dtype})"


def _row_major(t: torch.Tensor) -> bool:
    """Whether ``t`` has the strides of a fresh contiguous tensor of its shape (``is_contiguous`` ignores
    the stride of a size-1 dimension; ``view(torch.uint8)`` does not)."""
    expect, acc = [], 1
    for n in reversed(t.shape):
        expect.append(acc)
        acc *= n
    return t.stride() == tuple(reversed(expect))


def _row_plan(t: TensorInfo, item0: Any) -> tuple[list[int], Any]:
    """(rows to read, in order, as a list of row numbers or a range; index to apply to them on dimension 0)."""
    n = t.shape[0]
    if isinstance(item0, int):
        return range(item0, item0 + 1), 0
    start, stop, step = item0.indices(n)
    rows = range(start, stop, step)
    if step == 1 or len(rows) <= 1:
        return rows, slice(None)
    row_nbytes = t.nbytes // n if n else 0
    if row_nbytes * (step - 1) >= GAP_NBYTES:
        return rows, slice(None)
    return range(rows[0], rows[-1] + 1), slice(None, None, step)


# --------------------------------------------------------------------------- the handle


class safe_open:  # noqa: N801 - safetensors' name, so that code written for it works with a flashpack import
    """Open a flashpack file lazily: read tensors, or parts of them, as they are asked for.

    The surface of ``safetensors.safe_open``::

        with flashpack.safe_open("model.flashpack", framework="pt", device="cpu") as f:
            for k in f.keys():
                w = f.get_tensor(k)
            rows = f.get_slice("embed.weight")[0:1024]      # reads only those rows
            cols = f.get_slice("lm_head.weight")[:, 128:256]  # reads every row, keeps 128 columns

    Args:
        filename: a ``.flashpack`` file (this library's, or fal's flashpack v3/v4), or its
            :class:`~flashpack.format.WeightMap`.
        framework: ``"pt"`` (also ``"torch"``, ``"pytorch"``): torch tensors; ``"numpy"``/``"np"``: NumPy
            arrays (CPU only; dtypes NumPy lacks, bf16 and float8, raise ``TypeError``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, an int ``N`` (``cuda:N``, as safetensors) or a
            ``torch.device``. CUDA tensors are read into host memory, then copied to the device.
        backend: the reader backend (``"auto"``, ``"uring"``, ``"threads"``; ``None``: ``FLASHPACK_BACKEND``).
            safetensors' own values ``"mmap"`` and ``"pread"`` mean ``"auto"`` (a flashpack file is never
            mapped here; reads are always copies).
        verify: verify checksum chunks (default ``FLASHPACK_VERIFY``, on). Reads then cover whole chunks.

    Behaviour:
        ``keys()`` is sorted, like safetensors (``offset_keys()`` gives file order); aliases (tied weights) are
        keys too. ``metadata()`` is the ``str -> str`` metadata, or ``None`` when there is none (as
        safetensors). Each ``get_tensor`` call returns a new tensor that owns its memory (tied keys give two
        tensors, equal). The handle holds two descriptors per file, a reader opened on the first read, and
        between calls at most one batch of verified chunks (``WINDOW_NBYTES``, 64 MiB, at least one chunk) so
        that many small tensors in one chunk read it once; ``close()`` (or leaving the ``with``) frees them.
        Thread-safe: one lock per handle serialises its reads.

    Attributes:
        stats: a :class:`~flashpack.LoadStats` of everything read through this handle so far (``bytes_read``
            counts bytes requested from the file, ``chunks_verified`` checksum chunks).

    Raises:
        FormatError subclasses (``ValueError``) naming the file; ``FileNotFoundError``; ``UsageError`` (a
        ``ValueError``): an unknown ``framework`` or a NumPy framework with a non-CPU device;
        ``FlashPackError``: a device type other than cpu/cuda, or CUDA asked for where torch has none.
    """

    def __init__(self, filename: str | os.PathLike | WeightMap, framework: str = "pt",
                 device: str | int | torch.device = "cpu", *, backend: str | None = None, verify: bool | None = None):
        fw = FRAMEWORKS.get(framework) if isinstance(framework, str) else None
        if fw is None:
            raise UsageError(f"framework {framework!r} is not supported by flashpack.safe_open; use "
                             f"{', '.join(repr(k) for k in FRAMEWORKS)}")
        if isinstance(device, int) and not isinstance(device, bool):
            device = f"cuda:{device}"
        self._device = parse_device(device)
        if fw == "numpy" and self._device.type != "cpu":
            raise UsageError(f"framework {framework!r} returns NumPy arrays, which live on the CPU; got device {device!r}")
        self._framework = fw
        self._cfg = settings()
        self._verify = self._cfg.verify if verify is None else bool(verify)
        self._backend = None if backend in ("mmap", "pread") else backend
        self._lock = threading.RLock()
        self._files: list[_File] = []
        self._closed = False
        self._sources = open_sources(filename)
        try:
            self._files = [_File(p, wm, self._cfg, self._backend, WINDOW_NBYTES) for p, wm in self._sources.files]
        except BaseException:
            self.close()
            raise

    # ---- context manager and lifetime

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release descriptors, readers and buffers; safe to call twice. Later reads raise ``UsageError``."""
        with self._lock:
            self._closed = True
            for f in self._files:
                f.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"{self._sources.path}: the flashpack.safe_open handle is closed")

    # ---- what is in the file

    def keys(self) -> list[str]:
        """Every key (aliases included), sorted by name (safetensors' order)."""
        self._check_open()
        return sorted(self._sources.keys())

    def offset_keys(self) -> list[str]:
        """Every key in file order: stored tensors by byte offset (file by file), then aliases."""
        self._check_open()
        return self._sources.keys()

    def metadata(self) -> dict[str, str] | None:
        """The file's ``str -> str`` metadata, or ``None`` when it has none (as safetensors)."""
        self._check_open()
        return self._sources.metadata() or None

    @property
    def stats(self) -> LoadStats:
        s = LoadStats(backend=next((f.reader.name for f in self._files if f.reader is not None), ""))
        for f in self._files:
            s.bytes_read += f.bytes_read
            s.bytes_direct += f.bytes_direct
            s.bytes_buffered += f.bytes_buffered
            s.chunks_verified += f.chunks_verified
        return s

    # ---- reads

    def get_tensor(self, name: str):
        """The whole tensor ``name``, read now.

        Returns:
            A new contiguous tensor (``framework="numpy"``: an array) of the stored shape and dtype on the
            handle's device, owning its memory.

        Raises:
            KeyError: no such key (message ``"<file>: File does not contain tensor <name>"``).
            TypeError: ``name`` is not a string. ChecksumMismatchError; ReadError (``OSError``); DtypeError
            (the dtype is missing from this torch); UsageError: the handle is closed.
        """
        if not isinstance(name, str):
            raise TypeError(f"argument 'name': {type(name).__name__!r} object is not an instance of 'str'")
        self._check_open()
        i, t = self._sources.locate(name)
        return self._cut(i, t, [slice(None)] * len(t.shape) if t.shape else [])

    def get_slice(self, name: str) -> LazySlice:
        """A :class:`LazySlice` of ``name``: nothing is read until it is indexed.

        Raises:
            KeyError: no such key. TypeError: ``name`` is not a string. UsageError: the handle is closed.
        """
        if not isinstance(name, str):
            raise TypeError(f"argument 'name': {type(name).__name__!r} object is not an instance of 'str'")
        self._check_open()
        return LazySlice(self, name)

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, in file order (aliases last, each the same object as its target), read in one pass
        with bounded buffers (as :func:`iter_tensors`)."""
        self._check_open()
        with self._lock:
            out = dict(_stream(self._sources, _plan_stream(self._sources, None), self._device, self._verify,
                               self._cfg, self._backend, WINDOW_NBYTES, None))
        return {k: self._convert(v) for k, v in out.items()} if self._framework == "numpy" else out

    def _convert(self, t: torch.Tensor):
        return t.numpy() if self._framework == "numpy" else t

    def _cut(self, file: int, t: TensorInfo, items: list[Any]):
        """Read the rows ``items`` selects on dimension 0, apply ``items`` to them, move to the device."""
        dt = torch_dtype(t.dtype, key=t.key, path=self._sources.files[file][1].path)
        with self._lock:
            self._check_open()
            f = self._files[file]
            if not t.shape:  # 0-dim: only None and ... index it
                result = self._read_rows(f, t, dt, None)[tuple(items)]
            else:
                k0 = next(j for j, it in enumerate(items) if it is not None)
                rows, new0 = _row_plan(t, items[k0])
                part = self._read_rows(f, t, dt, rows)
                result = part[tuple(items[:k0] + [new0] + items[k0 + 1:])]
        if not _row_major(result):  # a cut, or a size-1 dimension with a stride left over from the cut
            result = result.clone(memory_format=torch.contiguous_format)
        if self._device.type != "cpu":
            result = result.to(self._device)
        return self._convert(result)

    def _read_rows(self, f: _File, t: TensorInfo, dt: torch.dtype, rows) -> torch.Tensor:
        """The rows ``rows`` (a range, ascending) of ``t`` as a CPU tensor of shape ``(len(rows), *shape[1:])``,
        or the whole 0-dim tensor for ``rows=None``."""
        if rows is None:
            shape, ranges, nbytes = t.shape, [(t.offset, t.nbytes, 0)], t.nbytes
        else:
            row = t.nbytes // t.shape[0] if t.shape[0] else 0
            shape = (len(rows), *t.shape[1:])
            nbytes = len(rows) * row
            if not row or not len(rows):
                ranges = []
            elif rows.step == 1:
                ranges = [(t.offset + rows.start * row, nbytes, 0)]
            else:
                ranges = [(t.offset + r * row, row, j * row) for j, r in enumerate(rows)]
        if not nbytes:
            return torch.empty(shape, dtype=dt)
        out = torch.empty(nbytes, dtype=torch.uint8)
        f.read_ranges(ranges, memoryview(out.numpy()).cast("B"), self._verify)
        return out.view(dt).reshape(shape)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<flashpack.safe_open {self._sources.path!r} device={self._device} ({state})>"


# --------------------------------------------------------------------------- streaming


@dataclass
class _Unit:
    """One read of the stream: ``nbytes`` at ``offset`` (a whole checksum chunk, or a piece of wanted bytes)."""

    offset: int
    nbytes: int
    chunk: Chunk | None


@dataclass
class _Pending:
    """A wanted stored tensor under assembly."""

    info: TensorInfo
    dtype: torch.dtype
    names: list[str]
    buf: torch.Tensor | None = None
    filled: int = 0


def _units(f: WeightMap, wanted: list[TensorInfo], verify: bool, slot_nbytes: int) -> list[_Unit]:
    """The reads that cover ``wanted`` (sorted by offset, non-empty): the checksum chunks overlapping them when
    verifying, else their byte ranges (merged across gaps under :data:`GAP_NBYTES`) cut to ``slot_nbytes``."""
    if verify and f.checksum_algorithm is not None:
        chunks = list(f.chunks())
        ends = [c.offset + c.nbytes for c in chunks]
        out: list[_Unit] = []
        seen = -1
        for t in wanted:
            i = max(bisect.bisect_right(ends, t.offset), seen + 1)
            while i < len(chunks) and chunks[i].offset < t.offset + t.nbytes:
                out.append(_Unit(chunks[i].offset, chunks[i].nbytes, chunks[i]))
                seen = i
                i += 1
        return out
    spans: list[list[int]] = []
    for t in wanted:
        if spans and t.offset - spans[-1][1] < GAP_NBYTES:
            spans[-1][1] = max(spans[-1][1], t.offset + t.nbytes)
        else:
            spans.append([t.offset, t.offset + t.nbytes])
    return [_Unit(lo + i, min(slot_nbytes, hi - lo - i), None) for lo, hi in spans for i in range(0, hi - lo, slot_nbytes)]


def _finish(p: _Pending, device: torch.device) -> torch.Tensor:
    t = p.info
    if t.nbytes == 0:
        out = torch.empty(t.shape, dtype=p.dtype)
    else:
        out = p.buf.view(p.dtype).reshape(t.shape)
    p.buf = None
    return out if device.type == "cpu" else out.to(device)


def _plan_stream(sources: Sources, keys: Iterable[str] | str | None) -> list[tuple[int, list[_Pending]]]:
    """Per file (index into ``sources.files``), the wanted stored tensors by offset with the names to yield
    for each (itself if wanted, then its wanted aliases, wherever they are stored).

    Raises:
        KeyError: a key not in the pack. DtypeError: a wanted dtype missing from this torch.
    """
    want = None
    if keys is not None:
        want = set(dict.fromkeys([keys] if isinstance(keys, str) else keys))
        for k in want:
            sources.locate(k)
    names: dict[str, list[str]] = {}
    for _, wm in sources.files:
        for k in wm.tensors:
            if want is None or k in want:
                names.setdefault(k, []).append(k)
    for a, tgt in sources.aliases.items():
        if want is None or a in want:
            names.setdefault(tgt, []).append(a)
    out = []
    for fi, (_, wm) in enumerate(sources.files):
        infos = sorted((wm.tensors[k] for k in names if k in wm.tensors and sources.key_source.get(k) == fi),
                       key=lambda t: (t.nbytes > 0, t.offset))
        if infos:
            out.append((fi, [_Pending(t, torch_dtype(t.dtype, key=t.key, path=wm.path), names[t.key]) for t in infos]))
    return out


def _stream(sources: Sources, plan: list[tuple[int, list[_Pending]]], device: torch.device, verify: bool,
            cfg: Settings, backend: str | None, window_nbytes: int,
            stats: LoadStats | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The generator behind :func:`iter_tensors` (see there), over a :func:`_plan_stream` plan."""
    for fi, pend in plan:
        wm = sources.files[fi][1]
        for p in pend:  # zero-byte tensors need no read: first
            if p.info.nbytes == 0:
                out = _finish(p, device)
                for n in p.names:
                    yield n, out
                del out
        pend = [p for p in pend if p.info.nbytes]
        if pend:
            yield from _stream_file(wm, pend, device, verify, cfg, backend, window_nbytes, stats)


def _stream_file(wm: WeightMap, pend: list[_Pending], device: torch.device, verify: bool, cfg: Settings,
                 backend: str | None, window_nbytes: int, stats: LoadStats | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream one file's wanted tensors (``pend``, by offset, non-empty) through a ring of read slots: reads
    complete in any order, units are verified and copied out in file order, each tensor is yielded as soon as
    its last byte is copied (the slots keep reading meanwhile)."""
    verify = verify and wm.checksum_algorithm is not None
    slot = max(cfg.extent_nbytes, wm.chunk_nbytes if verify else 0)
    slot += (-slot) % 4096
    units = _units(wm, [p.info for p in pend], verify, slot)
    nslots = min(max(2, window_nbytes // slot), len(units))
    scratch = aligned_empty(nslots * slot)
    mv = memoryview(scratch.numpy()).cast("B")
    free = list(range(nslots))
    slot_of: dict[int, int] = {}
    done: set[int] = set()
    submitted = 0
    ti = 0
    reader = open_reader(wm.path, backend, expect=wm.file_id, cfg=cfg)
    base = LoadStats() if stats is None else LoadStats(stats.backend, stats.bytes_read, stats.bytes_direct,
                                                       stats.bytes_buffered)

    def account() -> None:
        if stats is not None:
            stats.backend = reader.name
            stats.bytes_read = base.bytes_read + reader.stats.bytes_read
            stats.bytes_direct = base.bytes_direct + reader.stats.bytes_direct
            stats.bytes_buffered = base.bytes_buffered + reader.stats.bytes_buffered

    try:
        for k, u in enumerate(units):
            batch = []
            while free and submitted < len(units):
                s = free.pop()
                slot_of[submitted] = s
                v = units[submitted]
                batch.append(Extent(v.offset, v.nbytes, mv[s * slot:s * slot + v.nbytes], submitted))
                submitted += 1
            if batch:
                reader.submit(batch)
            while k not in done:
                if not reader.in_flight:  # pragma: no cover - a bug, not a file problem
                    raise RuntimeError(f"{wm.path}: read {k} was never submitted")
                for c in reader.wait():
                    if c.error is not None:
                        raise c.error
                    done.add(c.extent.tag)
            account()
            done.discard(k)
            s = slot_of.pop(k)
            if u.chunk is not None:
                verify_chunk(wm, u.chunk, mv[s * slot:s * slot + u.nbytes])
                if stats is not None:
                    stats.chunks_verified += 1
            lo, hi = u.offset, u.offset + u.nbytes
            while ti < len(pend) and pend[ti].info.offset < hi:
                p = pend[ti]
                t = p.info
                a, b = max(lo, t.offset), min(hi, t.offset + t.nbytes)
                if a < b:
                    if p.buf is None:
                        p.buf = torch.empty(t.nbytes, dtype=torch.uint8)
                    p.buf[a - t.offset:b - t.offset].copy_(scratch[s * slot + a - lo:s * slot + b - lo])
                    p.filled += b - a
                if t.offset + t.nbytes > hi:
                    break
                if p.filled != t.nbytes:  # pragma: no cover - a bug in _units
                    raise RuntimeError(f"{wm.path}: {t.key!r} assembled {p.filled} of {t.nbytes} bytes")
                ti += 1
                out = _finish(p, device)
                for n in p.names:
                    yield n, out
                del out
            free.append(s)
    finally:
        try:
            reader.cancel_pending()
        finally:
            reader.close()  # drains every read still in flight before the buffers can go
            account()


def iter_tensors(path: str | os.PathLike | WeightMap, device: str | torch.device = "cpu", keys: Iterable[str] | None = None,
                 verify: bool | None = None, *, backend: str | None = None, window_nbytes: int = WINDOW_NBYTES,
                 stats: LoadStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a pack, in file order, each as soon as its bytes are read
    and verified: the weights iterator of vLLM's and SGLang's loaders.

    Order: file by file; in a file, zero-element tensors first (they need no bytes), then stored tensors by
    byte offset; each alias (tied weight) right after its target, as the same tensor object.

    Memory bound: beyond the tensors already yielded that the caller still holds, the iterator holds at most
    ``max(window_nbytes, 2 * unit)`` bytes of read buffers (``unit``: ``max(FLASHPACK_EXTENT_NBYTES, chunk_nbytes)``,
    8 MiB by default, so 64 MiB by default) plus the one tensor it is assembling (at most the largest wanted
    tensor, which it then yields). A caller that drops each tensor after use stays within that.

    Args:
        path: a ``.flashpack`` file (this library's or fal's flashpack v3/v4) or its ``WeightMap``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``; CUDA tensors are assembled in host
            memory, then copied to the device one at a time.
        keys: yield only these keys (aliases included), still in file order; only their bytes (whole chunks
            when verifying) are read. ``None``: all.
        verify: verify checksum chunks (default ``FLASHPACK_VERIFY``, on); every chunk holding wanted bytes is
            read whole and verified before any tensor in it is yielded.
        backend: reader backend (``"auto"``, ``"uring"``, ``"threads"``). window_nbytes: read buffers, bytes.
        stats: a :class:`~flashpack.LoadStats` to fill in as the stream runs.

    Yields:
        ``(name, tensor)``: contiguous tensors of the stored dtype and shape on ``device``, each owning its
        memory (one allocation per stored tensor).

    Raises:
        KeyError: a name in ``keys`` is not in the pack (before anything is read). FormatError subclasses
        (``ValueError``), ChecksumMismatchError (after the tensors before the damaged chunk were yielded),
        ReadError (``OSError``; ``ESTALE`` when the file changed since its weight map was read), DtypeError,
        FlashPackError (a device that cannot be used), BackendUnavailableError.
    """
    dev = parse_device(device)
    cfg = settings()
    verify = cfg.verify if verify is None else bool(verify)
    if window_nbytes <= 0:
        raise ValueError(f"window_nbytes={window_nbytes}: must be positive")
    sources = open_sources(path)
    plan = _plan_stream(sources, keys)
    return _stream(sources, plan, dev, verify, cfg, backend, window_nbytes, stats)


__all__ = ["FRAMEWORKS", "GAP_NBYTES", "LazySlice", "Sources", "WINDOW_NBYTES", "iter_tensors", "open_sources",
           "safe_open"]
