"""``flashpack revert``: a ``.flashpack`` file back to ``.safetensors`` (with the safetensors library) or ``.pt``.

An exact round trip: every dtype safetensors knows (``F8_E4M3``, ``F8_E5M2`` included), 0-dim and empty
shapes, user metadata (as safetensors metadata). safetensors refuses tensors that share memory, so each
alias is written as its own copy *and* recorded in the metadata the way ``safetensors.torch.save_model``
records removed duplicates (``metadata[alias] = target``): ``safetensors.torch.load_file`` returns every
key, and ``flashpack convert`` turns the record back into an alias. A ``.pt`` destination keeps aliases
as shared tensors (``torch.save``) but has no place for metadata.

``format="fal"`` (``flashpack revert --format fal``) writes fal's flashpack 0.4 single-file layout instead
(:func:`write_fal`), so a team can roll back to fal's flashpack or run a mixed fleet over one cache.

The destination is written atomically (a temporary file in its folder, fsync, ``os.replace``) and is
never the source (case C32).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from ..atomic import atomic_path
from .convert import TORCH_SUFFIXES, UsageError, check_destination


@dataclass
class RevertResult:
    dst: str
    format: str  # "safetensors", "torch" or "fal"
    tensors: int
    aliases: int
    file_nbytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


#: Sub-byte integer dtypes: torch.save refuses them ("dtype torch.uint4 is not recognized") and
#: safetensors has no name for them, so revert refuses them up front for either destination.
SUB_BYTE_INTS = frozenset({*(f"U{n}" for n in range(1, 8)), *(f"I{n}" for n in range(1, 8))})


def default_destination(path: str) -> str:
    """``model.flashpack`` -> ``model.safetensors``; ``model.pack`` -> ``model.safetensors``; a source
    already named ``*.safetensors`` -> ``*.safetensors.safetensors`` (never the source itself)."""
    root, ext = os.path.splitext(path)
    out = (root if ext else path) + ".safetensors"
    return out if os.path.abspath(out) != os.path.abspath(path) else path + ".safetensors"


def _atomic_write(dst: str, write) -> int:
    """Call ``write(tmp_path)`` on a temporary file next to ``dst``, then atomically replace ``dst``. The file's
    mode follows the umask (0644 under umask 022), like a pack's: writers such as ``safetensors.save_file`` replace
    the temporary file with a 0600 one, so the mode is set again after ``write``."""
    with atomic_path(dst) as tmp:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
    return os.path.getsize(dst)


def revert(path: str, dst: str | None = None, *, force: bool = False, progress: bool = False,
           format: str | None = None, one_file: bool = False) -> RevertResult:
    """Write the tensors of a flashpack file (or a fal flashpack file) as safetensors or ``.pt``.

    Args:
        path: the flashpack file.
        dst: the destination; ``.pt``/``.pth``/``.bin`` writes ``torch.save``, anything else safetensors.
            Default: :func:`default_destination`.
        force: replace an existing ``dst``.
        progress: a tqdm bar on stderr.
        format: ``"safetensors"``, ``"torch"`` or ``"fal"`` (fal's flashpack 0.4 layout, :func:`write_fal`);
            default: from ``dst``'s suffix (``.pt``/``.pth``/``.bin`` -> torch, else safetensors). With
            ``"fal"`` the default ``dst`` is ``<name>.fal.flashpack``.
        one_file: a sharded pack (``path`` its index, or a folder holding it) as one destination file; without
            it a sharded pack becomes sharded safetensors, one per shard, read and written one shard at a time:
            ``NAME-00001-of-0000N.safetensors`` + the standard ``NAME.safetensors.index.json``
            (``{"metadata": {"total_size": N}, "weight_map": {key: file}}``) next to ``dst``.

    Raises:
        NotAFlashPackError: ``path`` is not a flashpack file. FormatError: it is damaged (checksums are
        verified while reading). NotARegularFileError: ``path`` is a FIFO, socket or device. UsageError:
        bad destination, a dtype safetensors cannot hold (safetensors destination), or a sub-byte integer
        dtype (``U1``-``U7``, ``I1``-``I7``), which neither safetensors nor ``torch.save`` can store.
        WriteError: the destination could not be written (``ENOSPC``...), naming it.
    """
    from ..deserialization import load
    from ..source import is_index_path, read_pack_map, resolve_pack_path

    path = os.path.abspath(resolve_pack_path(os.path.expanduser(path)))
    if format not in (None, "safetensors", "torch", "fal"):
        raise UsageError(f"{path}: unknown revert format {format!r}; use safetensors, torch or fal")
    if is_index_path(path) and not one_file and format in (None, "safetensors"):
        return _revert_sharded(path, dst, force=force, progress=progress)
    wm = read_pack_map(path)
    base = path.removesuffix(".index.json") if is_index_path(path) else path
    if dst:
        dst = os.path.abspath(os.path.expanduser(dst))
    else:
        dst = fal_destination(base) if format == "fal" else default_destination(base)
    check_destination(dst, [path], force)
    fmt = format or ("torch" if dst.lower().endswith(TORCH_SUFFIXES) else "safetensors")
    sub_byte = sorted({t.dtype for t in wm.tensors.values()} & SUB_BYTE_INTS)
    if sub_byte:
        key = next(k for k, t in wm.tensors.items() if t.dtype in SUB_BYTE_INTS)
        raise UsageError(f"{path}: dtype(s) {sub_byte} (e.g. key {key!r}) cannot be reverted: neither safetensors "
                         f"nor torch.save (.pt) can store sub-byte integer dtypes; load the file with "
                         f"flashpack.load instead")

    from tqdm import tqdm

    t0 = time.perf_counter()
    notes: list[str] = []
    with tqdm(total=2 * wm.payload_nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc="revert",
              file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        sd = load(wm, verify=True)
        bar.update(wm.payload_nbytes)
        if fmt == "torch":
            import torch

            if wm.metadata:
                notes.append(f"{dst}: a .pt file has no place for metadata; {len(wm.metadata)} entries not kept "
                             f"(revert to .safetensors to keep them)")
            # torch.save refuses views of one buffer under different dtypes: one copy per stored
            # tensor, aliases bound to their target's copy (torch.save keeps that sharing).
            own = {k: _own_copy(sd[k]) for k in wm.tensors}
            out = {k: own[wm.aliases.get(k, k)] for k in sd}
            del sd
            nbytes = _atomic_write(dst, lambda tmp: torch.save(out, tmp))
        elif fmt == "fal":
            nbytes, fal_notes = write_fal(wm, sd, dst)
            notes += fal_notes
        else:
            nbytes = _write_safetensors(wm, sd, dst, path)
        bar.update(wm.payload_nbytes)
    return RevertResult(dst, fmt, len(wm.tensors), len(wm.aliases), nbytes, time.perf_counter() - t0, notes)


def _own_copy(t):
    """A copy of a loaded (contiguous) tensor in its own memory, copied as bytes: ``clone()`` has no kernel
    for sub-byte dtypes (uint1-7, int1-7)."""
    import torch

    out = torch.empty(t.shape, dtype=t.dtype)
    if t.numel():
        out.reshape(-1).view(torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
    return out


def _write_safetensors(wm, sd: dict, dst: str, path: str) -> int:
    from safetensors.torch import save_file

    supported = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64",
                 "C64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
    bad = {t.dtype for t in wm.tensors.values()} - supported
    if bad:
        keys = [k for k, t in wm.tensors.items() if t.dtype in bad][:3]
        raise UsageError(f"{path}: dtype(s) {sorted(bad)} (e.g. key {keys[0]!r}) cannot be stored in safetensors; "
                         f"revert to a .pt file instead (flashpack revert {path} out.pt)")
    tensors = {}
    for k, t in sd.items():
        target = wm.aliases.get(k)
        tensors[k] = t.clone() if target is not None else t
    metadata = dict(wm.metadata)
    for alias, target in wm.aliases.items():
        metadata.setdefault(alias, target)
    if wm.aliases and "format" not in metadata:
        metadata["format"] = "pt"  # transformers refuses safetensors metadata without a format
    return _atomic_write(dst, lambda tmp: save_file(tensors, tmp, metadata=metadata or None))


# --------------------------------------------------------------------------- fal's format (a way back)

#: fal's default alignment (bytes) for blocks and for tensors inside a block.
FAL_ALIGN_BYTES = 128
#: The dtypes fal's flashpack 0.4 can read (torch names); others (sub-byte, float4, bits*) have no place there.
FAL_DTYPES = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16",
                        "bfloat16", "float32", "float64", "complex32", "complex64", "complex128", "float8_e4m3fn",
                        "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"})


def fal_destination(path: str) -> str:
    """``model.flashpack`` -> ``model.fal.flashpack`` (never the source)."""
    root, ext = os.path.splitext(path)
    return (root if ext else path) + ".fal.flashpack"


def write_fal(wm, sd: dict, dst: str) -> tuple[int, list[str]]:
    """Write ``sd`` (loaded from ``wm``) to ``dst`` in fal's flashpack v4 layout, atomically.

    Layout (what fal 0.4.5 reads): the payload from byte 0, one block ("macroblock") per dtype in order of the
    dtype's first key, each block and each tensor inside it starting on a 128-byte boundary (zero padding);
    then the UTF-8 JSON footer ``{"format": "flashpack_v4", "align_bytes": 128, "total_payload_bytes",
    "total_elems", "macroblocks": [{dtype, offset_bytes, length_bytes, length_elems}], "index": [{name, shape,
    offset, length, macroblock}]}`` (offsets and lengths of the index in elements inside the block), the
    footer's length as a little-endian u64, and ``FLASHPK\0``. User metadata goes under ``"metadata"`` (fal
    ignores it; this library reads it back). Bytes are copied as they are: the round trip is bit-exact.

    Returns:
        ``(file size in bytes, notes)``: notes say what fal's layout cannot keep (aliases become copies;
        0-dim tensors come back from fal's reader with shape ``[1]``).

    Raises:
        UsageError: a dtype fal cannot hold (names the key and the dtype).
    """
    import json
    import math

    import torch

    from ..format import DTYPE_ITEMSIZE, DTYPE_NAMES

    bad = [(k, t.dtype) for k, t in wm.tensors.items() if DTYPE_NAMES[t.dtype] not in FAL_DTYPES]
    if bad:
        raise UsageError(f"{wm.path}: key {bad[0][0]!r} has dtype {DTYPE_NAMES[bad[0][1]]}, which fal's flashpack "
                         f"cannot hold ({len(bad)} such key(s)); revert to .pt instead")
    keys = list(sd)
    order: dict[str, list[str]] = {}
    for k in keys:
        order.setdefault(wm.tensors[wm.aliases.get(k, k)].dtype, []).append(k)
    macroblocks, index, cursor = [], [], 0
    placed: list[tuple[int, object]] = []  # (absolute offset, tensor)
    for mb, (dt, names) in enumerate(order.items()):
        item = DTYPE_ITEMSIZE[dt]
        cursor += -cursor % math.lcm(FAL_ALIGN_BYTES, item)
        start, elems = cursor, 0
        align_elems = FAL_ALIGN_BYTES // math.gcd(FAL_ALIGN_BYTES, item)
        for k in names:
            t = sd[k]
            elems += -elems % align_elems
            index.append({"name": k, "shape": list(t.shape), "offset": elems, "length": t.numel(), "macroblock": mb})
            placed.append((start + elems * item, t))
            elems += t.numel()
        macroblocks.append({"dtype": DTYPE_NAMES[dt], "offset_bytes": start, "length_bytes": elems * item,
                            "length_elems": elems})
        cursor = start + elems * item
    footer = {"format": "flashpack_v4", "align_bytes": FAL_ALIGN_BYTES, "total_payload_bytes": cursor,
              "total_elems": sum(m["length_elems"] for m in macroblocks), "macroblocks": macroblocks, "index": index}
    if wm.metadata:
        footer["metadata"] = dict(wm.metadata)
    blob = json.dumps(footer, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.truncate(cursor)
            for off, t in placed:
                if t.numel():
                    f.seek(off)
                    f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            f.seek(cursor)
            f.write(blob)
            f.write(len(blob).to_bytes(8, "little"))
            f.write(b"FLASHPK\0")

    nbytes = _atomic_write(dst, write)
    notes = []
    if wm.aliases:
        notes.append(f"{dst}: fal's format has no aliases: {len(wm.aliases)} alias(es) written as copies "
                     f"(e.g. {next(iter(wm.aliases))!r})")
    scalars = [k for k in keys if sd[k].dim() == 0]
    if scalars:
        notes.append(f"{dst}: {len(scalars)} 0-dim tensor(s) (e.g. {scalars[0]!r}) come back with shape [1] from "
                     f"fal's reader (this library reads them back as 0-dim)")
    return nbytes, notes


def _revert_sharded(path: str, dst: str | None, *, force: bool, progress: bool) -> RevertResult:
    """A sharded pack -> sharded safetensors with the standard index, one shard in memory at a time."""
    import json

    from ..deserialization import load
    from ..source import read_index, read_shard

    index = read_index(path)
    base = path.removesuffix(".index.json")
    dst = os.path.abspath(os.path.expanduser(dst)) if dst else default_destination(base)
    if dst.lower().endswith(TORCH_SUFFIXES):
        raise UsageError(f"{dst}: a sharded pack reverts to sharded safetensors; give a .safetensors name, or pass "
                         f"--one-file for one .pt file")
    stem = os.path.basename(dst).removesuffix(".safetensors")
    folder = os.path.dirname(dst)
    n = len(index.shards)
    names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    idx_dst = os.path.join(folder, stem + ".safetensors.index.json")
    for out in [idx_dst] + [os.path.join(folder, x) for x in names]:
        check_destination(out, [path] + [index.shard_path(i) for i in range(n)], force)

    from tqdm import tqdm

    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    total = nbytes = tensors = aliases = 0
    with tqdm(total=index.total_size, unit="B", unit_scale=True, unit_divisor=1024, desc="revert",
              file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for i in range(n):
            wm = read_shard(index, i)  # checks the shard is the one the index lists
            sd = load(wm, verify=True)
            nbytes += _write_safetensors(wm, sd, os.path.join(folder, names[i]), wm.path)
            del sd
            for k in wm.keys():
                weight_map[k] = names[i]
            total += wm.payload_nbytes + sum(wm.tensors[t].nbytes for t in wm.aliases.values())
            tensors += len(wm.tensors)
            aliases += len(wm.aliases)
            bar.update(wm.payload_nbytes)
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    data = (json.dumps(doc, indent=2) + "\n").encode()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    nbytes += _atomic_write(idx_dst, write)  # the index last: it names only shards already in place
    return RevertResult(idx_dst, "safetensors", tensors, aliases, nbytes, time.perf_counter() - t0)
