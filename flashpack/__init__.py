"""flashpack: load PyTorch weights at the speed of the disk and the PCIe bus.

Public API (names kept from fal's flashpack): :func:`pack_to_file`, :func:`load`,
:func:`assign_from_file`, :class:`FlashPackMixin`; plus :func:`verify`, :func:`read_weight_map`,
:func:`backends`; lazy reads: :func:`safe_open` (the surface of ``safetensors.safe_open``, with row
slices) and :func:`iter_tensors` (a bounded-memory stream). The file format is specified in docs/FORMAT.md.

fal's public names are here too: :func:`is_flashpack_file`, :func:`get_flashpack_file_metadata`,
:func:`read_flashpack_file_distributed`, :func:`patch_integrations`, ``version``/``version_tuple``/``commit_id``.

Names and submodules are imported on first use (a module-level ``__getattr__``, PEP 562), so ``import flashpack``
and ``flashpack --help`` do not pay for importing torch; ``from flashpack import load`` works as usual, and so
does ``flashpack.serialization.pack_to_file(...)`` right after ``import flashpack`` (diffusers calls it so).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__version_tuple__ = version_tuple = tuple(int(p) for p in __version__.split("."))
version = __version__
__commit_id__ = commit_id = None  # fal's name; this package records no commit

#: submodules reachable as attributes right after ``import flashpack`` (imported on first use)
_SUBMODULES = frozenset({"atomic", "commands", "deserialization", "errors", "format", "integrations", "io", "loading",
                         "mixin", "plan", "serialization", "settings", "source", "staging", "testing", "tools"})

#: public name -> submodule that defines it
_LAZY: dict[str, str] = {
    **dict.fromkeys(["LoadStats", "VerifyReport", "get_flashpack_file_metadata", "is_flashpack_file", "load",
                     "read_flashpack_file_distributed", "read_weight_map", "verify"], ".deserialization"),
    **dict.fromkeys(["BackendUnavailableError", "ChecksumMismatchError", "DtypeError", "FlashPackError",
                     "FormatError", "ModelMismatchError", "NotAFlashPackError", "ReadError"], ".errors"),
    "backends": ".io",
    "FlashPackMixin": ".mixin",
    "assign_from_file": ".deserialization",
    "init_empty_weights": ".mixin",
    "iter_tensors": ".lazy",
    "safe_open": ".lazy",
    "pack_to_file": ".serialization",
    "patch_integrations": ".integrations",
}

__all__ = sorted([*_LAZY, "__version__", "__version_tuple__", "version", "version_tuple"])  # + commit_id (None)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it as an attribute here
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'flashpack' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


if TYPE_CHECKING:  # static checkers and IDEs see the eager imports
    from . import (atomic, commands, deserialization, errors, format, integrations, io, loading, mixin, plan,
                   serialization, settings, source, staging, testing, tools)
    from .deserialization import (LoadStats, VerifyReport, assign_from_file, get_flashpack_file_metadata,
                                  is_flashpack_file, load, read_flashpack_file_distributed, read_weight_map, verify)
    from .integrations import patch_integrations
    from .errors import (
        BackendUnavailableError,
        ChecksumMismatchError,
        DtypeError,
        FlashPackError,
        FormatError,
        ModelMismatchError,
        NotAFlashPackError,
        ReadError,
    )
    from .io import backends
    from .lazy import iter_tensors, safe_open
    from .mixin import FlashPackMixin, init_empty_weights
    from .serialization import pack_to_file
