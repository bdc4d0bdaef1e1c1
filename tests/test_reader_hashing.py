"""Checksums hashed by the reader's workers as the bytes land (Extent.hasher, flashpack.loading.host._extents,
plan extents starting at every checksum chunk): which chunks qualify, that a damaged chunk is still caught
whichever thread hashed it, and that the loading thread hashes whatever a reader did not."""

from __future__ import annotations

import pytest
import torch

import flashpack
from flashpack.errors import ChecksumMismatchError
from flashpack.plan import make_plan
from flashpack.settings import MiB


@pytest.fixture
def pack(tmp_path):
    torch.manual_seed(3)
    # three dtype blocks: 20 MiB float32 (chunks 8 + 8 + 4 MiB), a small int64 block, 6 MiB of bfloat16
    sd = {"f": torch.randn(5 * MiB), "i": torch.arange(3000), "b": torch.randn(3 * MiB).bfloat16()}
    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file(sd, path)
    return path, sd


def test_extents_start_at_every_chunk_when_verifying(pack):
    path, _ = pack
    wm = flashpack.read_weight_map(path)
    plan = make_plan(wm, extent_nbytes=8 * MiB, verify=True)
    starts = {e.file_offset for e in plan.extents}
    assert all(c.offset in starts for c in plan.chunks)
    # each extent holds exactly one chunk, all of it, and no extent crosses into the next chunk
    assert all(len(e.chunks) == 1 for e in plan.extents)
    by_start = {e.file_offset: e for e in plan.extents}
    assert all(by_start[c.offset].nbytes >= c.nbytes for c in plan.chunks)
    assert sorted(plan.chunk_extent_counts) == [1] * len(plan.chunks)
    # the extents still tile every region exactly
    for r in plan.regions:
        inside = sorted((e.file_offset, e.nbytes) for e in plan.extents
                        if r.file_offset <= e.file_offset < r.file_offset + r.nbytes)
        pos = r.file_offset
        for off, n in inside:
            assert off == pos
            pos += n
        assert pos == min(r.file_offset + r.nbytes, wm.file_nbytes)
    # smaller extents than chunks: several per 8 MiB chunk, which the loading thread hashes once all are in
    small = make_plan(wm, extent_nbytes=2 * MiB, verify=True)
    assert max(small.chunk_extent_counts) == 4


@pytest.mark.parametrize("cache", ["keep", "bypass"])
def test_worker_hashes_every_whole_chunk_on_threads(pack, cache):
    path, sd = pack
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend="threads", cache=cache, stats=stats)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    wm = flashpack.read_weight_map(path)
    assert stats.chunks_verified == sum(len(b.checksums) for b in wm.blocks) == 5  # 3 + 1 + 1
    assert stats.chunks_hashed_by_reader == stats.chunks_verified


def test_chunks_split_over_extents_are_hashed_by_the_loading_thread(pack, monkeypatch):
    path, sd = pack
    monkeypatch.setenv("FLASHPACK_EXTENT_NBYTES", "2M")
    stats = flashpack.LoadStats()
    out = flashpack.load(path, backend="threads", stats=stats)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    # only the int64 block's one chunk (24000 bytes) fits a 2 MiB extent whole
    assert stats.chunks_verified == 5 and stats.chunks_hashed_by_reader == 1


@pytest.mark.parametrize("extent", ["8M", "2M"])
@pytest.mark.parametrize("cache", ["keep", "bypass"])
def test_damage_is_caught_whoever_hashes(pack, backend, monkeypatch, extent, cache):
    path, _ = pack
    monkeypatch.setenv("FLASHPACK_EXTENT_NBYTES", extent)
    t = flashpack.read_weight_map(path).tensors["b"]
    with open(path, "r+b") as f:
        f.seek(t.offset + 5 * MiB + 17)
        byte = f.read(1)
        f.seek(t.offset + 5 * MiB + 17)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ChecksumMismatchError, match=r"block 2 \(BF16\) chunk 0, bytes .*affected keys: 'b'"):
        flashpack.load(path, backend=backend, cache=cache)
