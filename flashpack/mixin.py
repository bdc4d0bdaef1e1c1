"""``FlashPackMixin`` for ``nn.Module`` subclasses, and building a module without allocating its weights."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from .deserialization import assign_from_file  # noqa: F401  (fal's flashpack exports it here; diffusers calls it)

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
    """

    def save_flashpack(self, path: str | os.PathLike, target_dtype: torch.dtype | None = None, *,
                       metadata: dict[str, str] | None = None) -> int:
        """Write this module's state_dict with :func:`flashpack.pack_to_file` (atomic). Returns the file size in bytes."""
        from .serialization import pack_to_file

        return pack_to_file(self, path, target_dtype, metadata=metadata)

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
