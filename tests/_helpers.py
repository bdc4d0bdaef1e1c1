"""Helpers shared by several test modules (no fixtures here: those live in conftest.py).

Test modules import these as ``from _helpers import ...`` (pytest puts ``tests/`` on ``sys.path`` through
``conftest.py``); no test module imports another test module.

- crafting damaged packs: ``read_parts``, ``rewrite_weight_map``, ``rewrite_header``, ``flip_byte``,
  ``file_bytes``, ``file_size``. Each rewrites a valid pack so that exactly one invariant of docs/FORMAT.md
  is broken: ``rewrite_weight_map`` re-encodes a modified weight map and fixes the header's sizes and
  digests, ``rewrite_header`` re-encodes header fields with a valid header checksum.
- position-dependent bytes (a misplaced or stale page never matches): ``position_bytes``, ``raw``;
  and for raw reader tests ``pattern_bytes``, ``make_file``, ``aligned``, ``split``.
- ``CUDA``: the ``cuda`` marker plus a skip with the reason where torch has no usable CUDA device.
- the Hub: ``FakeHub`` (``HfApi.create_repo`` / ``HfApi.upload_folder``, and with a store a filtering
  ``snapshot_download`` serving what was pushed), ``files_under`` (a folder's files, relative).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch
import xxhash

from flashpack import format as fmt
from flashpack.io import Extent

PAGE = 4096

HAS_CUDA = torch.cuda.is_available()
CUDA_REASON = f"torch {torch.__version__} has no usable CUDA device (torch.cuda.is_available() is False)"


def cuda(fn):
    """Mark a test ``cuda`` and skip it, with the reason, where torch has no usable CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)(fn))


# --------------------------------------------------------------------------- crafting damaged packs


def read_parts(path) -> tuple[fmt.Header, bytes, dict[str, Any]]:
    """(header, payload bytes [4096, index_offset), weight map as a dict) of a valid pack."""
    with open(path, "rb") as f:
        data = f.read()
    header = fmt.decode_header(data[:64], str(path), len(data))
    doc = json.loads(data[header.index_offset:header.file_nbytes].decode("utf-8"))
    return header, data[fmt.HEADER_NBYTES:header.index_offset], doc


def rewrite_weight_map(path, mutate: Callable[[dict], Any], *, payload: bytes | None = None) -> dict:
    """Rewrite a pack's weight map: ``mutate(doc)`` edits the dict in place (returning None), or returns a
    new object to encode as JSON, or returns ``bytes`` to store verbatim. The header's index offset,
    sizes and both digests are re-encoded, so only what ``mutate`` changed is wrong. ``payload`` replaces
    the payload bytes between the header and the weight map. Returns the resulting doc (or None)."""
    _, old_payload, doc = read_parts(path)
    res = mutate(doc)
    if isinstance(res, (bytes, bytearray)):
        index = bytes(res)
    else:
        doc = doc if res is None else res
        index = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = old_payload if payload is None else payload
    index_offset = fmt.HEADER_NBYTES + len(body)
    file_nbytes = index_offset + len(index)
    header = fmt.encode_header(file_nbytes, index_offset, len(index), xxhash.xxh3_64_intdigest(index))
    with open(path, "wb") as f:
        f.write(header + body + index)
    return doc


HEADER_FIELDS = ("magic", "version", "header_nbytes", "file_nbytes", "index_offset", "index_nbytes", "index_digest")


def rewrite_header(path, **fields) -> None:
    """Overwrite named header fields (see ``HEADER_FIELDS``) and recompute the header checksum."""
    with open(path, "r+b") as f:
        head = f.read(fmt._HEADER.size)
        values = dict(zip(HEADER_FIELDS, fmt._HEADER.unpack(head)[:-1]))
        unknown = set(fields) - set(values)
        assert not unknown, unknown
        values.update(fields)
        hashed = fmt._HEADER.pack(*values.values(), 0)[:fmt._HEADER_HASHED]
        f.seek(0)
        f.write(hashed + struct.pack("<Q", xxhash.xxh3_64_intdigest(hashed)))


def flip_byte(path, offset: int) -> None:
    """XOR one byte of the file with 0xFF."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_size(path) -> int:
    return os.stat(path).st_size


# --------------------------------------------------------------------------- position-dependent bytes


def position_bytes(nbytes: int, seed: int = 0) -> torch.Tensor:
    """``nbytes`` bytes where byte i is a hash of (i, seed): a misplaced or stale page never matches."""
    i = torch.arange(nbytes // 4 + 1, dtype=torch.int64)
    words = ((i * 2654435761 + seed * 97 + 12345) ^ (i >> 3)) % (1 << 32)
    return words.to(torch.int32).view(torch.uint8)[:nbytes].clone()


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes in logical row-major order (from any device); b"" for an empty one."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def pattern_bytes(file_offset: int, nbytes: int) -> np.ndarray:
    """Bytes that depend on their file offset and are never zero."""
    i = np.arange(file_offset, file_offset + nbytes, dtype=np.uint64)
    return (((i * np.uint64(0x9E3779B1)) >> np.uint64(13)) % np.uint64(251) + np.uint64(1)).astype(np.uint8)


def make_file(path, nbytes: int) -> np.ndarray:
    """Write ``pattern_bytes(0, nbytes)`` to ``path`` and return them."""
    data = pattern_bytes(0, nbytes)
    data.tofile(str(path))
    return data


def aligned(nbytes: int, misalign: int = 0) -> np.ndarray:
    """A zeroed uint8 array whose first byte is ``misalign`` bytes past a 4096-byte boundary."""
    buf = np.zeros(nbytes + 2 * PAGE, dtype=np.uint8)
    start = (-buf.ctypes.data) % PAGE + misalign
    return buf[start:start + nbytes]


def split(nbytes: int, extent_nbytes: int, buf: np.ndarray, file_offset: int = 0) -> list[Extent]:
    """``buf`` cut into extents of ``extent_nbytes`` bytes (tag = offset in ``buf``)."""
    mv = memoryview(buf)
    return [Extent(file_offset + o, min(extent_nbytes, nbytes - o), mv[o:o + min(extent_nbytes, nbytes - o)], tag=o)
            for o in range(0, nbytes, extent_nbytes)]


# --------------------------------------------------------------------------- readers: descriptors, threads, faults

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_names() -> list[str]:
    """Threads of this process, except io_uring's kernel workers (iou-wrk-*), which exit on their own."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if not name.startswith("iou-"):
            names.append(name)
    return sorted(names)


def no_more_threads_than(baseline: list[str], timeout_s: float = 5.0) -> list[str]:
    """task_names(), polled until it holds no more threads than ``baseline`` or ``timeout_s`` passes: a
    joined thread's /proc entry can outlive its join for a moment while the kernel tears it down."""
    deadline = time.monotonic() + timeout_s
    names = task_names()
    while len(names) > len(baseline) and time.monotonic() < deadline:
        time.sleep(0.02)
        names = task_names()
    return names


@functools.lru_cache(maxsize=None)
def fault_build():
    """The shim built with ``-DFP_TESTING`` (fault injection) into a temporary directory, once per
    session; skips the calling test when it cannot be built here."""
    spec = importlib.util.spec_from_file_location("build_uring_for_tests", os.path.join(_REPO, "native", "build_uring.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if not build.can_build():
        return None
    return build.build_testing_module(tempfile.mkdtemp(prefix="fp_uring_testing_"))


def uring_faults(monkeypatch, **fault) -> object:
    """Make every uring reader opened from now on use the test build with ``struct fp_fault`` = ``fault``
    (fields of native/fp_uring.h; unset ones mean "no fault"). Returns the test build's module."""
    from flashpack.io import uring

    mod = fault_build()
    if mod is None:
        pytest.skip("the -DFP_TESTING build of the io_uring shim cannot be compiled here")
    fields = {"direct_max_nbytes": -1, "err_offset": -1, "eof_offset": -1, **fault}
    real_setup = uring.setup_ring

    def setup_with_fault(depth):
        ring, flags = real_setup(depth)
        mod.lib.fp_ring_set_fault(ring, mod.ffi.new("struct fp_fault *", fields))
        return ring, flags

    monkeypatch.setattr(uring, "_uring", mod)
    monkeypatch.setattr(uring, "setup_ring", setup_with_fault)
    return mod


# --------------------------------------------------------------------------- the Hub (no network)


def files_under(folder) -> set[str]:
    """Every file under ``folder``, as paths relative to it."""
    out = set()
    for root, _, names in os.walk(folder):
        for n in names:
            out.add(os.path.relpath(os.path.join(root, n), folder))
    return out


class FakeHub:
    """Stands in for ``HfApi.create_repo`` / ``HfApi.upload_folder`` (the calls a push makes); records the files
    present at upload time. With a ``store`` folder, pushed folders are also copied to ``store/<repo id>`` and
    ``install(monkeypatch, serve=True)`` replaces ``huggingface_hub.snapshot_download`` with
    :meth:`snapshot_download`, which hands back what was pushed."""

    def __init__(self, namespace="me", store=None):
        self.namespace = namespace
        self.store = None if store is None else os.fspath(store)
        self.created: list[dict] = []
        self.uploads: list[dict] = []
        self.downloads: list[dict] = []

    def install(self, monkeypatch, *, serve: bool = False):
        import huggingface_hub

        hub = self

        def create_repo(api, repo_id, **kw):
            hub.created.append({"repo_id": repo_id, **kw})
            full = repo_id if "/" in repo_id else f"{hub.namespace}/{repo_id}"
            return SimpleNamespace(repo_id=full, url=f"https://huggingface.co/{full}")

        def upload_folder(api, *, repo_id, folder_path, **kw):
            hub.uploads.append({"repo_id": repo_id, "folder_path": str(folder_path), "files": files_under(folder_path),
                                **kw})
            if hub.store is not None:
                shutil.copytree(folder_path, os.path.join(hub.store, repo_id), dirs_exist_ok=True)
            return SimpleNamespace(oid="0" * 40)

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        if serve:
            monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        return self

    def snapshot_download(self, repo_id, *, allow_patterns=None, **kwargs) -> str:
        """Like the Hub: a fresh snapshot folder holding the pushed files that match ``allow_patterns``; records
        (repo id, patterns, files fetched)."""
        src = os.path.join(self.store, repo_id)
        if not os.path.isdir(src):
            raise AssertionError(f"the fake Hub has no repo {repo_id!r}")
        dst = os.path.join(self.store, ".snapshots", str(len(self.downloads)), repo_id)
        got = []
        for rel in sorted(files_under(src)):
            posix = rel.replace(os.sep, "/")
            if allow_patterns is None or any(fnmatch.fnmatch(posix, p) for p in allow_patterns):
                os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))
                got.append(posix)
        os.makedirs(dst, exist_ok=True)
        self.downloads.append({"repo_id": repo_id, "allow_patterns": allow_patterns, "files": got})
        return dst


def mapping_of(t) -> str:
    """The /proc/self/maps path of the mapping holding tensor ``t``'s first byte ('' when anonymous, empty or None)."""
    if t is None or not t.numel():
        return ""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return ""


def mappings_holding(tensors) -> set[tuple[int, int]]:
    """The (start, end) address ranges of the /proc/self/maps lines that hold the non-empty ``tensors``' bytes: one
    range when they all live in one allocation (a load's destination), whatever storages they are views of."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            ranges.append((lo, hi))
    held = set()
    for t in tensors:
        if t.numel():
            first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size() - 1
            held |= {r for r in ranges if r[0] <= first < r[1] or r[0] <= last < r[1]}
    return held
