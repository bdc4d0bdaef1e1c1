"""flashpack: load PyTorch weights at the speed of the disk and the PCIe bus.

Public API (names kept from fal's flashpack): :func:`pack_to_file`, :func:`load`,
:func:`assign_from_file`, :class:`FlashPackMixin`; plus :func:`verify`, :func:`read_weight_map`,
:func:`backends`. The file format is specified in docs/FORMAT.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .deserialization import LoadStats, VerifyReport, assign_from_file, load, read_weight_map, verify
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
from .mixin import FlashPackMixin, init_empty_weights
from .serialization import pack_to_file

__all__ = [
    "BackendUnavailableError", "ChecksumMismatchError", "DtypeError", "FlashPackError", "FlashPackMixin",
    "FormatError", "LoadStats", "ModelMismatchError", "NotAFlashPackError", "ReadError", "VerifyReport",
    "assign_from_file", "backends", "init_empty_weights", "load", "pack_to_file", "read_weight_map", "verify",
]
