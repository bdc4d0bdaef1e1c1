"""``flashpack revert``: a ``.flashpack`` file back to ``.safetensors`` (with the safetensors library) or ``.pt``.

An exact round trip: every dtype safetensors knows (``F8_E4M3``, ``F8_E5M2`` included), 0-dim and empty
shapes, user metadata (as safetensors metadata). safetensors refuses tensors that share memory, so each
alias is written as its own copy *and* recorded in the metadata the way ``safetensors.torch.save_model``
records removed duplicates (``metadata[alias] = target``): ``safetensors.torch.load_file`` returns every
key, and ``flashpack convert`` turns the record back into an alias. A ``.pt`` destination keeps aliases
as shared tensors (``torch.save``) but has no place for metadata.

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
    format: str  # "safetensors" or "torch"
    tensors: int
    aliases: int
    file_nbytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def default_destination(path: str) -> str:
    """``model.flashpack`` -> ``model.safetensors``; ``model.pack`` -> ``model.safetensors``; a source
    already named ``*.safetensors`` -> ``*.safetensors.safetensors`` (never the source itself)."""
    root, ext = os.path.splitext(path)
    out = (root if ext else path) + ".safetensors"
    return out if os.path.abspath(out) != os.path.abspath(path) else path + ".safetensors"


def _atomic_write(dst: str, write) -> int:
    """Call ``write(tmp_path)`` on a temporary file next to ``dst``, then atomically replace ``dst``."""
    with atomic_path(dst) as tmp:
        write(tmp)
    return os.path.getsize(dst)


def revert(path: str, dst: str | None = None, *, force: bool = False, progress: bool = False,
           one_file: bool = False) -> RevertResult:
    """Write the tensors of a flashpack file (or a fal flashpack file) as safetensors or ``.pt``.

    Args:
        path: the flashpack file.
        dst: the destination; ``.pt``/``.pth``/``.bin`` writes ``torch.save``, anything else safetensors.
            Default: :func:`default_destination`.
        force: replace an existing ``dst``.
        progress: a tqdm bar on stderr.
        one_file: a sharded pack (``path`` its index, or a folder holding it) as one destination file; without
            it a sharded pack becomes sharded safetensors, one per shard, read and written one shard at a time:
            ``NAME-00001-of-0000N.safetensors`` + the standard ``NAME.safetensors.index.json``
            (``{"metadata": {"total_size": N}, "weight_map": {key: file}}``) next to ``dst``.

    Raises:
        NotAFlashPackError: ``path`` is not a flashpack file. FormatError: it is damaged (checksums are
        verified while reading). UsageError: bad destination, or a dtype safetensors cannot hold.
    """
    from ..deserialization import load
    from ..source import is_index_path, read_pack_map, resolve_pack_path

    path = os.path.abspath(resolve_pack_path(os.path.expanduser(path)))
    if is_index_path(path) and not one_file:
        return _revert_sharded(path, dst, force=force, progress=progress)
    wm = read_pack_map(path)
    if dst is None and is_index_path(path):
        dst = default_destination(path.removesuffix(".index.json"))
    dst = os.path.abspath(os.path.expanduser(dst)) if dst else default_destination(path)
    check_destination(dst, [path], force)
    fmt = "torch" if dst.lower().endswith(TORCH_SUFFIXES) else "safetensors"

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
