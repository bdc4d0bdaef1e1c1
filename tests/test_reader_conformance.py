"""One conformance suite for every reader backend (``flashpack.io.backends()``), driven only through the
reader interface: ``open_reader``, ``Extent``, ``read_all``, ``wait``. A backend that cannot run here is
skipped with its probe's reason.

Faults are injected per backend by :func:`inject`: for ``threads`` by patching
``flashpack.io.base._preadv``; for ``uring`` by swapping in the shim's test build (``-DFP_TESTING``,
compiled once per session into a temporary directory by :func:`fault_build`) and setting its
``struct fp_fault`` on each new ring (applied in C to each completion's result; the reads themselves
are real). Cases C15-C18 and C22 of CASES.md.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import threading

import numpy as np
import pytest

from flashpack.errors import ReadError
from flashpack.io import Extent, backends, base, open_reader, read_all
from flashpack.io.pagecache import drop_from_cache
from flashpack.source import file_identity

from _helpers import PAGE, aligned, make_file, no_more_threads_than, open_fds, pattern_bytes, split, task_names, uring_faults  # noqa: E501



# --------------------------------------------------------------------------- helpers


def load(path, backend: str, nbytes: int, extent_nbytes: int = 256 * 1024, direct: str = "on", **kw):
    buf = aligned(nbytes)
    with open_reader(path, backend=backend, direct=direct, **kw) as r:
        read_all(r, split(nbytes, extent_nbytes, buf))
        return buf, r.stats, r.features


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def inject(backend: str, monkeypatch, *, extent_nbytes: int = 0, max_res: int = 0, direct_max_nbytes: int = -1,
           direct_errno: int = 0, err_errno: int = 0, err_offset: int = -1, eof_offset: int = -1) -> list:
    """Make reads misbehave the same way on every backend; returns a list that records (fd_is_direct,
    file_offset, nbytes asked, nbytes reported) for the threads backend (empty for uring).

    ``direct_max_nbytes`` counts per extent; for threads, extents must start at multiples of
    ``extent_nbytes``."""
    if backend == "uring":
        uring_faults(monkeypatch, max_res=max_res, direct_max_nbytes=direct_max_nbytes, direct_errno=direct_errno,
                     err_errno=err_errno, err_offset=err_offset, eof_offset=eof_offset)
        return []
    assert backend == "threads", backend
    real = base._preadv
    log: list = []

    def fake(fd, buffers, offset):
        direct = _is_direct(fd)
        want = sum(memoryview(b).nbytes for b in buffers)
        if direct and direct_errno:
            raise OSError(direct_errno, os.strerror(direct_errno))
        if err_errno and offset <= err_offset < offset + want:
            raise OSError(err_errno, os.strerror(err_errno))
        n = real(fd, buffers, offset)  # the real read; only the reported count changes
        if eof_offset >= 0:
            n = max(0, min(n, eof_offset - offset))
        if direct and direct_max_nbytes >= 0:
            n = max(0, min(n, direct_max_nbytes - offset % extent_nbytes))
        if max_res > 0:
            n = min(n, max_res)
        log.append((direct, offset, want, n))
        return n

    monkeypatch.setattr(base, "_preadv", fake)
    monkeypatch.setattr(base, "native_copy", None)  # the C copy calls no faked preadv
    return log


# --------------------------------------------------------------------------- bytes in the right places


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 4097, 3 * PAGE + 1, 1024 * 1024 + 7])
def test_sizes_and_extent_at_eof(backend, tmp_path, nbytes):
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    for extent_nbytes in (PAGE, 64 * 1024, nbytes):
        buf, st, _ = load(path, backend, nbytes, extent_nbytes)
        assert np.array_equal(buf, data)
        assert st.bytes_read == nbytes and st.extents == -(-nbytes // extent_nbytes)


def test_unaligned_heads_tails_and_addresses(backend, tmp_path):
    nbytes = 300_000 + 17
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    cases = [(1, 4095), (4095, 8194), (4096, 4096 * 5 + 3), (12_288, 65_536), (7, 1), (nbytes - 5000, 5000)]
    for misalign in (0, 1, 512):
        for direct in ("on", "off"):
            bufs = [aligned(n, misalign) for _, n in cases]
            with open_reader(path, backend=backend, direct=direct) as r:
                read_all(r, [Extent(o, n, memoryview(b)) for (o, n), b in zip(cases, bufs)])
            for (o, n), b in zip(cases, bufs):
                assert np.array_equal(b, data[o:o + n]), (misalign, direct, o, n)


def test_thousands_of_small_extents(backend, tmp_path):
    nbytes = 4 * 1024 * 1024 + 333
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    rng = random.Random(7)
    extents, out = [], aligned(nbytes)
    mv = memoryview(out)
    o = 0
    while o < nbytes:
        n = min(nbytes - o, rng.choice([1, 3, 100, 511, 700, 1500, 4096, 5000]))
        extents.append(Extent(o, n, mv[o:o + n], tag=o))
        o += n
    rng.shuffle(extents)
    assert len(extents) > 2000
    done = []
    with open_reader(path, backend=backend, direct="on") as r:
        read_all(r, extents, on_complete=lambda e: done.append(e.tag))
        assert r.stats.extents == len(extents) and r.stats.bytes_read == nbytes
    assert sorted(done) == sorted(e.tag for e in extents)
    assert np.array_equal(out, data)


def test_extent_larger_than_2gib_is_split(backend, tmp_path):
    """One 2.1 GiB extent of a sparse file: only the marker regions hold data, the rest reads as zeros."""
    nbytes = 2 * 1024**3 + 100 * 1024 * 1024 + 123
    path = tmp_path / "sparse.bin"
    cap = 0x7FFFF000
    markers = [(0, 65_536), (cap - 70_000, 140_000), (2 * 1024**3 - 4096, 8192 + 5), (nbytes - 100_001, 100_001)]
    with open(path, "wb") as f:
        f.truncate(nbytes)
        for o, n in markers:
            f.seek(o)
            f.write(pattern_bytes(o, n).tobytes())
    buf = aligned(nbytes)
    buf[:: 1 << 20] = 0xAA  # stale bytes where holes must become zeros
    try:
        with open_reader(path, backend=backend, direct="on") as r:
            read_all(r, [Extent(0, nbytes, memoryview(buf))])
            assert r.stats.bytes_read == nbytes
        for o, n in markers:
            assert np.array_equal(buf[o:o + n], pattern_bytes(o, n)), o
        for o in (1 << 20, 1024**3, cap + (1 << 20), nbytes - 200_000):
            assert not buf[o:o + 4096].any(), o
    finally:
        del buf


def test_parallel_loads_in_threads(backend, tmp_path):
    nbytes = 2 * 1024 * 1024 + 999
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    results, errors = {}, []

    def one(i):
        try:
            buf, st, _ = load(path, backend, nbytes, 64 * 1024 + (i % 3) * PAGE, direct=("on", "off", "auto")[i % 3])
            results[i] = bool(np.array_equal(buf, data)) and st.bytes_read == nbytes
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {i: True for i in range(8)}


def test_repeated_open_close_leaks_nothing(backend, tmp_path):
    nbytes = 200_000
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    load(path, backend, nbytes)  # warm-up: lazy imports, first ring
    fds, tasks, pythreads = open_fds(), task_names(), threading.active_count()
    for i in range(60):
        buf = aligned(nbytes)
        r = open_reader(path, backend=backend, direct=("on", "off", "auto")[i % 3])
        if i % 2:
            read_all(r, split(nbytes, 16 * 1024, buf))
            assert np.array_equal(buf, data)
        else:  # close with reads still in flight: close drains them
            r.submit(split(nbytes, 16 * 1024, buf))
        r.close()
        r.close()  # idempotent
        assert r.wait() == []
    assert open_fds() == fds
    assert len(no_more_threads_than(tasks)) <= len(tasks), (task_names(), tasks)
    assert threading.active_count() == pythreads


def test_direct_modes_give_the_same_bytes(backend, tmp_path):
    nbytes = 1024 * 1024 + 4096 * 3 + 11
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    seen = {}
    for direct in ("on", "off", "auto"):
        buf, st, feats = load(path, backend, nbytes, 128 * 1024, direct=direct)
        assert np.array_equal(buf, data), direct
        seen[direct] = st
    assert seen["on"].bytes_direct == nbytes - nbytes % PAGE  # every aligned body went direct
    assert seen["off"].bytes_direct == 0 and seen["off"].bytes_buffered == nbytes


def test_auto_reads_a_warm_file_buffered_and_a_cold_one_direct(backend, tmp_path):
    nbytes = 2 * 1024 * 1024
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)  # just written: in the page cache
    buf, st, _ = load(path, backend, nbytes, direct="auto")
    assert np.array_equal(buf, data)
    assert st.bytes_direct == 0 and st.bytes_buffered == nbytes
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_from_cache(path)
    buf, st, _ = load(path, backend, nbytes, direct="auto")
    assert np.array_equal(buf, data)
    if st.bytes_direct == 0:
        pytest.skip("the kernel kept the pages cached after POSIX_FADV_DONTNEED")
    assert st.bytes_direct > nbytes // 2


def test_wait_on_an_idle_reader_returns_at_once(backend, tmp_path):
    path = tmp_path / "f.bin"
    data = make_file(path, 10_000)
    buf = aligned(10_000)
    with open_reader(path, backend=backend) as r:
        assert r.wait() == [] and r.wait(timeout_s=0) == [] and r.in_flight == 0
        r.submit([Extent(0, 10_000, memoryview(buf), tag="t")])
        got = []
        while r.in_flight:
            got += r.wait(timeout_s=5)
        assert [(c.extent.tag, c.error) for c in got] == [("t", None)]
    assert np.array_equal(buf, data)


# --------------------------------------------------------------------------- injected faults


def test_c15_direct_open_refused_reads_buffered(backend, tmp_path, monkeypatch, caplog):
    nbytes = 512 * 1024 + 100
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    real_open = base._open

    def refuse_direct(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), p)
        return real_open(p, flags, *a)

    monkeypatch.setattr(base, "_open", refuse_direct)
    with caplog.at_level(logging.WARNING, logger="flashpack"):
        for _ in range(2):
            buf, st, feats = load(path, backend, nbytes, direct="on")
            assert np.array_equal(buf, data)
            assert st.bytes_direct == 0 and st.bytes_buffered == nbytes
            assert "o_direct" not in feats
    notices = [r for r in caplog.records if "O_DIRECT refused" in r.getMessage()]
    assert len(notices) == 1 and str(path) in notices[0].getMessage()


def test_c16_direct_read_refused_retries_buffered(backend, tmp_path, monkeypatch, caplog):
    nbytes = 1024 * 1024 + 4097
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    inject(backend, monkeypatch, direct_errno=errno.EINVAL)
    with caplog.at_level(logging.WARNING, logger="flashpack"):
        buf, st, _ = load(path, backend, nbytes, 128 * 1024, direct="on")
    assert np.array_equal(buf, data)
    assert st.bytes_direct == 0 and st.bytes_buffered == nbytes and st.direct_fallbacks >= 1
    notices = [r for r in caplog.records if "O_DIRECT read refused" in r.getMessage()]
    assert len(notices) == 1 and str(path) in notices[0].getMessage()


def test_c16_buffered_retry_failing_too_reaches_the_caller(backend, tmp_path, monkeypatch):
    nbytes = 512 * 1024
    path = tmp_path / "f.bin"
    make_file(path, nbytes)
    inject(backend, monkeypatch, direct_errno=errno.EINVAL, err_errno=errno.EIO, err_offset=200_000)
    with pytest.raises(ReadError) as ei:
        load(path, backend, nbytes, 64 * 1024, direct="on")
    assert ei.value.errno == errno.EIO and ei.value.filename == str(path)


def test_c17_direct_returns_one_page_then_eof(backend, tmp_path, monkeypatch):
    extent_nbytes = 64 * 1024
    nbytes = 10 * extent_nbytes + 1234  # not a multiple of 4096; the last extent ends at EOF
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    log = inject(backend, monkeypatch, extent_nbytes=extent_nbytes, direct_max_nbytes=PAGE)
    buf, st, _ = load(path, backend, nbytes, extent_nbytes, direct="on")
    assert np.array_equal(buf, data)
    assert st.bytes_direct == 10 * PAGE  # one page of each direct extent, the rest buffered
    assert st.bytes_buffered == nbytes - 10 * PAGE
    assert st.direct_fallbacks == 0
    # threads: every direct read asked for an aligned range at an aligned offset
    assert all(o % PAGE == 0 and n % PAGE == 0 for d, o, n, _ in log if d)


def test_c18_reads_of_at_most_1000_bytes(backend, tmp_path, monkeypatch):
    nbytes = 300_000 + 5
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    log = inject(backend, monkeypatch, max_res=1000)
    buf, st, _ = load(path, backend, nbytes, 64 * 1024, direct="on")
    assert np.array_equal(buf, data)
    assert st.bytes_read == nbytes
    # a 1000-byte direct count is unaligned: the remainder went buffered, never back to O_DIRECT
    assert st.bytes_direct == 1000 * -(-nbytes // (64 * 1024)) and st.direct_fallbacks == 0
    assert all(o % PAGE == 0 for d, o, _, _ in log if d)


def test_c18_zero_byte_read_before_the_end_names_file_offset_and_counts(backend, tmp_path, monkeypatch):
    nbytes = 256 * 1024
    path = tmp_path / "f.bin"
    make_file(path, nbytes)
    inject(backend, monkeypatch, eof_offset=200_000)  # inside the last extent, [196608, 262144)
    for direct in ("off", "on"):
        with pytest.raises(OSError) as ei:
            load(path, backend, nbytes, 64 * 1024, direct=direct)
        msg = str(ei.value)
        assert isinstance(ei.value, ReadError) and ei.value.filename == str(path)
        assert "offset 196608" in msg and "expected 65536 bytes" in msg and "got 3392" in msg, msg


def test_c22_eio_reaches_the_caller_after_every_read_finished(backend, tmp_path, monkeypatch):
    extent_nbytes = 64 * 1024
    nbytes = 64 * extent_nbytes
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    load(path, backend, nbytes, extent_nbytes)  # warm-up
    fds, tasks, pythreads = open_fds(), task_names(), threading.active_count()
    bad = 20 * extent_nbytes + 5000
    inject(backend, monkeypatch, err_errno=errno.EIO, err_offset=bad)
    buf = aligned(nbytes)
    completed = []
    r = open_reader(path, backend=backend, direct="on")
    with pytest.raises(ReadError) as ei:
        read_all(r, split(nbytes, extent_nbytes, buf), on_complete=lambda e: completed.append(e.tag))
    assert r.in_flight == 0  # drained before the error was raised
    r.close()
    err = ei.value
    assert err.errno == errno.EIO and err.filename == str(path)
    assert "offset 1310720" in str(err) and "65536 bytes" in str(err)
    assert 20 * extent_nbytes not in completed
    for tag in completed:  # what was reported complete is right
        assert np.array_equal(buf[tag:tag + extent_nbytes], data[tag:tag + extent_nbytes])
    assert open_fds() == fds
    assert len(no_more_threads_than(tasks)) <= len(tasks), (task_names(), tasks)
    assert threading.active_count() == pythreads


# --------------------------------------------------------------------------- the protocol and open_reader


def test_reader_satisfies_the_protocol_and_reports_what_backends_reports(backend, tmp_path):
    from flashpack.io import Reader
    from flashpack.settings import settings

    path = tmp_path / "f.bin"
    make_file(path, 100_000)
    cfg = settings()
    with open_reader(path, backend=backend, cfg=cfg) as r:
        assert isinstance(r, Reader)
        assert r.name == backend and r.path == str(path) and r.file_nbytes == 100_000
        if "o_direct" in r.features or cfg.direct == "off":  # O_DIRECT not refused by this file system
            assert r.features == backends(cfg)[backend].features
        assert not hasattr(r, "files")  # FileHandles stay inside flashpack.io


def test_expect_checks_the_opened_file(backend, tmp_path):
    path = tmp_path / "f.bin"
    make_file(path, 50_000)
    ident = file_identity(os.stat(path))
    with open_reader(path, backend=backend, expect=ident) as r:
        assert r.file_nbytes == 50_000
    fds = open_fds()
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(ReadError) as ei:
        open_reader(path, backend=backend, expect=ident)
    assert ei.value.errno == errno.ESTALE and ei.value.filename == str(path)
    assert ("the file was replaced, truncated or rewritten while it was being loaded (50000 bytes when its "
            "weight map was read, 50004 bytes now; its weight map and payload would not match); load it again"
            ) in str(ei.value)
    assert open_fds() == fds  # nothing left open by the refused reader


def test_expect_sees_a_same_size_rewrite_whose_mtime_was_set_back(backend, tmp_path):
    """``cp -p`` over the file: same inode, same size, the old mtime restored; only the ctime tells."""
    path = tmp_path / "f.bin"
    make_file(path, 50_000)
    before = os.stat(path)
    ident = file_identity(before)
    with open(path, "r+b") as f:
        f.write(b"\xff" * 100)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(ReadError) as ei:
        open_reader(path, backend=backend, expect=ident)
    assert ei.value.errno == errno.ESTALE and ei.value.filename == str(path)


@pytest.mark.parametrize("option, value", [("queue_depth", 0), ("queue_depth", 4097), ("threads", -1)])
def test_options_out_of_range_are_named(backend, tmp_path, option, value):
    path = tmp_path / "f.bin"
    make_file(path, 1000)
    with pytest.raises(ValueError, match=f"{option}={value}: expected an integer from 1 to"):
        open_reader(path, backend=backend, **{option: value})


def test_queue_depth_bounds_reads_in_flight(backend, tmp_path):
    nbytes = 64 * 4096
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    buf = aligned(nbytes)
    with open_reader(path, backend=backend, direct="on", queue_depth=3, threads=8) as r:
        assert {"queue_depth=3", "threads=8"} <= r.features
        read_all(r, split(nbytes, 4096, buf))
    assert np.array_equal(buf, data)


def test_c_error_turns_a_negative_return_into_oserror():
    from flashpack.io import c_error

    e = c_error(-errno.ENOENT, "opening", "/x")
    assert isinstance(e, FileNotFoundError) and e.errno == errno.ENOENT and e.filename == "/x"
    assert e.strerror == f"opening failed: {os.strerror(errno.ENOENT)}"
    r = c_error(-errno.EIO, "read", "/y", ReadError)
    assert isinstance(r, ReadError) and r.errno == errno.EIO
