"""GPU loads from the page cache without a CPU copy (flashpack/staging/mapped.py), run on the CPU with the
host copy engine and a registrar double: bytes, the window bound, refusals falling back to the ring with one
notice, checksum errors after every window is unregistered, and truncation giving ReadError, never SIGBUS."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flashpack
from flashpack import ChecksumMismatchError, LoadStats, ReadError, read_weight_map
from flashpack.io import base as io_base
from flashpack.io.pagecache import drop_from_cache
from flashpack.loading.common import prepare
from flashpack.settings import settings
from flashpack.staging import mapped as mapped_mod
from flashpack.staging.mapped import FileMapping, run_mapped, window_bound
from flashpack.loading.staged import ring_shape
from flashpack.testing import HostCopySink, HostRegistrar, load_staged

KiB, MiB = 1024, 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOT = 256 * KiB


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(300_000, generator=g),
        "w.bf16": torch.randn(250_000, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(70_001, generator=g).to(torch.float16),
        "w.i64": torch.arange(60_000, dtype=torch.int64),
        "w.u8": torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=g),
        "w.bool": torch.rand(999, generator=g) > 0.5,
        "w.empty": torch.empty(0, 3),
    }


@pytest.fixture
def packed(pack):
    return pack(state_dict(), chunk_nbytes=64 * KiB)


@pytest.fixture
def notices(monkeypatch):
    monkeypatch.setattr(io_base, "_notices", set())


def same(out: dict, ref: dict) -> None:
    assert list(out) == list(ref)
    for k, r in ref.items():
        o = out[k]
        assert o.dtype == r.dtype and o.shape == r.shape, k
        assert o.reshape(-1).view(torch.uint8).tolist() == r.reshape(-1).view(torch.uint8).tolist(), k


def windows_of(path: str, verify: bool = True) -> int:
    """Windows of the whole pack in a load with SLOT-byte slots (the ring's pieces; verification never
    cuts a checksum chunk)."""
    wm = read_weight_map(path)
    job = prepare(wm, None, verify=verify, cfg=settings())
    return len(ring_shape(job.plan, wm, settings(), SLOT, None, job.verify)[2])


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "straight from the page cache was refused" in r.getMessage()]


# --------------------------------------------------------------------------- bytes and the window bound


@pytest.mark.parametrize("verify", [True, False])
def test_mapped_bytes_equal_flashpack_load(packed, verify):
    ref = flashpack.load(packed)
    reg, st = HostRegistrar(), LoadStats()
    out = load_staged(packed, mapped="on", registrar=reg, stats=st, slot_nbytes=SLOT, num_slots=3, verify=verify,
                      max_delay_s=0.002, seed=1)
    same(out, ref)
    n = windows_of(packed, verify)
    assert n > 3 and os.path.getsize(packed) > 3 * SLOT  # windows smaller than the file
    assert st.backend == "mapped" and st.bytes_direct == 0
    assert reg.registered == reg.unregistered == n and reg.live == 0 and not reg.violations
    assert (st.chunks_verified > 0) == verify
    assert mapped_mod.registered_nbytes()[0] == 0


def test_mapped_partial_keys(packed):
    keys = ["w.bf16", "w.bool"]
    out = load_staged(packed, mapped="on", keys=keys, slot_nbytes=SLOT)
    same(out, flashpack.load(packed, keys=keys))


@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_window_bound_is_respected(packed, num_slots):
    reg = HostRegistrar()
    mapped_mod.reset_registered_peak()
    load_staged(packed, mapped="on", registrar=reg, slot_nbytes=SLOT, num_slots=num_slots, max_delay_s=0.003, seed=2)
    assert reg.registered == windows_of(packed) > num_slots
    assert 1 <= reg.peak_live <= num_slots
    assert mapped_mod.registered_nbytes()[1] <= num_slots * SLOT


def test_window_bound_follows_the_pinned_cap():
    assert window_bound(4, 64 * MiB, 1 << 30) == 4
    assert window_bound(4, 64 * MiB, 128 * MiB) == 2
    assert window_bound(4, 64 * MiB, 1) == 1


def test_auto_takes_the_mapped_path_only_when_cached(packed, notices):
    flashpack.load(packed)  # buffered reads of a fresh file: cached
    st = LoadStats()
    same(load_staged(packed, mapped="auto", stats=st, slot_nbytes=SLOT), flashpack.load(packed))
    assert st.backend == "mapped"
    st = LoadStats()
    load_staged(packed, mapped="auto", backend="threads", stats=st, slot_nbytes=SLOT)
    assert st.backend == "threads"  # a named reader: the ring
    drop_from_cache(packed)
    wm = read_weight_map(packed)
    with FileMapping.open(wm) as m:
        frac = m.resident_fraction(prepare(wm, None, verify=None, cfg=settings()).plan)
    if frac >= mapped_mod.MIN_RESIDENT_FRACTION:
        pytest.skip(f"posix_fadvise(DONTNEED) left {frac:.0%} of the file cached here (tmpfs?)")
    st = LoadStats()
    same(load_staged(packed, mapped="auto", stats=st, slot_nbytes=SLOT), flashpack.load(packed))
    assert st.backend != "mapped"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("refuse_after", [0, 2])
def test_refused_registration_falls_back_to_the_ring_once(packed, notices, caplog, refuse_after):
    ref = flashpack.load(packed)
    caplog.set_level(logging.WARNING, logger="flashpack")
    for _ in range(2):
        reg, st = HostRegistrar(refuse="cudaHostRegister returned 801: operation not supported",
                                refuse_after=refuse_after), LoadStats()
        out = load_staged(packed, mapped="on", registrar=reg, stats=st, slot_nbytes=SLOT, num_slots=3)
        same(out, ref)
        assert reg.live == 0 and reg.registered == reg.unregistered and not reg.violations
        assert st.backend.startswith("mapped+") if refuse_after else st.backend in ("uring", "threads")
        assert st.chunks_verified == sum(1 for _ in read_weight_map(packed).chunks())
    msgs = refusals(caplog)
    assert len(msgs) == 1 and "operation not supported" in msgs[0] and packed in msgs[0], msgs


def test_old_kernel_without_populate_falls_back(packed, notices, caplog, monkeypatch):
    def refuse(addr, n, advice):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(mapped_mod, "_madvise", refuse)
    caplog.set_level(logging.WARNING, logger="flashpack")
    reg, st = HostRegistrar(), LoadStats()
    same(load_staged(packed, mapped="on", registrar=reg, stats=st, slot_nbytes=SLOT), flashpack.load(packed))
    assert reg.attempts == 0 and st.backend in ("uring", "threads")
    msgs = refusals(caplog)
    assert len(msgs) == 1 and "MADV_POPULATE_READ" in msgs[0] and "5.14" in msgs[0], msgs


# --------------------------------------------------------------------------- errors after draining


def test_corrupted_chunk_raises_after_every_window_is_unregistered(packed):
    wm = read_weight_map(packed)
    off = wm.tensors["w.bf16"].offset + 12345
    with open(packed, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    reg = HostRegistrar()
    with pytest.raises(ChecksumMismatchError, match="w.bf16"):
        load_staged(packed, mapped="on", registrar=reg, slot_nbytes=SLOT, num_slots=2, max_delay_s=0.002, seed=3)
    assert reg.registered >= 1 and reg.registered == reg.unregistered and reg.live == 0 and not reg.violations
    assert mapped_mod.registered_nbytes()[0] == 0


def test_file_rewritten_mid_load_raises_estale(packed):
    st = os.stat(packed)

    def touch(window, i):
        if i == 0:
            os.utime(packed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    reg = HostRegistrar(on_register=touch)
    with pytest.raises(ReadError) as ei:
        load_staged(packed, mapped="on", registrar=reg, slot_nbytes=SLOT, num_slots=2)
    assert ei.value.errno == errno.ESTALE and ei.value.filename == packed
    assert reg.registered == reg.unregistered and reg.live == 0


TRUNCATE = textwrap.dedent("""
    import os, sys, torch, flashpack
    from flashpack import ReadError, read_weight_map
    from flashpack.loading.common import prepare
    from flashpack.settings import settings
    from flashpack.staging.mapped import FileMapping, run_mapped
    from flashpack.staging.scheduler import cut_pieces
    from flashpack.testing import HostCopySink, HostRegistrar, load_payload_host

    path, case = sys.argv[1], sys.argv[2]
    sd = {"a": torch.randn(400_000), "b": torch.randn(300_000).to(torch.bfloat16)}
    flashpack.pack_to_file(sd, path, chunk_nbytes=64 * 1024)
    wm = read_weight_map(path)
    cut = wm.tensors["b"].offset + 100_003  # a little into the second tensor
    slot = 256 * 1024
    try:
        if case == "after-weight-map":
            os.truncate(path, cut)
            plan = prepare(wm, None, verify=None, cfg=settings()).plan
            load_payload_host(wm, plan, backend=None, verify=True, stats=flashpack.LoadStats(), mapped="on",
                              slot_nbytes=slot)
        else:
            plan = prepare(wm, None, verify=None, cfg=settings()).plan
            pieces = cut_pieces(plan, slot, wm.file_nbytes)
            reg = HostRegistrar(on_register=(lambda w, i: os.truncate(path, cut) if i == 1 else None)
                                if case == "mid-load" else None)
            with FileMapping.open(wm) as m:
                if case == "before-populate":
                    os.truncate(path, cut)
                dest = torch.empty(plan.buffer_nbytes, dtype=torch.uint8)
                with HostCopySink(dest) as sink:
                    try:
                        run_mapped(m, plan, pieces, sink, reg, verify=True, max_windows=3,
                                   prep_threads=1 if case == "mid-load" else 2, hash_threads=2)
                    finally:
                        print("registered", reg.registered, "unregistered", reg.unregistered, "live", reg.live)
        print("NO ERROR")
    except ReadError as e:
        print("READERROR", e.errno, e)
""")


@pytest.mark.parametrize("case", ["after-weight-map", "before-populate", "mid-load"])
def test_truncation_gives_read_error_not_sigbus(tmp_path, case):
    script = tmp_path / "truncate.py"
    script.write_text(TRUNCATE)
    path = str(tmp_path / "t.flashpack")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(script), path, case], capture_output=True, text=True, timeout=120, env=env)
    text = p.stdout + p.stderr
    assert p.returncode == 0, f"exit status {p.returncode} (SIGBUS is {-7}): {text[-3000:]}"
    assert "READERROR" in p.stdout and path in p.stdout, text[-3000:]
    if case == "after-weight-map":
        assert f"READERROR {errno.ESTALE}" in p.stdout, text
    else:
        assert f"READERROR {errno.EFAULT}" in p.stdout and "MADV_POPULATE_READ" in p.stdout, text
        assert "truncated" in p.stdout and "could not read bytes [" in p.stdout, text
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith("registered"))
        _, reg, _, unreg, _, live = line.split()
        assert reg == unreg and live == "0", line


def test_populate_checks_the_window(tmp_path):
    path = str(tmp_path / "p.flashpack")
    flashpack.pack_to_file({"a": torch.randn(100_000)}, path)
    wm = read_weight_map(path)
    with FileMapping.open(wm) as m:
        assert m.populate(0, 4096) is None
        with pytest.raises(ValueError):
            m.populate(100, 4096)
        with pytest.raises(ValueError):
            m.populate(0, wm.file_nbytes + 4096)


@pytest.mark.parametrize("where", ["after-submit", "after-popleft"])
def test_an_interrupt_between_the_window_lists_leaves_no_window_registered(packed, monkeypatch, where):
    """Found by review: a KeyboardInterrupt that lands while a registered window is in neither of run_mapped's lists
    (``after-submit``: the window's task was queued, the interrupt came before it was recorded; ``after-popleft``: taken
    from the prepared windows, not yet among the copying ones, the interrupt at ``Task.result``'s first bytecode) left
    it registered (a ``cudaHostRegister`` outliving the load, the process's count wrong). Each registered window is now
    recorded by the pool thread that registered it and unregistered by the end."""
    from flashpack.io import sync, threads

    from flashpack.staging.scheduler import cut_pieces

    wm = read_weight_map(packed)
    plan = prepare(wm, None, verify=True, cfg=settings()).plan
    pieces = cut_pieces(plan, SLOT, wm.file_nbytes)
    assert len(pieces) >= 3
    if where == "after-submit":
        real_submit, n = threads.ReadPool.submit, []

        def submit(self, fn, *args):
            task = real_submit(self, fn, *args)
            n.append(task)
            if len(n) == 2:  # the second window's task, once it has registered the window
                assert task.wait(10)
                raise KeyboardInterrupt("after the task was queued, before it was recorded")
            return task

        monkeypatch.setattr(threads.ReadPool, "submit", submit)
    else:
        real_result, calls = sync.Task.result, []

        def result(self, timeout_s=None):
            calls.append(1)
            if len(calls) == 1:
                self.wait()  # the window is registered
                raise KeyboardInterrupt("at Task.result's first bytecode")
            return real_result(self, timeout_s)

        monkeypatch.setattr(sync.Task, "result", result)
    reg = HostRegistrar()
    before = mapped_mod.registered_nbytes()[0]
    with FileMapping.open(wm) as m:
        dest = torch.empty(plan.buffer_nbytes, dtype=torch.uint8)
        with HostCopySink(dest) as sink:
            with pytest.raises(KeyboardInterrupt):
                run_mapped(m, plan, pieces, sink, reg, verify=True, max_windows=3, hash_threads=1)
    assert reg.registered >= 2 and reg.unregistered == reg.registered and reg.live == 0
    assert mapped_mod.registered_nbytes()[0] == before
