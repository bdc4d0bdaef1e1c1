"""The staging ring and its scheduler, run with the host copy engine (no GPU needed): slot reuse only
after the copy fence (C23), draining before errors propagate (C22), pinning capped or refused and
zero-byte plans (C25)."""

from __future__ import annotations

import errno
import os
import threading
import warnings

import pytest
import torch

import flashpack
import flashpack.loading.common
import flashpack.loading.host
import flashpack.settings
from flashpack import ChecksumMismatchError, LoadStats, ReadError, read_weight_map
from flashpack.staging import ring as ring_mod
from flashpack.loading.common import aligned_empty
from flashpack.loading.staged import load_payload_staged
from flashpack.testing import load_payload_host, load_staged
from flashpack.io import base as io_base
from flashpack.plan import make_plan
from flashpack.staging.ring import StagingRing, ring_geometry
from flashpack.staging.scheduler import cut_pieces, run_staged
from flashpack.settings import PAGE_NBYTES
from flashpack.testing import HostCopySink, HostFence

from _helpers import flip_byte, position_bytes, raw

KiB, MiB = 1024, 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers


def position_state_dict(total_nbytes: int = MiB) -> dict[str, torch.Tensor]:
    """Several dtypes and odd sizes summing to about ``total_nbytes``, every byte position dependent."""
    src = position_bytes(total_nbytes + 64 * KiB)
    sizes = [("f32", torch.float32, 50_000), ("bf16", torch.bfloat16, 150_001), ("u8", torch.uint8, 77_777),
             ("i64", torch.int64, 20_000), ("f16", torch.float16, 60_003)]
    sd, pos = {}, 0
    for name, dt, n in sizes:
        nb = n * torch.empty(0, dtype=dt).element_size()
        sd[name] = src[pos:pos + nb].clone().view(dt)
        pos += nb
    rest = (total_nbytes - pos) // 16 * 4
    assert rest > 0
    sd["big"] = src[pos:pos + rest * 4].clone().view(torch.float32).view(-1, 4)
    sd["empty"] = torch.zeros((0, 3), dtype=torch.float16)
    sd["alias"] = sd["f32"]
    return sd


def assert_same_dict(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert raw(got[k]) == raw(want[k]), k


def flashpack_threads() -> list[str]:
    """flashpack's threads still alive, other than the process's kept pools (the read pool and the hashing and
    window pools, :func:`flashpack.io.threads.named_pool`: kept between loads, idle: each must run a new task at once,
    so no task of the failed load still occupies it)."""
    from flashpack.io import threads as io_threads

    for pool in [io_threads.shared_pool()] + [p for pid, p in io_threads._named_pools.values() if pid == os.getpid()]:
        pool.submit(lambda: None).result(timeout_s=5)
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith("flashpack") and not t.name.startswith("flashpack-read"))


def plan_for(path, verify=True, keys=None):
    wm = read_weight_map(path)
    return wm, make_plan(wm, keys, extent_nbytes=8 * KiB, verify=verify)


class FakeFence:
    def __init__(self):
        self.is_done = False
        self.waited = 0

    def done(self):
        return self.is_done

    def wait(self):
        self.waited += 1
        self.is_done = True


class FakePinner:
    """Records register/unregister calls; refuses registrations larger than ``limit`` bytes."""

    name = "fake"

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.registered: list[int] = []
        self.unregistered: list[int] = []

    def register(self, t):
        if self.limit is not None and t.numel() > self.limit:
            return f"memlock limit {self.limit}"
        self.registered.append(t.numel())
        return None

    def unregister(self, t):
        self.unregistered.append(t.numel())


@pytest.fixture(autouse=True)
def _no_pooled_memory():
    ring_mod.release_pinned_memory()
    yield
    ring_mod.release_pinned_memory()
    assert ring_mod.live_rings() == 0


@pytest.fixture
def mib_pack(pack):
    sd = position_state_dict(MiB)
    return pack(sd, "mib.flashpack", chunk_nbytes=PAGE_NBYTES), sd


# --------------------------------------------------------------------------- geometry


def test_geometry_unchanged_within_budget():
    g = ring_geometry(num_slots=4, slot_nbytes=64 * MiB, pin=True, cap_nbytes=1 << 30, available_nbytes=64 << 30)
    assert (g.num_slots, g.slot_nbytes, g.pin, g.notes) == (4, 64 * MiB, True, ())


def test_geometry_capped_gives_fewer_slots():
    g = ring_geometry(num_slots=4, slot_nbytes=64 * MiB, pin=True, cap_nbytes=130 * MiB, available_nbytes=64 << 30)
    assert (g.num_slots, g.pin) == (2, True)
    assert "FLASHPACK_PINNED_CAP_NBYTES=136314880 holds 2 of 4 slots" in g.notes[0]


def test_geometry_cap_below_one_slot_gives_pageable():
    g = ring_geometry(num_slots=4, slot_nbytes=64 * MiB, pin=True, cap_nbytes=4096, available_nbytes=64 << 30)
    assert (g.num_slots, g.pin) == (4, False)
    assert "pageable" in g.notes[0]


def test_geometry_memory_budget():
    g = ring_geometry(num_slots=8, slot_nbytes=64 * MiB, pin=False, cap_nbytes=0, available_nbytes=1 << 30)
    assert g.num_slots == 4  # 25% of 1 GiB
    g = ring_geometry(num_slots=8, slot_nbytes=64 * MiB, pin=False, cap_nbytes=0, available_nbytes=10 * MiB)
    assert g.num_slots == 1 and not g.pin


# --------------------------------------------------------------------------- the ring itself


def test_slots_are_page_aligned_and_disjoint():
    with StagingRing(3, 2 * PAGE_NBYTES) as r:
        ptrs = sorted(s.tensor.data_ptr() for s in r.slots)
        assert all(p % PAGE_NBYTES == 0 for p in ptrs)
        assert [b - a for a, b in zip(ptrs, ptrs[1:])] == [2 * PAGE_NBYTES] * 2
        assert all(s.nbytes == 2 * PAGE_NBYTES and s.view.nbytes == 2 * PAGE_NBYTES for s in r.slots)
        assert not r.pinned and r.nbytes == 6 * PAGE_NBYTES


def test_slot_comes_back_only_after_its_fence():
    with StagingRing(2, PAGE_NBYTES) as r:
        a, b = r.try_acquire(), r.try_acquire()
        assert {a.index, b.index} == {0, 1} and r.try_acquire() is None and r.checked_out == 2
        fa, fb = FakeFence(), FakeFence()
        r.release(a, fa)
        r.release(b, fb)
        assert r.checked_out == 0 and r.fenced == 2
        assert r.try_acquire() is None  # both copies still running
        fb.is_done = True
        assert r.try_acquire() is b  # the finished one, though a was released first
        assert r.acquire() is a and fa.waited == 1  # blocks on a's fence
        assert a.generation == 2 and b.generation == 2 and r.acquires == 4
        r.release(a)
        r.release(b)


def test_double_release_and_exhaustion_raise():
    with StagingRing(1, PAGE_NBYTES) as r:
        s = r.acquire()
        with pytest.raises(RuntimeError, match="checked out"):
            r.acquire()
        r.release(s)
        with pytest.raises(ValueError, match="released twice"):
            r.release(s)


def test_close_waits_for_fences_and_refuses_leaks():
    r = StagingRing(2, PAGE_NBYTES)
    f = FakeFence()
    r.release(r.acquire(), f)
    r.close()
    assert f.waited == 1
    r.close()  # idempotent
    r2 = StagingRing(1, PAGE_NBYTES)
    r2.acquire()
    with pytest.raises(RuntimeError, match=r"slots \[0\] still checked out"):
        r2.close()
    assert ring_mod.live_rings() == 0


# --------------------------------------------------------------------------- pinning (C25)


def test_pinned_ring_is_pooled_until_released():
    p = FakePinner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with StagingRing(2, 4 * PAGE_NBYTES, pinner=p, cap_nbytes=MiB) as r:
            assert r.pinned and ring_mod.pinned_nbytes()[0] == 8 * PAGE_NBYTES
        with StagingRing(2, 4 * PAGE_NBYTES, pinner=p, cap_nbytes=MiB):
            pass
    assert p.registered == [8 * PAGE_NBYTES] and p.unregistered == []  # the second ring reused it
    with StagingRing(1, 4 * PAGE_NBYTES, pinner=p, cap_nbytes=MiB):  # another shape: old block unpinned first
        assert ring_mod.pinned_nbytes()[0] == 4 * PAGE_NBYTES
    assert p.unregistered == [8 * PAGE_NBYTES]
    assert ring_mod.release_pinned_memory() == 4 * PAGE_NBYTES
    assert ring_mod.pinned_nbytes()[0] == 0 and p.unregistered == [8 * PAGE_NBYTES, 4 * PAGE_NBYTES]


def test_pinned_peak_never_exceeds_slots_times_slot_size():
    ring_mod.reset_pinned_peak()
    with StagingRing(3, 2 * PAGE_NBYTES, pinner=FakePinner(), cap_nbytes=MiB) as r:
        pass
    assert ring_mod.pinned_nbytes()[1] == r.num_slots * r.slot_nbytes == 6 * PAGE_NBYTES


def test_pin_refused_gives_fewer_slots_with_one_warning():
    p = FakePinner(limit=2 * PAGE_NBYTES)
    with pytest.warns(RuntimeWarning) as rec:
        with StagingRing(4, PAGE_NBYTES, pinner=p, cap_nbytes=MiB) as r:
            assert r.num_slots == 2 and r.pinned
    assert len(rec) == 1  # nothing else warns in a bare ring
    assert "pinning 4 slots (16384 bytes) failed (memlock limit 8192); trying 2" in str(rec[0].message)


def test_pin_refused_entirely_gives_pageable_with_one_warning():
    p = FakePinner(limit=0)
    with pytest.warns(RuntimeWarning) as rec:
        with StagingRing(2, PAGE_NBYTES, pinner=p, cap_nbytes=MiB) as r:
            assert r.num_slots == 1 and not r.pinned
    assert len(rec) == 1 and "pageable" in str(rec[0].message) and "ulimit -l" in str(rec[0].message)


def test_c25_capped_load_same_bytes(mib_pack, monkeypatch):
    path, sd = mib_pack
    monkeypatch.setenv("FLASHPACK_PINNED_CAP_NBYTES", "8K")
    p = FakePinner()
    with pytest.warns(RuntimeWarning, match="FLASHPACK_PINNED_CAP_NBYTES=8192 holds 2 of 3 slots") as rec:
        out = load_staged(path, slot_nbytes=PAGE_NBYTES, num_slots=3, pinner=p)
    assert len([w for w in rec if "staging ring" in str(w.message)]) == 1 and p.registered == [2 * PAGE_NBYTES]
    assert_same_dict(out, flashpack.load(path))


def test_c25_zero_byte_plans_pin_nothing(pack):
    p = FakePinner()
    for sd in ({}, {"E": torch.zeros((0, 4), dtype=torch.float16)}):
        path = pack(sd, "empty.flashpack")
        out = load_staged(path, slot_nbytes=PAGE_NBYTES, pinner=p)
        assert list(out) == list(sd)
        for k in sd:
            assert out[k].shape == sd[k].shape and out[k].dtype == sd[k].dtype
    assert p.registered == [] and ring_mod.pinned_nbytes()[0] == 0


# --------------------------------------------------------------------------- pieces


def test_pieces_cover_the_plan_and_keep_chunks_whole(mib_pack):
    path, _ = mib_pack
    wm, plan = plan_for(path)
    for slot in (PAGE_NBYTES, 3 * PAGE_NBYTES, 64 * KiB):
        pieces = cut_pieces(plan, slot, wm.file_nbytes)
        assert all(0 < p.span_nbytes <= slot and p.nbytes <= p.span_nbytes for p in pieces)
        assert all(p.file_offset % PAGE_NBYTES == 0 and p.buffer_offset % PAGE_NBYTES == 0 for p in pieces)
        assert sum(p.span_nbytes for p in pieces) == plan.buffer_nbytes
        assert [p.buffer_offset for p in pieces] == [plan.buffer_offset(p.file_offset) for p in pieces]
        got = sorted(ci for p in pieces for ci in p.chunks)
        assert got == list(range(len(plan.chunks)))  # every chunk in exactly one piece
        for p in pieces:
            for ci in p.chunks:
                c = plan.chunks[ci]
                assert p.file_offset <= c.offset and c.offset + c.nbytes <= p.file_offset + p.nbytes


def test_pieces_never_split_a_chunk(pack):
    path = pack({"w": position_bytes(40 * KiB)}, "c.flashpack", chunk_nbytes=3 * PAGE_NBYTES)
    wm, plan = plan_for(path)
    pieces = cut_pieces(plan, 4 * PAGE_NBYTES, wm.file_nbytes)
    assert [p.span_nbytes // PAGE_NBYTES for p in pieces] == [3, 3, 4]  # the last piece holds chunks 2 and 3
    with pytest.raises(ValueError, match="does not fit"):
        cut_pieces(plan, 2 * PAGE_NBYTES, wm.file_nbytes)
    # the load bumps the slot to the chunk size instead of failing
    assert_same_dict(load_staged(path, slot_nbytes=PAGE_NBYTES), flashpack.load(path))


# --------------------------------------------------------------------------- C23: slot reuse


@pytest.mark.parametrize("num_slots", [2, 3])
def test_c23_one_mib_through_4k_slots_50_times(mib_pack, num_slots):
    path, sd = mib_pack
    want = flashpack.load(path)
    assert_same_dict(want, sd)
    wm, plan = plan_for(path)
    pieces = cut_pieces(plan, PAGE_NBYTES, wm.file_nbytes)
    reuses = 0
    for rep in range(50):
        dest = aligned_empty(plan.buffer_nbytes)
        dest.fill_(0xEE)
        stats = LoadStats()
        with HostCopySink(dest, num_workers=num_slots, max_delay_s=0.0003, seed=rep) as sink:
            ring = load_payload_staged(wm, plan, sink, backend="threads", verify=True, stats=stats,
                                       slot_nbytes=PAGE_NBYTES, num_slots=num_slots)
        assert sink.violations == []  # no slot handed out again while its copy ran
        assert ring.num_slots == num_slots and ring.checked_out == 0 and sink.copies == len(pieces)
        assert stats.chunks_verified == len(plan.chunks)
        reuses += ring.acquires - num_slots
        slot_lo = ring.slots[0].tensor.data_ptr()
        slot_hi = slot_lo + ring.nbytes
        job = flashpack.loading.common.prepare(wm, None, verify=True, cfg=flashpack.settings.settings())
        out = flashpack.loading.common.assemble(job, dest, plan)
        for k, t in out.items():
            if t.numel():
                assert not (slot_lo <= t.data_ptr() < slot_hi)  # nothing aliases a staging slot
        assert_same_dict(out, want)
    assert reuses >= 50 * (MiB // PAGE_NBYTES - num_slots)  # thousands of reuses


def test_same_plan_and_reader_as_load(mib_pack, backend):
    path, _ = mib_pack
    for kw in ({}, {"verify": False}, {"keys": ["alias", "i64", "empty"]}, {"keys": ["bf16"], "verify": False}):
        want = flashpack.load(path, backend=backend, **kw)
        stats = LoadStats()
        got = load_staged(path, backend=backend, slot_nbytes=2 * PAGE_NBYTES, num_slots=3, max_delay_s=0.0002,
                          seed=1, stats=stats, **kw)
        assert_same_dict(got, want)
        assert stats.backend == backend and stats.bytes_read > 0
        if "alias" in got and "f32" in got:
            assert got["alias"] is got["f32"]


def test_host_payload_equals_read_into_for_the_same_plan(mib_pack):
    path, _ = mib_pack
    wm, plan = plan_for(path)
    direct = aligned_empty(plan.buffer_nbytes)
    flashpack.loading.host.read_into(wm, plan, direct, backend="threads", verify=True, stats=LoadStats(),
                                     cfg=flashpack.settings.settings())
    staged = load_payload_host(wm, plan, backend="threads", verify=True, stats=LoadStats(), slot_nbytes=PAGE_NBYTES,
                               num_slots=2, max_delay_s=0.0002, seed=9)
    assert staged.numel() == plan.buffer_nbytes and staged.data_ptr() != direct.data_ptr()
    for r in plan.regions:  # every byte the file holds (region tails past EOF are never read)
        n = min(r.nbytes, wm.file_nbytes - r.file_offset)
        lo = r.buffer_offset
        assert torch.equal(staged[lo:lo + n], direct[lo:lo + n])


def test_default_ring_shape_for_a_small_plan(mib_pack):
    path, _ = mib_pack
    wm, plan = plan_for(path)
    with HostCopySink(aligned_empty(plan.buffer_nbytes)) as sink:
        ring = load_payload_staged(wm, plan, sink, backend=None, verify=True, stats=LoadStats())
    # the 64 MiB default shrinks to the plan (one slot holds it all), nothing larger is allocated
    assert ring.num_slots == 1 and ring.slot_nbytes == plan.buffer_nbytes


# --------------------------------------------------------------------------- errors (C22)


class CountingSink(HostCopySink):
    """A host engine that can fail: ``interrupt_at``: ``copy`` raises KeyboardInterrupt on that call;
    ``fail_at``: that copy fails in the worker."""

    def __init__(self, dest, *, interrupt_at=None, fail_at=None, **kw):
        super().__init__(dest, **kw)
        self.interrupt_at, self.fail_at = interrupt_at, fail_at
        self.all_fences = []

    def copy(self, slot, nbytes, dest_offset):
        if self.copies == self.interrupt_at:
            raise KeyboardInterrupt
        if self.copies == self.fail_at:
            self.copies += 1
            bad = HostFence()
            bad._complete(OSError(errno.EFAULT, "injected copy failure"))
            self._fences.append(bad)
            return bad
        f = super().copy(slot, nbytes, dest_offset)
        self.all_fences.append(f)
        return f


class WatchedReader:
    """Wraps a reader: can raise KeyboardInterrupt from the n-th wait; remembers the real reader."""

    def __init__(self, inner, interrupt_wait_at=None):
        self.inner, self.n, self.at = inner, 0, interrupt_wait_at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def wait(self, timeout_s=None):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return self.inner.wait(timeout_s)


def run_with(path, *, sink_kw=None, reader_kw=None, backend="threads", slot=PAGE_NBYTES, slots=3, verify=True):
    """Run the scheduler directly; returns (exception, ring, sink, reader) after it raised."""
    wm, plan = plan_for(path, verify=verify)
    dest = aligned_empty(plan.buffer_nbytes)
    sink = CountingSink(dest, num_workers=2, max_delay_s=0.0005, seed=3, **(sink_kw or {}))
    ring = StagingRing(slots, slot)
    reader = WatchedReader(flashpack.io.open_reader(path, backend), **(reader_kw or {}))
    try:
        with pytest.raises(BaseException) as ei:
            run_staged(reader, wm, plan, cut_pieces(plan, slot, wm.file_nbytes), ring, sink, verify=verify,
                       read_nbytes=PAGE_NBYTES, hash_threads=2)
        # at the moment the error reached us: every read and copy had finished, every slot was back
        assert reader.inner.in_flight == 0
        assert all(f.done() for f in sink.all_fences)
        assert ring.checked_out == 0
    finally:
        reader.inner.close()
        sink.close()
        ring.close()
    assert flashpack_threads() == []
    return ei.value, ring, sink


def test_c22_eio_mid_load_drains_everything(mib_pack, monkeypatch):
    path, _ = mib_pack
    bad = 130 * PAGE_NBYTES
    real = os.preadv

    def preadv(fd, bufs, offset):
        if offset <= bad < offset + sum(memoryview(b).nbytes for b in bufs):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, bufs, offset)

    monkeypatch.setattr(io_base, "_preadv", preadv)
    monkeypatch.setattr(io_base, "native_copy", None)  # the C copy calls no faked preadv
    err, ring, sink = run_with(path)
    assert isinstance(err, ReadError) and err.errno == errno.EIO and f"offset {bad}" in str(err)
    assert 0 < sink.copies < len(cut_pieces(plan_for(path)[1], PAGE_NBYTES, os.path.getsize(path)))
    # and through the public entry point
    with pytest.raises(ReadError):
        load_staged(path, backend="threads", slot_nbytes=PAGE_NBYTES, num_slots=2, max_delay_s=0.0005, seed=2)
    assert flashpack_threads() == [] and ring_mod.live_rings() == 0


def test_c22_checksum_mismatch_mid_load(mib_pack, backend):
    path, _ = mib_pack
    wm = read_weight_map(path)
    target = wm.tensors["big"]
    flip_byte(path, target.offset + target.nbytes // 2 + 7)
    err, ring, sink = run_with(path, backend=backend)
    assert isinstance(err, ChecksumMismatchError) and path in str(err) and "'big'" in str(err)
    with pytest.raises(ChecksumMismatchError):
        load_staged(path, backend=backend, slot_nbytes=PAGE_NBYTES, num_slots=3, max_delay_s=0.0005, seed=5)
    # with verification off the same file loads (the flip is in the bytes, not the layout)
    out = load_staged(path, backend=backend, verify=False, slot_nbytes=PAGE_NBYTES, num_slots=3)
    assert_same_dict(out, flashpack.load(path, backend=backend, verify=False))
    assert flashpack_threads() == [] and ring_mod.live_rings() == 0


def test_c22_checksum_verified_with_hash_threads(pack):
    path = pack({"w": position_bytes(256 * KiB)}, "h.flashpack", chunk_nbytes=PAGE_NBYTES)
    flip_byte(path, read_weight_map(path).tensors["w"].offset + 50 * PAGE_NBYTES)
    wm, plan = plan_for(path)
    with HostCopySink(aligned_empty(plan.buffer_nbytes)) as sink:
        with pytest.raises(ChecksumMismatchError, match="chunk 50,"):
            load_payload_staged(wm, plan, sink, backend="threads", verify=True, stats=LoadStats(),
                                slot_nbytes=16 * PAGE_NBYTES, num_slots=2, hash_threads=3)
    assert flashpack_threads() == []


def test_keyboard_interrupt_in_copy_drains_everything(mib_pack):
    path, _ = mib_pack
    err, ring, sink = run_with(path, sink_kw={"interrupt_at": 40})
    assert isinstance(err, KeyboardInterrupt) and sink.copies == 40


def test_keyboard_interrupt_while_waiting_for_reads(mib_pack):
    path, _ = mib_pack
    err, ring, sink = run_with(path, reader_kw={"interrupt_wait_at": 25})
    assert isinstance(err, KeyboardInterrupt) and sink.copies > 0


def test_copy_failure_reaches_the_caller_after_draining(mib_pack):
    path, _ = mib_pack
    err, ring, sink = run_with(path, sink_kw={"fail_at": 30})
    assert isinstance(err, OSError) and "injected copy failure" in str(err)


def test_errors_leave_the_next_load_working(mib_pack, monkeypatch):
    path, _ = mib_pack
    calls = {"n": 0}
    real = os.preadv

    def flaky(fd, bufs, offset):
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError(errno.EIO, "injected")
        return real(fd, bufs, offset)

    monkeypatch.setattr(io_base, "_preadv", flaky)
    monkeypatch.setattr(io_base, "native_copy", None)  # the C copy calls no faked preadv
    with pytest.raises(ReadError):
        load_staged(path, backend="threads", slot_nbytes=PAGE_NBYTES, num_slots=2)
    assert_same_dict(load_staged(path, backend="threads", slot_nbytes=PAGE_NBYTES, num_slots=2),
                     flashpack.load(path, backend="threads"))
