"""What the transformers and diffusers mixins share: the ``device_map`` rule, writing a model folder (config
files + pack, atomically), and building a model on the meta device and filling it from its pack (the weight map
read once per model)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
from typing import Callable, Iterable

import torch

from ..deserialization import option_strings, start_early_load
from ..errors import FlashPackError, ModelMismatchError, ModelNotFoundError, UnsupportedDeviceMapError
from ..format import WeightMap, torch_dtype
from ..mixin import assign_from_file, model_targets
from ..serialization import pack_to_file
from ..source import index_path_for, read_pack_map
from .hub import pack_name, push_folder, stale_pack_patterns

_dtype_lock = threading.RLock()

#: Default ``max_shard_size`` of ``save_pretrained_flashpack``: the Hub's recommended largest file.
DEFAULT_MAX_SHARD_SIZE = "20GB"


_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _one_device(value) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool):
        raise TypeError(f"device_map value {value!r} is not a device")
    if isinstance(value, int):
        return torch.device("cuda", value)
    if isinstance(value, str):
        if value in _STRATEGIES:
            raise UnsupportedDeviceMapError(
                f"device_map={value!r} (placement over several devices) is not supported yet by flashpack; "
                f"pass one device: 'cpu', 'cuda', 'cuda:1' or a torch.device")
        if value == "disk":
            raise UnsupportedDeviceMapError("device_map with 'disk' offload is not supported yet by flashpack; "
                                            "pass one device: 'cpu', 'cuda', 'cuda:1' or a torch.device")
        return torch.device(value)
    raise TypeError(f"device_map must be a device string, an int, a torch.device or a dict, got {type(value).__name__}")


def parse_device_map(device_map) -> torch.device:
    """The single device a ``device_map`` names.

    Args:
        device_map: ``None`` (CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, an int (CUDA index), a ``torch.device``,
            or a dict whose values all name the same device (``{"": "cuda:0"}``).

    Raises:
        UnsupportedDeviceMapError (``NotImplementedError``): a dict over several devices, ``"auto"``-style
            strategies or disk offload.
        TypeError: anything else.
    """
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty dict; pass a device such as 'cpu' or 'cuda'")
        devices = {_norm(_one_device(v)) for v in device_map.values()}
        if len(devices) > 1:
            raise UnsupportedDeviceMapError(
                f"device_map spreads the model over {sorted(str(d) for d in devices)}: placing one model on several "
                f"devices is not supported yet by flashpack; pass one device ('cpu', 'cuda', 'cuda:1')")
        return devices.pop()
    return _one_device(device_map)


def _norm(dev: torch.device) -> torch.device:
    """``cuda`` and ``cuda:0`` are the same device when comparing the values of a dict."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None):
    """``torch.set_default_dtype(dtype)`` for the block (floating dtypes torch accepts only; others ignored).
    Process-global like the libraries' own loaders; a lock serialises concurrent builds in this process."""
    if dtype is None or dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        yield
        return
    with _dtype_lock:
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def find_pack(folder: str, name: str) -> str:
    """``folder/name``, or a :class:`~flashpack.integrations.hub.ModelNotFoundError` listing the packs present."""
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    if os.path.isfile(index_path_for(path)):
        return index_path_for(path)  # saved sharded
    others = sorted(f for f in os.listdir(folder) if f.endswith(".flashpack")) if os.path.isdir(folder) else []
    raise ModelNotFoundError(
        f"{folder}: no {name}" + (f" (packs here: {others}; pick one with variant=)" if others else
                                  " (no pack here: write one with save_pretrained_flashpack)"))


def main_float_dtype(wm: WeightMap) -> torch.dtype | None:
    """The floating dtype holding the most bytes in a pack (the dtype the model is built in), or ``None``."""
    nbytes: dict[str, int] = {}
    for t in wm.tensors.values():
        nbytes[t.dtype] = nbytes.get(t.dtype, 0) + t.nbytes
    best = None
    for name, n in sorted(nbytes.items(), key=lambda kv: -kv[1]):
        try:
            dt = torch_dtype(name)
        except FlashPackError:
            continue
        if dt.is_floating_point:
            best = dt
            break
    return best


def match_file_dtypes(model: torch.nn.Module, wm: WeightMap) -> None:
    """Give every meta parameter the floating dtype the pack stores for it (modules a library keeps in fp32,
    a model built in another default dtype). Only meta tensors are replaced (they hold no data); ties kept."""
    groups, kinds = model_targets(model)
    for names in groups.values():
        kind, cur = kinds[names[0]]
        stored = next((n for n in names if n in wm.tensors or n in wm.aliases), None)
        if kind != "param" or stored is None or cur.device.type != "meta" or not cur.is_floating_point():
            continue
        fdt = torch_dtype(wm.tensors[wm.aliases.get(stored, stored)].dtype, key=stored, path=wm.path)
        if fdt == cur.dtype or not fdt.is_floating_point:
            continue
        new = torch.nn.Parameter(torch.empty_like(cur, dtype=fdt, device="meta"), requires_grad=cur.requires_grad)
        for n in names:
            mod_path, _, leaf = n.rpartition(".")
            (model.get_submodule(mod_path) if mod_path else model)._parameters[leaf] = new


#: fal's loading keywords of ``from_pretrained_flashpack`` that go to :func:`flashpack.assign_from_file` as they are.
FAL_LOAD_KEYWORDS = ("silent", "strict", "strict_params", "strict_buffers", "keep_flash_ref_on_model", "num_streams",
                     "chunk_bytes", "ignore_names", "ignore_prefixes", "ignore_suffixes", "use_distributed_loading",
                     "distributed_sharded", "distributed_shard_strategy", "rank", "local_rank", "world_size",
                     "coerce_dtype")
#: fal's Hub keywords accepted and ignored (deprecated in huggingface_hub): ``proxies``, ``local_dir_use_symlinks``.
FAL_IGNORED_HUB_KEYWORDS = ("proxies", "local_dir_use_symlinks")


def split_fal_options(kwargs: dict) -> tuple[dict, dict]:
    """Take fal's loading keywords out of ``kwargs`` (changed in place): returns ``(assign_options, hub_options)``.
    ``strict`` defaults to ``True`` here (a model built from its config must be filled completely); the Hub options
    are ``force_download`` and ``local_dir`` (passed to ``snapshot_download``)."""
    assign = {k: kwargs.pop(k) for k in FAL_LOAD_KEYWORDS if k in kwargs}
    if assign.get("strict") is None:
        assign["strict"] = True
    for k in FAL_IGNORED_HUB_KEYWORDS:
        kwargs.pop(k, None)
    hub = {k: kwargs.pop(k) for k in ("force_download", "local_dir") if k in kwargs}
    return assign, hub


def resolve_device(device, device_map, owner: str) -> torch.device:
    """fal's positional ``device`` or ``device_map`` (not both, unless they agree), as one device."""
    if device is not None and device_map is not None and parse_device_map(device) != parse_device_map(device_map):
        raise ValueError(f"{owner}: device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return parse_device_map(device if device is not None else device_map)


def stored_keys_match(model: torch.nn.Module, keys: list[str]) -> bool:
    """Whether every key a pack stores names a parameter or persistent buffer of ``model`` (then the pack is in
    the model's own layout and no checkpoint key conversion is looked for)."""
    _, kinds = model_targets(model)
    return all(k in kinds for k in keys)


def rename_weight_map(wm: WeightMap, renames: dict[str, str]) -> WeightMap:
    """The weight map with stored keys (and alias names) renamed: ``renames`` maps a stored key to the key the
    model uses. Offsets, dtypes and shapes are unchanged, so the loaded tensors are still views of the file's
    bytes (zero-copy); a sharded pack's merged map keeps its shards.

    Args:
        wm: the pack's weight map (:func:`flashpack.source.read_pack_map`).
        renames: ``{stored key: model key}``; keys not in it keep their name.

    Returns:
        ``wm`` itself when ``renames`` is empty, else a renamed copy.

    Raises:
        ModelMismatchError (``ValueError``): two stored keys would get the same name (naming both and the target).
    """
    if not renames:
        return wm
    seen: dict[str, str] = {}

    def new_name(key: str) -> str:
        name = renames.get(key, key)
        if seen.setdefault(name, key) != key:
            raise ModelMismatchError(
                f"{wm.path}: stored keys {seen[name]!r} and {key!r} both become {name!r} under the checkpoint key "
                f"conversions of the installed library; the pack mixes two key layouts: re-pack the model")
        return name

    tensors = {new_name(k): dataclasses.replace(t, key=renames.get(k, k)) for k, t in wm.tensors.items()}
    aliases = {new_name(a): renames.get(k, k) for a, k in wm.aliases.items()}
    extra = {}
    if getattr(wm, "shards", None):  # a sharded pack: mmap=True looks keys up in each shard's own map
        extra["shards"] = [rename_weight_map(s, {k: v for k, v in renames.items() if k in s.tensors or k in s.aliases})
                           for s in wm.shards]
    return dataclasses.replace(wm, tensors=tensors, aliases=aliases, **extra)


def load_model(build: Callable[[torch.dtype | None], torch.nn.Module], pack_path: str, device: torch.device,
               *, tie: Callable[[torch.nn.Module], None] | None = None, assign: dict | None = None,
               key_renames: Callable[[torch.nn.Module, WeightMap], dict[str, str]] | None = None,
               lenient_keys: Callable[[torch.nn.Module, list[str]], tuple[set[str], set[str]]] | None = None,
               init_omitted: Callable[[torch.nn.Module, list[str]], None] | None = None) -> torch.nn.Module:
    """Build a model with meta parameters, fill it from ``pack_path`` and return it ready (eval mode). The pack's
    bytes are read while ``build`` runs when :func:`flashpack.deserialization.start_early_load` allows it.

    Args:
        build: ``build(dtype)`` returns the model with parameters on the meta device (real buffers), built in
            ``dtype`` (the pack's main floating dtype, or ``None``).
        pack_path: the pack.
        device: where the weights go.
        tie: re-ties the model's shared weights the library's way (called before and after the fill).
        assign: keywords for :func:`flashpack.assign_from_file` (fal's, from :func:`split_fal_options`);
            default ``strict=True``.
        key_renames: ``key_renames(model, weight map)`` returns ``{stored key: model key}`` for a pack written in
            an older key layout (the library's checkpoint key conversions); applied with
            :func:`rename_weight_map` before the fill.
        lenient_keys: ``lenient_keys(model, the pack's keys)`` returns ``(absent, skipped)``, the library's own
            exceptions to a strict match (the transformers mixin's :func:`transformers_lenient_keys`): ``absent``,
            model keys the pack lacks that the library does not count as missing (keys it leaves out of the
            checkpoints it saves, or that may be missing by its rules); each is allocated on ``device`` after the
            fill and the ties, and ``init_omitted(model, those keys)`` initialises it, as ``from_pretrained``
            initialises the keys its checkpoint lacks; ``skipped``, pack keys the model does not have that the
            library ignores on load (GPT-2's ``attn.bias`` masks in old checkpoints): not read.

    Raises:
        ModelMismatchError: the pack does not fit the model, or something was left on the meta device.
        Everything :func:`flashpack.assign_from_file` raises.
    """
    wm = read_pack_map(pack_path)  # read once (a sharded pack: its merged map): dtypes, the fill, and the same-file check of the payload
    options = {"strict": True} | dict(assign or {})
    with start_early_load(wm, device, **options) as early:  # the read overlaps the build below
        model = build(main_float_dtype(wm))
        if tie is not None:
            tie(model)
        if key_renames is not None:
            renames = key_renames(model, wm)
            wm = rename_weight_map(wm, renames)
            if early is not None:
                early.rename(renames)
        match_file_dtypes(model, wm)
        absent, skipped = lenient_keys(model, wm.keys()) if lenient_keys is not None else ((), ())
        absent = sorted(absent)
        fill = options
        if absent or skipped:
            fill = dict(options, ignore_names=[*option_strings(options.get("ignore_names")), *absent, *skipped])
        assign_from_file(model, wm, device=device, early=early, **fill)
    if tie is not None:
        tie(model)
    if absent:
        materialize(model, absent, device)
        if init_omitted is not None:
            init_omitted(model, absent)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left and (assign or {}).get("strict", True) is not False:
        raise ModelMismatchError(f"{pack_path}: still on the meta device after loading (no data in the pack): "
                                 f"{left[:20]}{' ...' if len(left) > 20 else ''}")
    return model.eval()


def materialize(model: torch.nn.Module, keys: Iterable[str], device: torch.device) -> None:
    """Give each of ``keys`` (parameters or buffers of ``model`` still on the meta device) uninitialised memory
    on ``device``, same shape, dtype and ``requires_grad``; keys not on meta are left alone."""
    for key in keys:
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            p = owner._parameters[leaf]
            if p.device.type == "meta":
                owner._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device=device),
                                                             requires_grad=p.requires_grad)
        elif leaf in owner._buffers and owner._buffers[leaf] is not None and owner._buffers[leaf].device.type == "meta":
            owner._buffers[leaf] = torch.empty_like(owner._buffers[leaf], device=device)


def base_library_class(obj_or_cls, libraries: tuple[str, ...] = ("transformers", "diffusers")) -> type:
    """The nearest class in the MRO defined by one of ``libraries`` (``FlashPackCLIPTextModel`` ->
    ``CLIPTextModel``), so saved configs name a class anyone can import; the class itself if none."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    for c in cls.__mro__:
        if c.__module__.split(".")[0] in libraries:
            return c
    return cls


def save_model_folder(model: torch.nn.Module, save_directory: str | os.PathLike, *,
                      write_configs: Callable[[str], None], variant: str | None, target_dtype: torch.dtype | None,
                      push_to_hub: bool, repo_id: str | None, token, private: bool | None,
                      commit_message: str | None, create_pr: bool = False,
                      max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE, progress=None,
                      omit_keys: Iterable[str] = ()) -> str:
    """Write ``save_directory/<config files>`` and ``save_directory/model[.<variant>].flashpack`` (the model's
    state_dict less ``omit_keys``).

    The folder is created if needed. Config files are first written by ``write_configs(tmp)`` into a hidden
    temporary folder inside ``save_directory``; the pack is written atomically (temporary file, fsync, rename,
    replacing a stale pack of the same variant); then the config files are renamed into place. On any error the
    temporary folder is removed and no partial file is left. Other variants' packs and ordinary weight files in
    the folder are left alone.

    ``max_shard_size`` (an int or a Hugging Face size string, default ``"20GB"``, the Hub's recommendation;
    ``None`` for one file) splits a larger pack into ``model[.<variant>]-0000i-of-0000N.flashpack`` + index,
    atomic as a set (:func:`flashpack.pack_to_file`).

    Returns:
        The pack's path (its index when sharded).
    """
    folder = os.fspath(save_directory)
    if os.path.isfile(folder):
        raise NotADirectoryError(f"{folder} is a file; save_directory must be a folder (it is created if missing)")
    os.makedirs(folder, exist_ok=True)
    pack_path = os.path.join(folder, pack_name(variant))
    tmp = tempfile.mkdtemp(prefix=".flashpack-save-", dir=folder)
    try:
        write_configs(tmp)
        omit = set(omit_keys)
        source = model if not omit else {k: v for k, v in model.state_dict().items() if k not in omit}
        pack_to_file(source, pack_path, target_dtype, max_shard_nbytes=max_shard_size, progress=progress)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isfile(pack_path) and os.path.isfile(index_path_for(pack_path)):
        pack_path = index_path_for(pack_path)
    if push_to_hub:
        push_folder(folder, repo_id=repo_id, token=token, private=private, commit_message=commit_message,
                    create_pr=create_pr,
                    delete_patterns=stale_pack_patterns(os.path.basename(pack_path).removesuffix(".index.json")))
    return pack_path


