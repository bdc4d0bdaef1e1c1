"""The page-cache policy: ``flashpack.load(..., cache="auto"|"keep"|"bypass")`` and ``FLASHPACK_CACHE``
(flashpack.io.pagecache.decide_cache, Prefetcher; flashpack.loading.common.cache_mode).

Cache states are made with posix_fadvise(DONTNEED) on the test's own files (drop_from_cache) and read back with
mincore (resident_pages). Test doubles (a refusing or truncating madvise, a MemAvailable) live here."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import flashpack
from flashpack.errors import ReadError, SettingsError
from flashpack.io import pagecache
from flashpack.io.pagecache import MADV_POPULATE_READ, drop_from_cache, resident_pages
from flashpack.loading.common import aligned_empty, prepare
from flashpack.loading.staged import load_payload_staged
from flashpack.settings import MiB, settings
from flashpack.testing import HostCopySink

#: 24 MiB of float32 in one tensor: three 8 MiB extents, each at least uring's POOL_MIN_NBYTES (copied by threads).
NUMEL = 6 * 1024 * 1024


@pytest.fixture
def cold(tmp_path):
    """(path, state_dict, payload byte range) of a pack whose pages are evicted from the page cache."""
    sd = {"w": torch.arange(NUMEL, dtype=torch.float32)}
    path = str(tmp_path / "cold.flashpack")
    flashpack.pack_to_file(sd, path)  # fsynced (atomic), so its pages are clean and can be dropped
    drop_from_cache(path)
    t = flashpack.read_weight_map(path).tensors["w"]
    return path, sd, (t.offset, t.offset + t.nbytes)


def payload_resident(path, span) -> float:
    """Fraction of the payload's pages in the page cache now (mincore), its first MiB left out: reading the
    header (buffered, by read_weight_map) makes the kernel read a few pages ahead past it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = resident_pages(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return float(np.mean(pages[(span[0] + MiB) // 4096:span[1] // 4096]))


class RecordingMadvise:
    """Wraps pagecache._madvise: records (advice, nbytes, errno) of every MADV_POPULATE_READ call in ``calls``
    (``before(i)`` runs first, ``i`` the calls so far); ``refuse``: that errno instead, for every advice."""

    def __init__(self, monkeypatch, before=None, refuse: int = 0):
        self.real = pagecache._madvise
        self.calls: list[tuple[int, int, int]] = []
        self.before, self.refuse = before, refuse
        monkeypatch.setattr(pagecache, "_populate_refused", False)
        monkeypatch.setattr(pagecache, "_madvise", self)

    def __call__(self, address, nbytes, advice):
        if advice == MADV_POPULATE_READ and self.before is not None:
            self.before(len(self.calls))
        err = self.refuse if self.refuse else self.real(address, nbytes, advice)
        if advice == MADV_POPULATE_READ:
            self.calls.append((advice, nbytes, err))
        return err


def test_keep_reads_a_cold_file_through_the_cache_and_leaves_it_there(cold, backend):
    path, sd, span = cold
    assert payload_resident(path, span) == 0.0
    st = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=st)
    assert torch.equal(out["w"], sd["w"])
    assert (st.cache, st.cache_reason) == ("keep", "cache='keep' asked for")
    assert st.bytes_direct == 0 and st.bytes_buffered == st.bytes_read == 24 * MiB
    assert (st.bytes_prefetched, st.prefetch) == (24 * MiB, "populate_read")
    assert payload_resident(path, span) == 1.0

    # the next load (a restart) finds every page cached: nothing read ahead, every extent copied from the cache
    again = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=again)
    assert torch.equal(out["w"], sd["w"])
    assert (again.bytes_prefetched, again.prefetch, again.bytes_direct) == (0, "", 0)


def test_bypass_reads_with_o_direct_and_leaves_nothing_cached(cold, backend):
    path, sd, span = cold
    st = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="bypass", stats=st)
    assert torch.equal(out["w"], sd["w"])
    assert (st.cache, st.cache_reason) == ("bypass", "cache='bypass' asked for")
    assert (st.bytes_direct, st.bytes_prefetched, st.prefetch) == (24 * MiB, 0, "")
    assert payload_resident(path, span) == 0.0


def test_auto_keeps_up_to_half_of_mem_available(cold, monkeypatch):
    path, _, span = cold
    n = 24 * MiB  # bytes the load reads
    monkeypatch.setattr(pagecache, "mem_available_nbytes", lambda: 2 * n)
    st = flashpack.LoadStats()
    flashpack.load(path, stats=st)
    assert (st.cache, st.cache_reason) == ("keep", f"{n} bytes to read <= 50% of MemAvailable ({2 * n} bytes)")
    assert payload_resident(path, span) == 1.0

    drop_from_cache(path)
    monkeypatch.setattr(pagecache, "mem_available_nbytes", lambda: 2 * n - 2)
    st = flashpack.LoadStats()
    flashpack.load(path, stats=st)
    assert (st.cache, st.cache_reason) == ("bypass", f"{n} bytes to read > 50% of MemAvailable ({2 * n - 2} bytes)")
    assert payload_resident(path, span) == 0.0


def test_env_and_direct_on(cold, monkeypatch):
    path, _, _ = cold
    assert settings().cache == "auto"
    monkeypatch.setenv("FLASHPACK_CACHE", "Bypass")
    st = flashpack.LoadStats()
    flashpack.load(path, stats=st)
    assert (st.cache, st.cache_reason) == ("bypass", "cache='bypass' asked for")
    st = flashpack.LoadStats()
    flashpack.load(path, stats=st, cache="keep")  # the argument wins over the variable
    assert st.cache == "keep"
    monkeypatch.setenv("FLASHPACK_CACHE", "auto")
    monkeypatch.setenv("FLASHPACK_DIRECT", "on")
    st = flashpack.LoadStats()
    flashpack.load(path, stats=st)
    assert (st.cache, st.cache_reason) == ("bypass", "FLASHPACK_DIRECT=on asks for O_DIRECT")
    monkeypatch.setenv("FLASHPACK_CACHE", "sometimes")
    with pytest.raises(SettingsError, match="FLASHPACK_CACHE='sometimes': expected auto, keep or bypass"):
        flashpack.load(path)
    monkeypatch.delenv("FLASHPACK_CACHE")
    with pytest.raises(ValueError, match="cache='never': expected one of auto, keep, bypass"):
        flashpack.load(path, cache="never")
    with pytest.raises(ValueError, match="cache='never'"):
        flashpack.load(path, cache="never", mmap=True)


def test_truncated_under_a_keep_load_is_a_read_error_not_sigbus(cold, backend, monkeypatch):
    path, _, span = cold
    cut = span[0] + 4 * MiB  # inside the first extent

    def truncate_first(i):
        if i == 0:
            os.truncate(path, cut)

    spy = RecordingMadvise(monkeypatch, before=truncate_first)
    with pytest.raises(ReadError, match=rf"short read at byte offset \d+: expected {8 * MiB} bytes, got "
                                        rf"({4 * MiB}|0) \(was the file truncated") as ei:
        flashpack.load(path, backend=backend, cache="keep")
    assert (ei.value.errno, ei.value.filename) == (errno.EIO, path)
    # every range reached past the new end of the file: madvise said EFAULT where a touch would have raised SIGBUS
    assert spy.calls and all(c == (MADV_POPULATE_READ, 8 * MiB, errno.EFAULT) for c in spy.calls), spy.calls


def test_populate_refused_falls_back_to_willneed(cold, backend, monkeypatch):
    path, sd, span = cold
    # a kernel before 5.14; the helper thread is slow to find out, so every extent is queued before it does (CI
    # once saw "populate_read" here: the method was recorded when an extent was queued, not once it was read ahead)
    spy = RecordingMadvise(monkeypatch, before=lambda i: time.sleep(0.2), refuse=errno.EINVAL)
    advised: list[tuple[int, int]] = []
    real = pagecache.read_ahead
    monkeypatch.setattr(pagecache, "read_ahead",
                        lambda fd, off, n, limit: (advised.append((off, n)), real(fd, off, n, limit))[1])
    st = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=st)
    assert torch.equal(out["w"], sd["w"])
    assert spy.calls == [(MADV_POPULATE_READ, 8 * MiB, errno.EINVAL)]  # refused once, then never asked again
    assert sorted(advised) == [(span[0] + i * 8 * MiB, 8 * MiB) for i in range(3)]
    assert (st.prefetch, st.bytes_prefetched) == ("willneed", 24 * MiB)
    assert payload_resident(path, span) == 1.0
    assert pagecache._populate_refused  # later loads start with WILLNEED (restored by monkeypatch)


def test_keep_reads_ahead_each_extent_once_in_file_order(cold, backend, monkeypatch):
    """Extents are queued for read-ahead as the reader queues them (up to queue_depth ahead of the copies), in file
    order, each uncached extent once."""
    path, sd, span = cold
    added: list[tuple[int, int]] = []
    real = pagecache.Prefetcher.add
    monkeypatch.setattr(pagecache.Prefetcher, "add",
                        lambda self, off, n: (added.append((off, n)), real(self, off, n))[1])
    st = flashpack.LoadStats()
    out = flashpack.load(path, backend=backend, cache="keep", stats=st)
    assert torch.equal(out["w"], sd["w"])
    assert added == [(span[0] + i * 8 * MiB, 8 * MiB) for i in range(3)]
    assert (st.prefetch, st.bytes_prefetched) == ("populate_read", 24 * MiB)


def test_staged_path_honours_keep(cold, backend):
    path, sd, span = cold
    wm = flashpack.read_weight_map(path)
    job = prepare(wm, None, verify=True, cfg=settings())
    st = flashpack.LoadStats()
    dest = aligned_empty(job.plan.buffer_nbytes)
    with HostCopySink(dest) as sink:
        load_payload_staged(wm, job.plan, sink, backend=backend, verify=True, stats=st, cache="keep")
    assert torch.equal(dest[:24 * MiB].view(torch.float32), sd["w"])
    assert st.bytes_prefetched == 24 * MiB and st.bytes_direct == 0
    assert payload_resident(path, span) == 1.0


def _half_cached(tmp_path):
    """(fd, file_nbytes) of a 4 MiB file with only its second and fourth MiB in the page cache."""
    path = str(tmp_path / "half.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
    for start in (MiB, 3 * MiB):
        os.pread(fd, MiB, start)
    return fd, 4 * MiB


def test_residency_map_agrees_with_mincore_per_range(tmp_path):
    """ResidencyMap (cachestat(2) where the kernel has it) gives, range by range, the fraction mincore(2) gives."""
    fd, n = _half_cached(tmp_path)
    try:
        pages = resident_pages(fd, n)
        if pages is None or pages[MiB // 4096:2 * MiB // 4096].mean() < 1.0 or pages[:MiB // 4096].mean() > 0.0:
            pytest.skip("this file system does not leave exactly the pages read in the page cache")
        res = pagecache.ResidencyMap(fd, n)
        if pagecache.cached_pages(fd, 0, n) is not None:
            assert res.method == "cachestat"
        for off, nbytes in ((0, MiB), (MiB, MiB), (0, 2 * MiB), (MiB // 2, MiB), (3 * MiB, 2 * MiB), (n - 1, 1),
                            (4096 * 5 + 7, 100), (0, n)):
            lo, hi = off // 4096, min(n, off + nbytes + 4095) // 4096
            assert res.fraction(off, nbytes) == pytest.approx(float(pages[lo:hi].mean())), (off, nbytes)
        assert res.fraction(0, 0) == 0.0 and res.fraction(n, MiB) == 0.0  # empty and past the end
    finally:
        os.close(fd)


@pytest.mark.parametrize("kernel", ["cachestat", "mincore"])
def test_residency_map_across_granules_agrees_with_mincore_page_by_page(tmp_path, monkeypatch, kernel):
    """The map keeps a count per granule and pages only for partly cached granules: ranges that start, end or lie
    inside wholly cached, empty and partly cached 256 KiB granules (and the short last one) give mincore's
    fraction, with cachestat(2) and from a mincore(2) snapshot alike."""
    path = tmp_path / "g.bin"
    n = 4 * MiB + 5 * 4096  # 16 granules of 64 pages and a last one of 5
    with open(path, "wb") as f:
        f.write(b"\1" * n)
        f.flush()
        os.fsync(f.fileno())  # dirty pages are not dropped
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        for off, nbytes in ((0, 256 * 1024), (512 * 1024, 100 * 4096), (2 * MiB + 3 * 4096, 7 * 4096),
                            (3 * MiB, 256 * 1024 + 4096), (4 * MiB, 5 * 4096)):
            os.pread(fd, nbytes, off)
        pages = resident_pages(fd, n)
        if pages is None or not pages[:64].all() or pages[64:128].any():
            pytest.skip("this file system does not leave exactly the pages read in the page cache")
        monkeypatch.setattr(pagecache, "RESIDENCY_GRANULE_NBYTES", 256 * 1024)
        if kernel == "mincore":
            monkeypatch.setattr(pagecache, "cached_pages", lambda *a: None)
        elif pagecache.cached_pages(fd, 0, n) is None:
            pytest.skip("the kernel has no cachestat(2) (Linux < 6.5) or a filter refuses it")
        res = pagecache.ResidencyMap(fd, n)
        assert res.method == kernel
        starts = [0, 4096, 63 * 4096, 64 * 4096, 100 * 4096, 128 * 4096 - 1, 2 * MiB + 4096, 3 * MiB, 4 * MiB - 4096, n - 1]
        for off in starts:
            for nbytes in (1, 4096, 65 * 4096, MiB + 7, n):
                lo, hi = off // 4096, min(len(pages), (off + nbytes + 4095) // 4096)
                assert res.fraction(off, nbytes) == pytest.approx(float(pages[lo:hi].mean())), (off, nbytes)
        assert res.fraction(n, 4096) == 0.0 and res.fraction(0, 0) == 0.0
    finally:
        os.close(fd)


def test_residency_map_without_cachestat_takes_a_mincore_snapshot(tmp_path, monkeypatch):
    """A kernel without cachestat(2) (before 6.5, or a seccomp filter that refuses it): one mincore snapshot."""
    fd, n = _half_cached(tmp_path)
    try:
        pages = resident_pages(fd, n)
        monkeypatch.setattr(pagecache, "cached_pages", lambda *a: None)
        res = pagecache.ResidencyMap(fd, n)
        assert res.method == "mincore"
        assert res.fraction(0, 2 * MiB) == pytest.approx(float(pages[:512].mean()))
    finally:
        os.close(fd)


def test_residency_map_falls_back_when_cachestat_is_refused_midway(tmp_path, monkeypatch):
    """cachestat answers for the first 1 MiB granule (partly cached: mincore asked about it), then refuses: the
    whole file is asked with mincore, and the answers are still exact."""
    fd, n = _half_cached(tmp_path)
    try:
        pages = resident_pages(fd, n)
        answers = iter([7])
        monkeypatch.setattr(pagecache, "RESIDENCY_GRANULE_NBYTES", MiB)
        monkeypatch.setattr(pagecache, "cached_pages", lambda *a: next(answers, None))
        res = pagecache.ResidencyMap(fd, n)
        assert res.method == "mincore"
        assert res.fraction(MiB // 2, 2 * MiB) == pytest.approx(float(pages[128:640].mean()))
    finally:
        os.close(fd)


def test_residency_map_is_a_snapshot_taken_at_open(tmp_path):
    """A load decides each extent by the cache as it was when the load started: pages read (or evicted) after
    the map was taken do not change its answers (the keep path's own read-ahead must not turn a cold extent into
    a "cached" one half-way)."""
    fd, n = _half_cached(tmp_path)
    try:
        before = resident_pages(fd, n)
        res = pagecache.ResidencyMap(fd, n)
        want = [res.fraction(i * MiB, MiB) for i in range(4)]
        assert want == [pytest.approx(float(before[i * 256:(i + 1) * 256].mean())) for i in range(4)]
        os.pread(fd, MiB, 0)
        os.posix_fadvise(fd, MiB, MiB, os.POSIX_FADV_DONTNEED)
        assert [res.fraction(i * MiB, MiB) for i in range(4)] == want
    finally:
        os.close(fd)


def test_residency_granules_whole_cached_and_empty_are_not_asked_page_by_page(tmp_path, monkeypatch):
    """Granules whose pages are all cached or none cached take one cachestat call each; only a partly cached
    granule is asked with mincore."""
    fd, n = _half_cached(tmp_path)
    try:
        if pagecache.cached_pages(fd, 0, n) is None:
            pytest.skip("the kernel has no cachestat(2) (Linux < 6.5) or a filter refuses it")
        asked = []
        real = pagecache.resident_pages
        monkeypatch.setattr(pagecache, "resident_pages", lambda *a: asked.append(a[2:]) or real(*a))
        monkeypatch.setattr(pagecache, "RESIDENCY_GRANULE_NBYTES", MiB)
        pages = real(fd, n)
        res = pagecache.ResidencyMap(fd, n)
        partial = [(i * MiB, MiB) for i in range(4) if 0 < pages[i * 256:(i + 1) * 256].sum() < 256]
        assert res.method == "cachestat" and asked == partial
        assert res.fraction(0, n) == pytest.approx(float(pages.mean()))
    finally:
        os.close(fd)


def test_cached_pages_counts_the_range_and_refuses_nothing_sane(tmp_path):
    fd, n = _half_cached(tmp_path)
    try:
        got = pagecache.cached_pages(fd, 0, n)
        if got is None:
            pytest.skip("the kernel has no cachestat(2) (Linux < 6.5) or a filter refuses it")
        pages = resident_pages(fd, n)
        assert got == int(pages.sum())
        assert pagecache.cached_pages(fd, MiB, MiB) == int(pages[256:512].sum())
        assert pagecache.cached_pages(fd, 0, 0) == 0 and pagecache.cached_pages(fd, -1, 10) is None
    finally:
        os.close(fd)


def _wait_cached(fd, file_offset, nbytes, timeout_s=10.0) -> int:
    """Pages of the range cached once the count stops growing (cachestat, else mincore), at most ``timeout_s``."""
    import time
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        n = pagecache.cached_pages(fd, file_offset, nbytes)
        if n is None:
            n = int(resident_pages(fd, os.fstat(fd).st_size, file_offset, nbytes).sum())
        if n == nbytes // 4096 or n == last:
            return n
        last = n
        time.sleep(0.2)
    return last


def test_read_ahead_asks_in_pieces_the_kernel_reads_whole(tmp_path):
    """posix_fadvise(WILLNEED) reads at most max(max_sectors_kb, read_ahead_kb) of one advice (mm/readahead.c):
    one advice of a range larger than that leaves the rest uncached; read_ahead() cuts it in pieces of the
    device's limit and all of it is read."""
    path = tmp_path / "ra.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        limit = pagecache.readahead_limit_nbytes(fd)
        if limit == pagecache.DEFAULT_READAHEAD_LIMIT_NBYTES:
            pytest.skip(f"{tmp_path} is not on a block device sysfs names (tmpfs?)")
        span = 3 * limit
        os.write(fd, os.urandom(2 * span))
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around what the test itself reads
        assert pagecache.cached_pages(fd, 0, 2 * span) in (0, None)
        os.posix_fadvise(fd, 0, span, os.POSIX_FADV_WILLNEED)  # one advice of three limits
        assert 0 < _wait_cached(fd, 0, span) <= limit // 4096 + 64
        assert pagecache.read_ahead(fd, span, span, limit)
        assert _wait_cached(fd, span, span) == span // 4096
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid in a child")
def test_residency_of_another_users_file_is_unknown_not_all_cached(tmp_path):
    """A cold file owned by root, read by uid 65534 (the descriptor opened before the child drops its ids): the
    kernel refuses cachestat (EPERM) and mincore says every page is resident. The map must say "unknown" and count
    nothing cached, or a cold load of a shared model store is copied fault by fault instead of read ahead. The
    same descriptor before the drop: cachestat, nothing cached (the control)."""
    path = tmp_path / "theirs.bin"
    path.write_bytes(os.urandom(4 * MiB))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    n = 4 * MiB
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            before = pagecache.ResidencyMap(fd, n)
            row = [before.method, before.fraction(0, n)]
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            after = pagecache.ResidencyMap(fd, n)
            row += [pagecache.cached_pages(fd, 0, n), bool(resident_pages(fd, n).all()),
                    pagecache.mincore_reports_cache(fd), after.method, after.fraction(0, n)]
            os.write(w, repr(row).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert out == repr(["cachestat", 0.0, None, True, False, "unknown", 0.0])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv(1)")
def test_residency_for_root_without_capabilities_is_unknown(tmp_path):
    """Root in a container started with --cap-drop=ALL (here: setpriv with an empty bounding set) has neither
    CAP_FOWNER nor CAP_DAC_OVERRIDE: for a cold file of uid 65534 the kernel refuses cachestat and mincore says
    all resident, so the map must say "unknown" (an euid-0 shortcut said "mincore", all cached)."""
    path = tmp_path / "nobodys.bin"
    path.write_bytes(os.urandom(4 * MiB))
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o644)
    drop_from_cache(str(path))
    child = ("import os, sys; from flashpack.io import pagecache as pc; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "m = pc.ResidencyMap(fd, 4 << 20); "
             "print(m.method, m.fraction(0, 4 << 20), pc.cached_pages(fd, 0, 4 << 20), pc.mincore_reports_cache(fd))")
    r = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", child, str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["unknown", "0.0", "None", "False"], r.stdout


def test_residency_on_overlayfs_is_asked_of_the_file_beneath(tmp_path):
    """A file of a Docker image lives on overlayfs, where cachestat(2) counts the overlay inode's empty mapping (a
    cached file read 0% cached, so bypass loads read it again with O_DIRECT). mincore(2) on a mapping of it sees the
    pages of the file beneath: cached reads 1.0, evicted reads 0.0."""
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    with open(dirs["lower"] / "image.bin", "wb") as f:
        f.write(os.urandom(4 * MiB))
        os.fsync(f.fileno())  # clean pages, which DONTNEED can evict
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {r.stderr.strip()}")
    try:
        fd = os.open(dirs["merged"] / "image.bin", os.O_RDONLY)
        try:
            n = os.fstat(fd).st_size
            os.pread(fd, n, 0)
            cached = pagecache.ResidencyMap(fd, n)
            drop_from_cache(dirs["lower"] / "image.bin")  # the pages belong to the file beneath
            cold = pagecache.ResidencyMap(fd, n)
        finally:
            os.close(fd)
        assert (cached.method, cached.fraction(0, n)) == ("mincore", 1.0)
        assert (cold.method, cold.fraction(0, n)) == ("mincore", 0.0)
    finally:
        subprocess.run(["umount", str(dirs["merged"])], check=True)
