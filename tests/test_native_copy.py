"""One extent copied and hashed in one C call: ``fp_copy_extent`` (native/fp_copy.c) and the worker path that uses
it (``flashpack.io.base.read_extent`` / ``read_extents``, and the ``threads`` reader's batches).

Everything here runs against real files, a real userfaultfd region and the real system calls; the fault cases are
made with real truncated files and a directory descriptor, not fakes (the faked-``preadv`` tests elsewhere turn the
C path off and test the Python one).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
import xxhash

import flashpack
import flashpack.io.base as io_base
from flashpack.errors import ChecksumMismatchError, ReadError
from flashpack import read_weight_map
from flashpack.io import uffd
from flashpack.io.base import Extent, FileHandles, read_extent
from flashpack.io.protocol import ReaderStats
from flashpack.settings import MiB

from _helpers import flip_byte

shim = io_base.native_copy
pytestmark = pytest.mark.skipif(shim is None, reason="flashpack._uring was built without fp_copy_extent "
                                                      "(no liburing or no xxhash.h at build time)")
UFFD_OK, UFFD_WHY = uffd.probe()


def random_file(tmp_path, nbytes: int, name: str = "data.bin") -> tuple[str, bytes]:
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def copy_request(**fields):
    c = shim.ffi.new("struct fp_copy *")
    c.fd = c.uffd = -1
    for k, v in fields.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("nbytes,piece,hash_nbytes", [
    (3 * MiB + 123, MiB, 3 * MiB + 123),  # pieces that do not divide it; hash all
    (3 * MiB + 123, 8 * MiB, MiB + 7),    # one piece; hash a prefix only
    (4096, 1000, 0),                      # no hash
    # the C side hashes in 256 KiB steps with the AVX2 loop where the CPU has it: uneven updates across
    # XXH3's 1 KiB blocks and 256-byte buffer, a step that ends inside a piece, a hash that stops mid-step
    (2 * 256 * 1024 + 3 * 64 + 1, 3 * 4096 + 17, 2 * 256 * 1024 + 3 * 64 + 1),
    (300_000, 256 * 1024 + 1, 299_999),
    (MiB, 8 * MiB, 256 * 1024 - 1),
])
def test_pread_copies_and_hashes_like_the_python_package(tmp_path, nbytes, piece, hash_nbytes):
    path, data = random_file(tmp_path, nbytes + 5000)
    buf = bytearray(nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        c = copy_request(dst=io_base.buffer_address(memoryview(buf)), file_offset=5000, nbytes=nbytes,
                         piece_nbytes=piece, hash_nbytes=hash_nbytes, fd=fd, mode=shim.lib.FP_COPY_PREAD)
        assert shim.lib.fp_copy_extent(c) == 0
    finally:
        os.close(fd)
    assert (c.done, c.error, c.hashed) == (nbytes, 0, hash_nbytes)
    assert bytes(buf) == data[5000:5000 + nbytes]
    if hash_nbytes:
        assert c.digest == xxhash.xxh3_64_intdigest(data[5000:5000 + hash_nbytes])


def test_pread_past_the_end_stops_short_without_error(tmp_path):
    path, data = random_file(tmp_path, 10_000)
    buf = bytearray(8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        c = copy_request(dst=io_base.buffer_address(memoryview(buf)), file_offset=4096, nbytes=8192,
                         piece_nbytes=4096, hash_nbytes=8192, fd=fd, mode=shim.lib.FP_COPY_PREAD)
        assert shim.lib.fp_copy_extent(c) == 0
    finally:
        os.close(fd)
    assert (c.done, c.error, c.hashed) == (10_000 - 4096, 0, 10_000 - 4096)
    assert bytes(buf[:c.done]) == data[4096:]


def test_pread_error_is_the_kernels_errno(tmp_path):
    fd = os.open(str(tmp_path), os.O_RDONLY)  # read(2) of a directory: EISDIR
    buf = bytearray(4096)
    try:
        c = copy_request(dst=io_base.buffer_address(memoryview(buf)), nbytes=4096, piece_nbytes=4096, fd=fd,
                         mode=shim.lib.FP_COPY_PREAD)
        assert shim.lib.fp_copy_extent(c) == 0
    finally:
        os.close(fd)
    assert (c.done, c.error) == (0, errno.EISDIR)


@pytest.mark.parametrize("fields", [dict(mode=7, piece_nbytes=4096), dict(mode=0, piece_nbytes=0)])
def test_bad_mode_or_piece_size_is_einval(fields):
    assert shim.lib.fp_copy_extent(copy_request(nbytes=4096, **fields)) == -errno.EINVAL


@contextlib.contextmanager
def fill_source(path: str, nbytes: int):
    """``(region, fd, src_address)``: a userfaultfd region of ``nbytes`` and a read-only shared mapping of ``path``
    (its first ``nbytes``) to fill it from; everything released on exit."""
    region = uffd.FillRegion.create(nbytes)
    fd = os.open(path, os.O_RDONLY)
    src = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
    view = np.frombuffer(src, dtype=np.uint8)
    try:
        yield region, fd, view.ctypes.data
    finally:
        region.release()
        del view
        src.close()
        os.close(fd)


@pytest.mark.skipif(not UFFD_OK, reason=f"userfaultfd unavailable here: {UFFD_WHY}")
def test_fill_copies_hashes_unmaps_and_reports_the_size(tmp_path):
    path, data = random_file(tmp_path, 3 * MiB)
    with fill_source(path, 3 * MiB) as (region, fd, src_address):
        c = copy_request(dst=region.address, src=src_address + MiB, file_offset=MiB, nbytes=2 * MiB,
                         piece_nbytes=MiB // 2, hash_nbytes=2 * MiB - 10, fd=fd, uffd=region.uffd,
                         mode=shim.lib.FP_COPY_FILL, unmap_src=1)
        assert shim.lib.fp_copy_extent(c) == 0
        assert (c.done, c.error, c.hashed, c.file_nbytes) == (2 * MiB, 0, 2 * MiB - 10, 3 * MiB)
        assert c.digest == xxhash.xxh3_64_intdigest(data[MiB:3 * MiB - 10])
        assert region.mapping[:2 * MiB] == data[MiB:3 * MiB]
        # a page already there: EEXIST, nothing copied; after the release: ENOENT
        again = copy_request(dst=region.address, src=src_address, nbytes=4096, piece_nbytes=4096, fd=fd,
                             uffd=region.uffd, mode=shim.lib.FP_COPY_FILL)
        assert shim.lib.fp_copy_extent(again) == 0 and (again.done, again.error) == (0, errno.EEXIST)
        uffd_number = region.uffd
        region.release()
        gone = copy_request(dst=region.address + 2 * MiB, src=src_address, nbytes=4096, piece_nbytes=4096, fd=fd,
                            uffd=uffd_number, mode=shim.lib.FP_COPY_FILL)
        assert shim.lib.fp_copy_extent(gone) == 0 and gone.done == 0 and gone.error != 0


@pytest.mark.skipif(not UFFD_OK, reason=f"userfaultfd unavailable here: {UFFD_WHY}")
def test_fill_from_a_truncated_file_is_efault_not_sigbus(tmp_path):
    path, data = random_file(tmp_path, 2 * MiB)
    with fill_source(path, 2 * MiB) as (region, fd, src_address):
        os.truncate(path, MiB)  # the second MiB of the mapping is now past the end of the file
        c = copy_request(dst=region.address, src=src_address, nbytes=2 * MiB,
                         piece_nbytes=2 * MiB, hash_nbytes=2 * MiB, fd=fd, uffd=region.uffd,
                         mode=shim.lib.FP_COPY_FILL)
        assert shim.lib.fp_copy_extent(c) == 0
        assert c.error == errno.EFAULT and c.done == MiB and c.file_nbytes == -1
        assert region.mapping[:MiB] == data[:MiB]


# ----------------------------------------------------------------------------------- the worker path


def _extent(buf: memoryview, file_offset: int, nbytes: int, hash_nbytes: int = 0) -> Extent:
    ext = Extent(file_offset, nbytes, buf[:nbytes], 0)
    if hash_nbytes:
        ext.hasher, ext.hash_nbytes = xxhash.xxh3_64, hash_nbytes
    return ext


def test_read_extent_buffered_in_one_call(tmp_path):
    path, data = random_file(tmp_path, 5 * MiB + 11)
    files = FileHandles(path, direct="off")
    buf = memoryview(bytearray(5 * MiB + 11))
    st = ReaderStats()
    try:
        ext = _extent(buf, 0, 5 * MiB + 11, 5 * MiB + 11)
        read_extent(files, ext, st)
    finally:
        files.close()
    assert (st.extents, st.extents_native, st.bytes_buffered) == (1, 1, 5 * MiB + 11)
    assert bytes(buf) == data and ext.digest == xxhash.xxh3_64_intdigest(data)


def test_read_extent_of_a_shorter_file_names_file_offset_and_counts(tmp_path):
    path, _ = random_file(tmp_path, 3 * MiB)
    files = FileHandles(path, direct="off")
    buf = memoryview(bytearray(2 * MiB))
    try:
        with pytest.raises(ReadError) as ei:
            read_extent(files, _extent(buf, 2 * MiB, 2 * MiB), ReaderStats())
    finally:
        files.close()
    msg = str(ei.value)
    assert path in msg and str(2 * MiB) in msg and str(MiB) in msg, msg


def test_read_extent_with_another_hasher_takes_the_python_path(tmp_path):
    path, data = random_file(tmp_path, MiB)
    files = FileHandles(path, direct="off")
    buf = memoryview(bytearray(MiB))
    st = ReaderStats()
    try:
        ext = Extent(0, MiB, buf, 0)
        ext.hasher, ext.hash_nbytes = xxhash.xxh64, MiB
        read_extent(files, ext, st)
    finally:
        files.close()
    assert st.extents_native == 0 and ext.digest == xxhash.xxh64_intdigest(data) and bytes(buf) == data


@pytest.mark.skipif(not UFFD_OK, reason=f"userfaultfd unavailable here: {UFFD_WHY}")
def test_read_extent_fill_of_a_file_truncated_since_open_reports_the_short_read(tmp_path):
    path, data = random_file(tmp_path, 4 * MiB)
    region = uffd.FillRegion.create(4 * MiB)
    files = FileHandles(path, cache="keep", fill=region)
    st = ReaderStats()
    try:
        os.truncate(path, 3 * MiB + 100)
        with pytest.raises(ReadError, match="shorter|short|truncat") as ei:
            read_extent(files, _extent(memoryview(region.mapping), 0, 4 * MiB, 4 * MiB), st)
        assert path in str(ei.value)
        assert region.released  # a fill that stopped releases the region, so preadv could read the rest
        assert region.mapping[:3 * MiB] == data[:3 * MiB]
    finally:
        files.close()
        region.release()


@pytest.mark.skipif(not UFFD_OK, reason=f"userfaultfd unavailable here: {UFFD_WHY}")
@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_keep_loads_give_the_same_tensors_and_say_which_path(tmp_path, backend, monkeypatch, native):
    monkeypatch.setenv("FLASHPACK_HUGE_PAGES", "off")  # the userfaultfd fill (4 KiB pages)
    if not native:
        monkeypatch.setattr(io_base, "native_copy", None)
    torch.manual_seed(0)
    sd = {"w": torch.randn(5 * MiB), "h": torch.randn(3 * MiB).half(), "i": torch.arange(999)}
    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file(sd, path)
    flashpack.load(path, backend=backend, cache="keep")  # cached now
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=stats)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert stats.chunks_verified > 0 and stats.bytes_read > 0
    assert (stats.extents_native > 0) == native, stats


@pytest.mark.parametrize("where", [100, 6 * MiB + 3])
def test_a_flipped_byte_is_caught_by_the_c_hash(tmp_path, backend, where):
    torch.manual_seed(1)
    sd = {"w": torch.randn(4 * MiB)}
    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file(sd, path)
    flip_byte(path, read_weight_map(path).tensors["w"].offset + where)
    flashpack.load(path, backend=backend, cache="keep", verify=False)  # cached now: the copies come from the cache
    stats = flashpack.LoadStats()
    with pytest.raises(ChecksumMismatchError) as ei:
        flashpack.load(path, backend=backend, cache="keep", stats=stats)
    assert path in str(ei.value) and "'w'" in str(ei.value)


def test_read_extents_reports_each_extent_of_a_batch_on_its_own(tmp_path):
    """A batch in one C call where the file ends inside the second extent: the first is read and hashed, the second
    is a short read naming its offset, the third (wholly past the end) a short read too; nothing raises."""
    path, data = random_file(tmp_path, MiB + 5000)
    files = FileHandles(path, direct="off")
    bufs = [memoryview(bytearray(MiB)) for _ in range(3)]
    exts = [_extent(b, i * MiB, MiB, MiB) for i, b in enumerate(bufs)]
    stats = [ReaderStats() for _ in exts]
    try:
        errors = io_base.read_extents(files, exts, stats)
    finally:
        files.close()
    assert errors[0] is None and bytes(bufs[0]) == data[:MiB] and exts[0].digest == xxhash.xxh3_64_intdigest(data[:MiB])
    assert isinstance(errors[1], ReadError) and str(MiB) in str(errors[1]) and path in str(errors[1])
    assert isinstance(errors[2], ReadError)
    assert [s.extents_native for s in stats] == [1, 1, 1] and stats[1].bytes_buffered == 5000
    assert bytes(bufs[1][:5000]) == data[MiB:] and stats[2].bytes_buffered == 0


@pytest.mark.parametrize("queue_depth,most", [(32, 4), (1, 1)])
def test_cached_extents_go_to_a_worker_in_batches_within_queue_depth(tmp_path, monkeypatch, queue_depth, most):
    """16 cached 8 MiB extents (threads backend, cache="keep", 4 KiB destination): batches of up to
    COPY_BATCH_NBYTES, never more extents in tasks at once than queue_depth; queue_depth=1 keeps one at a time."""
    import flashpack.io.threads as io_threads

    monkeypatch.setenv("FLASHPACK_HUGE_PAGES", "off")
    monkeypatch.setenv("FLASHPACK_QUEUE_DEPTH", str(queue_depth))
    sizes, real = [], io_threads.read_extents

    def recording(files, exts, stats):
        sizes.append(len(exts))
        return real(files, exts, stats)

    monkeypatch.setattr(io_threads, "read_extents", recording)
    monkeypatch.setattr(io_threads, "_CPUS", 2)  # this machine's; batches spread over min(free workers, CPUs)
    sd = {"w": torch.arange(32 * MiB, dtype=torch.int32)}  # 128 MiB
    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file(sd, path)
    flashpack.load(path, backend="threads", cache="keep")  # cached now
    sizes.clear()
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend="threads", cache="keep", stats=stats)
    assert torch.equal(out["w"], sd["w"])
    assert sum(sizes) == stats.extents_native >= 16 and max(sizes) == most, sizes
    assert io_threads.COPY_BATCH_NBYTES // (8 * MiB) == 4


def test_extents_waiting_for_read_ahead_are_not_batched(tmp_path, monkeypatch):
    """A cold keep load: every extent waits for its read-ahead, so each goes to a worker alone."""
    import flashpack.io.threads as io_threads
    from flashpack.io.pagecache import drop_from_cache

    monkeypatch.setenv("FLASHPACK_HUGE_PAGES", "off")
    sizes, real = [], io_threads.read_extents
    monkeypatch.setattr(io_threads, "read_extents", lambda f, e, s: (sizes.append(len(e)), real(f, e, s))[1])
    sd = {"w": torch.arange(16 * MiB, dtype=torch.int32)}
    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file(sd, path)
    os.sync()
    drop_from_cache(path)
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend="threads", cache="keep", stats=stats)
    assert torch.equal(out["w"], sd["w"])
    if stats.bytes_prefetched == 0:
        pytest.skip("the kernel kept the file cached (drop refused): nothing was read ahead")
    assert max(sizes) == 1 and stats.bytes_prefetched >= 8 * MiB, (sizes, stats)


def test_a_destination_shorter_than_the_extent_is_never_written_past(tmp_path):
    """The C copy trusts its length: a destination shorter than ``nbytes`` must go to the Python steps (a short
    read of the destination's size, nothing written past it)."""
    path, data = random_file(tmp_path, 2 * MiB)
    whole = bytearray(2 * MiB)
    dest = memoryview(whole)[:MiB]
    files = FileHandles(path, direct="off")
    st = ReaderStats()
    try:
        errors = io_base.read_extents(files, [Extent(0, 2 * MiB, dest, 0)], [st])
    finally:
        files.close()
    assert isinstance(errors[0], ReadError) and st.extents_native == 0
    assert bytes(whole[MiB:]) == bytes(MiB)  # the canary half is untouched
    assert bytes(whole[:MiB]) == data[:MiB]


def test_one_bad_extent_fails_alone_in_its_batch(tmp_path, backend):
    """A negative offset (C cannot take it) and a bytearray destination (not a memoryview) in the middle of good
    extents: each fails on its own, the others are read, and nothing escapes submit() or wait()."""
    path, data = random_file(tmp_path, 4 * MiB)
    bufs = [memoryview(bytearray(MiB)) for _ in range(4)]
    exts = [Extent(0, MiB, bufs[0], "a"), Extent(-4096, MiB, bufs[1], "negative"),
            Extent(MiB, MiB, bytearray(MiB), "bytearray"), Extent(2 * MiB, MiB, bufs[3], "d")]
    got = {}
    with flashpack.io.open_reader(path, backend=backend, direct="off") as r:
        r.submit(exts)
        while r.in_flight:
            for c in r.wait():
                got[c.extent.tag] = c.error
    assert got["a"] is None and got["d"] is None, got
    assert got["negative"] is not None and got["bytearray"] is not None, got
    assert bytes(bufs[0]) == data[:MiB] and bytes(bufs[3]) == data[2 * MiB:3 * MiB]


def test_a_stale_or_xxhash_less_build_falls_back_to_the_python_steps():
    class Lib:
        def __init__(self, names, available=1):
            for n in names:
                setattr(self, n, lambda *a: available)

    class Shim:
        def __init__(self, lib):
            self.lib = lib

    full = ("fp_copy_available", "fp_copy_extent", "fp_copy_extents")
    assert io_base.usable_copy_shim(None) is None
    assert io_base.usable_copy_shim(Shim(Lib(()))) is None  # built before fp_copy_extent
    assert io_base.usable_copy_shim(Shim(Lib(full[:2]))) is None  # built before fp_copy_extents
    assert io_base.usable_copy_shim(Shim(Lib(full, available=0))) is None  # compiled to the stub (no xxhash 0.8)
    ok = Shim(Lib(full))
    assert io_base.usable_copy_shim(ok) is ok
    assert io_base.usable_copy_shim(shim) is shim  # this build


def test_many_small_cached_extents_are_spread_over_the_cpus(tmp_path, monkeypatch):
    """1000 cached 64 KiB extents, queue_depth 32, 2 CPUs: a batch holds at most ceil(32 / 2) extents (a fair share
    of what queue_depth leaves free, not of the whole queue), and several copy at once."""
    import flashpack.io.threads as io_threads

    monkeypatch.setattr(io_threads, "_CPUS", 2)
    sizes, real = [], io_threads.read_extents
    monkeypatch.setattr(io_threads, "read_extents", lambda f, e, s: (sizes.append(len(e)), real(f, e, s))[1])
    path, data = random_file(tmp_path, 1000 * 65536)
    with open(path, "rb") as f:
        f.read()  # cached
    bufs = [memoryview(bytearray(65536)) for _ in range(1000)]
    with flashpack.io.open_reader(path, backend="threads", direct="auto", queue_depth=32, threads=16) as r:
        io_base.read_all(r, [Extent(i * 65536, 65536, b, i) for i, b in enumerate(bufs)])
    assert sum(sizes) == 1000 and max(sizes) <= 16 and len(sizes) >= 1000 // 16, sizes[:20]
    assert all(bytes(bufs[i]) == data[i * 65536:(i + 1) * 65536] for i in range(0, 1000, 97))


def test_batches_share_the_queued_bytes_not_the_extent_count(tmp_path, monkeypatch):
    """A cached 16 MiB load's extents (8 MiB, 6.4 MiB, 1.5 MiB, 100 KiB, 68 KiB), 2 CPUs (one helper and the caller):
    each claim takes the oldest extent, then more only while it holds at most a quarter of the bytes left, so the two
    large extents go to different threads and each extent is a claim of its own (by extent count, three of them
    went to one worker and the other copied 168 KiB)."""
    import flashpack.io.threads as io_threads

    monkeypatch.setattr(io_threads, "_CPUS", 2)
    batches, real = [], io_threads.read_extents
    monkeypatch.setattr(io_threads, "read_extents",
                        lambda f, e, s: (batches.append([x.nbytes for x in e]), real(f, e, s))[1])
    sizes = [8 << 20, 6556 << 10, 1476 << 10, 100 << 10, 68 << 10]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    path, data = random_file(tmp_path, sum(sizes))
    with open(path, "rb") as f:
        f.read()  # cached
    bufs = [memoryview(bytearray(n)) for n in sizes]
    with flashpack.io.open_reader(path, backend="threads", direct="auto", queue_depth=32, threads=16) as r:
        io_base.read_all(r, [Extent(o, n, b, i) for i, (o, n, b) in enumerate(zip(offsets, sizes, bufs))])
    # bytes left 16 MiB -> share 4 MiB: 8 MiB alone; 8 MiB left -> 2 MiB: 6.4 MiB alone; 1.6 MiB left -> 0.4 MiB:
    # 1.44 MiB alone; then 100 KiB and 68 KiB, each more than a quarter of what is left
    assert sorted(batches) == sorted([[n] for n in sizes]), batches
    assert all(bytes(b) == data[o:o + n] for o, n, b in zip(offsets, sizes, bufs))


def test_claims_shrink_as_the_copies_run_out(tmp_path, monkeypatch):
    """Eleven cached 2 MiB extents, claims of at most 8 MiB, 2 CPUs (one helper and the caller): the first claims
    hold two extents (a quarter of the 22 MiB left is 5.5 MiB), the last ones one, in file order whichever thread
    takes them, and every extent is copied once (fixed batches of 4 MiB left one thread copying the last batch while
    the other waited)."""
    import flashpack.io.threads as io_threads

    monkeypatch.setattr(io_threads, "_CPUS", 2)
    monkeypatch.setattr(io_threads, "COPY_BATCH_NBYTES", 8 << 20)
    claims, real = [], io_threads.ThreadsReader._claim

    def recording(self):
        batch = real(self)  # _cond is held: claims are recorded in the order they were made
        if batch:
            claims.append([x.file_offset for x in batch])
        return batch

    monkeypatch.setattr(io_threads.ThreadsReader, "_claim", recording)
    n = 2 << 20
    path, data = random_file(tmp_path, 11 * n)
    with open(path, "rb") as f:
        f.read()  # cached
    bufs = [memoryview(bytearray(n)) for _ in range(11)]
    with flashpack.io.open_reader(path, backend="threads", direct="auto", queue_depth=32, threads=16) as r:
        io_base.read_all(r, [Extent(i * n, n, b, i) for i, b in enumerate(bufs)])
    # 22 MiB left -> 5.5 MiB: 2; 18 -> 4.5: 2; 14 -> 3.5: 1; then one at a time
    assert [len(c) for c in claims] == [2, 2] + [1] * 7, claims
    assert [off for c in claims for off in c] == [i * n for i in range(11)]
    assert all(bytes(b) == data[i * n:(i + 1) * n] for i, b in enumerate(bufs))


def test_copies_queued_while_a_helper_leaves_get_a_new_helper(tmp_path, monkeypatch):
    """One copier (threads=1), one extent handed out at a time (queue_depth=1, so the helper finds the queue empty
    after each) and a caller that waits with a timeout (as the GPU scheduler does), so it copies nothing itself: a
    helper that found no copy left but whose task has not finished yet (held here until the end) must not count, or
    the copy queued next waits for the caller's whole timeout, wait after wait (a review found that stall; before
    the fix 7 of the 8 extents were still waiting after 30 s)."""
    import flashpack.io.threads as io_threads

    release, real = threading.Event(), io_threads.ThreadsReader._copy_helper

    def lingering(self):
        real(self)
        release.wait(60)  # done taking copies, task not finished

    monkeypatch.setattr(io_threads.ThreadsReader, "_copy_helper", lingering)
    n = 1 << 20
    path, data = random_file(tmp_path, 8 * n)
    with open(path, "rb") as f:
        f.read()  # cached: every extent is a copy
    bufs = [memoryview(bytearray(n)) for _ in range(8)]
    done, empty_waits = [], 0
    try:
        with flashpack.io.open_reader(path, backend="threads", direct="auto", queue_depth=1, threads=1) as r:
            r.submit([Extent(i * n, n, b, i) for i, b in enumerate(bufs)])
            deadline = time.monotonic() + 30
            while r.in_flight and time.monotonic() < deadline:
                got = r.wait(2.0)
                empty_waits += not got
                done += [c.extent.tag for c in got if c.error is None]
            left = r.in_flight
            release.set()
    finally:
        release.set()
    assert left == 0 and sorted(done) == list(range(8)) and empty_waits == 0, (left, done, empty_waits)
    assert all(bytes(b) == data[i * n:(i + 1) * n] for i, b in enumerate(bufs))


def test_threads_caps_tasks_and_copy_helpers_together(tmp_path, monkeypatch):
    """threads=1 on a partly cached file (every other 4 MiB evicted): the O_DIRECT reads (tasks) and the copies out of
    the cache (helpers) never run on more than one pool thread at once (the caller's own thread aside); the copy
    helpers had not counted against ``threads`` (two at once, found by review). The bytes are right."""
    import flashpack.io.threads as io_threads
    from flashpack.io.pagecache import cached_pages

    n = 1 << 20
    path, data = random_file(tmp_path, 16 * n)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for off in range(0, 16 * n, 8 * n):  # 4 MiB at a time: a large folio is evicted whole or not at all
            os.posix_fadvise(fd, off, 4 * n, os.POSIX_FADV_DONTNEED)
        left = cached_pages(fd, 0, 16 * n)
    finally:
        os.close(fd)
    if left is not None and left in (0, 16 * n // 4096):
        pytest.skip("posix_fadvise(DONTNEED) did not leave the file partly cached here")
    main, lock, now, peak, real = threading.get_ident(), threading.Lock(), [0], [0], io_threads.read_extents

    def counting(files, exts, stats):
        if threading.get_ident() == main:
            return real(files, exts, stats)
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.002)  # long enough for another worker to overlap, if one may
            return real(files, exts, stats)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(io_threads, "read_extents", counting)
    bufs = [memoryview(bytearray(n)) for _ in range(16)]
    done = []
    with flashpack.io.open_reader(path, backend="threads", direct="auto", threads=1, queue_depth=8) as r:
        r.submit([Extent(i * n, n, b, i) for i, b in enumerate(bufs)])
        while r.in_flight:
            done += [c.extent.tag for c in r.wait(0.01) if c.error is None]
    assert sorted(done) == list(range(16)) and peak[0] == 1, (done, peak)
    assert all(bytes(b) == data[i * n:(i + 1) * n] for i, b in enumerate(bufs))


def test_reader_locks_are_never_taken_through_python_condition_methods(tmp_path):
    """The reader's, the read pool's and the prefetcher's locks are taken with ``with lock`` (C code), never through
    ``with condition``, directly or inside ``threading.Event`` or ``concurrent.futures.Future`` methods:
    ``Condition.__enter__``/``__exit__`` are Python functions, a KeyboardInterrupt can be raised at their first line,
    and one raised at ``__exit__`` left the lock held, so closing the reader hung (a review interrupting 300 loads
    hung 3 runs of 3; then, rarely, inside a pool task's ``concurrent.futures.Future``). Traced on the loading thread
    and the workers over a cached and a cold load: no Condition is entered, waited on or notified with a frame of
    ``flashpack.io`` below it (within six frames): ``Condition.wait`` and ``notify`` run Python code between releasing
    and re-taking the lock, where an interrupt left it released under the caller's ``with`` (found by review)."""
    from flashpack.io.pagecache import drop_from_cache

    n = 1 << 20
    path, data = random_file(tmp_path, 8 * n)
    entered = []
    here = os.path.dirname(flashpack.io.base.__file__)

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name in ("__enter__", "__exit__", "wait", "notify", "notify_all") and \
                frame.f_code.co_filename == threading.__file__ and isinstance(frame.f_locals.get("self"),
                                                                              threading.Condition):
            caller, depth = frame.f_back, 0
            while caller is not None and depth < 6:
                if os.path.dirname(caller.f_code.co_filename) == here:
                    entered.append(f"{caller.f_code.co_name}:{caller.f_lineno} via {frame.f_back.f_code.co_name}")
                    break
                caller, depth = caller.f_back, depth + 1
        return None

    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        for cold in (False, True):
            if cold:
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                drop_from_cache(path)
            bufs = [memoryview(bytearray(n)) for _ in range(8)]
            with flashpack.io.open_reader(path, backend="threads", direct="auto", queue_depth=4, cache="keep") as r:
                io_base.read_all(r, [Extent(i * n, n, b, i) for i, b in enumerate(bufs)])
            assert all(bytes(b) == data[i * n:(i + 1) * n] for i, b in enumerate(bufs))
    finally:
        sys.settrace(None)
        threading.settrace(None)
    assert entered == [], entered


# --- the read pool and the caller that runs a task no worker started -------------------------------------------


def test_read_pool_runs_tasks_reuses_idle_threads_and_keeps_no_task_alive():
    """A task's result and error come back through its future; a task cancelled before it started never runs; one
    thread serves tasks submitted one after the other; a finished task's arguments are not held by the pool."""
    import gc
    import weakref

    from flashpack.io.threads import ReadPool

    pool = ReadPool(4)
    assert pool.submit(lambda a, b: a + b, 2, 3).result(timeout_s=10) == 5
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 // 0).result(timeout_s=10)

    class Payload:
        pass

    payload = Payload()
    ref = weakref.ref(payload)
    assert pool.submit(lambda p: type(p).__name__, payload).result(timeout_s=10) == "Payload"
    del payload
    for _ in range(50):  # the worker drops its references after setting the result
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.01)
    assert ref() is None
    assert pool._threads == 1  # each task found the one thread idle

    gate, started = threading.Event(), threading.Event()
    ran = []
    blocker = pool.submit(lambda: (started.set(), gate.wait(10)))
    assert started.wait(10)
    first = [pool.submit(gate.wait, 10) for _ in range(3)]  # the other three threads
    queued_payload = Payload()
    queued_ref = weakref.ref(queued_payload)
    queued = pool.submit(ran.append, queued_payload)  # max_threads reached: waits in the queue
    del queued_payload
    assert queued.cancel()
    gc.collect()
    assert queued_ref() is None  # still queued, but a cancelled task holds nothing (a shared buffer could be sealed)
    gate.set()
    assert all(f.result(timeout_s=10) for f in [blocker, *first])
    assert pool.submit(ran.append, "after").result(timeout_s=10) is None
    assert ran == ["after"] and pool._threads == 4
    deadline = time.monotonic() + 10  # the thread that skipped the cancelled task may count itself idle just now
    while pool._idle != 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool._idle == 4  # the queued task owed a thread; the one that took it is idle again


def test_the_waiting_caller_reads_the_oldest_task_no_worker_started(tmp_path, monkeypatch):
    """Every pool thread busy elsewhere: the load is not held up; the thread that waits reads the queued batches
    itself, oldest first (a later extent may need a page an earlier fill copies), and the bytes are right."""
    import flashpack.io.threads as io_threads

    pool = io_threads.ReadPool(1)
    gate, started = threading.Event(), threading.Event()
    busy = pool.submit(lambda: (started.set(), gate.wait(60)))
    assert started.wait(10)
    monkeypatch.setattr(io_threads, "shared_pool", lambda: pool)
    monkeypatch.setattr(io_threads, "_CPUS", 2)
    monkeypatch.setattr(io_threads, "COPY_BATCH_NBYTES", 4 << 20)
    order, real = [], io_threads.read_extents
    monkeypatch.setattr(io_threads, "read_extents",
                        lambda f, e, s: (order.append((threading.get_ident(), e[0].file_offset)), real(f, e, s))[1])
    n = 1 << 20
    path, data = random_file(tmp_path, 8 * n)
    with open(path, "rb") as f:
        f.read()  # cached: batches of copies
    bufs = [memoryview(bytearray(n)) for _ in range(8)]
    try:
        with flashpack.io.open_reader(path, backend="threads", direct="auto", queue_depth=32, threads=16) as r:
            io_base.read_all(r, [Extent(i * n, n, b, i) for i, b in enumerate(bufs)])
    finally:
        gate.set()
    busy.result(timeout_s=10)
    assert all(bytes(b) == data[i * n:(i + 1) * n] for i, b in enumerate(bufs))
    assert len(order) >= 2 and {ident for ident, _ in order} == {threading.get_ident()}, order
    assert [off for _, off in order] == sorted(off for _, off in order), order


def test_a_batch_claimed_just_before_an_interrupt_no_longer_counts_once_closed(tmp_path, monkeypatch):
    """A KeyboardInterrupt between the loading thread's claim of copies and their copy leaves the batch taken but
    never copied; once the reader is closed nothing counts as in flight (it counted forever before)."""
    import flashpack.io.threads as io_threads

    n = 256 << 10
    path, data = random_file(tmp_path, 64 * n)
    with open(path, "rb") as f:
        f.read()  # cached: copies the loading thread claims too
    real, main = io_threads.ThreadsReader._copy, threading.get_ident()

    def copy(self, batch):
        if threading.get_ident() == main:
            raise KeyboardInterrupt  # landed before _copy's own try
        return real(self, batch)

    monkeypatch.setattr(io_threads.ThreadsReader, "_copy", copy)
    bufs = [memoryview(bytearray(n)) for _ in range(64)]
    with pytest.raises(KeyboardInterrupt):
        with flashpack.io.open_reader(path, backend="threads", direct="auto", queue_depth=64) as r:
            io_base.read_all(r, [Extent(i * n, n, b, i) for i, b in enumerate(bufs)])
    assert r.in_flight == 0
