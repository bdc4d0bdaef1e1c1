"""Atomic file replacement: write a temporary file in the destination folder, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never a mix; on any error the temporary file is removed and
an existing destination is untouched. The new file's mode follows the umask (``mkstemp`` would give 0600).
See rename(2): the rename is atomic within one file system, which is why the temporary file lives in the
destination's own folder.

Temporary files are named ``.<destination name>.fpk-<8 random characters>.tmp`` and their writer holds an
exclusive ``flock(2)`` on them for as long as it writes. A writer killed with SIGKILL cannot remove its
temporary file, but the kernel drops its lock; so every save first removes, in its destination folder,
the temporary files of that naming pattern (regular files owned by this user) whose lock it can take.
A live writer's file is never removed (its lock is held), and no other file is ever touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import tempfile
from typing import Iterator

from .errors import FlashPackError, WriteError

#: ``.<name>.fpk-<8 characters of tempfile's alphabet>.tmp``: the names :func:`atomic_path` creates.
TEMP_NAME = re.compile(r"\..+\.fpk-[a-z0-9_]{8}\.tmp")
#: errno values that mean "the destination could not be written" (reported as :class:`WriteError`).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


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


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove the temporary files of dead writers in ``folder``: names matching :data:`TEMP_NAME`,
    regular files (not symlinks) owned by this user, whose exclusive ``flock`` can be taken now.

    Returns:
        The paths removed. Errors (a file that vanished, a folder that cannot be listed) are ignored:
        this is housekeeping and never fails a save.
    """
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(folder) if TEMP_NAME.fullmatch(n)]
    except OSError:
        return removed
    uid = os.geteuid()
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # still the file we locked
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _locked_temp(folder: str, base: str) -> tuple[int, str]:
    """Create ``.<base>.fpk-XXXXXXXX.tmp`` in ``folder`` and take its exclusive flock. A cleaner may take the
    lock of a just-created file before its writer does and remove it; the writer sees its file unlinked
    (or replaced) and makes another."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.fpk-", suffix=".tmp", dir=folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.lstat(tmp)
            except FileNotFoundError:
                now = None
            if st.st_nlink > 0 and now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return fd, tmp
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on a clean exit fsync it and rename it onto ``path``.

    The body writes the temporary path (by name: ``torch.save``, ``safetensors.save_file``, ``open``).
    While it does, this process holds an exclusive ``flock`` on the temporary file; temporary files of
    writers that died (their lock is free) are removed from the folder first
    (:func:`remove_stale_temp_files`).

    Raises:
        OSError: the folder is missing or not writable. WriteError (an ``OSError``): writing, syncing or
        renaming failed with ``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EIO`` or ``EROFS`` (or torch.save reported
        a failed write); the message names the destination, whose old content is intact. Whatever else
        the body raises (the temporary file is removed).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not path or os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "destination is a folder; give a file name", path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "the destination's folder does not exist; create it first", path)
    remove_stale_temp_files(folder)
    lock_fd, tmp = _locked_temp(folder, os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(lock_fd)
        err = _write_error(e, path)
        if err is not None:
            raise err from e
        raise
    os.close(lock_fd)
    fsync_folder(folder)


def _write_error(e: BaseException, path: str) -> WriteError | None:
    if isinstance(e, FlashPackError):
        return None
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return WriteError(e.errno, f"writing {path} failed: {e.strerror or e} (nothing was written over "
                                   f"{path}; free space or fix the disk, then try again)", path)
    text = str(e)
    if "No space left on device" in text or "os error 28" in text:  # safetensors' Rust I/O errors
        return WriteError(errno.ENOSPC, f"writing {path} failed: no space left on device (nothing was written "
                                        f"over {path}; free space, then try again)", path)
    if isinstance(e, RuntimeError) and "file write failed" in text:  # torch.save's PytorchStreamWriter
        return WriteError(errno.EIO, f"writing {path} failed: torch.save could not write the file (is the disk "
                                     f"full?) (nothing was written over {path})", path)
    return None
