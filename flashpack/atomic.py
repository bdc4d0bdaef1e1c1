"""Atomic file replacement: write a temporary file in the destination folder, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never a mix; on any error the temporary file is removed and
an existing destination is untouched. The new file's mode follows the umask (``mkstemp`` would give 0600).
See rename(2): the rename is atomic within one file system, which is why the temporary file lives in the
destination's own folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_folder(folder: str) -> None:
    """fsync(2) a folder so a rename in it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on a clean exit fsync it and rename it onto ``path``.

    The body writes the temporary path (by name: ``torch.save``, ``safetensors.save_file``, ``open``).

    Raises:
        OSError: the folder is missing or not writable; whatever the body raises (the temporary file is removed).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not path or os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "destination is a folder; give a file name", path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "the destination's folder does not exist; create it first", path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)
