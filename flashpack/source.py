"""The source of a load: open a pack, read and validate its weight map through one descriptor, and the
file identity that every later payload read is checked against.

Stage 2 of the pipeline (after :mod:`flashpack.format`): it does I/O on the header and the weight map only;
it knows nothing about tensors, readers or devices.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .errors import NotAFlashPackError, NotARegularFileError, ReadError, WeightMapError, short_read_error
from .format import (
    FAL_MAGIC,
    HEADER_NBYTES,
    MAGIC,
    MAX_INDEX_NBYTES,
    WeightMap,
    decode_fal_footer,
    decode_header,
    decode_weight_map,
)

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_regular(st: os.stat_result, path: str) -> None:
    """Raise unless ``st`` describes a regular file.

    Raises:
        IsADirectoryError: a folder. NotARegularFileError: a FIFO, socket or device (or anything else).
    """
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a flashpack file", path)
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise NotARegularFileError(f"{path}: not a regular file ({kind}); flashpack reads regular files only", path)


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking and return ``(fd, fstat)`` once it is known to be a
    regular file. ``O_NONBLOCK`` keeps a FIFO without a writer from hanging ``open(2)``; it is cleared
    again before returning, so reads behave as usual. ``O_NOCTTY`` keeps a terminal device from becoming
    the controlling terminal. The caller closes the descriptor.

    Raises:
        FileNotFoundError, PermissionError and other ``OSError`` from ``open(2)``; IsADirectoryError (a
        folder); NotARegularFileError (a FIFO, socket or device), before any byte is read.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        check_regular(st, path)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _pread_exact(fd: int, nbytes: int, offset: int, path: str) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` into one buffer allocated up front (no intermediate copies).

    Raises:
        ReadError naming the file, offset and length: the read failed (``EIO``...) or came back short.
    """
    out = bytearray(nbytes)
    view = memoryview(out)
    done = 0
    try:
        while done < nbytes:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
            except OSError as e:
                raise ReadError(e.errno or errno.EIO, f"read of {nbytes - done} bytes at byte offset {offset + done} "
                                f"failed: {e.strerror or e}", path) from e
            if n == 0:
                raise short_read_error(path, offset, nbytes, done)
            done += n
    finally:
        view.release()
    return out


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns): changes when the file is replaced or rewritten."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_identity(fd: int, expect: tuple[int, int, int, int], path: str) -> None:
    """Raise unless the open descriptor ``fd`` is the file whose :func:`file_identity` was ``expect``.

    Raises:
        ReadError (``ESTALE``): the file was replaced, truncated or rewritten since ``expect`` was taken.
    """
    now = file_identity(os.fstat(fd))
    if now != tuple(expect):
        raise ReadError(errno.ESTALE, f"the file was replaced, truncated or rewritten while it was being loaded "
                                      f"({expect[2]} bytes when its weight map was read, {now[2]} bytes now; "
                                      f"its weight map and payload would not match); load it again", path)


def check_same_file(wm: WeightMap, fd: int) -> None:
    """Raise unless ``fd`` is the file (same inode, size and mtime) whose weight map ``wm`` is.

    Raises:
        ReadError (``ESTALE``): the file was replaced or rewritten since its weight map was read.
    """
    if wm.file_id is not None:
        check_identity(fd, wm.file_id, wm.path)


def read_weight_map_fd(fd: int, path: str) -> WeightMap:
    """Read and validate the weight map through an open descriptor, recording the file's identity so the
    payload reads can check they read the same file (:func:`check_same_file`).

    Every length the file states (``index_nbytes``, a fal footer's length) is checked against its limit
    (:data:`~flashpack.format.MAX_INDEX_NBYTES`) and against the file's size before anything is read,
    and is read into one preallocated buffer: a small (or sparse) hostile file cannot make this allocate
    more than the limit.

    Raises:
        IsADirectoryError; NotARegularFileError (FIFO, socket, device); ReadError (a failed or short read,
        naming file and offset); FormatError subclasses for the invariants I1-I14.
    """
    st = os.fstat(fd)
    check_regular(st, path)
    wm = _read_weight_map_fd(fd, path, st.st_size)
    wm.file_id = file_identity(st)
    return wm


def _read_weight_map_fd(fd: int, path: str, size: int) -> WeightMap:
    head = _pread_exact(fd, min(size, HEADER_NBYTES), 0, path)
    if head[:8] == MAGIC:
        header = decode_header(head, path, size)  # checks index_nbytes against the limit and the size
        index = _pread_exact(fd, header.index_nbytes, header.index_offset, path)
        return decode_weight_map(header, index, path)
    if size >= 16:
        tail = _pread_exact(fd, 16, size - 16, path)
        if tail[8:] == FAL_MAGIC:
            footer_nbytes = int.from_bytes(tail[:8], "little")
            footer_offset = size - 16 - footer_nbytes
            if footer_offset < 0:
                raise NotAFlashPackError(f"{path}: fal flashpack footer length {footer_nbytes} exceeds the file size "
                                         f"{size} (the length is the 8 bytes at byte {size - 16})")
            if footer_nbytes > MAX_INDEX_NBYTES:
                raise WeightMapError(f"{path}: fal flashpack footer of {footer_nbytes} bytes at byte {footer_offset} "
                                     f"exceeds the {MAX_INDEX_NBYTES}-byte limit; the file is damaged or hostile "
                                     f"(nothing was read)")
            footer = _pread_exact(fd, footer_nbytes, footer_offset, path)
            return decode_fal_footer(footer, path, size, footer_offset)
    return decode_header(head, path, size)  # raises NotAFlashPackError / HeaderError


def read_weight_map(path: str | os.PathLike) -> WeightMap:
    """Read and validate only the weight map of a flashpack file (or a fal flashpack file).

    Reads the 4096-byte header and the weight map, whatever the file size; checks invariants I1-I14.
    The file is opened with :func:`open_regular`, so a FIFO, socket or device fails at once instead of
    hanging.

    Raises:
        FormatError subclasses (also ``ValueError``) naming the file and what is wrong;
        NotARegularFileError; ReadError (naming file and byte offset); ``OSError`` from opening the file.
    """
    path = os.fspath(path)
    fd, _ = open_regular(path)
    try:
        return read_weight_map_fd(fd, path)
    finally:
        os.close(fd)


__all__ = ["check_identity", "check_regular", "check_same_file", "file_identity", "open_regular", "read_weight_map",
           "read_weight_map_fd"]
