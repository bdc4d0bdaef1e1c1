"""Models: :func:`init_empty_weights` (build a module without allocating its weights) and :class:`FlashPackMixin`.
:func:`assign_from_file` (a pack into an ``nn.Module``, ties kept, checked before anything changes) is defined in
:mod:`flashpack.deserialization`, as in fal's flashpack, and re-exported here under fal's other import path
(diffusers calls ``flashpack.mixin.assign_from_file``)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import warnings

import torch

from .deserialization import assign_from_file, check_mmap_device, ignore_filter, model_targets, start_early_load
from .serialization import pack_to_file
from .source import read_pack_map

_patch_lock = threading.RLock()
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


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
        :func:`flashpack.assign_from_file`, and return it in eval mode on ``device``. The weight map is read first;
        for a CPU target the pack's bytes are then read while the module is built
        (:func:`flashpack.deserialization.start_early_load`), and a failing constructor cancels that read.

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
        device = "cpu" if device is None else device
        ignore_names = ignore_names or cls.flashpack_ignore_names
        ignore_prefixes = ignore_prefixes or cls.flashpack_ignore_prefixes
        ignore_suffixes = ignore_suffixes or cls.flashpack_ignore_suffixes
        wm = read_pack_map(path, missing_ok=True)  # read once; the pack's bytes are read while the module is built
        with start_early_load(wm, device, backend=backend, verify=verify, mmap=mmap, process_group=process_group,
                              use_distributed_loading=use_distributed_loading, ignore_names=ignore_names,
                              ignore_prefixes=ignore_prefixes, ignore_suffixes=ignore_suffixes) as early:
            with init_empty_weights():
                module = init_fn(*init_args, **init_kwargs)
            assign_from_file(module, wm, device, strict, strict_params, strict_buffers,
                             keep_flash_ref_on_model, silent, num_streams, chunk_bytes, ignore_names, ignore_prefixes,
                             ignore_suffixes, use_distributed_loading, distributed_sharded, distributed_shard_strategy,
                             rank, local_rank, world_size, coerce_dtype or cls.flashpack_coerce_dtype, backend=backend,
                             verify=verify, mmap=mmap, process_group=process_group, early=early)
        return module.eval()


__all__ = ["FlashPackMixin", "assign_from_file", "check_mmap_device", "ignore_filter", "init_empty_weights",
           "model_targets"]
