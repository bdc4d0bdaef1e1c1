"""The exception hierarchy.

Every error flashpack raises derives from :class:`FlashPackError`, and each subclass is also the
builtin a caller would naturally catch: format problems are :class:`ValueError`, I/O problems are
:class:`OSError` (keeping ``errno``), an unavailable backend is :class:`RuntimeError`. Messages name
the file and the key or byte offset involved, and say what to do next.
"""

from __future__ import annotations

import errno as _errno
import os


class FlashPackError(Exception):
    """Base class of every error raised by flashpack."""


# --------------------------------------------------------------------------- format errors


class FormatError(FlashPackError, ValueError):
    """The file breaks an invariant of the format (see docs/FORMAT.md)."""


class NotAFlashPackError(FormatError):
    """The file does not start with the flashpack magic and has no fal flashpack footer (I1)."""


class HeaderError(FormatError):
    """The 4096-byte header is damaged or inconsistent (I2, I3)."""


class UnsupportedVersionError(FormatError):
    """The header or weight map names a format version this reader does not know (I4)."""


class TruncatedFileError(FormatError):
    """The file is shorter than its header says (I5)."""


class TrailingBytesError(FormatError):
    """The file is longer than its header says (I5)."""


class WeightMapError(FormatError):
    """The weight map is damaged: bad checksum, bad UTF-8/JSON, missing or ill-typed fields (I6, I7)."""


class DtypeError(FormatError):
    """A dtype name is unknown, or this torch build lacks it (I9)."""


class LayoutError(FormatError):
    """Offsets, sizes or shapes in the weight map are out of range, misaligned or overlapping (I8, I10-I14)."""


class ChecksumMismatchError(FormatError):
    """A payload chunk's checksum does not match the weight map (I15)."""


class SettingsError(FlashPackError, ValueError):
    """A ``FLASHPACK_*`` environment variable holds a value of the wrong form; the message names it."""


# --------------------------------------------------------------------------- model errors


class ModelMismatchError(FlashPackError, ValueError):
    """The file does not fit the model: a shape, dtype, missing/unexpected key or conflicting tie."""


# --------------------------------------------------------------------------- I/O and backends


class ReadError(FlashPackError, OSError):
    """A read failed or came back short. ``errno``, ``filename`` and ``strerror`` are set."""

    def __init__(self, err: int, message: str, filename: str | os.PathLike | None = None):
        OSError.__init__(self, err, message, None if filename is None else os.fspath(filename))


class NotARegularFileError(FlashPackError, OSError):
    """The path names a FIFO, socket, character or block device (anything but a regular file or a folder).

    Raised before any byte is read, so a FIFO without a writer cannot hang a load. ``errno`` is ``EINVAL``,
    ``filename`` the path; the message says what kind of file it is.
    """

    def __init__(self, message: str, filename: str | os.PathLike):
        OSError.__init__(self, _errno.EINVAL, message, os.fspath(filename))


class WriteError(FlashPackError, OSError):
    """Writing a destination failed (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EIO``...). ``errno`` is kept,
    ``filename`` is the destination; the old destination, if any, is intact."""

    def __init__(self, err: int, message: str, filename: str | os.PathLike):
        OSError.__init__(self, err, message, os.fspath(filename))


class BackendUnavailableError(FlashPackError, RuntimeError):
    """A reader backend that was asked for by name cannot run here; the message says why and how to fix it."""


class DistributedLoadError(FlashPackError, RuntimeError):
    """A distributed load failed on at least one rank; every rank of the group raises this same error.

    Attributes:
        failures: group rank -> ``"ExceptionType: message"`` for every rank that failed.
        stage: what the ranks were doing (``"opening and validating the file"``, ...).
    """

    def __init__(self, message: str, failures: dict[int, str], stage: str):
        super().__init__(message)
        self.failures = dict(failures)
        self.stage = stage


class UnsupportedDeviceMapError(FlashPackError, NotImplementedError):
    """A ``device_map`` that spreads one model over several devices (not supported yet)."""


class ModelNotFoundError(FlashPackError, FileNotFoundError):
    """A local folder, a cached Hub snapshot or the pack inside a folder does not exist; the message says which
    and what to do next."""


class HubPushError(FlashPackError, OSError):
    """Pushing a saved folder to the Hugging Face Hub failed (network, permissions, quota); the message names
    the folder, the repo and the step, the hub's error is chained; the folder itself is intact."""


class UsageError(FlashPackError, ValueError):
    """Unusable input or arguments (the command line exits with status 2). The message names the file
    or argument and what to do."""


class ShardIndexError(FormatError):
    """A sharded pack's index (``NAME.flashpack.index.json``) breaks an invariant of docs/FORMAT.md
    ("Sharded packs"): not JSON, a missing field, a shard name with a path in it, a key mapped to no shard."""


class ShardMismatchError(FormatError):
    """A shard is not the one its index lists: its weight map checksum or its keys differ (shards from two
    saves mixed in one folder). Save the pack again or copy the whole set."""


class ShardMissingError(FlashPackError, FileNotFoundError):
    """A shard its index lists is not in the index's folder; the message names the shard and the index."""


def short_read_error(path: str | os.PathLike, file_offset: int, expected: int, got: int) -> ReadError:
    """The error for a read that returned fewer bytes than the file should hold (cases C18, C30)."""
    return ReadError(
        _errno.EIO,
        f"short read at byte offset {file_offset}: expected {expected} bytes, got {got} "
        f"(was the file truncated or replaced while loading?)",
        path,
    )
