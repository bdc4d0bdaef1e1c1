"""``flashpack convert``: find a checkpoint's weight files, then stream them into one ``.flashpack`` file.

A source is a ``.safetensors`` file, a ``.pt`` / ``.bin`` / ``.pth`` file, a folder of shards with its
``*.index.json``, a transformers or diffusers model folder (optionally a ``subfolder`` of it), or a Hub
repo id. :func:`resolve_source` turns it into an ordered list of weight files; :func:`convert` plans
every tensor from shapes and dtypes alone (:class:`~flashpack.serialization.LazyTensor`) and hands the
plan to :func:`~flashpack.serialization.pack_to_file`, which reads each tensor only when it writes it.
Source files are opened one at a time, so peak memory is about the largest shard, not the model.

torch, safetensors and huggingface_hub are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UsageError

#: File suffixes read as PyTorch pickles (``torch.load(weights_only=True)``).
TORCH_SUFFIXES = (".pt", ".bin", ".pth")
#: (stem, extension) of the weight files transformers and diffusers write, most preferred first.
_WEIGHT_NAMES = {
    "transformers": [("model", "safetensors"), ("pytorch_model", "bin")],
    "diffusers": [("diffusion_pytorch_model", "safetensors"), ("diffusion_pytorch_model", "bin")],
}
_WEIGHT_NAMES[None] = [_WEIGHT_NAMES["transformers"][0], _WEIGHT_NAMES["diffusers"][0],
                       _WEIGHT_NAMES["transformers"][1], _WEIGHT_NAMES["diffusers"][1]]
#: Metadata key of the top-level entries of a wrapped ``.pt`` (``{"state_dict": ..., "epoch": 3}``) that convert
#: left out: JSON ``{file name: ["'epoch' (int)", ...]}``.
DROPPED_KEY = "flashpack.convert.dropped_entries"
#: The file name the transformers/diffusers integrations load (``model.flashpack``, ``model.<variant>.flashpack``).
DEFAULT_PACK_STEM = "model"
_SAFETENSORS_HEADER_MAX = 100 * 1024 * 1024


@dataclass
class Source:
    """Resolved weight files of one checkpoint, in the order they are written."""

    description: str
    files: list[str]
    kind: str  # "safetensors" or "torch"
    folder: str | None = None  # the model folder (config.json lives here), if any
    index: str | None = None
    default_dst: str = ""


@dataclass
class ConvertResult:
    dst: str
    source: Source
    tensors: int
    aliases: int
    file_nbytes: int
    payload_nbytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- resolving a source


def looks_local(src: str) -> bool:
    """Whether ``src`` must be a local path, never a Hub repo id (case C33): it starts with ``.``, ``/``,
    ``~``, holds a backslash or more than one ``/``, ends with a weight-file suffix, or its first path
    component exists here."""
    if src.startswith((".", "/", "~")) or "\\" in src or src.count("/") > 1:
        return True
    if src.lower().endswith((".safetensors", ".flashpack", ".json", *TORCH_SUFFIXES)):
        return True
    head = src.split("/", 1)[0]
    return "/" in src and os.path.exists(head)


def _variant_re(stem: str, ext: str, variant: str | None) -> list[tuple[str, re.Pattern]]:
    s, e = re.escape(stem), re.escape(ext)
    if variant is None:
        return [("default", re.compile(rf"^{s}-(\d+)-of-(\d+)\.{e}$"))]
    v = re.escape(variant)
    return [("<stem>.<variant>-NNNNN-of-NNNNN", re.compile(rf"^{s}\.{v}-(\d+)-of-(\d+)\.{e}$")),
            ("<stem>-NNNNN-of-NNNNN.<variant>", re.compile(rf"^{s}-(\d+)-of-(\d+)\.{v}\.{e}$"))]


def select_weight_files(names: list[str], variant: str | None, framework: str | None,
                        where: str) -> tuple[str | None, list[str]]:
    """Pick the weight files of one checkpoint among the file names of a folder.

    Tried in order, for each known (stem, extension) (``model.safetensors``,
    ``diffusion_pytorch_model.safetensors``, ``pytorch_model.bin``, ...): the index
    (``<stem>.<ext>.index.json``, or ``<stem>.<ext>.index.<variant>.json``), the single file
    (``<stem>[.<variant>].<ext>``), then a complete set of shards in either variant naming style
    (``model.fp16-00001-of-00002.safetensors`` or ``model-00001-of-00002.fp16.safetensors``). Without a
    variant, variant files are never picked (case C35). Last, a lone ``*.safetensors`` index or file.

    Returns:
        (index name or None, weight file names in order). With an index, the files are read from it later.

    Raises:
        UsageError: nothing fits, or two complete shard sets fit, naming the folder and what it holds.
    """
    present = set(names)
    for stem, ext in _WEIGHT_NAMES[framework]:
        idx = [f"{stem}.{ext}.index.json"] if variant is None else \
              [f"{stem}.{ext}.index.{variant}.json", f"{stem}.{variant}.{ext}.index.json"]
        for name in idx:
            if name in present:
                return name, []
        single = f"{stem}.{ext}" if variant is None else f"{stem}.{variant}.{ext}"
        if single in present:
            return None, [single]
        complete = []
        for style, rx in _variant_re(stem, ext, variant):
            found = {}
            for n in names:
                m = rx.match(n)
                if m:
                    found[int(m.group(1))] = (int(m.group(2)), n)
            if not found:
                continue
            total = {t for t, _ in found.values()}
            if len(total) != 1 or set(found) != set(range(1, next(iter(total)) + 1)):
                missing = sorted(set(range(1, max(total) + 1)) - set(found))
                raise UsageError(f"{where}: incomplete shard set {stem}*{ext} ({style}): shard(s) {missing} of "
                                 f"{max(total)} missing; download the missing shards or pass the index file")
            complete.append([found[i][1] for i in sorted(found)])
        if len(complete) > 1:
            raise UsageError(f"{where}: two complete {variant} shard sets in different naming styles "
                             f"({complete[0][0]}, {complete[1][0]}) and no index to choose; delete one set "
                             f"or add {stem}.{ext}.index.{variant}.json")
        if complete:
            return None, complete[0]
    if framework is None:
        tag = r"[^.]+" if variant is None else re.escape(variant)
        if variant is None:
            idx = [n for n in names if n.endswith(".safetensors.index.json") and n.count(".") == 3]
            files = [n for n in names if n.endswith(".safetensors") and n.count(".") == 1]
        else:
            idx = [n for n in names if re.fullmatch(rf"[^.]+\.safetensors\.index\.{tag}\.json", n)]
            files = [n for n in names if re.fullmatch(rf"[^.]+\.{tag}\.safetensors", n)]
        if len(idx) == 1:
            return idx[0], []
        if not idx and len(files) == 1:
            return None, files
    weights = sorted(n for n in names if n.endswith((".safetensors", ".json", *TORCH_SUFFIXES)))
    what = f"no {variant!r} variant weights" if variant else "no weights (default, non-variant set)"
    raise UsageError(f"{where}: {what} found; it holds {weights[:8] or 'no weight files'}"
                     f"{' ...' if len(weights) > 8 else ''}; check --variant/--subfolder or pass a weight file")


#: Largest shard index read (a 100,000-tensor model's index is a few MiB).
MAX_SHARD_INDEX_NBYTES = 64 * 1024 * 1024


class UnsafeShardPathError(UsageError):
    """A shard index (``*.index.json``) or a model folder names a weight file outside the model folder:
    an absolute path, a ``..`` component, or a symlink that resolves elsewhere. The message names the
    index, the entry and why."""


def _allowed_roots(folder: str) -> list[str]:
    """The model folder, plus, for a Hugging Face cache snapshot (``models--org--name/snapshots/<rev>``),
    the repo's ``blobs`` folder that the snapshot's symlinks point into."""
    real = os.path.realpath(folder)
    roots = [real]
    parts = real.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--", "spaces--")):
            roots.append(os.path.join(os.sep.join(parts[:i]), "blobs"))
            break
    return roots


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_weight_file(folder: str, name: str, where: str) -> str:
    """Check that ``name`` (from a shard index or the folder listing) is a regular file inside ``folder``.

    Returns:
        The path to read (``folder/name``).

    Raises:
        UnsafeShardPathError: ``name`` is not a string, is absolute, has a ``..`` component or a NUL,
            or resolves (through symlinks) outside the folder (a Hub cache snapshot may point into its
            repo's ``blobs`` folder). UsageError: the file is missing or not a regular file.
    """
    if not isinstance(name, str) or not name:
        raise UnsafeShardPathError(f"{where}: shard file {name!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    why = ("is an absolute path" if name.startswith(("/", "\\")) or os.path.isabs(name) else
           "has a '..' component" if ".." in parts else
           "holds a NUL character" if "\0" in name else None)
    if why:
        raise UnsafeShardPathError(f"{where}: shard file {name!r} {why}; shard files must lie inside the model "
                                   f"folder {folder}; fix or delete the index")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if not any(_inside(real, r) for r in _allowed_roots(folder)):
        raise UnsafeShardPathError(f"{where}: shard file {name!r} resolves to {real}, outside the model folder "
                                   f"{folder} (a symlink out of it); refusing to read it")
    try:
        st = os.stat(real)
    except OSError:
        raise UsageError(f"{where} names shard(s) that are not there: {[name]}; download them or fix the index") from None
    from ..source import check_regular

    check_regular(st, path)
    return path


def _read_index(folder: str, index: str) -> list[str]:
    from ..format import load_json
    from ..source import open_regular

    path = os.path.join(folder, index)
    fix = "it must be JSON with a 'weight_map' of key -> shard file"
    fd, st = open_regular(path)
    try:
        if st.st_size > MAX_SHARD_INDEX_NBYTES:
            raise UsageError(f"{path}: shard index of {st.st_size} bytes exceeds the {MAX_SHARD_INDEX_NBYTES}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_SHARD_INDEX_NBYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = load_json(data, path, "shard index", 0)
    except ValueError as e:
        raise UsageError(f"{e}; {fix}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise UsageError(f"{path}: not a usable shard index (no 'weight_map' object); {fix}")
    if not weight_map:
        raise UsageError(f"{path}: not a usable shard index: its 'weight_map' is empty; {fix}")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise UsageError(f"{path}: not a usable shard index: weight_map[{key!r}] is {name!r}, not a file name; {fix}")
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        key = next(k for k, v in weight_map.items() if v == name)
        check_weight_file(folder, name, f"{path}: weight_map[{key!r}]")
    return sorted(files)


def _kind_of_file(path: str) -> str:
    low = path.lower()
    if low.endswith(".safetensors"):
        return "safetensors"
    if low.endswith(TORCH_SUFFIXES):
        return "torch"
    with open(path, "rb") as f:
        head = f.read(16)
    from ..format import FAL_MAGIC, MAGIC

    if head.startswith(MAGIC) or (os.path.getsize(path) >= 16 and _tail(path) == FAL_MAGIC):
        raise UsageError(f"{path}: already a flashpack file; nothing to convert (use `flashpack revert` to get safetensors)")
    if head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise UsageError(f"{path}: not a safetensors, .pt/.bin/.pth or model folder; name it with its real suffix "
                     f"(.safetensors, .pt, .bin, .pth)")


def _tail(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        return f.read(8)


def _folder_source(folder: str, variant: str | None, framework: str | None, description: str) -> Source:
    names = sorted(os.listdir(folder))
    index, files = select_weight_files(names, variant, framework, folder)
    if index is not None:
        files = _read_index(folder, index)
    else:
        for name in files:
            check_weight_file(folder, name, folder)
    kind = "safetensors" if files[0].endswith(".safetensors") else "torch"
    stem = DEFAULT_PACK_STEM if variant is None else f"{DEFAULT_PACK_STEM}.{variant}"
    return Source(description, [os.path.join(folder, f) for f in files], kind, folder,
                  None if index is None else os.path.join(folder, index), os.path.join(folder, f"{stem}.flashpack"))


def resolve_source(src: str, *, subfolder: str | None = None, variant: str | None = None,
                   framework: str | None = None) -> Source:
    """Find the weight files ``src`` stands for.

    Args:
        src: a file, a folder, or a Hub repo id (``org/name``).
        subfolder: a folder inside ``src`` (``unet``, ``text_encoder``).
        variant: ``fp16``, ``bf16``...: only that variant's files.
        framework: ``"transformers"``, ``"diffusers"`` or None (either): which weight file names to look for.

    Raises:
        UsageError: a local-looking path that does not exist (never a Hub request, case C33), a folder
            without weights, a Hub download that failed (naming what to check).
    """
    path = os.path.expanduser(src)
    if os.path.exists(path):
        path = os.path.abspath(path)
        if os.path.isdir(path):
            folder = os.path.join(path, subfolder) if subfolder else path
            if not os.path.isdir(folder):
                raise UsageError(f"{folder}: no such folder; check --subfolder={subfolder}")
            return _folder_source(folder, variant, framework, folder)
        if subfolder:
            raise UsageError(f"{path} is a file; --subfolder applies to model folders and Hub repos only")
        from ..source import check_regular

        check_regular(os.stat(path), path)  # a FIFO would hang the open below
        kind = _kind_of_file(path)
        stem, _ = os.path.splitext(path)
        return Source(path, [path], kind, None, None, stem + ".flashpack")
    if looks_local(src):
        raise UsageError(f"{src}: no such file or folder; check the path (a Hub repo id looks like org/name)")
    return _hub_source(src, subfolder=subfolder, variant=variant, framework=framework)


def hub_patterns(subfolder: str | None, variant: str | None, ext: str) -> tuple[list[str], list[str]]:
    """(allow_patterns, ignore_patterns) for ``snapshot_download``: the config, the index and the weight
    files of one folder of the repo, of one variant (or of none), nothing from deeper folders."""
    p = f"{subfolder.strip('/')}/" if subfolder else ""
    if variant is None:
        allow = [f"{p}*.{ext}", f"{p}*.{ext}.index.json"]
        ignore = [f"{p}*.*.{ext}"]  # variant files have a second dot: model.fp16.safetensors
    else:
        allow = [f"{p}*.{variant}.{ext}", f"{p}*.{variant}-*-of-*.{ext}", f"{p}*.{ext}.index.{variant}.json"]
        ignore = []
    return allow + [f"{p}config.json"], ignore + [f"{p}*/*"]


def _hub_source(repo_id: str, *, subfolder: str | None, variant: str | None, framework: str | None) -> Source:
    import huggingface_hub

    where = f"{repo_id}{'/' + subfolder if subfolder else ''} (Hugging Face Hub)"
    last: UsageError | None = None
    for ext in ("safetensors", "bin"):
        allow, ignore = hub_patterns(subfolder, variant, ext)
        try:
            local = huggingface_hub.snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=ignore)
        except Exception as e:  # noqa: BLE001 - every Hub failure becomes one actionable line
            first = plain_text((str(e).strip().splitlines() or [""])[0])
            raise UsageError(f"{repo_id}: could not download from the Hugging Face Hub ({type(e).__name__}: {first}); "
                             f"check the repo id, your token (HF_TOKEN or `hf auth login`) and the network") from None
        folder = os.path.join(local, subfolder) if subfolder else local
        if not os.path.isdir(folder):
            last = UsageError(f"{where}: no folder {subfolder!r} in the repo; check --subfolder")
            continue
        try:
            src = _folder_source(folder, variant, framework, where)
        except UsageError as e:
            last = e
            continue
        name = repo_id.rsplit("/", 1)[-1] + (f"-{subfolder.strip('/').replace('/', '-')}" if subfolder else "") \
            + (f".{variant}" if variant else "")
        src.default_dst = os.path.abspath(f"{name}.flashpack")
        return src
    assert last is not None
    raise last


# --------------------------------------------------------------------------- reading tensors lazily


class _OneOpen:
    """Keeps at most one source file open; opening another drops the previous one (and its mapping)."""

    def __init__(self, opener: Callable[[str], object]):
        self._opener = opener
        self._path: str | None = None
        self._handle = None

    def get(self, path: str):
        if path != self._path:
            self.close()
            self._handle = self._opener(path)
            self._path = path
        return self._handle

    def close(self) -> None:
        self._handle = None
        self._path = None


def _safe_open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise UsageError(f"{path}: not a readable safetensors file ({e}); check that the download completed") from None


#: Terminal escape sequences: CSI (``ESC [ ... m``, colours and bold), OSC (``ESC ] ... BEL`` or ``ESC ] ... ESC \\``,
#: hyperlinks, titles), and the other two-byte ``ESC x`` sequences.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


def plain_text(text: str) -> str:
    """A library's message (torch's, huggingface_hub's) as plain one-line text: terminal escape sequences
    (torch wraps a warning in ``ESC[1m ... ESC[0m``) removed, other control characters and runs of whitespace
    turned into one space. What a file supplies is still escaped by the CLI when printed
    (:func:`flashpack.tools.cli.safe_text`); this only keeps a library's formatting out of the message.

    Args:
        text: the message.

    Returns:
        The text without escape sequences or control characters, on one line.
    """
    return " ".join(_CONTROLS.sub(" ", _ANSI.sub("", text)).split())


def unpickling_reason(e: BaseException) -> str:
    """The line of a ``weights_only`` refusal that says why (torch >= 2.6: ``WeightsUnpickler error: Unsupported
    global: GLOBAL __main__.Foo ...``, up to its first sentence), else the message's first line; as
    :func:`plain_text`, at most 300 characters.

    Args:
        e: the ``pickle.UnpicklingError`` ``torch.load`` raised.

    Returns:
        One line of plain text.
    """
    lines = [ln.strip() for ln in str(e).strip().splitlines()]
    why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), None)
    if why is not None:
        why = why.split(". ", 1)[0].rstrip(".")
    text = plain_text(why if why is not None else (lines or [""])[0])
    return text if len(text) <= 300 else text[:300] + " ..."


def torch_state_dict(path: str, *, mmap: bool = True, dropped: list[str] | None = None) -> dict:
    """``torch.load(path, weights_only=True)`` (memory-mapped when the file allows), reduced to its
    mapping of key -> tensor (a top-level ``state_dict``/``model``/``module`` entry is accepted).

    Args:
        path: the ``.pt`` / ``.bin`` / ``.pth`` file.
        mmap: map the file instead of reading it (falls back to reading for the legacy format).
        dropped: when given and the tensors came from a wrapping entry (``{"state_dict": ..., "epoch": 3}``),
            the names of the file's other top-level entries, which are left out, are appended here.

    Returns:
        The state_dict: key -> tensor.

    Raises:
        UsageError: the pickle holds objects ``weights_only`` refuses, or no state_dict of tensors.
    """
    import pickle

    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: torch.load(weights_only=True) refused it ({unpickling_reason(e)}); only state_dicts "
                         f"of tensors are converted: re-save it with torch.save(model.state_dict(), ...)") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch's loader lets KeyError, IndexError, struct.error... through
        text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
        first = plain_text((text.strip().splitlines() or [""])[0])[:200]  # KeyError's str() is a repr
        raise UsageError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first}); "
                         f"check that the file is complete") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in ("state_dict", "model", "module"):
            if isinstance(obj.get(k), dict):
                if dropped is not None:
                    dropped += [f"{o!r} ({type(v).__name__})" for o, v in obj.items() if o != k]
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: holds a {type(obj).__name__}, not a state_dict; save model.state_dict() instead")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UsageError(f"{path}: entries that are not tensors: {bad[:5]}; save a state_dict of tensors only")
    return obj


def _plan_safetensors(files: list[str], loaded: Callable[[int], None]):
    from ..format import torch_dtype
    from ..serialization import LazyTensor

    opened = _OneOpen(_safe_open)
    lazy: dict = {}
    metadata: dict[str, str] = {}
    for path in files:
        h = _safe_open(path)
        keys = h.offset_keys() if hasattr(h, "offset_keys") else list(h.keys())
        for k, v in (h.metadata() or {}).items():
            metadata.setdefault(k, v)
        for key in keys:
            if key in lazy:
                raise UsageError(f"{path}: key {key!r} is also in another shard; the checkpoint is inconsistent")
            sl = h.get_slice(key)
            dt = torch_dtype(sl.get_dtype(), key=key, path=path)
            shape = tuple(sl.get_shape())

            def load(path=path, key=key, nbytes=dt.itemsize * _numel(shape)):
                t = opened.get(path).get_tensor(key)
                loaded(nbytes)
                return t

            lazy[key] = LazyTensor(shape, dt, load)
        del h
    return lazy, metadata, opened, {}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _plan_torch(files: list[str], loaded: Callable[[int], None]):
    from ..serialization import LazyTensor

    opened = _OneOpen(torch_state_dict)
    lazy: dict = {}
    dropped: dict[str, list[str]] = {}
    for path in files:
        sd = torch_state_dict(path, dropped=dropped.setdefault(path, []))
        if not dropped[path]:
            del dropped[path]
        seen: dict = {}
        for key, t in sd.items():
            if key in lazy:
                raise UsageError(f"{path}: key {key!r} is also in another shard; the checkpoint is inconsistent")
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) \
                if t.numel() else None
            if ident is not None and ident in seen:  # tied: saved once by torch.save, two names
                lazy[key] = lazy[seen[ident]]
                continue

            def load(path=path, key=key, nbytes=t.numel() * t.element_size()):
                out = opened.get(path)[key]
                loaded(nbytes)
                return out

            lazy[key] = LazyTensor(tuple(t.shape), t.dtype, load)
            if ident is not None:
                seen[ident] = key
        del sd
    return lazy, {}, opened, dropped


#: A parameter path as ``nn.Module.state_dict`` writes it: dotted identifiers (``layers.0.attn.weight``).
_PARAM_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+")


def _looks_like_removed_tie(k: str, v: str) -> bool:
    """Whether ``metadata[k] = v`` can only be a ``save_model`` record of a removed tied tensor ``k``: both
    are dotted parameter paths and name the same kind of parameter (``lm_head.weight`` ->
    ``embed.weight``), which ordinary metadata (``description: weight``) never is."""
    return bool(_PARAM_PATH.fullmatch(k) and _PARAM_PATH.fullmatch(v)) and k.rsplit(".", 1)[1] == v.rsplit(".", 1)[1]


def _alias_from_metadata(lazy: dict, metadata: dict[str, str], notes: list[str] | None = None) -> int:
    """Turn safetensors alias records into aliases; those records leave the user metadata, every other
    entry stays metadata.

    Two kinds of record are recognised: ``save_model``'s ``metadata[removed] = kept`` where ``removed`` is
    absent from the file's tensors and both names are parameter paths of the same kind
    (:func:`_looks_like_removed_tie`); and ``flashpack revert``'s, where both keys are stored with the same
    shape, dtype and bytes. A note is appended to ``notes`` for every alias recovered."""
    import torch

    n = 0
    for k, v in list(metadata.items()):
        if k == v or v not in lazy or lazy[v].numel() == 0:
            continue
        if k not in lazy:
            if not _looks_like_removed_tie(k, v):
                continue
            lazy[k] = lazy[v]
        else:
            a, b = lazy[k], lazy[v]
            if a is not b and (a.shape != b.shape or a.dtype != b.dtype
                               or not torch.equal(a.load().view(-1).view(torch.uint8), b.load().view(-1).view(torch.uint8))):
                continue
            lazy[k] = b
        del metadata[k]
        n += 1
        if notes is not None:
            notes.append(f"key {k!r} restored as an alias of {v!r} from the safetensors metadata record "
                         f"{k!r}: {v!r} (written by safetensors' save_model or flashpack revert); "
                         f"the record is not kept as metadata")
    return n


def _transformers_ties(folder: str | None, lazy: dict) -> tuple[int, str | None]:
    """Names that the model class ties (``tie_word_embeddings``) but the checkpoint stores once
    (transformers saves a tied weight under one name and records nothing) become aliases.
    Builds the model on the meta device from ``config.json``; returns (aliases added, a note on failure)."""
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        return 0, None
    try:
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            return 0, f"{folder}: config.json names no transformers architecture; tied weights not looked up"
        with torch.device("meta"):
            model = cls(config)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
    except Exception as e:  # noqa: BLE001 - optional refinement: say why and go on
        return 0, f"{folder}: could not build the model to find tied weights ({type(e).__name__}: {e}); packing without them"
    n = 0
    for names in groups.values():
        stored = [x for x in names if x in lazy]
        for x in names:
            if stored and x not in lazy:
                lazy[x] = lazy[stored[0]]
                n += 1
    return n, None


# --------------------------------------------------------------------------- converting


def parse_dtype(text: str):
    """``float16``/``fp16``/``half``/``F16``, ``bfloat16``/``bf16``, ``float32``/``fp32``, ``float8_e4m3fn``...
    -> a floating ``torch.dtype``.

    Raises:
        UsageError: not a floating dtype name.
    """
    import torch

    from ..format import DTYPE_NAMES

    t = text.strip()
    short = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
             "fp64": "float64", "double": "float64"}
    attr = short.get(t.lower()) or DTYPE_NAMES.get(t.upper()) or t.lower().removeprefix("torch.")
    dt = getattr(torch, attr, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise UsageError(f"--dtype={text}: not a floating-point dtype; use e.g. float16, bfloat16, float32")
    return dt


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_destination(dst: str, sources: list[str], force: bool, *, replace_pack: bool = False) -> bool:
    """Refuse a destination that is one of the sources (cases C31, C32), or an existing file without ``force``.
    With ``replace_pack`` (``convert``), an existing flashpack file (:func:`flashpack.is_flashpack_file`) is
    replaced without ``force``, atomically, as fal's ``convert`` replaces it (a script that converts twice into
    one path runs); ``revert`` keeps the rule that any existing file needs ``force``.

    Returns:
        ``True`` when an existing flashpack file will be replaced (the caller says so); ``False`` when nothing
        exists there, or ``force`` replaces some other file.

    Raises:
        UsageError naming the file and the fix.
    """
    from ..deserialization import is_flashpack_file

    for s in sources:
        if _same_file(dst, s):
            raise UsageError(f"{dst}: the destination is the source file; give another destination")
    if os.path.isdir(dst):
        raise UsageError(f"{dst}: is a folder; give a file name for the destination")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UsageError(f"{dst}: folder {parent} does not exist; create it first")
    if not os.path.lexists(dst):
        return False
    if force:
        return os.path.isfile(dst) and is_flashpack_file(dst)
    if not replace_pack:
        raise UsageError(f"{dst}: already exists; pass --force to replace it, or give another destination")
    if os.path.isfile(dst) and not os.path.islink(dst) and is_flashpack_file(dst):
        return True
    raise UsageError(f"{dst}: already exists and is not a flashpack file; pass --force to replace it, or give "
                     f"another destination")


def shard_limit(max_shard_size, files: list[str]) -> int | None:
    """``max_shard_size`` of :func:`convert` in bytes: ``None`` (one file), ``"keep"`` (the largest source file's
    size, so a sharded checkpoint keeps about its sharding; one file for a one-file source), an int or a Hugging
    Face size string (``"20GB"``).

    Raises:
        UsageError: not a size.
    """
    from ..settings import parse_shard_size

    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, str) and max_shard_size.strip().lower() == "keep":
        return max(os.path.getsize(f) for f in files) if len(files) > 1 else None
    try:
        return parse_shard_size(max_shard_size)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None


def convert(src: str, dst: str | None = None, *, subfolder: str | None = None, variant: str | None = None,
            dtype=None, framework: str | None = None, force: bool = False, progress: bool = False,
            ignore=None, max_shard_size: int | str | None = None) -> ConvertResult:
    """Convert a checkpoint (file, folder, shards or Hub repo) into one ``.flashpack`` file.

    Args:
        src, subfolder, variant, framework: see :func:`resolve_source`.
        dst: the destination file; default: next to the source (``model.safetensors`` -> ``model.flashpack``;
            a folder -> ``<folder>/model[.<variant>].flashpack``; a Hub repo -> ``./<name>.flashpack``).
        dtype: a floating ``torch.dtype`` (or its name): cast floating tensors only.
        force: replace an existing ``dst`` that is not a flashpack file (an existing flashpack file is always
            replaced, atomically, as by fal's ``convert``; ``notes`` says so).
        progress: show a tqdm bar on stderr.
        ignore: ``key -> bool``; keys for which it is true are left out (fal's ``--ignore-*`` filters, see
            :func:`flashpack.deserialization.ignore_filter`).
        max_shard_size: write a sharded pack (``dst`` names it; its shards and index go next to it) with at
            most this many payload bytes per shard: an int, ``"20GB"``, or ``"keep"`` (about the source's own
            sharding). ``None``: one file. The source is still read one tensor at a time.

    Returns:
        A :class:`ConvertResult` (``dst`` is the index when the pack came out sharded).

    Raises:
        UsageError: unusable source or destination. FlashPackError, OSError: the write failed (the
        destination is untouched: the write is atomic).
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    source = resolve_source(src, subfolder=subfolder, variant=variant, framework=framework)
    dst = os.path.abspath(os.path.expanduser(dst)) if dst else source.default_dst
    sources = source.files + ([source.index] if source.index else [])
    replacing = check_destination(dst, sources, force, replace_pack=True)
    from ..source import index_path_for

    index = index_path_for(dst)  # pack_to_file writes it (sharded) or removes it as a stale set (one file)
    if any(_same_file(index, s) for s in sources):
        raise UsageError(f"{dst}: its pack index {index} would replace the source's index; give another destination")
    limit = shard_limit(max_shard_size, source.files)
    if limit is not None and os.path.lexists(dst + ".index.json") and not force:
        raise UsageError(f"{dst}.index.json: already exists; pass --force to replace it, or give another destination")

    from tqdm import tqdm

    from ..serialization import pack_to_file

    t0 = time.perf_counter()
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    plan = _plan_safetensors if source.kind == "safetensors" else _plan_torch
    lazy, metadata, opened, dropped = plan(source.files, bar.update)
    notes: list[str] = [f"{dst}: replaced the existing pack"] if replacing else []
    try:
        if metadata:
            _alias_from_metadata(lazy, metadata, notes)
        if dropped:  # added after the alias records are read, so it is never taken for one
            notes += [f"{path}: converted the state_dict it wraps and dropped its other entries: "
                      f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''} (listed in the pack's metadata "
                      f"under {DROPPED_KEY!r}); save them separately if you need them" for path, names in dropped.items()]
            metadata[DROPPED_KEY] = json.dumps({os.path.basename(p): names for p, names in dropped.items()})
        if framework == "transformers":
            _, note = _transformers_ties(source.folder, lazy)
            if note:
                notes.append(note)
        if ignore is not None:
            lazy = {k: v for k, v in lazy.items() if not ignore(k)}
            if not lazy:
                raise UsageError(f"{src}: every tensor matches the --ignore-* filters; nothing to convert")
        seen: set[int] = set()
        stored = [t for t in lazy.values() if not (id(t) in seen or seen.add(id(t)))]
        bar.reset(total=sum(t.numel() * t.dtype.itemsize for t in stored))
        nbytes = pack_to_file(lazy, dst, dtype, metadata=metadata, max_shard_nbytes=limit)
        if not os.path.exists(dst) and os.path.exists(dst + ".index.json"):
            dst += ".index.json"
    finally:
        opened.close()
        bar.close()
    return ConvertResult(dst, source, len(stored), len(lazy) - len(stored), nbytes,
                         sum(t.numel() * (dtype if dtype is not None and t.is_floating_point() else t.dtype).itemsize
                             for t in stored),
                         time.perf_counter() - t0, notes)
