"""The source of a load: open a pack, read and validate its weight map through one descriptor, and the
file identity that every later payload read is checked against.

Stage 2 of the pipeline (after :mod:`flashpack.format`): it does I/O on the header and the weight map only;
it knows nothing about tensors, readers or devices.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import NotAFlashPackError, ReadError, short_read_error
from .format import FAL_MAGIC, MAGIC, WeightMap, decode_fal_footer, decode_header, decode_weight_map


def _pread_exact(fd: int, nbytes: int, offset: int, path: str) -> bytes:
    out = bytearray()
    while len(out) < nbytes:
        chunk = os.pread(fd, nbytes - len(out), offset + len(out))
        if not chunk:
            raise short_read_error(path, offset, nbytes, len(out))
        out += chunk
    return bytes(out)


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
    payload reads can check they read the same file (:func:`check_same_file`)."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a flashpack file", path)
    wm = _read_weight_map_fd(fd, path, st.st_size)
    wm.file_id = file_identity(st)
    return wm


def _read_weight_map_fd(fd: int, path: str, size: int) -> WeightMap:
    head = _pread_exact(fd, min(size, 64), 0, path)
    if head[:8] == MAGIC:
        header = decode_header(head, path, size)
        index = _pread_exact(fd, header.index_nbytes, header.index_offset, path)
        return decode_weight_map(header, index, path)
    if size >= 16:
        tail = _pread_exact(fd, 16, size - 16, path)
        if tail[8:] == FAL_MAGIC:
            footer_nbytes = int.from_bytes(tail[:8], "little")
            footer_offset = size - 16 - footer_nbytes
            if footer_offset < 0:
                raise NotAFlashPackError(f"{path}: fal flashpack footer length {footer_nbytes} exceeds the file size {size}")
            footer = _pread_exact(fd, footer_nbytes, footer_offset, path)
            return decode_fal_footer(footer, path, size, footer_offset)
    return decode_header(head, path, size)  # raises NotAFlashPackError / HeaderError


def read_weight_map(path: str | os.PathLike) -> WeightMap:
    """Read and validate only the weight map of a flashpack file (or a fal flashpack file).

    Reads the 4096-byte header and the weight map, whatever the file size; checks invariants I1-I14.

    Raises:
        FormatError subclasses (also ``ValueError``) naming the file and what is wrong; ``OSError``.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_weight_map_fd(fd, path)
    finally:
        os.close(fd)


__all__ = ["check_identity", "check_same_file", "file_identity", "read_weight_map", "read_weight_map_fd"]
