"""Models: :func:`assign_from_file` (a pack into an ``nn.Module``, ties kept, checked before anything changes),
:func:`init_empty_weights` (build a module without allocating its weights) and :class:`FlashPackMixin`.
The module name and ``assign_from_file``'s place in it are fal's (diffusers calls ``flashpack.mixin.assign_from_file``)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Iterable

import torch

from .deserialization import load, read_weight_map
from .errors import ModelMismatchError
from .format import WeightMap, torch_dtype
from .serialization import pack_to_file
from .source import is_index_path, read_pack_map, resolve_pack_path

_patch_lock = threading.RLock()
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    mod_path, _, leaf = name.rpartition(".")
    return (model.get_submodule(mod_path) if mod_path else model), leaf


def model_targets(model: torch.nn.Module):
    """Parameters and persistent buffers by state_dict key; ties grouped by object identity.

    Returns:
        (groups, kinds): ``groups`` maps id(tensor) -> list of keys sharing that object (tied weights);
        ``kinds`` maps key -> ("param"|"buffer", the current tensor).
    """
    groups: dict[int, list[str]] = {}
    kinds: dict[str, tuple[str, torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        kinds[name] = ("param", p)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for bname, b in mod._buffers.items():
            if b is None or bname in mod._non_persistent_buffers_set:
                continue
            key = f"{mod_name}.{bname}" if mod_name else bname
            if key in kinds:
                continue
            groups.setdefault(id(b), []).append(key)
            kinds[key] = ("buffer", b)
    return groups, kinds


def _default_device(model: torch.nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def assign_from_file(model: torch.nn.Module, path: str | os.PathLike | WeightMap, device=None, *, strict: bool = True,
                     backend: str | None = None, verify: bool | None = None, mmap: bool = False,
                     process_group=None, keys: Iterable[str] | None = None):
    """Load a flashpack file and assign its tensors into ``model`` as zero-copy views.

    Parameters become new ``nn.Parameter`` objects (``requires_grad`` kept) over the loaded memory;
    persistent buffers are replaced by the loaded tensors; non-persistent buffers keep their values.
    Parameters tied in the model (one object under several names) stay tied: every name gets the same
    new ``Parameter``, filled from whichever of the names the file stores (aliases included).

    Args:
        model: the module, on any device or on ``meta`` (built without allocating weights).
        path: the file, a sharded pack's index or a folder holding one pack (:func:`flashpack.source.read_pack`),
            or a :class:`~flashpack.format.WeightMap` (read once and reused).
        device: where the weights go; default: the device of the model's first non-meta tensor, else CPU.
        strict: raise when keys are missing or unexpected; with ``False`` warn instead, naming anything
            left on the meta device.
        backend, verify, mmap, process_group: as for :func:`load`.
        keys: assign only these keys (the rest count as missing).

    Returns:
        ``torch.nn.modules.module._IncompatibleKeys(missing_keys, unexpected_keys)``, like ``load_state_dict``.

    Raises:
        ModelMismatchError (``ValueError``): a shape or dtype differs (naming the key and both values),
            tied names hold different values in the file, or (``strict``) keys are missing/unexpected.
            Checked before the model is changed: on error the model is untouched.
        Everything :func:`load` raises.
    """
    if isinstance(path, WeightMap):
        wm = path
    else:
        where = resolve_pack_path(path)  # a folder: its one pack
        # a sharded pack: the merged map of only the shards holding ``keys``
        wm = read_pack_map(where, keys=keys, missing_ok=True) if is_index_path(where) else read_weight_map(where)
    path = wm.path
    dev = torch.device(device) if device is not None else _default_device(model)
    groups, kinds = model_targets(model)

    file_keys = set(wm.keys())
    unexpected = [k for k in wm.keys() if k not in kinds]
    if keys is not None:  # only these are assigned: every other model key counts as missing
        keys = list(dict.fromkeys([keys] if isinstance(keys, str) else keys))
        file_keys &= set(keys)
    missing = [k for k in kinds if k not in file_keys]
    # A tie whose names are partly in the file is not missing: the stored name fills all (case C03a).
    tied_ok = {k for names in groups.values() if any(n in file_keys for n in names) for k in names}
    missing = [k for k in missing if k not in tied_ok]
    if strict and (missing or unexpected):
        raise ModelMismatchError(
            f"{path} does not match {type(model).__name__}: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass strict=False to load what matches"
        )
    for k in (set(kinds) & file_keys):
        t, (_, cur) = wm.tensors[wm.aliases.get(k, k)], kinds[k]
        if tuple(cur.shape) != t.shape:
            raise ModelMismatchError(f"{path}: key {k!r}: shape {list(t.shape)} in the file, {list(cur.shape)} in the model")
        fdt = torch_dtype(t.dtype, key=k, path=path)
        if fdt != cur.dtype:
            raise ModelMismatchError(f"{path}: key {k!r}: dtype {fdt} in the file, {cur.dtype} in the model; "
                                     f"build the model with the file's dtype or repack with target_dtype")
    load_keys = [k for k in wm.keys() if k in kinds and k in file_keys]
    # The weight map checked above is the one loaded: a file replaced in between is detected, not mixed in.
    sd = load(wm, device=dev, backend=backend, keys=load_keys, verify=verify, mmap=mmap, process_group=process_group)

    sources = []  # check every tie before changing the model: on error it stays untouched
    for names in groups.values():
        present = [n for n in names if n in sd]
        if not present:
            continue
        src = sd[present[0]]
        for n in present[1:]:
            other = sd[n]
            if other is not src and not torch.equal(other, src):
                raise ModelMismatchError(
                    f"{path}: {present[0]!r} and {n!r} are tied in the model but hold different values in the file; "
                    f"untie them in the model or repack the file"
                )
        sources.append((names, src))
    used: set[int] = set()
    for i, (names, src) in enumerate(sources):
        if id(src) in used:  # tied (aliased) in the file but not in the model: give each its own memory
            src = src.clone()
            sources[i] = (names, src)
        used.add(id(src))
    for names, src in sources:
        kind, cur = kinds[names[0]]
        new = torch.nn.Parameter(src, requires_grad=cur.requires_grad) if kind == "param" else src
        for n in names:
            mod, leaf = _owner(model, n)
            if kind == "param":
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new

    if dev.type != "meta":  # non-persistent buffers built elsewhere follow the weights
        for mod in model.modules():
            for bname in list(mod._non_persistent_buffers_set):
                b = mod._buffers.get(bname)
                if b is not None and b.device.type != "meta" and b.device != dev:
                    mod._buffers[bname] = b.to(dev)
    if not strict and (missing or unexpected):
        still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
        warnings.warn(
            f"{path}: loaded with strict=False: missing keys {missing[:20]}, unexpected keys {unexpected[:20]}"
            + (f"; still on the meta device (no data): {still_meta[:20]}" if still_meta else ""),
            stacklevel=2,
        )
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


@contextlib.contextmanager
def init_empty_weights():
    """Build modules with parameters on the meta device (no memory, no random init) while buffers
    stay real, so non-persistent buffers (``position_ids = arange(n)``) keep their computed values
    (case C11). Unlike ``accelerate.init_empty_weights``, ``ACCELERATE_INIT_INCLUDE_BUFFERS`` has no
    effect here. Temporarily wraps ``nn.Module.register_parameter`` for the duration of the block.
    The ``torch.nn.init`` functions skip meta tensors inside the block: random init of a meta tensor is
    wasted work, and the first one costs seconds in torch 2.13 (it imports the compiler stack).
    """
    original = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    def skip_meta(fn):
        @functools.wraps(fn)
        def init(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
                return tensor
            return fn(tensor, *args, **kwargs)
        return init

    inits = {n: getattr(torch.nn.init, n) for n in _INIT_FUNCTIONS if hasattr(torch.nn.init, n)}
    with _patch_lock:
        torch.nn.Module.register_parameter = register_parameter
        for n, fn in inits.items():
            setattr(torch.nn.init, n, skip_meta(fn))
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original
            for n, fn in inits.items():
                setattr(torch.nn.init, n, fn)


class FlashPackMixin:
    """Adds ``save_flashpack`` and ``from_flashpack`` to an ``nn.Module`` subclass::

        class MyModule(nn.Module, FlashPackMixin): ...
        MyModule(4).save_flashpack("model.flashpack")
        m = MyModule.from_flashpack("model.flashpack", 4)
    """

    def save_flashpack(self, path: str | os.PathLike, target_dtype: torch.dtype | None = None, *,
                       metadata: dict[str, str] | None = None, max_shard_nbytes: int | str | None = None,
                       progress=None) -> int:
        """Write this module's state_dict with :func:`flashpack.pack_to_file` (atomic; sharded when
        ``max_shard_nbytes``, an int or ``"20GB"``, is given and exceeded). Returns the bytes written."""
        return pack_to_file(self, path, target_dtype, metadata=metadata, max_shard_nbytes=max_shard_nbytes,
                            progress=progress)

    @classmethod
    def from_flashpack(cls, path: str | os.PathLike, *init_args, device="cpu", strict: bool = True,
                       backend: str | None = None, verify: bool | None = None, mmap: bool = False,
                       process_group=None, **init_kwargs):
        """Build ``cls(*init_args, **init_kwargs)`` with meta parameters, fill it from ``path`` with
        :func:`flashpack.assign_from_file`, and return it in eval mode on ``device``.

        Raises:
            Everything :func:`flashpack.assign_from_file` raises; no partially loaded module is returned.
        """
        with init_empty_weights():
            module = cls(*init_args, **init_kwargs)
        assign_from_file(module, path, device=device, strict=strict, backend=backend, verify=verify, mmap=mmap,
                         process_group=process_group)
        return module.eval()


__all__ = ["FlashPackMixin", "assign_from_file", "init_empty_weights", "model_targets"]
