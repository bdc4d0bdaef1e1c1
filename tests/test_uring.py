"""What only the ``uring`` backend has: the probe and its reasons (C19), registered buffers and files,
RLIMIT_MEMLOCK (C20), and the optional build (native/build_uring.py)."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from flashpack.errors import BackendUnavailableError, ReadError
from flashpack.io import Extent, backend_info, base, open_reader, pagecache, read_all, resolve_backend, uring

from _helpers import aligned, make_file, open_fds, split, uring_faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_uring = pytest.mark.skipif(not uring.probe()[0], reason=f"io_uring unavailable: {uring.probe()[1]}")


@pytest.fixture
def fresh_probe(monkeypatch):
    """A probe that runs again in this test, and notices that are logged again; both restored after."""
    monkeypatch.setattr(uring, "_probe_cache", None)
    monkeypatch.setattr(uring, "_probe_flags", {})
    monkeypatch.setattr(base, "_notices", set())


def _refuse_setup(err: int):
    def setup_ring(depth):
        raise OSError(err, os.strerror(err))
    return setup_ring


# --------------------------------------------------------------------------- C19: io_uring refused


C19_CASES = {
    "seccomp-eperm": (errno.EPERM, 0, ["EPERM", "seccomp", "--security-opt seccomp=unconfined"]),
    "enosys": (errno.ENOSYS, 0, ["ENOSYS", "CONFIG_IO_URING"]),
    "disabled-1": (errno.EPERM, 1, ["kernel.io_uring_disabled=1", "io_uring_group",
                                    "sysctl kernel.io_uring_disabled=0"]),
    "disabled-2": (None, 2, ["kernel.io_uring_disabled=2", "sysctl kernel.io_uring_disabled=0"]),
}


@pytest.mark.parametrize("case", list(C19_CASES))
def test_c19_refused_ring_falls_back_to_threads_with_one_notice(case, tmp_path, monkeypatch, caplog, fresh_probe):
    err, disabled, words = C19_CASES[case]
    monkeypatch.setattr(uring, "io_uring_disabled", lambda: disabled)
    if err is not None:
        monkeypatch.setattr(uring, "setup_ring", _refuse_setup(err))
    else:  # io_uring_disabled=2 must be reported without even trying a ring
        monkeypatch.setattr(uring, "setup_ring", lambda depth: pytest.fail("ring setup attempted"))
    nbytes = 300_000 + 3
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)

    info = backend_info("uring")
    assert not info.available and all(w in info.reason for w in words), info.reason
    with caplog.at_level(logging.WARNING, logger="flashpack"):
        for _ in range(3):
            assert resolve_backend("auto") == "threads"
            buf = aligned(nbytes)
            with open_reader(path, backend="auto", direct="on") as r:
                assert r.name == "threads"
                read_all(r, split(nbytes, 64 * 1024, buf))
            assert np.array_equal(buf, data)
    lines = [r.getMessage() for r in caplog.records if "io_uring" in r.getMessage()]
    assert len(lines) == 1, lines
    assert all(w in lines[0] for w in words) and "threads" in lines[0]
    with pytest.raises(BackendUnavailableError) as ei:
        open_reader(path, backend="uring")
    assert all(w in str(ei.value) for w in words)
    assert isinstance(ei.value, RuntimeError)


def test_extension_not_built_says_how_to_build(tmp_path, monkeypatch, caplog, fresh_probe):
    monkeypatch.setattr(uring, "_uring", None)
    monkeypatch.setattr(uring, "_IMPORT_ERROR", "No module named 'flashpack._uring'")
    ok, reason = uring.probe()
    assert not ok and "liburing-dev" in reason and "reinstall" in reason and "flashpack._uring" in reason
    path = tmp_path / "f.bin"
    make_file(path, 5000)
    with pytest.raises(BackendUnavailableError, match="liburing-dev"):
        open_reader(path, backend="uring")
    with caplog.at_level(logging.WARNING, logger="flashpack"):
        with open_reader(path, backend="auto") as r:
            assert r.name == "threads"
        # the notice comes when a load needs the ring: not for this wholly cached file where cachestat(2) says so
        assert resolve_backend("auto") == "threads"
    assert sum("liburing-dev" in r.getMessage() for r in caplog.records) == 1


def test_probe_is_cached(monkeypatch, fresh_probe):
    calls = []

    def counting(depth):
        calls.append(depth)
        raise OSError(errno.ENOSYS, "nope")

    monkeypatch.setattr(uring, "setup_ring", counting)
    for _ in range(5):
        assert uring.probe()[0] is False
    assert len(calls) == 1


# --------------------------------------------------------------------------- registered files and buffers


@needs_uring
def test_features_name_what_is_active(tmp_path):
    path = tmp_path / "f.bin"
    make_file(path, 100_000)
    with open_reader(path, backend="uring", direct="on", queue_depth=5, registered_files=True,
                     registered_buffers=True) as r:
        assert {"queue_depth=5", "registered_files", "registered_buffers", "o_direct"} <= r.features
    with open_reader(path, backend="uring", direct="off", registered_files=False, registered_buffers=False) as r:
        assert not {"registered_files", "registered_buffers", "o_direct"} & r.features
    assert any(f.startswith("queue_depth=") for f in backend_info("uring").features)


@needs_uring
@pytest.mark.parametrize("registered_files", [True, False])
def test_registered_buffers_give_the_same_bytes(tmp_path, monkeypatch, registered_files):
    """Small windows, so extents land in several registered windows and some straddle two (unregistered)."""
    monkeypatch.setattr(uring, "FIXED_WINDOW_NBYTES", 256 * 1024)
    nbytes = 3 * 1024 * 1024 + 777
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    for extent_nbytes in (64 * 1024, 96 * 1024):
        buf = aligned(nbytes)
        with open_reader(path, backend="uring", direct="on", registered_buffers=True,
                         registered_files=registered_files) as r:
            read_all(r, split(nbytes, extent_nbytes, buf))
            assert "registered_buffers" in r.features
            assert r.stats.bytes_direct == nbytes - nbytes % 4096
            assert len([v for v in r._fixed.values() if v is not None]) == -(-nbytes // (256 * 1024))
        assert np.array_equal(buf, data)


@needs_uring
def test_close_releases_registered_buffer_owners(tmp_path):
    path = tmp_path / "f.bin"
    data = make_file(path, 200_000)
    buf = bytearray(200_000)
    with open_reader(path, backend="uring", registered_buffers=True) as r:
        read_all(r, [Extent(0, 200_000, memoryview(buf))])
    buf.extend(b"x")  # would raise BufferError if the reader still held an export
    assert bytes(buf[:200_000]) == data.tobytes()


@needs_uring
def test_cancel_pending_completes_every_extent_once(tmp_path):
    nbytes = 4 * 1024 * 1024
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    buf = aligned(nbytes)
    extents = split(nbytes, 64 * 1024, buf)
    with open_reader(path, backend="uring", queue_depth=2) as r:
        r.submit(extents)
        r.cancel_pending()
        got = []
        while r.in_flight:
            got += r.wait()
    assert sorted(c.extent.tag for c in got) == sorted(e.tag for e in extents)
    ok = [c for c in got if c.error is None]
    assert 1 <= len(ok) <= 2 and len(got) - len(ok) == len(extents) - len(ok)
    for c in ok:
        o = c.extent.tag
        assert np.array_equal(buf[o:o + 64 * 1024], data[o:o + 64 * 1024])


@needs_uring
def test_bad_destination_is_an_extent_error_not_a_crash(tmp_path):
    path = tmp_path / "f.bin"
    make_file(path, 10_000)
    small = bytearray(100)
    with open_reader(path, backend="uring") as r:
        r.submit([Extent(0, 10_000, memoryview(small)), Extent(0, 10, memoryview(b"readonly...."))])
        got = []
        while r.in_flight:
            got += r.wait()
    assert len(got) == 2 and all(isinstance(c.error, ValueError) for c in got)
    assert small == bytearray(100)


_C20_CHILD = textwrap.dedent("""
    import hashlib, json, logging, resource, sys
    import numpy as np
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    from flashpack.io import Extent, open_reader, read_all
    path, nbytes = sys.argv[1], int(sys.argv[2])
    raw = np.zeros(nbytes + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096
    buf = raw[start:start + nbytes]
    with open(f"/proc/self/status") as f:
        capeff = int([l for l in f if l.startswith("CapEff:")][0].split()[1], 16)
    with open_reader(path, backend="uring", direct="on", registered_buffers=True) as r:
        before = sorted(r.features)
        step = 256 * 1024
        read_all(r, [Extent(o, min(step, nbytes - o), memoryview(buf)[o:o + step]) for o in range(0, nbytes, step)])
        after = sorted(r.features)
        stats = dict(direct=r.stats.bytes_direct, buffered=r.stats.bytes_buffered)
    print(json.dumps(dict(before=before, after=after, stats=stats, sha=hashlib.sha256(buf).hexdigest(),
                          memlock=resource.getrlimit(resource.RLIMIT_MEMLOCK), ipc_lock=bool(capeff >> 14 & 1))))
""")


@needs_uring
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
def test_c20_memlock_64k_drops_registered_buffers_keeps_the_ring(tmp_path):
    nbytes = 2 * 1024 * 1024 + 100
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    cmd = ["prlimit", "--memlock=65536:65536"]
    if os.geteuid() == 0:  # root has CAP_IPC_LOCK, which ignores RLIMIT_MEMLOCK: drop it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing: cannot drop CAP_IPC_LOCK")
        cmd += ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"]
    cmd += [sys.executable, "-c", _C20_CHILD, str(path), str(nbytes)]
    env = dict(os.environ, PYTHONPATH=REPO, FLASHPACK_URING_BUFFERS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["memlock"] == [65536, 65536] and out["ipc_lock"] is False
    assert "registered_buffers" in out["before"] and "registered_buffers" not in out["after"]
    assert out["sha"] == hashlib.sha256(data.tobytes()).hexdigest()
    assert out["stats"]["direct"] == nbytes - nbytes % 4096  # the ring went on, with O_DIRECT
    notices = [line for line in res.stderr.splitlines() if "RLIMIT_MEMLOCK" in line]
    assert len(notices) == 1, res.stderr
    assert "65536 bytes soft / 65536 bytes hard" in notices[0]
    need = int(notices[0].split("needs at least ")[1].split()[0])
    assert need >= nbytes


# --------------------------------------------------------------------------- the optional build


def _build_script():
    spec = importlib.util.spec_from_file_location("build_uring_under_test", os.path.join(REPO, "native", "build_uring.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_script_says_why_not(monkeypatch):
    pytest.importorskip("cffi")
    mod = _build_script()
    monkeypatch.setenv("FLASHPACK_NO_URING_BUILD", "1")
    assert not mod.can_build() and "FLASHPACK_NO_URING_BUILD" in mod.why_not()
    monkeypatch.delenv("FLASHPACK_NO_URING_BUILD")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not mod.can_build() and "no C compiler" in mod.why_not()
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return
    monkeypatch.setenv("CC", shutil.which("cc") or shutil.which("gcc"))
    monkeypatch.setenv("CFLAGS", "-nostdinc")  # hides liburing.h along with every other header
    reason = mod.why_not()
    assert "liburing.h not found" in reason and "liburing-dev" in reason
    monkeypatch.delenv("CFLAGS")
    if uring._uring is not None:  # built here, so the script must agree it can build
        assert mod.can_build(), mod.why_not()


@needs_uring
def test_cached_extents_are_copied_by_threads_and_cold_ones_go_to_the_ring(tmp_path):
    """A warm file (just written, so in the page cache) is copied by the copy threads, not read inline on
    the submitting thread; a cold one goes through the ring with O_DIRECT. Same bytes either way."""
    path = tmp_path / "warm.bin"
    nbytes = 8 * 1024 * 1024  # 1 MiB extents: all large enough for the copy threads
    data = make_file(path, nbytes)
    buf = aligned(nbytes)
    with open_reader(path, "uring", direct="auto") as r:
        read_all(r, split(nbytes, 1024 * 1024, buf))
        assert r._copier is not None and r._copier.stats is r.stats  # the owned ThreadsReader copied them
        assert r.stats.bytes_buffered == nbytes and r.stats.bytes_direct == 0
        assert r.ring_stats()["sqes"] == 0
    assert np.array_equal(buf, data)
    from flashpack.io.pagecache import drop_from_cache

    drop_from_cache(path)
    buf2 = aligned(nbytes)
    with open_reader(path, "uring", direct="auto") as r:
        read_all(r, split(nbytes, 1024 * 1024, buf2))
        if r.stats.bytes_direct:  # the kernel honoured DONTNEED: the cold extents went to the ring
            assert r.ring_stats()["sqes"] > 0
    assert np.array_equal(buf2, data)


@pytest.mark.timeout(60)
def test_auto_copies_a_wholly_cached_file_without_making_a_ring(tmp_path, monkeypatch, fresh_probe):
    """``auto`` on a file wholly in the page cache opens the threads backend, which copies every extent as the uring
    backend's copier would, and neither probes io_uring nor sets a ring up (0.3-0.9 ms in a fresh process); once a
    page is missing, ``auto`` is ``uring`` again where io_uring runs. The same bytes either way."""
    from flashpack.io import wholly_cached
    from flashpack.io.pagecache import cached_pages, drop_from_cache

    path = tmp_path / "warm.bin"
    nbytes = 4 * 1024 * 1024 + 4096 * 3 + 5
    data = make_file(path, nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        if cached_pages(fd, 0, nbytes) is None:
            pytest.skip("no cachestat(2) on this kernel (Linux 6.5+): auto keeps its usual choice")
    finally:
        os.close(fd)
    path.read_bytes()
    assert wholly_cached(path)
    ok, _ = uring.probe()
    monkeypatch.setattr(uring, "_probe_cache", None)
    monkeypatch.setattr(uring, "setup_ring", lambda depth: pytest.fail("a ring was set up for a cached file"))
    asked, real = [], pagecache.cached_pages
    monkeypatch.setattr(pagecache, "cached_pages", lambda *a: (asked.append(a[1:]), real(*a))[1])
    buf = aligned(nbytes)
    with open_reader(path, backend="auto", direct="auto", cache="keep") as r:
        assert r.name == "threads"
        # one cachestat(2) of the whole file (wholly_cached); the reader's residency snapshot takes its answer
        assert asked == [(0, nbytes)] and r._files._resident.fraction(0, nbytes) == 1.0
        read_all(r, split(nbytes, 1024 * 1024, buf))
        assert r.stats.bytes_buffered == nbytes and r.stats.bytes_direct == 0
    assert np.array_equal(buf, data)
    assert uring._probe_cache is None  # never probed
    assert not wholly_cached(tmp_path / "missing.bin") and not wholly_cached(tmp_path)
    (tmp_path / "empty.bin").write_bytes(b"")
    assert not wholly_cached(tmp_path / "empty.bin")
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open(2) would hang here
    assert not wholly_cached(tmp_path / "fifo")
    monkeypatch.undo()
    with open_reader(tmp_path / "fifo", backend="auto") as r:  # opened as by a named backend (loads refuse FIFOs
        assert r.name == ("uring" if ok else "threads")         # above this layer, naming the file)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED drops clean pages only
        drop_from_cache(path)
        left = cached_pages(fd, 0, nbytes)
    finally:
        os.close(fd)
    if left == -(-nbytes // 4096):
        pytest.skip("posix_fadvise(DONTNEED) left the file cached here (tmpfs?)")
    assert not wholly_cached(path)
    buf2 = aligned(nbytes)
    with open_reader(path, backend="auto", direct="auto") as r:
        assert r.name == ("uring" if ok else "threads")
        read_all(r, split(nbytes, 1024 * 1024, buf2))
    assert np.array_equal(buf2, data)


# --------------------------------------------------------------------------- hard submit errors (test build)


@needs_uring
@pytest.mark.parametrize("max_res", [0, 5000], ids=["whole-reads", "resubmissions"])
def test_hard_submit_error_loses_no_read_and_writes_no_failed_buffer(tmp_path, monkeypatch, max_res):
    """io_uring_submit fails hard (ENXIO) on two submit calls: every extent still completes exactly once,
    the failed ones with that errno; after an extent is reported failed its buffer never changes again
    (its SQE became a no-op); the successful ones hold the right bytes; close returns."""
    extent_nbytes = 64 * 1024
    nbytes = 48 * extent_nbytes
    path = tmp_path / "f.bin"
    data = make_file(path, nbytes)
    uring_faults(monkeypatch, submit_errno=errno.ENXIO, submit_fail_from=2, submit_fail_count=2, max_res=max_res)
    fds = open_fds()
    buf = aligned(nbytes)
    extents = split(nbytes, extent_nbytes, buf)
    seen: dict[int, BaseException | None] = {}
    snapshots: dict[int, bytes] = {}
    r = open_reader(path, backend="uring", direct="on", queue_depth=8)
    r.submit(extents)
    while r.in_flight:
        for c in r.wait(timeout_s=10):
            tag = c.extent.tag
            assert tag not in seen, f"extent {tag} completed twice"
            seen[tag] = c.error
            if c.error is not None:
                snapshots[tag] = buf[tag:tag + extent_nbytes].tobytes()
    r.close()
    assert sorted(seen) == [e.tag for e in extents]
    failed = {t: e for t, e in seen.items() if e is not None}
    assert failed and len(failed) < len(extents), len(failed)
    for tag, err in failed.items():
        assert isinstance(err, ReadError) and err.errno == errno.ENXIO and "io_uring submit failed" in str(err)
        assert buf[tag:tag + extent_nbytes].tobytes() == snapshots[tag], f"extent {tag} written after it failed"
    for tag in set(seen) - set(failed):
        assert np.array_equal(buf[tag:tag + extent_nbytes], data[tag:tag + extent_nbytes]), tag
    assert open_fds() == fds


@needs_uring
def test_finish_ignores_an_unknown_tag(tmp_path):
    path = tmp_path / "f.bin"
    make_file(path, 4096)
    with open_reader(path, backend="uring") as r:
        d = uring._uring.ffi.new("struct fp_done *", {"tag": 12345})
        assert r._finish(d) is None


# --------------------------------------------------------------------------- one header, one bound


def test_cdef_comes_from_the_header_and_hides_the_test_hooks():
    mod = _build_script()
    text = mod.header_text()
    plain, testing = mod.cdef_from_header(text), mod.cdef_from_header(text, testing=True)
    directives = [line.strip() for line in plain.splitlines() if line.strip().startswith("#")]
    assert directives and all(d.startswith("#define FP_") and d.endswith(" ...") for d in directives), directives
    assert "#define FP_MAX_QUEUE_DEPTH ..." in plain and "struct fp_read {" in plain
    assert "fp_ring_set_fault" not in plain and "fp_ring_set_fault" in testing
    with pytest.raises(ValueError):
        mod.cdef_from_header("#ifdef FP_TESTING\nint x;\n")
    if uring._uring is not None:
        assert not hasattr(uring._uring.lib, "fp_ring_set_fault")  # the shipped build has no fault hooks


def test_queue_depth_bound_is_one_number(monkeypatch):
    from flashpack.errors import SettingsError
    from flashpack.settings import MAX_QUEUE_DEPTH, settings

    mod = _build_script()
    assert mod.header_constant("FP_MAX_QUEUE_DEPTH") == MAX_QUEUE_DEPTH == mod.settings_max_queue_depth()
    mod.check_queue_depth_bound()
    if uring._uring is not None:
        assert uring._uring.lib.FP_MAX_QUEUE_DEPTH == MAX_QUEUE_DEPTH
    monkeypatch.setenv("FLASHPACK_QUEUE_DEPTH", str(MAX_QUEUE_DEPTH))
    assert settings().queue_depth == MAX_QUEUE_DEPTH
    monkeypatch.setenv("FLASHPACK_QUEUE_DEPTH", "8192")
    with pytest.raises(SettingsError, match=f"FLASHPACK_QUEUE_DEPTH='8192': expected an integer from 1 to {MAX_QUEUE_DEPTH}"):
        settings()
