"""flashpack.lazy: ``safe_open`` (the surface of ``safetensors.safe_open``, row slices reading only their rows)
and ``iter_tensors`` (a file-order stream in bounded memory), on our files and fal's v3/v4 files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashpack
import flashpack.lazy as lazy
from _helpers import cuda, flip_byte, open_fds
from flashpack import LoadStats, iter_tensors, safe_open
from flashpack.errors import ChecksumMismatchError, ReadError, UsageError

CHUNK = 4096
DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.bool, torch.int64, torch.float32,
          torch.float16, torch.uint8]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (NaN payloads of fp8 compare bit for bit)."""
    t = torch.empty(t.shape, dtype=t.dtype).copy_(t)  # fresh strides (a size-1 dimension may keep a step)
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, same shape and dtype."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def random_tensor(shape, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw & 1).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def dim0_slices(n: int):
    for step in (1, 2, 3):
        for a in range(0, n + 1):
            for b in range(a, n + 1):
                yield slice(a, b, step)
    yield from (slice(None), slice(-2, None), slice(None, -1), slice(n + 5, None), slice(None, None, n + 1))


# --------------------------------------------------------------------------- slices equal full slicing


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 16), verify=st.booleans(), gap=st.sampled_from([0, lazy.GAP_NBYTES]))
def test_get_slice_equals_slicing_the_full_tensor(tmp_path_factory, monkeypatch, shape, dtype, seed, verify, gap):
    # every dim-0 slice (steps 1-3, every start and stop) and every dim-1 slice, on a random shape and dtype;
    # gap=0 makes strided row selections read row by row, the default reads the covering rows
    monkeypatch.setattr(lazy, "GAP_NBYTES", gap)
    path = str(tmp_path_factory.mktemp("h") / "m.flashpack")
    w = random_tensor(shape, dtype, seed)
    sd = {"pad": torch.ones(3, dtype=dtype), "w": w}
    flashpack.pack_to_file(sd, path, chunk_nbytes=CHUNK)
    with safe_open(path, framework="pt", device="cpu", verify=verify) as f:
        s = f.get_slice("w")
        assert s.get_shape() == list(shape) and isinstance(s.get_shape(), list)
        assert s.get_dtype() == flashpack.format.dtype_name(dtype)
        assert same(f.get_tensor("w"), w)
        for sl in dim0_slices(shape[0]):
            assert same(s[sl], w[sl]), sl
            assert same(s[sl, ...], w[sl, ...]), sl
        if len(shape) > 1:
            for sl in dim0_slices(shape[1]):
                assert same(s[:, sl], w[:, sl]), sl
                assert same(s[1 % shape[0]:, sl], w[1 % shape[0]:, sl]), sl
        for i in range(-shape[0], shape[0]):
            assert same(s[i], w[i]), i
        assert same(s[..., 0], w[..., 0])
        assert same(s[None, 0], w[None, 0])


def test_zero_dim_and_empty_tensors(pack):
    sd = {"s": torch.tensor(2.5), "z": torch.zeros(0, 3), "e": torch.zeros(4, 0, dtype=torch.int64)}
    path = pack(sd)
    with safe_open(path, framework="pt") as f:
        assert same(f.get_tensor("s"), sd["s"]) and same(f.get_slice("s")[...], sd["s"])
        assert same(f.get_slice("s")[()], sd["s"])
        assert same(f.get_slice("z")[:, 1], sd["z"][:, 1]) and same(f.get_tensor("z"), sd["z"])
        assert same(f.get_slice("e")[1:3], sd["e"][1:3])
        with pytest.raises(IndexError):
            f.get_slice("s")[:]
        assert f.stats.bytes_read <= 4096 * 2


# --------------------------------------------------------------------------- bytes read


def big_pack(pack, rows=256, cols=1024, dtype=torch.bfloat16, chunk=64 * 1024):
    w = random_tensor((rows, cols), dtype, 1)
    sd = {"head": torch.ones(100), "w": w, "tail": torch.arange(1000)}
    return pack(sd, "big.flashpack", chunk_nbytes=chunk), sd


def test_dim0_slice_reads_only_its_rows_as_one_range(pack, backend, monkeypatch):
    path, sd = big_pack(pack)
    row = 1024 * 2
    seen = []
    real = lazy.read_all
    monkeypatch.setattr(lazy, "read_all", lambda r, exts, *a: (seen.append([(e.file_offset, e.nbytes) for e in exts]),
                                                               real(r, exts, *a))[1])
    t = flashpack.read_weight_map(path).tensors["w"]
    with safe_open(path, framework="pt", backend=backend, verify=False) as f:
        part = f.get_slice("w")[32:64]  # 1/8 of the rows
        assert same(part, sd["w"][32:64])
        assert f.stats.bytes_read == 32 * row
        (exts,) = seen
        assert exts[0][0] == t.offset + 32 * row and sum(n for _, n in exts) == 32 * row
        assert all(a + n == b for (a, n), (b, _) in zip(exts, exts[1:]))  # one contiguous range
        f.get_slice("w")[5]
        assert f.stats.bytes_read == 33 * row
        f.get_slice("w")[:, 3:9]  # a cut in dimension 1 reads the covering rows: all of them
        assert f.stats.bytes_read == 33 * row + 256 * row


def test_verified_slice_reads_whole_chunks(pack, backend):
    path, sd = big_pack(pack)  # 64 KiB chunks = 32 rows of 2 KiB
    t = flashpack.read_weight_map(path).tensors["w"]
    row, chunk = 2048, 64 * 1024
    with safe_open(path, framework="pt", backend=backend, verify=True) as f:
        assert same(f.get_slice("w")[40:50], sd["w"][40:50])
        lo, hi = t.offset + 40 * row, t.offset + 50 * row
        block = flashpack.read_weight_map(path).blocks[0]
        first = (lo - block.offset) // chunk
        last = (hi - 1 - block.offset) // chunk
        assert f.stats.chunks_verified == last - first + 1
        assert f.stats.bytes_read == (last - first + 1) * chunk
        before = f.stats.bytes_read
        f.get_slice("w")[41:49]  # inside the chunks just verified: read from the last batch
        assert f.stats.bytes_read == before


def test_strided_rows_read_row_by_row_when_the_gaps_are_large(pack, monkeypatch):
    path, sd = big_pack(pack)
    monkeypatch.setattr(lazy, "GAP_NBYTES", 4096)
    with safe_open(path, framework="pt", verify=False) as f:
        assert same(f.get_slice("w")[0:256:8], sd["w"][0:256:8])  # 7 skipped rows = 14 KiB gaps
        assert f.stats.bytes_read == 32 * 2048
    monkeypatch.setattr(lazy, "GAP_NBYTES", 1 << 30)
    with safe_open(path, framework="pt", verify=False) as f:
        assert same(f.get_slice("w")[0:256:8], sd["w"][0:256:8])
        assert f.stats.bytes_read == 249 * 2048  # rows 0 to 248, covering


def test_a_damaged_chunk_is_found_by_a_slice_and_skipped_by_verify_false(pack):
    path, sd = big_pack(pack)
    t = flashpack.read_weight_map(path).tensors["w"]
    flip_byte(path, t.offset + 200 * 2048 + 7)
    with safe_open(path, framework="pt") as f:
        assert same(f.get_slice("w")[0:64], sd["w"][0:64])  # chunks away from the damage
        with pytest.raises(ChecksumMismatchError, match="'w'"):
            f.get_slice("w")[190:210]
    with safe_open(path, framework="pt", verify=False) as f:
        assert not same(f.get_slice("w")[200], sd["w"][200])


# --------------------------------------------------------------------------- safetensors' surface


@pytest.fixture
def twins(tmp_path):
    """The same tensors as a safetensors file and a flashpack file."""
    from safetensors.torch import save_file

    sd = {"zz": torch.arange(24, dtype=torch.float32).reshape(4, 6), "aa": torch.arange(5),
          "s": torch.tensor(3.0), "e": torch.zeros(0, 3)}
    st_path, fp_path = str(tmp_path / "m.safetensors"), str(tmp_path / "m.flashpack")
    save_file(sd, st_path, metadata={"format": "pt"})
    flashpack.pack_to_file(sd, fp_path, metadata={"format": "pt"})
    return st_path, fp_path, sd


INDICES = [slice(1, 3), (slice(None), slice(1, 5, 2)), (Ellipsis, 1), 1, -1, 10, -5, slice(2, 10), slice(10, 20),
           (slice(None), 7), (1, 2, 3), slice(None, None, -1), slice(None, None, 0), 1.0, (None, 1), (1, None),
           (slice(None), Ellipsis), (), slice(3, 1), slice(-10, None), (slice(0, 4, 3), slice(1, None, 2)), "a"]


def outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), None


@pytest.mark.parametrize("index", INDICES, ids=repr)
def test_slices_match_safetensors(twins, index):
    from safetensors import safe_open as st_open

    st_path, fp_path, _ = twins
    with st_open(st_path, framework="pt") as g, safe_open(fp_path, framework="pt") as f:
        want = outcome(lambda: g.get_slice("zz")[index])
        got = outcome(lambda: f.get_slice("zz")[index])
    assert got[0] == want[0]
    if want[0] == "ok":
        assert same(got[1], want[1].contiguous())


def test_surface_matches_safetensors(twins):
    from safetensors import safe_open as st_open

    st_path, fp_path, sd = twins
    with st_open(st_path, framework="pt") as g, safe_open(fp_path, framework="pt") as f:
        assert f.keys() == g.keys()
        assert f.metadata() == g.metadata() == {"format": "pt"}
        for k in g.keys():
            assert same(f.get_tensor(k), g.get_tensor(k))
            assert f.get_slice(k).get_shape() == g.get_slice(k).get_shape()
            assert f.get_slice(k).get_dtype() == g.get_slice(k).get_dtype()
        assert {k: bits(v) for k, v in f.get_tensors().items()}.keys() == g.get_tensors().keys()
        with pytest.raises(KeyError, match="does not contain tensor nope"):
            f.get_tensor("nope")
        with pytest.raises(KeyError):
            f.get_slice("nope")
        with pytest.raises(TypeError):
            f.get_tensor(3)
    with pytest.raises(UsageError, match="closed"):
        f.keys()
    with pytest.raises(UsageError, match="closed"):
        f.get_tensor("aa")


def test_metadata_none_keys_order_and_aliases(pack):
    a = torch.randn(8, 4)
    path = pack({"b": torch.ones(3, dtype=torch.int64), "a": a, "tied": a})
    with safe_open(path, "pt") as f:
        assert f.metadata() is None  # as safetensors for a file without metadata
        assert f.keys() == ["a", "b", "tied"]
        assert f.offset_keys() == ["b", "a", "tied"]  # the int64 block comes first in this file
        assert same(f.get_tensor("tied"), a) and same(f.get_slice("tied")[2:4, 1], a[2:4, 1])
        assert f.get_tensor("a") is not f.get_tensor("a")  # each call a new tensor, as safetensors


def test_framework_device_and_backend_arguments(pack):
    path = pack({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)})
    for fw in ("pt", "torch", "pytorch"):
        with safe_open(path, framework=fw) as f:
            assert isinstance(f.get_tensor("w"), torch.Tensor)
    with safe_open(path, framework="numpy") as f:
        arr = f.get_slice("w")[1:]
        assert type(arr).__module__ == "numpy" and arr.tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
    with safe_open(path, framework="pt", backend="mmap") as f:  # safetensors' backend names mean "auto"
        assert f.get_tensor("w").sum() == 66
    for bad in ("tf", "flax", "PT", None):
        with pytest.raises(UsageError, match="framework"):
            safe_open(path, framework=bad)
    with pytest.raises(flashpack.FlashPackError):
        safe_open(path, framework="pt", device="meta")
    with pytest.raises(FileNotFoundError):
        safe_open(path + ".missing", framework="pt")


def test_a_rewritten_file_is_refused(pack):
    path = pack({"w": torch.zeros(64, 64)})
    f = safe_open(path, framework="pt")
    assert f.get_slice("w")[0].sum() == 0
    with open(path, "r+b") as fh:  # same size, new contents and mtime: the weight map no longer describes it
        fh.seek(5000)
        fh.write(b"\x01")
    os.utime(path, ns=(1, 1))
    with pytest.raises(ReadError) as e:
        f.get_tensor("w")
    assert e.value.errno == errno.ESTALE
    f.close()
    f.close()


@cuda
def test_cuda_device_reads_to_host_then_copies(pack):
    sd = {"w": torch.randn(64, 32)}
    path = pack(sd)
    with safe_open(path, framework="pt", device="cuda") as f:
        t = f.get_slice("w")[8:16]
        assert t.device.type == "cuda" and torch.equal(t.cpu(), sd["w"][8:16])
    got = dict(iter_tensors(path, device="cuda"))
    assert got["w"].device.type == "cuda" and torch.equal(got["w"].cpu(), sd["w"])


# --------------------------------------------------------------------------- iter_tensors


def test_iter_tensors_file_order_aliases_and_keys(pack):
    emb = torch.randn(50, 8)
    sd = {"f32": torch.randn(7), "i64": torch.arange(9), "emb": emb, "z": torch.zeros(0), "lm_head": emb,
          "bf": torch.randn(33, 5).to(torch.bfloat16)}
    path = pack(sd, chunk_nbytes=CHUNK)
    wm = flashpack.read_weight_map(path)
    got = list(iter_tensors(path))
    names = [n for n, _ in got]
    stored = sorted((t for t in wm.tensors.values()), key=lambda t: (t.nbytes > 0, t.offset))
    expect = []
    for t in stored:
        expect += [t.key] + [a for a, tgt in wm.aliases.items() if tgt == t.key]
    assert names == expect and set(names) == set(sd)
    d = dict(got)
    assert d["lm_head"] is d["emb"]
    for k, v in sd.items():
        assert same(d[k], v), k
    # keys=: only those, file order kept, an alias alone comes with its target's bytes
    only = list(iter_tensors(path, keys=["lm_head", "f32"]))
    assert [n for n, _ in only] == [k for k in names if k in ("lm_head", "f32")]
    assert same(dict(only)["lm_head"], emb)
    with pytest.raises(KeyError, match="nope"):
        iter_tensors(path, keys=["nope"])  # at the call, before anything is read
    # get_tensors() of a handle is the same stream
    with safe_open(path, "pt") as f:
        g = f.get_tensors()
    assert list(g) == names and g["lm_head"] is g["emb"]


def test_iter_tensors_yields_before_the_last_byte_is_read(pack):
    sd = {f"t{i}": torch.full((64, 1024), float(i)) for i in range(8)}  # 256 KiB each
    path = pack(sd, chunk_nbytes=64 * 1024)
    stats = LoadStats()
    it = iter_tensors(path, stats=stats, window_nbytes=128 * 1024)
    name, t = next(it)
    assert name == "t0" and same(t, sd["t0"])
    assert 0 < stats.bytes_read < 4 * 256 * 1024  # far from the 2 MiB of the whole payload
    rest = list(it)
    assert [n for n, _ in rest] == [f"t{i}" for i in range(1, 8)]
    assert stats.bytes_read == 8 * 256 * 1024 and stats.chunks_verified == 32


def test_iter_tensors_damage_and_abandon(pack):
    sd = {f"t{i}": torch.full((64, 1024), float(i)) for i in range(4)}
    path = pack(sd, chunk_nbytes=64 * 1024)
    t2 = flashpack.read_weight_map(path).tensors["t2"]
    flip_byte(path, t2.offset + 100)
    fds = open_fds()
    got = []
    with pytest.raises(ChecksumMismatchError, match="'t2'"):
        for name, t in iter_tensors(path):
            got.append(name)
    assert got == ["t0", "t1"]  # the tensors before the damaged chunk were yielded
    assert sorted(n for n, _ in iter_tensors(path, verify=False)) == ["t0", "t1", "t2", "t3"]
    it = iter_tensors(path, verify=False)
    next(it)
    it.close()  # abandoned half way: the reader is closed, its descriptors too
    assert open_fds() == fds


def test_iter_tensors_memory_is_bounded(tmp_path):
    # 96 MiB in 48 tensors of 2 MiB (1 MiB chunks, 2 MiB reads), streamed through 8 MiB of read buffers, each
    # tensor dropped after use: the peak resident memory may grow by the window plus one tensor (and 8 MiB of
    # allocator and interpreter slack; about 6 MiB measured), not by the pack (keeping every tensor: +110 MiB).
    # glibc's mmap threshold is fixed at its initial 128 KiB (mallopt(3), M_MMAP_THRESHOLD): left dynamic, it rises
    # to 2 MiB at the first freed tensor and the heap then keeps freed tensors' blocks (growth 6, 12 or 18 MiB from
    # run to run on the AMD CI machine, 6.7 MiB every time with the threshold fixed): glibc's retention, not ours.
    path = str(tmp_path / "big.flashpack")
    flashpack.pack_to_file({f"t{i}": torch.full((512, 1024), float(i)) for i in range(48)}, path,
                           chunk_nbytes=2 ** 20)
    code = textwrap.dedent(f"""
        import json, torch, flashpack
        from flashpack.loading.memory import resident_nbytes

        def hwm():  # peak resident set size since the last reset (VmHWM), bytes
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

        path = {path!r}
        for _ in flashpack.iter_tensors(path, keys=["t0"]):
            pass  # imports and first allocations done
        base = resident_nbytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (proc(5), Linux 4.0)
        n = 0
        sampled = base
        for name, t in flashpack.iter_tensors(path, window_nbytes=8 << 20):
            sampled = max(sampled, resident_nbytes())
            n += int(t[0, 0])
            del t
        print(json.dumps({{"base": base, "sampled": sampled, "peak": max(hwm(), sampled), "sum": n}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, FLASHPACK_EXTENT_NBYTES="2M", MALLOC_MMAP_THRESHOLD_="131072"))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["sum"] == sum(range(48))
    bound = 8 * 2 ** 20 + 2 * 2 ** 20 + 8 * 2 ** 20  # window + one tensor + slack
    assert r["peak"] - r["base"] <= bound, (r, bound)


# --------------------------------------------------------------------------- fal's files


ALIGN = 128


def fal_file(path, groups, version: int) -> str:
    """A file laid out as fal's flashpack 0.2-0.4 writes it (docs/FORMAT.md): payload from byte 0 (blocks and
    tensors 128-byte aligned), JSON footer, its length as u64, ``FLASHPK\\0``."""
    payload = bytearray()
    mbs, index = [], []
    for mbi, (dt, items) in enumerate(groups):
        payload += bytes(-len(payload) % ALIGN)
        start, elems = len(payload), 0
        for name, t in items:
            elems += -elems % (ALIGN // dt.itemsize)
            index.append({"name": name, "shape": list(t.shape), "offset": elems, "length": t.numel(), "macroblock": mbi})
            payload += bytes(start + elems * dt.itemsize - len(payload)) + bits(t).numpy().tobytes()
            elems += t.numel()
        mbs.append({"dtype": str(dt).removeprefix("torch."), "offset_bytes": start,
                    "length_bytes": elems * dt.itemsize, "length_elems": elems})
    if version == 3:
        for rec in index:
            del rec["macroblock"]
        footer = {"format": "flashpack_v3", "target_dtype": mbs[0]["dtype"], "align_bytes": ALIGN,
                  "total_elems": mbs[0]["length_elems"], "index": index}
    else:
        footer = {"format": "flashpack_v4", "macroblocks": mbs, "index": index}
    body = json.dumps(footer).encode()
    with open(path, "wb") as f:
        f.write(bytes(payload) + body + len(body).to_bytes(8, "little") + b"FLASHPK\x00")
    return str(path)


@pytest.mark.parametrize("version", [3, 4])
def test_fal_files(tmp_path, version):
    a, b = random_tensor((37, 11), torch.bfloat16, 3), random_tensor((5, 3), torch.bfloat16, 4)
    groups = [(torch.bfloat16, [("a", a), ("b", b)])]
    if version == 4:
        groups.append((torch.float8_e4m3fn, [("c", random_tensor((9, 4), torch.float8_e4m3fn, 5))]))
    path = fal_file(tmp_path / "fal.bin", groups, version)
    sd = {n: t for _, items in groups for n, t in items}
    with safe_open(path, framework="pt") as f:
        assert f.keys() == sorted(sd)
        for k, v in sd.items():
            assert same(f.get_tensor(k), v)
        assert same(f.get_slice("a")[3:30:4, 2:], a[3:30:4, 2:])
        before = f.stats.bytes_read
        f.get_slice("a")[10:20]
        assert f.stats.bytes_read - before == 10 * 11 * 2  # no checksums: exactly the rows
    got = dict(iter_tensors(path))
    assert got.keys() == sd.keys() and all(same(got[k], v) for k, v in sd.items())


def test_sharded_pack_reads_like_one_file(tmp_path):
    """safe_open and iter_tensors on a sharded pack (index or folder) equal the one-file pack, ties included."""
    torch.manual_seed(3)
    w = torch.randn(64, 48)
    sd = {"a.weight": w, "b.weight": torch.randn(300, 7).bfloat16(), "c.ids": torch.arange(5000),
          "d.weight": w, "e.mask": torch.rand(333) > 0.5}
    flashpack.pack_to_file(sd, tmp_path / "one.flashpack")
    folder = tmp_path / "sharded"
    folder.mkdir()
    flashpack.pack_to_file(sd, folder / "model.flashpack", max_shard_nbytes=16 * 1024)
    index = folder / "model.flashpack.index.json"
    assert index.exists() and len(list(folder.glob("model-*-of-*.flashpack"))) >= 3
    for where in (index, folder):
        with flashpack.safe_open(where) as f, flashpack.safe_open(tmp_path / "one.flashpack") as g:
            assert f.keys() == g.keys() == sorted(sd)
            for k in sd:
                assert torch.equal(f.get_tensor(k), sd[k])
            assert torch.equal(f.get_slice("b.weight")[10:20, 2:5], sd["b.weight"][10:20, 2:5])
        got = dict(flashpack.iter_tensors(where))
        assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
        assert got["a.weight"] is got["d.weight"]  # the tie stays one tensor
