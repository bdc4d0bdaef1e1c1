"""Distributed loading (flashpack.loading.distributed) on CPU with gloo, in spawned processes.

Each world size (2 and 4) is one group of spawned processes that runs every scenario in turn and
writes what it saw; the tests below compare that with single-process loads made here. Failure
scenarios run in the same group, between successful loads, so the group is shown to stay usable.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
import xxhash

import flashpack
from _helpers import mapping_of, mappings_holding
from flashpack.deserialization import LoadStats
from flashpack.plan import make_plan
from flashpack.plan import share_bounds, share_nbytes, share_plan

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16 * 1024  # small checksum chunks, so a small file splits evenly across ranks
JOIN_TIMEOUT_S = 120


def digest(t: torch.Tensor) -> tuple:
    """dtype, shape and a hash of the raw bytes (any dtype, including bool/fp8/complex/0-dim)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return str(t.dtype), tuple(t.shape), xxhash.xxh3_64_intdigest(raw)


def digests(sd: dict) -> dict:
    return {k: digest(v) for k, v in sd.items()}


class Tied(torch.nn.Module):
    """Input and output projections share one weight. (Linear, not Embedding: on torch 2.13 a meta
    Embedding's normal_ init imports torch._dynamo, seconds per process.)"""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(24, 37, bias=False)
        self.mid = torch.nn.Linear(24, 24)
        self.head = torch.nn.Linear(24, 37, bias=False)
        self.head.weight = self.inp.weight


def _files(folder: Path) -> dict[str, str]:
    g = torch.Generator().manual_seed(0)
    mixed = {
        "f32": torch.randn(1000, 37, generator=g),  # 148000 bytes: not a multiple of 4096 or of any world size
        "bf16": torch.randn(333, 77, generator=g).to(torch.bfloat16),
        "i64": torch.arange(12345, dtype=torch.int64),
        "flag": torch.rand(999, generator=g) > 0.5,
        "c64": torch.randn(301, dtype=torch.complex64, generator=g),
        "fp8": torch.randn(4099, generator=g).to(torch.float8_e4m3fn),
        "empty_f32": torch.empty(0, 5),
        "empty_i8": torch.empty(3, 0, dtype=torch.int8),
        "scalar": torch.tensor(3.5),
    }
    mixed["alias_f32"] = mixed["f32"]
    paths = {
        "mixed": mixed,
        "huge": {"w": torch.randn(300_007, generator=g)},  # one tensor spanning every share
        "big": {"w": torch.randn(1_500_007, generator=g), "b": torch.randn(7, generator=g).bfloat16()},  # >= 4 MiB
        "zeros_only": {"a": torch.empty(0), "b": torch.empty(0, 3, dtype=torch.bfloat16)},
        "empty": {},
    }
    out = {}
    for name, sd in paths.items():
        out[name] = str(folder / f"{name}.flashpack")
        flashpack.pack_to_file(sd, out[name], chunk_nbytes=CHUNK)
    out["tied"] = str(folder / "tied.flashpack")
    torch.manual_seed(1)
    flashpack.pack_to_file(Tied(), out["tied"], chunk_nbytes=CHUNK)
    other = str(folder / "other.flashpack")  # same keys, other values: a different file
    flashpack.pack_to_file({"w": torch.zeros(300_007)}, other, chunk_nbytes=CHUNK)
    out["other"] = other
    corrupt = str(folder / "corrupt.flashpack")  # a flipped payload byte in the last rank's share
    data = bytearray(Path(out["huge"]).read_bytes())
    wm = flashpack.read_weight_map(out["huge"])
    data[wm.tensors["w"].offset + wm.tensors["w"].nbytes - 10] ^= 0xFF
    Path(corrupt).write_bytes(bytes(data))
    out["corrupt"] = corrupt
    plan = make_plan(wm, None, extent_nbytes=8 << 20, verify=True)
    for w in (2, 4):  # a flipped byte just past rank 0's share, in a chunk that starts in rank 0's share
        at = share_nbytes(plan.buffer_nbytes, w) + 100
        assert at % CHUNK > 100 and len(plan.regions) == 1
        bad = bytearray(Path(out["huge"]).read_bytes())
        bad[plan.regions[0].file_offset + at] ^= 0xFF
        out[f"straddle{w}"] = str(folder / f"straddle{w}.flashpack")
        Path(out[f"straddle{w}"]).write_bytes(bytes(bad))
    return out


# --------------------------------------------------------------------------- the worker (runs in each rank)


def _worker(rank: int, world: int, port: int, files: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    from flashpack.errors import DistributedLoadError
    from flashpack.loading.distributed import load_distributed
    from flashpack.testing import init_local_group

    init_local_group(rank, world, port, timeout_s=60)
    res: dict = {}
    # the share-and-exchange scenarios: bypass, or ranks on one host would share the page cache instead
    os.environ["FLASHPACK_CACHE"] = "bypass"

    def run(label, fn):
        stats = LoadStats()
        try:
            sd = fn(stats)
        except Exception as e:  # noqa: BLE001 - recorded for the parent to check
            res[label] = {"error": type(e).__name__, "message": str(e),
                          "is_dist_error": isinstance(e, DistributedLoadError),
                          "failures": getattr(e, "failures", None)}
            return
        res[label] = {"digests": digests(sd), "bytes_read": stats.bytes_read, "chunks": stats.chunks_verified,
                      "allocations": len(mappings_holding(sd.values())), "alias_same": sd.get("alias_f32") is sd.get("f32") if sd else None,
                      "cache": stats.cache, "cache_reason": stats.cache_reason, "direct": stats.bytes_direct,
                      "memory": stats.memory, "maps": mapping_of(next(iter(sd.values()), None)),
                      "filled": stats.bytes_filled}
        return sd

    for name in ("mixed", "huge", "zeros_only", "empty", "tied"):
        run(name, lambda st, n=name: flashpack.load(files[n], process_group=dist.group.WORLD, stats=st))
    run("missing", lambda st: flashpack.load(files["mixed"] if rank != world - 1 else files["mixed"] + ".missing",
                                             process_group="default", stats=st))
    run("after_missing", lambda st: flashpack.load(files["mixed"], process_group="default", stats=st))
    run("all_gather", lambda st: load_distributed(files["mixed"], process_group=None, stats=st, exchange="all_gather"))
    run("broadcast", lambda st: load_distributed(files["mixed"], process_group=None, stats=st, exchange="broadcast"))
    run("noverify", lambda st: load_distributed(files["mixed"], stats=st, verify=False))
    run("src_rank", lambda st: load_distributed(files["huge"] if rank == 1 else None, src_rank=1, stats=st))
    run("src_rank_load", lambda st: flashpack.load(files["huge"] if rank == 1 else None, process_group="default",
                                                    src_rank=1, stats=st))
    run("src_missing", lambda st: load_distributed(files["huge"] + ".missing" if rank == 0 else None, src_rank=0,
                                                   stats=st))
    run("keys", lambda st: flashpack.load(files["mixed"], keys=["bf16", "alias_f32", "empty_i8"],
                                          process_group="default", stats=st))
    run("different_file", lambda st: flashpack.load(files["other"] if rank == 1 else files["huge"],
                                                    process_group="default", stats=st))
    run("corrupt", lambda st: flashpack.load(files["corrupt"], process_group="default", stats=st))
    run("straddle", lambda st: flashpack.load(files[f"straddle{world}"], process_group="default", stats=st))
    run("bad_key_one_rank", lambda st: flashpack.load(files["mixed"], keys=["f32"] if rank else ["nope"],
                                                      process_group="default", stats=st))
    os.environ["FLASHPACK_DISTRIBUTED"] = "1"
    run("env", lambda st: flashpack.load(files["huge"], stats=st))
    del os.environ["FLASHPACK_DISTRIBUTED"]

    # ranks on one host share the page cache (cache="auto" keeps these small files)
    del os.environ["FLASHPACK_CACHE"]
    from flashpack.io.pagecache import drop_from_cache
    import flashpack.loading.distributed as D

    dist.barrier()
    if rank == 0:
        drop_from_cache(files["huge"])
    dist.barrier()
    shared = run("shared", lambda st: flashpack.load(files["huge"], process_group="default", stats=st))
    dist.barrier()
    if rank == world - 1:
        shared["w"].add_(1.0)  # a write in one rank: that rank's own copy of the page
    dist.barrier()
    res["shared_after_write"] = digests(shared)
    del shared
    run("shared_big", lambda st: flashpack.load(files["big"], process_group="default", stats=st))
    run("shared_keys", lambda st: flashpack.load(files["mixed"], keys=["bf16", "alias_f32", "empty_i8"],
                                                 process_group="default", stats=st))
    run("shared_corrupt", lambda st: flashpack.load(files["corrupt"], process_group="default", stats=st))
    run("shared_bad_cache", lambda st: load_distributed(files["huge"], stats=st, cache="sometimes"))
    real_host = D.host_name
    D.host_name = lambda: f"host{rank}"  # a test double: every rank on a host of its own
    run("hosts", lambda st: flashpack.load(files["huge"], process_group="default", stats=st))
    D.host_name = lambda: f"host{rank % 2}"  # two hosts
    run("two_hosts", lambda st: flashpack.load(files["huge"], process_group="default", stats=st, cache="keep"))
    D.host_name = real_host
    real_map = D.memory.map_shared

    def refuse(handle):  # a test double: the last rank cannot open rank 0's descriptor (another pid namespace)
        if rank == world - 1:
            raise PermissionError(13, "Permission denied", "/proc/1234/fd/5")
        return real_map(handle)
    D.memory.map_shared = refuse
    run("shared_unreachable", lambda st: flashpack.load(files["huge"], process_group="default", stats=st))
    D.memory.map_shared = real_map

    # tied weights through assign_from_file
    with flashpack.init_empty_weights():
        model = Tied()
    flashpack.assign_from_file(model, files["tied"], process_group=dist.group.WORLD)
    res["tied_model"] = {"tied": model.head.weight is model.inp.weight,
                         "digests": digests(dict(model.state_dict())),
                         "meta": [n for n, p in model.named_parameters() if p.device.type == "meta"]}
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "wb") as f:
        pickle.dump(res, f)


def _spawn(world: int, files: dict[str, str], folder: Path) -> list[dict]:
    from flashpack.testing import free_port

    ctx = mp.get_context("forkserver")  # one interpreter imports torch once; each rank is a fork of it
    ctx.set_forkserver_preload(["torch", "torch.distributed", "flashpack", "flashpack.loading.distributed", __name__])
    port = free_port()
    outs = [str(folder / f"rank{r}.pkl") for r in range(world)]
    procs = [ctx.Process(target=_worker, args=(r, world, port, files, outs[r])) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} of {world} still running after {JOIN_TIMEOUT_S} s (a hang)"
    assert [p.exitcode for p in procs] == [0] * world
    results = []
    for o in outs:
        with open(o, "rb") as f:
            results.append(pickle.load(f))
    return results


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return _files(tmp_path_factory.mktemp("packs"))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world(request, files, tmp_path_factory):
    w = request.param
    return w, _spawn(w, files, tmp_path_factory.mktemp(f"world{w}"))


def _single(path, **kw) -> tuple[dict, LoadStats]:
    st = LoadStats()
    return digests(flashpack.load(path, stats=st, **kw)), st


# --------------------------------------------------------------------------- tests over the spawned groups


@pytest.mark.parametrize("name", ["mixed", "huge", "zeros_only", "empty", "tied", "after_missing", "all_gather",
                                  "broadcast", "noverify"])
def test_every_rank_bit_identical_to_single_process(world, files, name):
    w, res = world
    expect, _ = _single(files[{"after_missing": "mixed", "all_gather": "mixed", "broadcast": "mixed",
                               "noverify": "mixed"}.get(name, name)])
    for r in range(w):
        got = res[r][name]
        assert "error" not in got, got
        assert got["digests"] == expect, f"rank {r}"
        assert list(got["digests"]) == list(expect)  # same key order as a single-process load
        assert got["allocations"] <= 1  # views into one buffer, as in a normal load
    if name == "mixed":
        assert all(res[r]["mixed"]["alias_same"] for r in range(w))


@pytest.mark.parametrize("name", ["mixed", "huge"])
def test_each_rank_reads_about_its_share(world, files, name):
    w, res = world
    _, st = _single(files[name])
    reads = [res[r][name]["bytes_read"] for r in range(w)]
    assert sum(reads) == st.bytes_read  # the file is read once in all, not w times
    for b in reads:
        assert abs(b - st.bytes_read / w) <= 4096 * w, reads
    # every checksum chunk verified exactly once across the group
    assert sum(res[r][name]["chunks"] for r in range(w)) == st.chunks_verified > 1


def test_empty_and_zero_size_files_read_nothing_extra(world, files):
    w, res = world
    for name in ("empty", "zeros_only"):
        _, st = _single(files[name])
        assert sum(res[r][name]["bytes_read"] for r in range(w)) == st.bytes_read


def test_missing_path_on_one_rank_raises_on_every_rank(world):
    w, res = world
    errs = [res[r]["missing"] for r in range(w)]
    assert all(e.get("is_dist_error") for e in errs), errs
    assert len({e["message"] for e in errs}) == 1  # the same error everywhere
    msg = errs[0]["message"]
    assert f"rank {w - 1} of {w}" in msg and "FileNotFoundError" in msg and ".missing" in msg
    assert errs[0]["failures"].keys() == {w - 1}


def test_src_rank_mode(world, files):
    w, res = world
    expect, st = _single(files["huge"])
    for r in range(w):
        assert res[r]["src_rank"]["digests"] == expect
        assert res[r]["src_rank"]["bytes_read"] == (st.bytes_read if r == 1 else 0)
        # the same through the public flashpack.load(..., process_group=..., src_rank=...)
        assert res[r]["src_rank_load"]["digests"] == expect
        assert res[r]["src_rank_load"]["bytes_read"] == (st.bytes_read if r == 1 else 0)
    errs = [res[r]["src_missing"] for r in range(w)]
    assert all(e.get("is_dist_error") for e in errs) and len({e["message"] for e in errs}) == 1
    assert f"rank 0 of {w}" in errs[0]["message"] and "FileNotFoundError" in errs[0]["message"]


def test_keys_subset(world, files):
    w, res = world
    expect, st = _single(files["mixed"], keys=["bf16", "alias_f32", "empty_i8"])
    for r in range(w):
        assert res[r]["keys"]["digests"] == expect
    assert sum(res[r]["keys"]["bytes_read"] for r in range(w)) == st.bytes_read


def test_different_file_on_one_rank_is_refused(world):
    w, res = world
    errs = [res[r]["different_file"] for r in range(w)]
    assert all(e.get("is_dist_error") for e in errs) and len({e["message"] for e in errs}) == 1
    assert "[1]" in errs[0]["message"] and "different file" in errs[0]["message"]


def test_checksum_mismatch_in_one_share_raises_everywhere(world):
    w, res = world
    errs = [res[r]["corrupt"] for r in range(w)]
    assert all(e.get("is_dist_error") for e in errs) and len({e["message"] for e in errs}) == 1
    assert "ChecksumMismatchError" in errs[0]["message"]
    assert errs[0]["failures"].keys() == {w - 1}  # the flipped byte lies in the last rank's share


def test_checksum_mismatch_across_a_share_boundary_raises_everywhere(world):
    w, res = world
    errs = [res[r]["straddle"] for r in range(w)]
    assert all(e.get("is_dist_error") for e in errs) and len({e["message"] for e in errs}) == 1
    assert "ChecksumMismatchError" in errs[0]["message"] and "share boundary" in errs[0]["message"]
    assert errs[0]["failures"].keys() == {0}  # verified by the rank whose share holds the chunk's start


def test_bad_key_on_one_rank_raises_everywhere(world):
    w, res = world
    errs = [res[r]["bad_key_one_rank"] for r in range(w)]
    assert all(e.get("is_dist_error") for e in errs)
    assert "rank 0 of" in errs[0]["message"] and "KeyError" in errs[0]["message"] and "nope" in errs[0]["message"]


def test_env_switch_uses_default_group(world, files):
    w, res = world
    expect, st = _single(files["huge"])
    assert all(res[r]["env"]["digests"] == expect for r in range(w))
    assert sum(res[r]["env"]["bytes_read"] for r in range(w)) == st.bytes_read
    assert all(res[r]["env"]["bytes_read"] < st.bytes_read for r in range(w))


def test_ranks_on_one_host_share_one_read_through_sealed_shared_memory(world, files):
    w, res = world
    expect, st = _single(files["huge"])
    reason = (f"{st.bytes_read} bytes to read <= 50% of MemAvailable (")
    tail = f" bytes); the {w} ranks share this host and file: rank 0 reads it once through the page cache"
    for r in range(w):
        got = res[r]["shared"]
        assert got["digests"] == expect
        assert got["cache"] == "keep" and got["cache_reason"].startswith(reason)
        # every tensor in every rank is a view of the memory file rank 0 filled (memfd_create name)
        assert got["maps"] == "/memfd:flashpack:huge.flashpack (deleted)"
        if r == 0:
            assert (got["bytes_read"], got["direct"], got["chunks"]) == (st.bytes_read, 0, st.chunks_verified)
            assert got["cache_reason"].endswith(tail) and got["memory"] == "memfd"
        else:  # read nothing, verified nothing: mapped rank 0's sealed, verified bytes
            assert (got["bytes_read"], got["chunks"]) == (0, 0)
            assert got["cache_reason"].endswith(tail + " (rank 0 read it into shared memory; this rank maps it "
                                                       "copy-on-write)") and got["memory"] == "memfd (mapped)"
    # a write in the last rank stays in that rank (MAP_PRIVATE)
    assert all(res[r]["shared_after_write"] == expect for r in range(w - 1))
    assert res[w - 1]["shared_after_write"]["w"] != expect["w"]
    keys, kst = _single(files["mixed"], keys=["bf16", "alias_f32", "empty_i8"])
    assert all(res[r]["shared_keys"]["digests"] == keys for r in range(w))
    assert [res[r]["shared_keys"]["bytes_read"] for r in range(w)] == [kst.bytes_read] + [0] * (w - 1)


def test_shared_memory_of_4_mib_or_more_is_filled_with_uffdio_copy(world, files):
    """Rank 0 fills the memory file's shmem pages with UFFDIO_COPY from the page cache (no fault and no zeroed
    page per 4 KiB; measured in perf/bench_dist.py): every byte it read went through the fill, and the result is
    the single-process load's, in every rank."""
    w, res = world
    expect, st = _single(files["big"])
    for r in range(w):
        got = res[r]["shared_big"]
        assert got["digests"] == expect and got["maps"] == "/memfd:flashpack:big.flashpack (deleted)"
        if r == 0:
            assert got["memory"] == "memfd+uffd" and got["filled"] == got["bytes_read"] == st.bytes_read > 4 << 20
        else:
            assert (got["memory"], got["filled"], got["bytes_read"]) == ("memfd (mapped)", 0, 0)


def test_a_rank_that_cannot_map_the_shared_memory_reads_the_file_itself(world, files):
    w, res = world
    expect, st = _single(files["huge"])
    for r in range(w):
        got = res[r]["shared_unreachable"]
        assert got["digests"] == expect
        if r == w - 1:
            assert (got["bytes_read"], got["chunks"]) == (st.bytes_read, st.chunks_verified)
            assert "memfd" not in got["maps"] and got["memory"] == "torch"  # its own allocation (a small file)
            assert got["cache_reason"].endswith(" (rank 0's shared memory could not be mapped here ([Errno 13] "
                                                "Permission denied: '/proc/1234/fd/5'): this rank read the file)")
        else:
            assert got["maps"] == "/memfd:flashpack:huge.flashpack (deleted)"


def test_shared_memory_checksum_mismatch_raises_on_every_rank(world):
    w, res = world
    errs = [res[r]["shared_corrupt"] for r in range(w)]
    assert all(e.get("is_dist_error") for e in errs) and len({e["message"] for e in errs}) == 1
    assert "ChecksumMismatchError" in errs[0]["message"]
    assert "while reading the file into memory shared by the ranks of this host" in errs[0]["message"]
    assert errs[0]["failures"].keys() == {0}  # rank 0 read and verified the file for the host
    bad = [res[r]["shared_bad_cache"] for r in range(w)]
    assert all((e["error"], e["message"]) == ("ValueError", "cache='sometimes': expected one of auto, keep, bypass")
               for e in bad)


def test_ranks_on_different_hosts_still_read_shares_and_exchange(world, files):
    w, res = world
    expect, st = _single(files["huge"])
    for label, nhosts in (("hosts", w), ("two_hosts", 2)):
        reads = [res[r][label]["bytes_read"] for r in range(w)]
        assert all(res[r][label]["digests"] == expect for r in range(w))
        assert sum(reads) == st.bytes_read and all(abs(b - st.bytes_read / w) <= 4096 * w for b in reads), reads
        assert all(res[r][label]["cache"] == "keep" for r in range(w))
        assert all(res[r][label]["cache_reason"].endswith(f"; ranks on {nhosts} hosts or files: each reads a share, "
                                                          f"then the shares are exchanged") for r in range(w))


def test_tied_model_stays_tied_on_every_rank(world, files):
    w, res = world
    with flashpack.init_empty_weights():
        ref = Tied()
    flashpack.assign_from_file(ref, files["tied"])
    expect = digests(dict(ref.state_dict()))
    for r in range(w):
        tm = res[r]["tied_model"]
        assert tm["tied"] and not tm["meta"]
        assert tm["digests"] == expect


# --------------------------------------------------------------------------- the share arithmetic (no processes)


@pytest.mark.parametrize("w", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("name", ["mixed", "huge", "zeros_only", "empty"])
def test_shares_partition_the_plan(files, w, name):
    wm = flashpack.read_weight_map(files[name])
    plan = make_plan(wm, None, extent_nbytes=64 * 1024, verify=True)
    s = share_nbytes(plan.buffer_nbytes, w)
    assert s % 4096 == 0 and s * w - plan.buffer_nbytes < 4096 * w
    read = []
    verified = later = 0
    for r in range(w):
        lo, hi = share_bounds(plan.buffer_nbytes, w, r)
        sub, rest = share_plan(plan, lo, hi)
        assert lo % 4096 == 0 and sub.buffer_nbytes == hi - lo
        for e in sub.extents:
            assert e.file_offset % 4096 == 0 and 0 <= e.buffer_offset and e.buffer_offset + e.nbytes <= hi - lo
            read.append((e.file_offset, e.nbytes))
            assert plan.buffer_offset(e.file_offset) == lo + e.buffer_offset  # lands where the full plan puts it
        assert all(n == sum(1 for e in sub.extents if ci in e.chunks) for ci, n in enumerate(sub.chunk_extent_counts))
        verified += len(sub.chunks)
        later += len(rest)
    # disjoint, and together exactly the bytes of the single-process plan
    read.sort()
    assert all(a[0] + a[1] <= b[0] for a, b in zip(read, read[1:]))
    assert sum(n for _, n in read) == plan.read_nbytes
    assert verified + later == len(plan.chunks) and later <= max(0, w - 1)


# --------------------------------------------------------------------------- the benchmark, smoke-run


def test_src_rank_without_a_process_group_is_refused(tmp_path):
    path = tmp_path / "m.flashpack"
    flashpack.pack_to_file({"w": torch.ones(3)}, path)
    with pytest.raises(flashpack.FlashPackError, match="src_rank needs a process group"):
        flashpack.load(path, src_rank=0)
    with pytest.raises(flashpack.FlashPackError, match="mmap=True .* cannot be combined with a process group"):
        flashpack.load(path, mmap=True, process_group=object())
