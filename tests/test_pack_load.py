"""pack_to_file + flashpack.load: aliasing and layout (C02, C04-C07), partial and zero-copy loads,
verify(), many tensors, atomic writes, and the threads backend's short-read handling (C17, C18)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import flashpack
from flashpack import LoadStats, ReadError, read_weight_map
from flashpack.format import BLOCK_ALIGN, HEADER_NBYTES, TENSOR_ALIGN
from flashpack.io import base as io_base

from _helpers import file_bytes, file_size, flip_byte


def stored_bytes(path, key) -> bytes:
    """The bytes the file holds for a stored key, read straight from the file."""
    t = read_weight_map(path).tensors[key]
    with open(path, "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


def row_major_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert row_major_bytes(a) == row_major_bytes(b)


# --------------------------------------------------------------------------- C02: same tensor twice


def test_c02_same_tensor_twice_stored_once_and_shared(pack):
    w = torch.randn(4, 4)
    path = pack({"embed.weight": w, "lm_head.weight": w})
    wm = read_weight_map(path)
    assert wm.payload_nbytes == 64
    assert list(wm.tensors) == ["embed.weight"]
    assert wm.aliases == {"lm_head.weight": "embed.weight"}
    assert [b.nbytes for b in wm.blocks] == [64]
    out = flashpack.load(path)
    assert list(out) == ["embed.weight", "lm_head.weight"]
    assert torch.equal(out["embed.weight"], w) and torch.equal(out["lm_head.weight"], w)
    assert out["embed.weight"].data_ptr() == out["lm_head.weight"].data_ptr()
    out["embed.weight"][0, 0] = 123.0
    assert out["lm_head.weight"][0, 0].item() == 123.0


def test_c02_kind_detached_and_view_aliases(pack):
    w = torch.arange(12.0).reshape(3, 4)
    sd = {"a": w, "b": w.detach(), "c": w.view(3, 4), "d": w.view(12), "e": w[1:], "f": w[1:]}
    path = pack(sd)
    wm = read_weight_map(path)
    # same storage, offset, shape and strides -> alias; a different view of it is stored separately
    assert wm.aliases == {"b": "a", "c": "a", "f": "e"}
    assert list(wm.tensors) == ["a", "d", "e"]
    assert wm.payload_nbytes == 48 + 48 + 32
    out = flashpack.load(path)
    for k, t in sd.items():
        assert_same(out[k], t)
    assert out["f"] is out["e"] and out["b"] is out["a"]
    assert out["d"].data_ptr() != out["a"].data_ptr()


def test_c02_keys_argument_returns_alias(pack):
    w = torch.randn(3)
    path = pack({"x": w, "y": w})
    out = flashpack.load(path, keys=["y"])
    assert list(out) == ["y"] and torch.equal(out["y"], w)


# --------------------------------------------------------------------------- C04: layouts


def _layouts():
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    big = torch.arange(10_000, dtype=torch.float32)
    m = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    return {
        "transposed": torch.randn(4, 6).t(),
        "channels_last": base.to(memory_format=torch.channels_last),
        "offset_slice": big[100:110],
        "column_slice": m[:, 1:4],
        "step_slice": big[5:50:7],
        "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(4, 3),
        "broadcast_0stride": torch.tensor(7, dtype=torch.int64).expand(2, 5),
        "permuted": base.permute(3, 1, 0, 2),
        "unsqueezed_t": torch.randn(3, 2).t().unsqueeze(1),
        "bf16_t": torch.randn(5, 3).to(torch.bfloat16).t(),
        "diag_strided": torch.arange(25.0).reshape(5, 5).diagonal(),
        "as_strided": torch.arange(20, dtype=torch.int16).as_strided((3, 3), (5, 2), 1),
    }


def test_c04_transposed_and_channels_last_exact(pack):
    a = torch.randn(4, 6).t()
    assert a.stride() == (1, 6)
    b = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert not b.is_contiguous()
    path = pack({"a": a, "b": b})
    out = flashpack.load(path)
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b)
    assert out["a"].is_contiguous() and out["b"].is_contiguous()
    # the file holds logical row-major order
    assert stored_bytes(path, "a") == row_major_bytes(a)
    assert stored_bytes(path, "b") == row_major_bytes(b)


@pytest.mark.parametrize("name", list(_layouts()))
def test_c04_kind_every_layout_row_major_own_bytes_only(pack, name):
    t = _layouts()[name]
    path = pack({name: t})
    wm = read_weight_map(path)
    assert wm.tensors[name].nbytes == t.numel() * t.element_size()
    assert wm.tensors[name].shape == tuple(t.shape)
    assert stored_bytes(path, name) == row_major_bytes(t)
    out = flashpack.load(path)
    assert torch.equal(out[name], t) and out[name].dtype == t.dtype


def test_c04_slice_of_large_storage_stores_only_its_bytes(pack):
    big = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB storage
    small = big[1000:1010]
    path = pack({"small": small})
    wm = read_weight_map(path)
    assert wm.payload_nbytes == 40
    assert [b.nbytes for b in wm.blocks] == [40]
    assert file_size(path) == HEADER_NBYTES + 40 + wm.index_nbytes
    assert torch.equal(flashpack.load(path)["small"], torch.arange(1000, 1010, dtype=torch.float32))


def test_c04_overlapping_views_of_one_storage_are_separate_copies(pack):
    s = torch.arange(10.0)
    sd = {"lo": s[:6], "hi": s[4:], "mid": s[2:8].view(2, 3)}
    path = pack(sd)
    wm = read_weight_map(path)
    assert wm.aliases == {}
    assert wm.payload_nbytes == 24 + 24 + 24
    out = flashpack.load(path)
    for k in sd:
        assert torch.equal(out[k], sd[k])
    out["lo"][5] = -1.0  # separate memory after loading
    assert out["hi"][1].item() == 5.0


def test_layout_blocks_and_tensors_aligned(pack):
    sd = {"a": torch.randn(3), "b": torch.ones(7, dtype=torch.int8), "c": torch.randn(5),
          "d": torch.zeros(3, dtype=torch.int8), "e": torch.randn(2, 2).to(torch.bfloat16)}
    path = pack(sd)
    wm = read_weight_map(path)
    assert [b.dtype for b in wm.blocks] == ["F32", "I8", "BF16"]
    assert all(b.offset % BLOCK_ALIGN == 0 for b in wm.blocks)
    assert wm.blocks[0].offset == HEADER_NBYTES
    by = {b.dtype: b for b in wm.blocks}
    for k, t in wm.tensors.items():
        assert (t.offset - by[t.dtype].offset) % TENSOR_ALIGN == 0
    assert wm.tensors["a"].offset == 4096 and wm.tensors["c"].offset == 4096 + 64
    assert wm.blocks[0].nbytes == 64 + 20
    assert wm.tensors["b"].offset == 8192 and wm.tensors["d"].offset == 8192 + 64
    assert wm.blocks[2].offset == 12288
    assert list(wm.keys()) == list(sd)


# --------------------------------------------------------------------------- C05 / C06 / C07


def test_c05_empty_tensors_are_separate_entries(pack):
    sd = {"E": torch.zeros((0, 4), dtype=torch.float16), "F": torch.tensor([]), "G": torch.tensor([]),
          "W": torch.ones(3)}
    assert sd["F"].data_ptr() == 0 and sd["G"].data_ptr() == 0
    path = pack(sd)
    wm = read_weight_map(path)
    assert wm.aliases == {}
    assert sorted(wm.tensors) == ["E", "F", "G", "W"]
    assert wm.tensors["E"].nbytes == 0 and wm.tensors["F"].nbytes == 0
    out = flashpack.load(path)
    assert out["E"].shape == (0, 4) and out["E"].dtype == torch.float16
    assert out["F"].shape == (0,) and out["F"].dtype == torch.float32
    assert out["G"].shape == (0,) and out["G"].dtype == torch.float32
    assert out["F"] is not out["G"]
    assert torch.equal(out["W"], torch.ones(3))


def test_c05_no_frombuffer_on_empty(pack, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.frombuffer called")

    monkeypatch.setattr(torch, "frombuffer", boom)
    path = pack({"E": torch.zeros((0, 4), dtype=torch.float16), "F": torch.tensor([])})
    out = flashpack.load(path)
    assert out["E"].shape == (0, 4) and out["F"].shape == (0,)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (0, 0), (2, 0, 3), (0, 1, 1, 1), (1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64,
                                   torch.float8_e4m3fn, torch.uint8])
def test_c05_kind_zero_size_shapes(pack, shape, dtype):
    sd = {"z": torch.empty(shape, dtype=dtype), "n": torch.ones(2).to(dtype), "z2": torch.empty(shape, dtype=dtype)}
    path = pack(sd)
    for kw in ({}, {"mmap": True}, {"keys": ["z"]}):
        out = flashpack.load(path, **kw)
        assert out["z"].shape == shape and out["z"].dtype == dtype
        if "z2" in out:
            assert out["z2"].shape == shape and out["z2"] is not out["z"]
            assert_same(out["n"], sd["n"])


def test_c06a_empty_state_dict(pack):
    path = pack({})
    wm = read_weight_map(path)
    assert wm.tensors == {} and wm.aliases == {} and wm.blocks == []
    assert wm.payload_nbytes == 0
    assert file_size(path) == HEADER_NBYTES + wm.index_nbytes
    for kw in ({}, {"mmap": True}, {"verify": False}, {"backend": "threads"}):
        assert flashpack.load(path, **kw) == {}
    rep = flashpack.verify(path)
    assert (rep.tensors, rep.aliases, rep.blocks, rep.chunks_verified, rep.bytes_verified) == (0, 0, 0, 0, 0)


def test_c06b_only_tensor_is_zero_size(pack):
    path = pack({"x": torch.zeros((0, 4), dtype=torch.float16)})
    wm = read_weight_map(path)
    assert wm.blocks == [] and wm.payload_nbytes == 0
    st = LoadStats()
    out = flashpack.load(path, stats=st)
    assert list(out) == ["x"] and out["x"].shape == (0, 4) and out["x"].dtype == torch.float16
    assert st.bytes_read == 0
    assert flashpack.load(path, mmap=True)["x"].shape == (0, 4)


@pytest.mark.parametrize("value,dtype", [(2.5, torch.float32), (2.5, torch.bfloat16), (2.5, torch.float16),
                                         (-7, torch.int64), (200, torch.uint8), (True, torch.bool),
                                         (1 + 2j, torch.complex64), (0.5, torch.float8_e4m3fn),
                                         (3.25, torch.float64), (65000, torch.uint16)])
def test_c07_zero_dim_keeps_shape(pack, value, dtype):
    t = torch.tensor(value).to(dtype)
    path = pack({"s": t, "v": torch.ones(1).to(dtype)})
    assert read_weight_map(path).tensors["s"].shape == ()
    out = flashpack.load(path)
    assert out["s"].shape == () and out["s"].dim() == 0 and out["s"].dtype == dtype
    assert out["v"].shape == (1,)
    assert_same(out["s"], t)


def test_c07_exact_value(pack):
    out = flashpack.load(pack({"s": torch.tensor(2.5)}))
    assert out["s"].shape == torch.Size([]) and out["s"].item() == 2.5


# --------------------------------------------------------------------------- keys=, mmap, verify


@pytest.fixture
def big_pack(pack):
    sd = {"big": torch.arange(1 << 20, dtype=torch.float32),  # 4 MiB
          "small": torch.arange(16, dtype=torch.float32) * 0.5,
          "big2": torch.ones(1 << 19, dtype=torch.float32),
          "ids": torch.arange(5, dtype=torch.int64)}
    return pack(sd, chunk_nbytes=65536), sd


def test_keys_reads_only_needed_extents(big_pack):
    path, sd = big_pack
    size = file_size(path)
    st = LoadStats()
    out = flashpack.load(path, keys=["small"], stats=st)
    assert list(out) == ["small"] and torch.equal(out["small"], sd["small"])
    assert 0 < st.bytes_read <= 65536 + 4096
    assert st.bytes_read * 50 < size
    assert st.chunks_verified == 1
    st2 = LoadStats()
    out = flashpack.load(path, keys=["small", "ids"], verify=False, stats=st2)
    assert torch.equal(out["ids"], sd["ids"]) and torch.equal(out["small"], sd["small"])
    assert st2.bytes_read <= 2 * 4096 and st2.chunks_verified == 0


def test_keys_still_verify(big_pack):
    path, sd = big_pack
    wm = read_weight_map(path)
    flip_byte(path, wm.tensors["small"].offset + 3)
    with pytest.raises(flashpack.ChecksumMismatchError, match="'small'"):
        flashpack.load(path, keys=["small"])
    # the damage lies outside the extents of another key: that key still loads
    out = flashpack.load(path, keys=["ids"])
    assert torch.equal(out["ids"], sd["ids"])


def test_keys_far_from_damage_loads(big_pack):
    path, sd = big_pack
    wm = read_weight_map(path)
    flip_byte(path, wm.tensors["big"].offset + (1 << 21))
    assert torch.equal(flashpack.load(path, keys=["small"])["small"], sd["small"])
    with pytest.raises(flashpack.ChecksumMismatchError, match="'big'"):
        flashpack.load(path, keys=["big"])


def test_keys_unknown_key_raises(big_pack):
    path, _ = big_pack
    with pytest.raises(KeyError, match="nope"):
        flashpack.load(path, keys=["small", "nope"])


def test_mmap_zero_copy_writable_private(big_pack):
    path, sd = big_pack
    before = file_bytes(path)
    st = LoadStats()
    out = flashpack.load(path, mmap=True, stats=st)
    assert st.backend == "mmap"
    for k, t in sd.items():
        assert torch.equal(out[k], t)
    out["small"].add_(1)
    out["big"][0] = -5.0
    assert out["small"][0].item() == 1.0 and out["big"][0].item() == -5.0
    assert file_bytes(path) == before
    again = flashpack.load(path)
    assert torch.equal(again["small"], sd["small"]) and again["big"][0].item() == 0.0
    del out


def test_mmap_verify_detects_damage(big_pack):
    path, sd = big_pack
    flip_byte(path, read_weight_map(path).tensors["ids"].offset)
    with pytest.raises(flashpack.ChecksumMismatchError, match="'ids'"):
        flashpack.load(path, mmap=True, verify=True)
    out = flashpack.load(path, mmap=True, verify=False)
    assert out["ids"][0].item() == (0 ^ 0xFF)


def test_verify_sound_file(big_pack):
    path, sd = big_pack
    wm = read_weight_map(path)
    rep = flashpack.verify(path)
    assert rep.source == "flashpack" and rep.file_nbytes == file_size(path)
    assert rep.tensors == 4 and rep.aliases == 0 and rep.blocks == 2
    assert rep.chunks_verified == len(list(wm.chunks()))
    assert rep.bytes_verified == sum(b.nbytes for b in wm.blocks)
    assert rep.checksum_algorithm == "xxh3_64"
    # a small buffer streams the same chunks
    rep2 = flashpack.verify(path, buffer_nbytes=1)
    assert rep2.chunks_verified == rep.chunks_verified and rep2.bytes_verified == rep.bytes_verified


def test_verify_damaged_file(big_pack):
    path, _ = big_pack
    wm = read_weight_map(path)
    flip_byte(path, wm.tensors["big2"].offset + 100)
    with pytest.raises(flashpack.ChecksumMismatchError) as ei:
        flashpack.verify(path)
    assert path in str(ei.value) and "'big2'" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_verify_default_on_full_load(big_pack):
    path, _ = big_pack
    st = LoadStats()
    flashpack.load(path, stats=st)
    assert st.chunks_verified == len(list(read_weight_map(path).chunks()))
    flip_byte(path, read_weight_map(path).tensors["big"].offset + 8)
    with pytest.raises(flashpack.ChecksumMismatchError):
        flashpack.load(path)


# --------------------------------------------------------------------------- many tensors


@pytest.mark.slow
def test_100k_small_tensors_round_trip(pack):
    n = 100_000
    data = torch.arange(2 * n, dtype=torch.float32).reshape(n, 2)
    sd = {f"layer.{i}.w": data[i] for i in range(n)}  # views at distinct offsets: no aliases
    path = pack(sd)
    wm = read_weight_map(path)
    assert len(wm.tensors) == n and wm.aliases == {} and wm.payload_nbytes == 8 * n
    out = flashpack.load(path)
    assert list(out) == list(sd)
    stacked = torch.stack([out[f"layer.{i}.w"] for i in range(n)])
    assert torch.equal(stacked, data)


# --------------------------------------------------------------------------- pack_to_file API


def test_target_dtype_positional_and_keyword(pack):
    sd = {"w": torch.tensor([1.5, 2.25]), "i": torch.tensor([1001])}
    a = flashpack.load(pack(sd, "a.flashpack", torch.float16))
    b = flashpack.load(pack(sd, "b.flashpack", target_dtype=torch.float16))
    for out in (a, b):
        assert out["w"].dtype == torch.float16 and out["w"].tolist() == [1.5, 2.25]
        assert out["i"].dtype == torch.int64 and out["i"].tolist() == [1001]


def test_metadata_round_trip(pack):
    path = pack({"w": torch.ones(1)}, metadata={"format": "pt", "ünï": "cödé"})
    assert read_weight_map(path).metadata == {"format": "pt", "ünï": "cödé"}
    with pytest.raises(TypeError):
        pack({"w": torch.ones(1)}, "b.flashpack", metadata={"n": 1})


def test_pack_module_and_return_size(tmp_path):
    m = torch.nn.Linear(3, 2)
    p = tmp_path / "m.flashpack"
    n = flashpack.pack_to_file(m, p)
    assert n == file_size(p)
    out = flashpack.load(p)
    assert torch.equal(out["weight"], m.weight.detach()) and torch.equal(out["bias"], m.bias.detach())


@pytest.mark.parametrize("bad,exc", [({1: torch.ones(1)}, TypeError), ({"a": [1.0]}, TypeError),
                                     ({"a": torch.ones(2, device="meta")}, flashpack.FlashPackError),
                                     ({"a": torch.ones(2, 2).to_sparse()}, flashpack.FlashPackError)])
def test_pack_rejects_bad_input_and_leaves_nothing(tmp_path, bad, exc):
    p = tmp_path / "x.flashpack"
    with pytest.raises(exc):
        flashpack.pack_to_file(bad, p)
    assert os.listdir(tmp_path) == []


def test_pack_atomic_on_error(tmp_path, monkeypatch):
    from flashpack import serialization

    p = tmp_path / "x.flashpack"
    flashpack.pack_to_file({"old": torch.ones(2)}, p)
    before = file_bytes(p)
    calls = []
    real = serialization._write_all

    def failing(fd, data):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(serialization, "_write_all", failing)
    with pytest.raises(OSError) as ei:
        flashpack.pack_to_file({"new": torch.randn(100), "n2": torch.randn(3)}, p)
    assert ei.value.errno == errno.ENOSPC
    assert file_bytes(p) == before
    assert os.listdir(tmp_path) == ["x.flashpack"]


def test_pack_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = tmp_path / "x.flashpack"
        flashpack.pack_to_file({"w": torch.ones(1)}, p)
    finally:
        os.umask(old)
    assert os.stat(p).st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------- C17 / C18 (threads)


@pytest.fixture
def mixed_pack(pack):
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(70_000, generator=g),  # 280,000 bytes: not a multiple of 4096
          "b": torch.randint(0, 1000, (3333,), generator=g),
          "c": torch.randn(1234, generator=g).to(torch.bfloat16)}
    path = pack(sd)
    assert file_size(path) % 4096 != 0
    return path, sd


class FakeReads:
    """Wraps flashpack.io.base._preadv/_open: records which descriptors are O_DIRECT and every call."""

    def __init__(self, monkeypatch, behaviour):
        self.real_preadv, self.real_open = os.preadv, os.open
        self.direct_fds: set[int] = set()
        self.calls: list[tuple[bool, int, int, int]] = []  # (direct, offset, asked, returned)
        self.behaviour = behaviour
        monkeypatch.setattr(io_base, "_open", self._open)
        monkeypatch.setattr(io_base, "_preadv", self._preadv)
        monkeypatch.setattr(io_base, "native_copy", None)  # the C copy calls no faked preadv

    def _open(self, path, flags, *a):
        fd = self.real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            self.direct_fds.add(fd)
        return fd

    def _preadv(self, fd, bufs, offset):
        mv = memoryview(bufs[0]).cast("B")
        direct = fd in self.direct_fds
        n = self.behaviour(self, fd, mv, offset, direct)
        self.calls.append((direct, offset, mv.nbytes, n))
        return n


@pytest.mark.parametrize("direct", ["on", "off", "auto"])
def test_c18_reads_capped_at_1000_bytes(mixed_pack, monkeypatch, direct):
    path, sd = mixed_pack
    monkeypatch.setenv("FLASHPACK_DIRECT", direct)

    def capped(fake, fd, mv, offset, is_direct):
        if is_direct:  # the kernel wrote one page but reports 1000 bytes: the rest must be re-read
            n = fake.real_preadv(fd, [mv[:4096]], offset)
            if n > 1000:
                mv[1000:n] = b"\xAA" * (n - 1000)
            return min(n, 1000)
        return fake.real_preadv(fd, [mv[:1000]], offset)

    fake = FakeReads(monkeypatch, capped)
    st = LoadStats()
    out = flashpack.load(path, backend="threads", stats=st)
    for k, t in sd.items():
        assert torch.equal(out[k], t)
    assert all(n <= 1000 for _, _, _, n in fake.calls)
    assert len(fake.calls) >= st.bytes_read // 1000
    assert st.backend == "threads"


def test_c18_zero_byte_read_before_end_raises(mixed_pack, monkeypatch):
    path, _ = mixed_pack
    monkeypatch.setenv("FLASHPACK_DIRECT", "off")

    def zero_after_first(fake, fd, mv, offset, is_direct):
        if fake.calls:
            return 0
        return fake.real_preadv(fd, [mv[:1000]], offset)

    FakeReads(monkeypatch, zero_after_first)
    with pytest.raises(OSError) as ei:
        flashpack.load(path, backend="threads")
    e = ei.value
    assert isinstance(e, ReadError) and isinstance(e, flashpack.FlashPackError)
    assert e.errno == errno.EIO and e.filename == path
    msg = str(e)
    assert path in msg and "short read at byte offset" in msg and "expected" in msg and "got" in msg


def test_c18_short_read_message_values(tmp_path, monkeypatch):
    path = str(tmp_path / "one.flashpack")
    flashpack.pack_to_file({"w": torch.ones(100)}, path)  # one 400-byte block at 4096
    monkeypatch.setenv("FLASHPACK_DIRECT", "off")

    def give_100_then_0(fake, fd, mv, offset, is_direct):
        return 0 if fake.calls else fake.real_preadv(fd, [mv[:100]], offset)

    FakeReads(monkeypatch, give_100_then_0)
    with pytest.raises(ReadError) as ei:
        flashpack.load(path, backend="threads", verify=False)
    # the only extent is [4096, EOF): the page-rounded region is clipped at the end of the file
    want = file_size(path) - 4096
    assert f"short read at byte offset 4096: expected {want} bytes, got 100" in str(ei.value)


def test_c17_direct_one_page_then_zero(mixed_pack, monkeypatch):
    path, sd = mixed_pack
    monkeypatch.setenv("FLASHPACK_DIRECT", "on")
    monkeypatch.setenv("FLASHPACK_EXTENT_NBYTES", "64K")
    served: set[int] = set()

    def one_page(fake, fd, mv, offset, is_direct):
        if is_direct:
            assert offset % 4096 == 0 and mv.nbytes % 4096 == 0, (offset, mv.nbytes)
            if offset in served or any(o < offset < o + 65536 for o in served):
                return 0
            served.add(offset)
            return fake.real_preadv(fd, [mv[:4096]], offset)
        return fake.real_preadv(fd, [mv], offset)

    fake = FakeReads(monkeypatch, one_page)
    st = LoadStats()
    out = flashpack.load(path, backend="threads", stats=st)
    for k, t in sd.items():
        assert torch.equal(out[k], t)
    direct_calls = [c for c in fake.calls if c[0]]
    assert direct_calls, "O_DIRECT was never used"
    assert all(off % 4096 == 0 and asked % 4096 == 0 for _, off, asked, _ in direct_calls)
    assert st.bytes_direct > 0 and st.bytes_buffered > 0
    assert st.bytes_read == sum(n for *_, n in fake.calls)


def test_c17_unaligned_tail_never_on_direct(mixed_pack, monkeypatch):
    path, sd = mixed_pack
    monkeypatch.setenv("FLASHPACK_DIRECT", "on")

    def real(fake, fd, mv, offset, is_direct):
        n = fake.real_preadv(fd, [mv], offset)
        return n

    fake = FakeReads(monkeypatch, real)
    st = LoadStats()
    out = flashpack.load(path, backend="threads", stats=st)
    for k, t in sd.items():
        assert torch.equal(out[k], t)
    direct_calls = [c for c in fake.calls if c[0]]
    assert direct_calls and all(off % 4096 == 0 and asked % 4096 == 0 for _, off, asked, _ in direct_calls)
    wm = read_weight_map(path)
    # the last region is clipped at EOF: its unaligned remainder came through the buffered descriptor
    assert any(not d and off + n == wm.file_nbytes for d, off, _, n in fake.calls)
    assert st.bytes_direct > 0


# --------------------------------------------------------------------------- more of C02/C04's kind


def test_conj_view_is_not_an_alias_of_its_base(pack):
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    sd = {"conj": c.conj(), "base": c, "conj2": c.conj(), "conj_t": c.view(1, 2).t().conj()}
    path = pack(sd)
    assert read_weight_map(path).aliases == {"conj2": "conj"}
    out = flashpack.load(path)
    assert out["base"].tolist() == [1 + 2j, 3 - 4j]
    assert out["conj"].tolist() == [1 - 2j, 3 + 4j] and out["conj2"].tolist() == [1 - 2j, 3 + 4j]
    assert out["conj_t"].tolist() == [[1 - 2j], [3 + 4j]]
    assert not out["conj"].is_conj()


def test_parameters_and_grad_tensors_pack(pack):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    (p * 2).sum().backward()
    out = flashpack.load(pack({"p": p, "q": p, "g": p.grad}))
    assert out["p"].tolist() == [1.0, 2.0] and out["q"] is out["p"] and out["g"].tolist() == [2.0, 2.0]
    assert not out["p"].requires_grad


def test_keys_empty_list_reads_nothing(big_pack):
    path, _ = big_pack
    st = LoadStats()
    assert flashpack.load(path, keys=[], stats=st) == {}
    assert st.bytes_read == 0


def test_c21_pack_loaded_twice_from_a_warm_cache_is_copied_from_the_page_cache(tmp_path, backend):
    """C21: a pack in the page cache (just written, then loaded twice) is copied from the cache with buffered
    reads, never re-read with O_DIRECT (fal's flashpack ran ~5x slower warm for that). Speed itself is
    checked by perf/bench_load.py, not here."""
    sd = {f"w{i}": torch.arange(i * 100_000, (i + 1) * 100_000, dtype=torch.float32) for i in range(8)}
    path = tmp_path / "warm.flashpack"
    flashpack.pack_to_file(sd, path)
    payload = flashpack.read_weight_map(path).payload_nbytes
    for _ in range(2):
        st = flashpack.LoadStats()
        out = flashpack.load(path, backend=backend, stats=st)
        assert st.backend == backend and st.bytes_direct == 0
        assert payload <= st.bytes_buffered <= payload + 2 * 4096 * len(sd)
        assert all(torch.equal(out[k], v) for k, v in sd.items())
