"""Filling fresh destinations with userfaultfd's UFFDIO_COPY (flashpack/io/uffd.py, FileHandles.fill_copy,
memory.host_buffer(fill=True), FLASHPACK_USERFAULTFD): the region itself, loads through it on both backends,
what happens on a truncated file, on a refusal, on a failed copy, and the settings that turn it off.

Loads here are 40 MiB (above memory.MIN_FILL_NBYTES) with cache="keep". Test doubles (a refusing kernel, a copy
that stops) live here. The truncation case runs in a child process: a SIGBUS or a thread waiting forever on a
registered page would otherwise take the test run down with it."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import flashpack
from flashpack.errors import ChecksumMismatchError
import flashpack.io.base
from flashpack.io import uffd
from flashpack.io.pagecache import drop_from_cache
from flashpack.loading import memory
from flashpack.settings import MiB

OK, WHY = uffd.probe()
pytestmark = pytest.mark.skipif(not OK, reason=f"userfaultfd unavailable here: {WHY}")

#: 40 MiB of float32: five 8 MiB extents.
NUMEL = 10 * MiB


@pytest.fixture
def pack(tmp_path):
    torch.manual_seed(0)
    sd = {"w": torch.randn(NUMEL), "b": torch.arange(1000, dtype=torch.int64), "h": torch.randn(33, 7).half()}
    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file(sd, path)
    return path, sd


def rss_file_nbytes() -> int:
    """``RssFile`` of /proc/self/status (proc(5)) in bytes: file pages mapped into this process now."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.fixture(autouse=True)
def fresh_refusal(monkeypatch):
    monkeypatch.setattr(memory, "_fill_refused", "")
    # the fill is for 4 KiB destinations: where FLASHPACK_HUGE_PAGES=auto would take huge pages (no free page
    # reporting, enough free 2 MiB blocks), a keep load lets its copies fault those in instead (test_memory.py)
    monkeypatch.setenv("FLASHPACK_HUGE_PAGES", "off")


def test_region_copy_fill_release():
    region = uffd.FillRegion.create(3 * 4096 + 1)
    assert region.nbytes == 4 * 4096 and region.address % 4096 == 0 and not region.released
    src = torch.arange(4 * 4096, dtype=torch.uint8)
    assert region.covers(region.address, 4 * 4096) and not region.covers(region.address + 4096, 4 * 4096)
    assert region.copy(region.address, src.data_ptr(), 2 * 4096) == (2 * 4096, 0)
    # a page already present is not overwritten: EEXIST, nothing copied
    assert region.copy(region.address + 4096, src.data_ptr(), 4096) == (0, errno.EEXIST)
    region.release()
    region.release()  # idempotent
    assert region.released and not region.covers(region.address, 4096)
    assert region.copy(region.address + 2 * 4096, src.data_ptr(), 4096) == (0, errno.ENOENT)
    t = torch.frombuffer(region.mapping, dtype=torch.uint8)
    assert torch.equal(t[:2 * 4096], src[:2 * 4096])
    assert int(t[2 * 4096:].sum()) == 0  # never filled: ordinary zeroed pages once released, no wait
    t[-1] = 5  # and writable
    assert int(t[-1]) == 5


def test_region_copy_from_an_unreadable_source_is_efault_not_sigbus(tmp_path):
    f = tmp_path / "short"
    f.write_bytes(b"x" * 4096)
    with open(f, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 4096, prot=mmap.PROT_READ)
    src_address = np.frombuffer(m, dtype=np.uint8).ctypes.data
    os.truncate(f, 0)
    region = uffd.FillRegion.create(4096)
    try:
        assert region.copy(region.address, src_address, 4096) == (0, errno.EFAULT)
    finally:
        region.release()


def test_host_buffer_fill_kind_and_threshold():
    b = memory.host_buffer(memory.MIN_FILL_NBYTES, huge_pages="off", fill=True)
    assert b.kind == "uffd" and b.region is not None and b.tensor.numel() == memory.MIN_FILL_NBYTES
    b.region.release()
    small = memory.host_buffer(memory.MIN_FILL_NBYTES - 4096, huge_pages="off", fill=True)
    assert small.kind == "torch" and small.region is None
    assert memory.host_buffer(memory.MIN_FILL_NBYTES, huge_pages="on", fill=True).kind != "uffd"


def test_keep_load_fills_with_uffd_bit_for_bit(pack, backend):
    path, sd = pack
    drop_from_cache(path)
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=stats)
    assert stats.memory == "uffd" and stats.cache == "keep"
    assert stats.bytes_filled == stats.bytes_read == stats.bytes_buffered > NUMEL * 4
    assert stats.chunks_verified > 0 and stats.chunks_hashed_by_reader == stats.chunks_verified
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    out["w"].add_(1)  # private and writable: the fill region was released
    assert torch.equal(out["w"], sd["w"] + 1)
    cached = flashpack.LoadStats()  # second load, from the page cache the first one left
    again = flashpack.load(path, backend=backend, cache="keep", stats=cached)
    assert cached.memory == "uffd" and cached.bytes_filled == cached.bytes_read
    assert torch.equal(again["w"], sd["w"])


def test_sharded_keep_load_fills_every_shard(tmp_path, backend):
    torch.manual_seed(1)
    sd = {f"w{i}": torch.randn(3 * MiB) for i in range(4)}  # 48 MiB in 12 MiB pieces
    folder = tmp_path / "sharded"
    folder.mkdir()
    flashpack.pack_to_file(sd, folder / "model.flashpack", max_shard_nbytes=13 * MiB)
    assert len(list(folder.glob("model-*.flashpack"))) == 4
    stats = flashpack.LoadStats()
    out = flashpack.load(folder, backend=backend, cache="keep", stats=stats)
    assert stats.memory == "uffd" and stats.bytes_filled == stats.bytes_read
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_the_source_pages_leave_the_rss_behind_the_copies(pack, backend, monkeypatch):
    """One copy at a time: when each copy starts, the file pages the earlier ones mapped are unmapped again
    (the load's peak RSS is its destination, not destination + file)."""
    path, sd = pack
    monkeypatch.setenv("FLASHPACK_THREADS", "1")
    monkeypatch.setenv("FLASHPACK_QUEUE_DEPTH", "1")
    real = uffd.FillRegion.copy
    grown = []
    base = rss_file_nbytes()

    def sampling(self, address, src_address, nbytes):
        grown.append(rss_file_nbytes() - base)
        return real(self, address, src_address, nbytes)

    monkeypatch.setattr(uffd.FillRegion, "copy", sampling)
    monkeypatch.setattr(flashpack.io.base, "native_copy", None)  # the C copy calls no faked copy
    flashpack.load(path, backend=backend, cache="keep")  # the file cached
    base = rss_file_nbytes()
    grown.clear()
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=stats)
    assert stats.memory == "uffd" and len(grown) >= 6 and torch.equal(out["w"], sd["w"])
    assert max(grown) < 4 * MiB, [g // MiB for g in grown]


@pytest.mark.parametrize("how", ["env", "bypass", "refused"])
def test_no_uffd_when_off_bypassed_or_refused(pack, backend, monkeypatch, how):
    path, sd = pack
    cache = "keep"
    if how == "env":
        monkeypatch.setenv("FLASHPACK_USERFAULTFD", "0")
    elif how == "bypass":
        cache = "bypass"
    else:
        def refuse():
            raise OSError(errno.EPERM, "userfaultfd: Operation not permitted")
        monkeypatch.setattr(uffd, "_userfaultfd", refuse)
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache=cache, stats=stats)
    assert stats.memory == "torch" and stats.bytes_filled == 0
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    if how == "refused":  # remembered: not tried again in this process
        assert memory._fill_refused == "[Errno 1] userfaultfd: Operation not permitted"
        monkeypatch.setattr(uffd, "_userfaultfd", lambda: pytest.fail("tried again after a refusal"))
        assert flashpack.load(path, backend=backend, cache="keep", stats=flashpack.LoadStats())["w"].equal(sd["w"])


def test_a_copy_that_stops_midway_falls_back_to_preadv(pack, backend, monkeypatch):
    path, sd = pack
    real = uffd.FillRegion.copy
    calls = []

    def stop_on_second(self, address, src_address, nbytes):
        calls.append(nbytes)
        if len(calls) == 2:  # half of it, then a refusal
            done, _ = real(self, address, src_address, nbytes // 2)
            return done, errno.ENOMEM
        return real(self, address, src_address, nbytes)

    monkeypatch.setattr(uffd.FillRegion, "copy", stop_on_second)
    monkeypatch.setattr(flashpack.io.base, "native_copy", None)  # the C copy calls no faked copy
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=stats)
    assert stats.memory == "uffd" and 0 < stats.bytes_filled < stats.bytes_read == stats.bytes_buffered
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_region_released_when_the_load_fails(pack, backend, monkeypatch):
    path, sd = pack
    t = flashpack.read_weight_map(path).tensors["w"]
    with open(path, "r+b") as f:  # damage one byte in the middle of "w"
        f.seek(t.offset + 5 * MiB)
        b = f.read(1)
        f.seek(t.offset + 5 * MiB)
        f.write(bytes([b[0] ^ 0xFF]))
    released = []
    real = uffd.FillRegion.release
    monkeypatch.setattr(uffd.FillRegion, "release", lambda self: (released.append(self), real(self)))
    with pytest.raises(ChecksumMismatchError):
        flashpack.load(path, backend=backend, cache="keep")
    assert released and all(r.released for r in released)


@pytest.mark.timeout(300)
def test_truncated_under_a_filled_load_is_a_read_error_in_a_child(pack, backend):
    """Case C30 under the fill: the file shrinks after its weight map was read: the copies past the new end fail with EFAULT inside the
    kernel, the region is released, preadv meets the short file: a ReadError naming it, no SIGBUS, no hang."""
    path, _ = pack
    child = textwrap.dedent(f"""
        import os, sys
        import flashpack
        from flashpack.errors import ReadError
        from flashpack.io import pagecache
        path = {path!r}
        wm = flashpack.read_weight_map(path)
        t = wm.tensors["w"]
        real = pagecache._madvise
        state = {{"cut": False}}
        def cut_first(address, nbytes, advice):  # the file is cut while the first range is read ahead
            if advice == pagecache.MADV_POPULATE_READ and not state["cut"]:
                state["cut"] = True
                os.truncate(path, t.offset + 12 * 1024 * 1024)
            return real(address, nbytes, advice)
        pagecache._madvise = cut_first
        pagecache.drop_from_cache(path)
        stats = flashpack.LoadStats()
        try:
            flashpack.load(wm, backend={backend!r}, cache="keep", stats=stats)
        except ReadError as e:
            print("READERROR", e.errno, e.filename == path, "truncated" in str(e), stats.memory, flush=True)
            sys.exit(0)
        print("NO ERROR", stats.memory)
        sys.exit(1)
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.split() == ["READERROR", str(errno.EIO), "True", "True", "uffd"], r.stdout


@pytest.mark.timeout(300)
def test_c30_truncated_inside_the_last_page_of_a_filled_extent_is_a_short_read(tmp_path, backend):
    """Case C30, the cut that lands inside a page: UFFDIO_COPY copies a page the file now ends in whole (zeros past
    the end) and succeeds, so without a size check the load returned the lost tail as zeros with verify=False.
    Once the first 1 MiB extent has landed, the file is cut 100 bytes before the end of its payload, inside the
    payload's last page (the weight map after it goes too): a short-read ReadError, as with preadv (the same load
    with FLASHPACK_USERFAULTFD=0 is the control). In a child: a hang or SIGBUS must not take the
    run down."""
    torch.manual_seed(6)
    sd = {"a": torch.randn(5 * MiB + 3), "tail": torch.randn(3001)}  # 20 MiB and a bit: the end is mid-page
    child = textwrap.dedent("""
        import os, sys
        import flashpack
        from flashpack.errors import ReadError
        path, backend = sys.argv[1], sys.argv[2]
        wm = flashpack.read_weight_map(path)
        end = max(t.offset + t.nbytes for t in wm.tensors.values())
        assert (end - 1) % 4096 > 100, end  # the new end lies in the payload's last page
        cut = []
        def progress(done, total):
            if done and not cut:
                cut.append(done)
                os.truncate(path, end - 100)
        stats = flashpack.LoadStats()
        try:
            flashpack.load(wm, backend=backend, verify=False, cache="keep", progress=progress, stats=stats)
        except ReadError as e:
            print("READERROR", e.errno, "short read" in str(e), stats.memory, flush=True)
            sys.exit(0)
        print("NO ERROR", stats.memory)
        sys.exit(1)
    """)
    env = dict(os.environ, FLASHPACK_EXTENT_NBYTES="1M", FLASHPACK_QUEUE_DEPTH="1", FLASHPACK_THREADS="1")
    for fill, memory_kind in (("1", "uffd"), ("0", "torch")):
        path = str(tmp_path / f"t{fill}.flashpack")
        flashpack.pack_to_file(sd, path)
        r = subprocess.run([sys.executable, "-c", child, path, backend], capture_output=True, text=True, timeout=240,
                           env=dict(env, FLASHPACK_USERFAULTFD=fill))
        assert r.returncode == 0, (fill, r.returncode, r.stdout, r.stderr[-2000:])
        assert r.stdout.split() == ["READERROR", str(errno.EIO), "True", memory_kind], (fill, r.stdout)


def test_a_reader_that_sees_the_region_released_can_read_into_it_at_once(pack, monkeypatch):
    """release() racing a worker (another worker's copy failed): once covers() is false the worker reads with
    preadv at once, so the region must already be unregistered by then, not only marked released (EFAULT)."""
    import fcntl as real_fcntl
    import threading
    import time

    from flashpack.io import base
    from flashpack.io.protocol import Extent, ReaderStats

    path, _ = pack
    nbytes = os.path.getsize(path) // 4096 * 4096
    region = uffd.FillRegion.create(nbytes)
    files = base.FileHandles(path, cache="keep", fill=region)
    unregistering = threading.Event()

    class SlowUnregister:  # the kernel's UFFDIO_UNREGISTER, made slow: it waits for the mmap write lock
        def __getattr__(self, name):
            return getattr(real_fcntl, name)

        @staticmethod
        def ioctl(fd, request, arg=0, *rest):
            if request == uffd.UFFDIO_UNREGISTER:
                unregistering.set()
                time.sleep(0.3)
            return real_fcntl.ioctl(fd, request, arg, *rest)

    monkeypatch.setattr(uffd, "fcntl", SlowUnregister())
    t = threading.Thread(target=region.release)
    t.start()
    try:
        assert unregistering.wait(10)
        mv = memoryview(region.mapping)[:MiB]
        base.read_extent(files, Extent(0, MiB, mv), ReaderStats())  # was: ReadError EFAULT ("Bad address")
    finally:
        t.join()
        files.close()
    with open(path, "rb") as f:
        assert bytes(mv) == f.read(MiB)


def test_a_refused_source_mapping_releases_the_region(pack, backend, monkeypatch):
    """The file cannot be mapped (a FUSE file system in direct_io mode: ENODEV; RLIMIT_AS: ENOMEM): nothing can
    UFFDIO_COPY from it, so the region must be released before the reads go to preadv (else EFAULT)."""
    from flashpack.io import pagecache

    path, sd = pack
    real = pagecache.libc

    class NoMmap:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def mmap(*args):
            return pagecache.MAP_FAILED

    monkeypatch.setattr(pagecache, "libc", NoMmap())
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=stats)  # was: ReadError EFAULT
    assert stats.memory == "uffd" and stats.bytes_filled == 0
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_read_into_releases_the_region_even_with_nothing_to_read(pack):
    from flashpack.loading.common import LoadStats
    from flashpack.loading.host import read_into
    from flashpack.plan import LoadPlan
    from flashpack.settings import settings

    path, _ = pack
    dest = memory.host_buffer(memory.MIN_FILL_NBYTES, huge_pages="off", fill=True)
    region, tensor = dest.region, dest.tensor
    del dest  # no repr of a still-registered tensor in a failure report: printing it would wait forever
    assert region is not None
    empty = LoadPlan((), (), (), (), 0)
    read_into(flashpack.read_weight_map(path), empty, tensor, backend="threads", verify=True,
              stats=LoadStats(), cfg=settings(), cache="keep", fill=region)
    released = region.released
    region.release()
    assert released  # "dest is ordinary memory when this returns"


def test_a_dropped_region_closes_its_descriptor():
    import gc
    before = len(os.listdir("/proc/self/fd"))
    regions = [uffd.FillRegion.create(4096) for _ in range(8)]
    assert len(os.listdir("/proc/self/fd")) == before + 8
    del regions
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_region_dropped_with_an_interrupt_pending_closes_its_descriptor_and_the_interrupt_reaches_the_caller():
    """Found by review: with ``FillRegion.__del__`` (Python), a Ctrl-C pending when the last reference went was raised
    at ``__del__``'s first bytecode: the descriptor leaked, the region stayed registered and the interrupt was lost
    ("Exception ignored"). The descriptor is now owned by an object whose C deallocator closes it. The same
    trick as the review: the signal is tripped and the last reference dropped by C calls with no bytecode between."""
    import _thread
    import collections
    import operator

    region = uffd.FillRegion.create(4096)
    fd = region.uffd
    holder = [region]
    del region
    reached = False
    try:
        collections.deque(map(operator.call, [_thread.interrupt_main, holder.clear]), maxlen=0)
    except KeyboardInterrupt:
        reached = True
    assert reached
    with pytest.raises(OSError):
        os.fstat(fd)


def test_region_over_a_memory_file_fills_its_shmem_pages():
    """FillRegion.over registers a shared mapping of a memory file (the distributed load's shared destination):
    UFFDIO_COPY allocates and fills the file's own pages (read back through the descriptor), a present page is
    never overwritten, and once released the rest is ordinary shared memory."""
    fd = os.memfd_create("flashpack-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * 4096)
        m = mmap.mmap(fd, 4 * 4096, flags=mmap.MAP_SHARED)
        address = np.frombuffer(m, dtype=np.uint8).ctypes.data
        with pytest.raises(ValueError, match="page-aligned"):
            uffd.FillRegion.over(address + 1, 4096)
        region = uffd.FillRegion.over(address, 3 * 4096 + 1)
        assert (region.mapping, region.address, region.nbytes) == (None, address, 4 * 4096)
        src = torch.arange(4 * 4096, dtype=torch.int64).to(torch.uint8)
        assert region.copy(address, src.data_ptr(), 2 * 4096) == (2 * 4096, 0)
        assert region.copy(address + 4096, src.data_ptr(), 4096) == (0, errno.EEXIST)
        region.release()
        os.preadv(fd, [memoryview(m)[2 * 4096:3 * 4096]], 0)  # a kernel write into it works once released
        assert os.pread(fd, 3 * 4096, 0) == bytes(src[:2 * 4096].numpy()) + bytes(src[:4096].numpy())
        assert os.pread(fd, 4096, 3 * 4096) == bytes(4096)  # never filled: a zeroed page
        m.close()
    finally:
        os.close(fd)


def test_a_shared_fill_that_stops_midway_falls_back_to_preadv(pack, monkeypatch):
    """A UFFDIO_COPY into the shared memory file refused partway (ENOMEM): the region is released and the reads
    finish the load into the shared mapping with preadv(2); the sealed file holds the file's bytes."""
    from flashpack.loading.common import assemble, prepare
    from flashpack.loading.host import read_into
    from flashpack.settings import settings
    from flashpack.source import read_pack_map

    path, sd = pack
    real, calls = uffd.FillRegion.copy, []

    def stop_on_second(self, address, src_address, nbytes):
        calls.append(nbytes)
        if len(calls) == 2:
            done, _ = real(self, address, src_address, nbytes // 2)
            return done, errno.ENOMEM
        return real(self, address, src_address, nbytes)

    monkeypatch.setattr(uffd.FillRegion, "copy", stop_on_second)
    monkeypatch.setattr(flashpack.io.base, "native_copy", None)  # the C copy calls no faked copy
    cfg = settings()
    job = prepare(read_pack_map(path), None, verify=True, cfg=cfg)
    fd, b = memory.shared_buffer(job.plan.buffer_nbytes, userfaultfd=True)
    try:
        assert b.kind == "memfd+uffd"
        st = flashpack.LoadStats()
        read_into(job.wm, job.plan, b.tensor, backend="threads", verify=True, stats=st, cfg=cfg, cache="keep",
                  fill=b.region)
        assert b.region.released and 0 < st.bytes_filled < st.bytes_read == st.bytes_buffered
        del b
        out = assemble(job, memory.map_shared(memory.seal_shared(fd)))
        assert all(torch.equal(out[k], sd[k]) for k in sd)
    finally:
        os.close(fd)


def test_a_refused_registration_closes_its_descriptor_once(tmp_path):
    """UFFDIO_REGISTER refused (a shared mapping of an ext4 file: EINVAL): the descriptor is closed once, and the
    dropped half-made region does not close its number again (by then another file's: it was, before)."""
    import gc

    f = tmp_path / "plain"
    f.write_bytes(bytes(4096))
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 4096, flags=mmap.MAP_SHARED)
    address = np.frombuffer(m, dtype=np.uint8).ctypes.data
    with pytest.raises(OSError) as e:
        uffd.FillRegion.over(address, 4096)
    assert e.value.errno == errno.EINVAL
    reused = os.open(os.devnull, os.O_RDONLY)  # most likely the number the region's descriptor had
    try:
        del e
        gc.collect()  # the region's __del__, with the traceback gone
        os.fstat(reused)  # still open
    finally:
        os.close(reused)
    m.close()
