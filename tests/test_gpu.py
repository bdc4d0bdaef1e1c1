"""Loads to CUDA through the pinned staging ring: bit-equal to the CPU load for several dtypes,
assign_from_file(device="cuda"), the recycled-memory race (C24), capped or refused pinning and 0-byte
plans (C25), a checksum failure mid-load (C22/C28). Skipped, with the reason, where torch has no CUDA;
the one test that runs there checks that loading to 'cuda' then raises a clear FlashPackError."""

from __future__ import annotations

import warnings

import pytest
import torch

import flashpack
from flashpack import ChecksumMismatchError, FlashPackError, read_weight_map
from flashpack.staging import ring as ring_mod
from flashpack.loading.common import aligned_empty

from _helpers import HAS_CUDA, cuda, flip_byte, position_bytes, raw

KiB = 1024


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def mixed_state_dict(nbytes_each: int = 300 * KiB) -> dict[str, torch.Tensor]:
    sd = {}
    for i, dt in enumerate(DTYPES):
        size = torch.empty(0, dtype=dt).element_size()
        b = position_bytes(nbytes_each // size * size, seed=i)
        if dt == torch.bool:
            b = b & 1
        sd[f"t{i}.{str(dt).removeprefix('torch.')}"] = b.view(dt).view(-1, 4 // size if size < 4 else 1)
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros((0, 4), dtype=torch.float16)
    sd["tied"] = sd[next(iter(sd))]
    return sd


@pytest.fixture(autouse=True)
def _clean_ring_state():
    ring_mod.release_pinned_memory()
    yield
    ring_mod.release_pinned_memory()
    assert ring_mod.live_rings() == 0


# --------------------------------------------------------------------------- without CUDA


@pytest.mark.skipif(HAS_CUDA, reason="this torch has CUDA; the no-CUDA error cannot happen here")
def test_cuda_without_cuda_is_a_clear_error(pack):
    path = pack({"w": torch.ones(4)})
    with pytest.raises(FlashPackError, match=r"cannot load to cuda.*no usable CUDA device.*load to 'cpu'"):
        flashpack.load(path, device="cuda")
    with pytest.raises(FlashPackError, match="cannot load to cuda:1"):
        flashpack.load(path, device="cuda:1")
    model = torch.nn.Linear(2, 2)
    flashpack.pack_to_file(model, path)
    with pytest.raises(FlashPackError, match="no usable CUDA device"):
        flashpack.assign_from_file(torch.nn.Linear(2, 2), path, device="cuda")


# --------------------------------------------------------------------------- with CUDA


@cuda
@pytest.mark.parametrize("slot", ["small", "default"])
def test_cuda_load_bit_equal_to_cpu(pack, monkeypatch, slot):
    if slot == "small":  # many slots, reused often
        monkeypatch.setenv("FLASHPACK_SLOT_NBYTES", "16K")
        monkeypatch.setenv("FLASHPACK_NUM_SLOTS", "3")
    sd = mixed_state_dict()
    path = pack(sd, chunk_nbytes=16 * KiB)
    cpu = flashpack.load(path)
    stats = flashpack.LoadStats()
    gpu = flashpack.load(path, device="cuda", stats=stats)
    torch.cuda.synchronize()
    assert list(gpu) == list(cpu) == list(sd)
    for k in sd:
        assert gpu[k].device.type == "cuda" and gpu[k].dtype == cpu[k].dtype and gpu[k].shape == cpu[k].shape, k
        assert raw(gpu[k]) == raw(cpu[k]) == raw(sd[k]), k
    assert gpu["tied"] is gpu[next(iter(sd))]
    assert stats.chunks_verified > 0 and stats.bytes_read >= sum(t.nbytes for t in sd.values()) - sd["tied"].nbytes
    gpu[next(iter(sd))].add_(1)  # ordinary, writable device memory
    torch.cuda.synchronize()


@cuda
def test_cuda_partial_and_unverified_loads(pack):
    sd = mixed_state_dict(64 * KiB)
    path = pack(sd)
    keys = [list(sd)[1], "tied"]
    for verify in (True, False):
        gpu = flashpack.load(path, device="cuda:0", keys=keys, verify=verify)
        assert list(gpu) == keys and all(raw(gpu[k]) == raw(sd[k]) for k in keys)


@cuda
def test_cuda_assign_from_file(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file(model, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    res = flashpack.assign_from_file(fresh, path, device="cuda")
    assert res.missing_keys == [] and res.unexpected_keys == []
    for (n, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters()):
        assert p.device.type == "cuda" and p.requires_grad, n
        assert raw(p) == raw(q), n
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x.cuda()).cpu(), model(x)) or torch.allclose(fresh(x.cuda()).cpu(), model(x), atol=1e-4)


@cuda
def test_c24_recycled_memory_is_not_overwritten_by_pending_work(pack):
    sd = {"w": position_bytes(8 * 1024 * KiB).view(torch.float32)}
    path = pack(sd)
    wm = read_weight_map(path)
    nbytes = flashpack.plan.make_plan(wm, None, extent_nbytes=8 << 20, verify=True).buffer_nbytes
    ref = flashpack.load(path)
    for _ in range(3):
        x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(200_000_000)  # a long kernel on the current stream ...
        x.fill_(0x5A)  # ... and then a write of the whole block
        del x  # freed while the write is still queued: the allocator hands the block to the load
        out = flashpack.load(path, device="cuda")
        torch.cuda.synchronize()
        assert raw(out["w"]) == raw(ref["w"])


@cuda
def test_c25_pinning_capped_gives_pageable_staging(pack, monkeypatch):
    sd = mixed_state_dict(128 * KiB)
    path = pack(sd, chunk_nbytes=16 * KiB)
    monkeypatch.setenv("FLASHPACK_SLOT_NBYTES", "64K")
    monkeypatch.setenv("FLASHPACK_PINNED_CAP_NBYTES", "4K")
    ring_mod.reset_pinned_peak()
    with pytest.warns(RuntimeWarning, match="pageable") as rec:
        gpu = flashpack.load(path, device="cuda")
    assert len([w for w in rec if "staging ring" in str(w.message)]) == 1
    torch.cuda.synchronize()
    assert all(raw(gpu[k]) == raw(sd[k]) for k in sd)
    assert ring_mod.pinned_nbytes() == (0, 0)
    monkeypatch.setenv("FLASHPACK_PINNED_CAP_NBYTES", "130K")  # two of four 64K slots
    with pytest.warns(RuntimeWarning, match="holds 2 of 4 slots"):
        gpu = flashpack.load(path, device="cuda")
    torch.cuda.synchronize()
    assert all(raw(gpu[k]) == raw(sd[k]) for k in sd)
    assert ring_mod.pinned_nbytes()[1] <= 2 * 64 * KiB


@cuda
def test_c25_zero_byte_plans_pin_nothing(pack):
    ring_mod.reset_pinned_peak()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flashpack.load(pack({}, "a.flashpack"), device="cuda") == {}
        out = flashpack.load(pack({"E": torch.zeros((0, 4), dtype=torch.float16)}, "b.flashpack"), device="cuda")
    assert out["E"].shape == (0, 4) and out["E"].device.type == "cuda"
    assert ring_mod.pinned_nbytes() == (0, 0)
    torch.cuda.synchronize()


@cuda
def test_pinned_memory_at_most_slots_times_slot_size(pack, monkeypatch):
    monkeypatch.setenv("FLASHPACK_SLOT_NBYTES", "64K")
    monkeypatch.setenv("FLASHPACK_NUM_SLOTS", "3")
    path = pack({"w": position_bytes(2048 * KiB)}, chunk_nbytes=64 * KiB)
    ring_mod.reset_pinned_peak()
    flashpack.load(path, device="cuda")
    assert 0 < ring_mod.pinned_nbytes()[1] <= 3 * 64 * KiB


@cuda
def test_refused_registration_leaves_cuda_usable():
    from flashpack.staging.sinks import CudaPinner

    t = aligned_empty(64 * KiB)
    p = CudaPinner()
    assert p.register(t) is None
    why = p.register(t)  # already registered: cudaErrorHostMemoryAlreadyRegistered
    assert why is not None and "cudaHostRegister returned" in why
    assert (torch.arange(10, device="cuda") * 2).sum().item() == 90  # no stale error surfaces here
    p.unregister(t)
    torch.cuda.synchronize()


@cuda
def test_c22_c28_checksum_failure_mid_load_leaves_cuda_working(pack, monkeypatch):
    monkeypatch.setenv("FLASHPACK_SLOT_NBYTES", "32K")
    sd = {"a": position_bytes(512 * KiB), "b": position_bytes(512 * KiB, seed=1).view(torch.float32)}
    path = pack(sd, chunk_nbytes=16 * KiB)
    t = read_weight_map(path).tensors["b"]
    flip_byte(path, t.offset + t.nbytes // 2)
    with pytest.raises(ChecksumMismatchError, match="'b'"):
        flashpack.load(path, device="cuda")
    torch.cuda.synchronize()
    assert ring_mod.live_rings() == 0
    assert (torch.ones(4, device="cuda") * 3).sum().item() == 12.0
    out = flashpack.load(path, device="cuda", verify=False)  # the layout is intact; only checksums fail
    assert raw(out["a"]) == raw(sd["a"])
