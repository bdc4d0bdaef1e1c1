"""Models: :func:`assign_from_file` (a pack into an ``nn.Module``, ties kept, checked before anything changes),
:func:`init_empty_weights` (build a module without allocating its weights) and :class:`FlashPackMixin`.
The module name and ``assign_from_file``'s place in it are fal's (diffusers calls ``flashpack.mixin.assign_from_file``)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import warnings
from typing import Iterable

import torch

from .deserialization import ignore_filter, load, read_weight_map
from .errors import ModelMismatchError, UsageError
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


def check_mmap_device(device, where) -> None:
    """The rule of ``mmap=True`` for models: the weights stay in a private mapping of the pack in CPU memory, so the
    target must be the CPU. Checked before any file is opened or any CUDA call is made.

    Args:
        device: the target (anything ``torch.device`` accepts, or ``None`` for the CPU).
        where: the pack or folder, named in the message.

    Raises:
        UsageError (``ValueError``): ``device`` is not the CPU; the message names ``where`` and what to pass instead.
    """
    dev = torch.device(device if device is not None else "cpu")
    if dev.type != "cpu":
        raise UsageError(
            f"{os.fspath(where)}: mmap=True keeps the weights in a private mapping of the pack in CPU memory, but the "
            f"target device is {dev}; load to the CPU (device_map='cpu') for a zero-copy load, or leave mmap=False to "
            f"load onto {dev}")


def assign_from_file(model: torch.nn.Module, path: str | os.PathLike | WeightMap, device=None,
                     strict: bool | None = None, strict_params: bool = True, strict_buffers: bool = False,
                     keep_flash_ref_on_model: bool = False, silent: bool = True, num_streams: int | None = None,
                     chunk_bytes: int | None = None, ignore_names: Iterable[str] | None = None,
                     ignore_prefixes: Iterable[str] | None = None, ignore_suffixes: Iterable[str] | None = None,
                     use_distributed_loading: bool = False, distributed_sharded: bool = False,
                     distributed_shard_strategy: str | None = None, rank: int | None = None,
                     local_rank: int | None = None, world_size: int | None = None, coerce_dtype: bool = False, *,
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
        strict: ``True``: raise when parameters or persistent buffers are missing or keys are unexpected;
            ``False``: warn instead, naming anything left on the meta device. ``None`` (default, fal's rule):
            ``strict_params`` decides for parameters, ``strict_buffers`` for buffers, and unexpected keys raise
            when either is true.
        strict_params: with ``strict=None``, raise on missing parameters (default ``True``).
        strict_buffers: with ``strict=None``, raise on missing persistent buffers (default ``False``: a
            missing buffer keeps the value the model's ``__init__`` gave it).
        keep_flash_ref_on_model: also set ``model._flash_shared_storage`` (the loaded state_dict) and
            ``model._flash_shared_storage_meta`` (the :class:`~flashpack.format.WeightMap`), as fal does.
        silent: ``False`` prints one summary line on stdout (keys assigned, elements, ignored and missing).
        num_streams, chunk_bytes: fal's performance knobs; accepted and ignored (this reader sizes its
            queue and staging from the ``FLASHPACK_*`` settings, see :mod:`flashpack.settings`).
        ignore_names, ignore_prefixes, ignore_suffixes: keys equal to / starting with / ending with one of
            these are neither loaded from the file nor counted as missing in the model.
        use_distributed_loading: load through ``torch.distributed`` (``process_group="default"``), first
            initialising the default group from ``rank``/``local_rank``/``world_size`` (or the ``RANK``,
            ``LOCAL_RANK``, ``WORLD_SIZE`` variables) when it is not yet initialised and the world is > 1.
        distributed_sharded: with distributed loading, every rank reads about 1/world_size of the file
            (``True``) or rank 0 reads it all and broadcasts (``False``, fal's default).
        distributed_shard_strategy: fal's ``"contiguous"`` or ``"windows"``; accepted, the division is this
            library's own (validated, otherwise ignored).
        rank, local_rank, world_size: for ``use_distributed_loading`` (see above).
        coerce_dtype: on a dtype difference, cast the file's tensor to the model's dtype (a copy) instead of
            raising.
        backend, verify, process_group: as for :func:`load`.
        mmap: zero-copy CPU load (:func:`load`'s ``mmap=True``): the parameters and buffers become views of a
            private copy-on-write mapping of the pack, nothing is copied up front; they are writable and writes
            never reach the file. ``device`` (or the model's device) must be the CPU. Checksums are checked (every
            chunk read once with pread before the mapping is handed out) only with ``verify=True``. Caveat: if
            the file is truncated or replaced in place while the model is alive, touching a lost page raises
            SIGBUS and kills the process (mmap(2)); keep the pack unchanged while the model uses it.
        keys: assign only these keys (the rest count as missing).

    Returns:
        ``torch.nn.modules.module._IncompatibleKeys(missing_keys, unexpected_keys)``, like ``load_state_dict``.

    Raises:
        ModelMismatchError (``ValueError``): a shape or dtype differs (naming the key and both values),
            tied names hold different values in the file, or (strict) keys are missing/unexpected.
            Checked before the model is changed: on error the model is untouched.
        ValueError: ``distributed_shard_strategy`` is not ``"contiguous"``, ``"windows"`` or ``None``.
        UsageError (``ValueError``): ``mmap=True`` with a device other than the CPU (before any file is read).
        Everything :func:`load` raises.
    """
    if distributed_shard_strategy not in (None, "contiguous", "windows"):
        raise ValueError(f"distributed_shard_strategy must be 'contiguous', 'windows' or None, "
                         f"got {distributed_shard_strategy!r}")
    dev = torch.device(device) if device is not None else _default_device(model)
    if mmap:
        check_mmap_device(dev, path.path if isinstance(path, WeightMap) else path)
    if isinstance(path, WeightMap):
        wm = path
    else:
        where = resolve_pack_path(path)  # a folder: its one pack
        # a sharded pack: the merged map of only the shards holding ``keys``
        wm = read_pack_map(where, keys=keys, missing_ok=True) if is_index_path(where) else read_weight_map(where)
    path = wm.path
    groups, kinds = model_targets(model)
    ignored = ignore_filter(ignore_names, ignore_prefixes, ignore_suffixes)
    src_rank = None
    if use_distributed_loading:
        process_group = process_group if process_group is not None else _init_distributed(rank, local_rank,
                                                                                            world_size)
        src_rank = None if distributed_sharded or process_group is None else 0

    file_keys = {k for k in wm.keys() if not ignored(k)}
    unexpected = [k for k in wm.keys() if k not in kinds and k in file_keys]
    if keys is not None:  # only these are assigned: every other model key counts as missing
        keys = list(dict.fromkeys([keys] if isinstance(keys, str) else keys))
        file_keys &= set(keys)
    missing = [k for k in kinds if k not in file_keys and not ignored(k)]
    # A tie whose names are partly in the file is not missing: the stored name fills all (case C03a).
    tied_ok = {k for names in groups.values() if any(n in file_keys for n in names) for k in names}
    missing = [k for k in missing if k not in tied_ok]
    strict_p = strict_params if strict is None else strict
    strict_b = strict_buffers if strict is None else strict
    strict_u = (strict_params or strict_buffers) if strict is None else strict
    fatal_missing = [k for k in missing if (strict_p if kinds[k][0] == "param" else strict_b)]
    if fatal_missing or (strict_u and unexpected):
        raise ModelMismatchError(
            f"{path} does not match {type(model).__name__}: missing keys {fatal_missing[:20]}"
            f"{' ...' if len(fatal_missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass strict=False to load what matches"
            + ("" if strict is not None else " (strict=None: missing buffers are allowed unless strict_buffers=True)")
        )
    coerce: set[str] = set()
    for k in (set(kinds) & file_keys):
        t, (_, cur) = wm.tensors[wm.aliases.get(k, k)], kinds[k]
        if tuple(cur.shape) != t.shape:
            raise ModelMismatchError(f"{path}: key {k!r}: shape {list(t.shape)} in the file, {list(cur.shape)} in the model")
        fdt = torch_dtype(t.dtype, key=k, path=path)
        if fdt != cur.dtype:
            if coerce_dtype:
                coerce.add(k)
                continue
            raise ModelMismatchError(f"{path}: key {k!r}: dtype {fdt} in the file, {cur.dtype} in the model; "
                                     f"build the model with the file's dtype, repack with target_dtype, "
                                     f"or pass coerce_dtype=True to cast while loading")
    load_keys = [k for k in wm.keys() if k in kinds and k in file_keys]
    # The weight map checked above is the one loaded: a file replaced in between is detected, not mixed in.
    sd = load(wm, device=dev, backend=backend, keys=load_keys, verify=verify, mmap=mmap, process_group=process_group,
              src_rank=src_rank)
    for k in coerce:  # coerce_dtype: one cast copy per differing key
        sd[k] = sd[k].to(kinds[k][1].dtype)

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
    if keep_flash_ref_on_model:
        model._flash_shared_storage = sd
        model._flash_shared_storage_meta = wm
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"] \
        if (missing or unexpected) else []
    if missing or unexpected:
        if strict is False or unexpected or still_meta:
            warnings.warn(
                f"{path}: loaded {'with strict=False' if strict is False else 'leniently'}: missing keys "
                f"{missing[:20]}, unexpected keys {unexpected[:20]}"
                + (f"; still on the meta device (no data): {still_meta[:20]}" if still_meta else ""),
                stacklevel=2,
            )
    if not silent:
        n_elems = sum(t.numel() for t in sd.values())
        print(f"flashpack: assigned {len(sd)} keys ({n_elems} elements) from {path} to {type(model).__name__} on "
              f"{dev}; {len(missing)} missing, {len(unexpected)} unexpected, "
              f"{len(wm.keys()) - len([k for k in wm.keys() if not ignored(k)])} ignored")
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def _init_distributed(rank: int | None, local_rank: int | None, world_size: int | None):
    """fal's ``use_distributed_loading``: the default process group, initialised from the arguments or the
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` variables when it is not yet; ``None`` (a plain load) for a world of 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return "default"
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    local_rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", rank))
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return None
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world_size)
    else:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    return "default"


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

    Class attributes (fal's): ``flashpack_init_method`` (name of a classmethod that builds the module instead of
    ``cls(...)``), ``flashpack_ignore_names`` / ``_prefixes`` / ``_suffixes`` (default ``ignore_*`` filters) and
    ``flashpack_coerce_dtype`` (default ``coerce_dtype``).
    """

    flashpack_init_method: str | None = None
    flashpack_ignore_names: list[str] | None = None
    flashpack_ignore_prefixes: list[str] | None = None
    flashpack_ignore_suffixes: list[str] | None = None
    flashpack_coerce_dtype: bool = False

    def save_flashpack(self, destination_path: str | os.PathLike, target_dtype: torch.dtype | None = None,
                       name_order: list[str] | None = None, align_bytes: int | None = None, silent: bool = True,
                       num_workers: int | None = None, *, metadata: dict[str, str] | None = None,
                       max_shard_nbytes: int | str | None = None, progress=None) -> int:
        """Write this module's state_dict with :func:`flashpack.pack_to_file` (atomic; arguments as there;
        sharded when ``max_shard_nbytes``, an int or ``"20GB"``, is given and exceeded).

        Returns:
            The bytes written.
        """
        return pack_to_file(self, destination_path, target_dtype, name_order, align_bytes, silent, num_workers,
                            metadata=metadata, max_shard_nbytes=max_shard_nbytes, progress=progress)

    @classmethod
    def from_flashpack(cls, path: str | os.PathLike, *init_args, device="cpu", silent: bool = True,
                       strict: bool | None = None, strict_params: bool = True, strict_buffers: bool = False,
                       keep_flash_ref_on_model: bool = False, ignore_names: list[str] | None = None,
                       ignore_prefixes: list[str] | None = None, ignore_suffixes: list[str] | None = None,
                       num_streams: int | None = None, chunk_bytes: int | None = None,
                       use_distributed_loading: bool = False, distributed_sharded: bool = False,
                       distributed_shard_strategy: str | None = None, rank: int | None = None,
                       local_rank: int | None = None, world_size: int | None = None, coerce_dtype: bool = False,
                       init_fn=None, backend: str | None = None, verify: bool | None = None, mmap: bool = False,
                       process_group=None, **init_kwargs):
        """Build the module with meta parameters (real buffers), fill it from ``path`` with
        :func:`flashpack.assign_from_file`, and return it in eval mode on ``device``.

        Args:
            path: the pack.
            *init_args, **init_kwargs: for the constructor: ``init_fn``, else the classmethod named by
                ``flashpack_init_method``, else ``cls``. Keywords the constructor does not take (and it has no
                ``**kwargs``) are dropped with a warning naming them, as fal drops them; ``rank``,
                ``local_rank`` and ``world_size`` are also passed to a constructor that takes them.
            device: where the weights go (``None`` means CPU, fal's default).
            init_fn: a callable that builds the module (fal's).
            mmap: zero-copy CPU load: the parameters are views of a private copy-on-write mapping of the pack
                (writable, writes never reach the file; checksums only with ``verify=True``). ``device`` must be
                the CPU. SIGBUS caveat as for :func:`flashpack.assign_from_file`: keep the pack unchanged while
                the module lives.
            Everything else: as for :func:`flashpack.assign_from_file`; the ``ignore_*`` and ``coerce_dtype``
                defaults come from the class attributes.

        Raises:
            UsageError (``ValueError``): ``mmap=True`` with a device other than the CPU (before the module is built).
            Everything :func:`flashpack.assign_from_file` raises; no partially loaded module is returned.
        """
        if mmap:
            check_mmap_device(device, path)
        if init_fn is None:
            init_fn = getattr(cls, cls.flashpack_init_method) if cls.flashpack_init_method else cls
        try:
            params = inspect.signature(init_fn).parameters
        except (TypeError, ValueError):
            params = None
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            dropped = sorted(k for k in init_kwargs if k not in params)
            if dropped:
                warnings.warn(f"{cls.__name__}.from_flashpack: {getattr(init_fn, '__qualname__', init_fn)} takes no "
                              f"keyword(s) {dropped}; dropped", stacklevel=2)
            init_kwargs = {k: v for k, v in init_kwargs.items() if k in params}
            for name, value in (("rank", rank), ("local_rank", local_rank), ("world_size", world_size)):
                if name in params and name not in init_kwargs:
                    init_kwargs[name] = value
        with init_empty_weights():
            module = init_fn(*init_args, **init_kwargs)
        assign_from_file(module, path, "cpu" if device is None else device, strict, strict_params, strict_buffers,
                         keep_flash_ref_on_model, silent, num_streams, chunk_bytes,
                         ignore_names or cls.flashpack_ignore_names, ignore_prefixes or cls.flashpack_ignore_prefixes,
                         ignore_suffixes or cls.flashpack_ignore_suffixes, use_distributed_loading,
                         distributed_sharded, distributed_shard_strategy, rank, local_rank, world_size,
                         coerce_dtype or cls.flashpack_coerce_dtype, backend=backend, verify=verify, mmap=mmap,
                         process_group=process_group)
        return module.eval()


__all__ = ["FlashPackMixin", "assign_from_file", "check_mmap_device", "ignore_filter", "init_empty_weights",
           "model_targets"]
