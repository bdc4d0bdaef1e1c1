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
    """Call ``write(tmp_path)`` on a temporary file next to ``dst``, then atomically replace ``dst``."""
    with atomic_path(dst) as tmp:
        write(tmp)
    return os.path.getsize(dst)


def revert(path: str, dst: str | None = None, *, force: bool = False, progress: bool = False) -> RevertResult:
    """Write the tensors of a flashpack file (or a fal flashpack file) as safetensors or ``.pt``.

    Args:
        path: the flashpack file.
        dst: the destination; ``.pt``/``.pth``/``.bin`` writes ``torch.save``, anything else safetensors.
            Default: :func:`default_destination`.
        force: replace an existing ``dst``.
        progress: a tqdm bar on stderr.

    Raises:
        NotAFlashPackError: ``path`` is not a flashpack file. FormatError: it is damaged (checksums are
        verified while reading). NotARegularFileError: ``path`` is a FIFO, socket or device. UsageError:
        bad destination, a dtype safetensors cannot hold (safetensors destination), or a sub-byte integer
        dtype (``U1``-``U7``, ``I1``-``I7``), which neither safetensors nor ``torch.save`` can store.
        WriteError: the destination could not be written (``ENOSPC``...), naming it.
    """
    from ..deserialization import load, read_weight_map

    path = os.path.abspath(os.path.expanduser(path))
    wm = read_weight_map(path)
    dst = os.path.abspath(os.path.expanduser(dst)) if dst else default_destination(path)
    check_destination(dst, [path], force)
    fmt = "torch" if dst.lower().endswith(TORCH_SUFFIXES) else "safetensors"
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
        sd = load(path, verify=True)
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
