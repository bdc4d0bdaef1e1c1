"""Fuzzing (issue 14): a seeded mutator over valid packs and fal flashpack v3/v4 files.

Mutations: byte flips (weighted to the header and the weight map), truncations, appended bytes, header
fields rewritten with the header checksum recomputed, and structure-aware weight-map / fal-footer
mutations (a field replaced by a hostile value, deleted, deeply nested, ...) re-encoded with the header
sizes and checksums recomputed, so they get past the checksums.

Every mutated file goes through ``flashpack.load`` (backends uring and threads, ``keys=``, ``mmap=True``),
``flashpack.verify`` and ``flashpack.assign_from_file``; some go through the CLI (``python -m flashpack
metadata|verify|revert`` in a subprocess with a timeout and an address-space limit). The oracle: each
call returns a result identical to a reference decode of the file (the weight map from
``read_weight_map`` and the tensor bytes sliced from the file as docs/FORMAT.md says; for byte flips,
truncations and appends of a flashpack file, identical to the unmutated file, since every byte that
matters is checksummed), or raises a named flashpack error (a ``FlashPackError`` subclass, ``ReadError``
included) naming the file. Anything else fails the test with the seed and case number to replay.

The default suite runs a short fixed-seed run. The long run is marked ``slow``:

    FLASHPACK_FUZZ_CASES=20000 FLASHPACK_FUZZ_SEED=1 pytest -m slow tests/test_fuzz.py -s
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time

import pytest
import torch
import xxhash
from torch import nn

import flashpack
from flashpack import format as fmt
from flashpack.errors import FlashPackError, FormatError, ReadError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAL_MAGIC = b"FLASHPK\x00"
#: Address-space limit of the CLI subprocesses: a hostile length that made the process allocate would be
#: killed (MemoryError) instead of exhausting the machine.
CLI_AS_LIMIT = 6 << 30
CLI_TIMEOUT = 120

HOSTILE = [0, -1, 1, 7, 63, 64, 4095, 4096, 4097, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63),
           1.5, 1.0, 1e308, "0", "", "x", "F32", "U4", "C32", "\ud800", "\x1b[2J\u202e", True, False, None,
           [], {}, [0], [0, 2**62, 4], [2**62, 0, 1], [-1], [1.5], ["1"], {"a": 1}, "0123456789abcdef",
           " 123456789abcdef", "0x23456789abcdef"]


# --------------------------------------------------------------------------- the corpus


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 6)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("scale", torch.tensor(2.5, dtype=torch.float64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("empty", torch.zeros(0, 3, dtype=torch.bfloat16))
        self.register_buffer("h16", torch.arange(10, dtype=torch.float16))


def reference_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def fal_bytes(version: int) -> bytes:
    """A fal flashpack file laid out as tests/test_fal_compat.py documents (128-byte alignment, element
    offsets within macroblocks, torch dtype names)."""
    groups = [(torch.float32, [("a.weight", torch.randn(5, 3)), ("a.bias", torch.randn(5)), ("z", torch.zeros(0))]),
              (torch.int64, [("steps", torch.arange(7))])]
    if version == 3:
        groups = groups[:1]
    payload, macroblocks, index = bytearray(), [], []
    for mbi, (dt, items) in enumerate(groups):
        payload += bytes(-len(payload) % 128)
        start, elems = len(payload), 0
        for name, t in items:
            elems += -elems % (128 // dt.itemsize)
            index.append({"name": name, "shape": list(t.shape), "offset": elems, "length": t.numel(), "macroblock": mbi})
            payload += bytes(start + elems * dt.itemsize - len(payload))
            payload += t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            elems += t.numel()
        macroblocks.append({"dtype": str(dt).removeprefix("torch."), "offset_bytes": start,
                            "length_bytes": elems * dt.itemsize, "length_elems": elems})
    if version == 3:
        for rec in index:
            del rec["macroblock"]
        footer = {"format": "flashpack_v3", "target_dtype": "float32", "align_bytes": 128,
                  "total_elems": macroblocks[0]["length_elems"], "index": index, "metadata": {"k": "v"}}
    else:
        footer = {"format": "flashpack_v4", "macroblocks": macroblocks, "index": index, "metadata": {"k": "v"}}
    return fal_join(bytes(payload), json.dumps(footer).encode())


def fal_join(payload: bytes, footer: bytes) -> bytes:
    return payload + footer + len(footer).to_bytes(8, "little") + FAL_MAGIC


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    path = str(folder / "net.flashpack")
    flashpack.pack_to_file(reference_net(), path, metadata={"source": "fuzz"}, chunk_nbytes=4096)
    out = {"flashpack": open(path, "rb").read(), "fal3": fal_bytes(3), "fal4": fal_bytes(4)}
    return out


# --------------------------------------------------------------------------- mutations


def _split_flashpack(data: bytes):
    h = fmt.decode_header(data[:fmt.HEADER_NBYTES], "corpus", len(data))
    return data[fmt.HEADER_NBYTES:h.index_offset], json.loads(data[h.index_offset:].decode())


def _join_flashpack(payload: bytes, index: bytes) -> bytes:
    off = fmt.HEADER_NBYTES + len(payload)
    return fmt.encode_header(off + len(index), off, len(index), xxhash.xxh3_64_intdigest(index)) + payload + index


def _split_fal(data: bytes):
    n = int.from_bytes(data[-16:-8], "little")
    return data[:len(data) - 16 - n], json.loads(data[len(data) - 16 - n:-16].decode())


def _mutate_doc(rng: random.Random, doc) -> bytes:
    """Change one place in a JSON document; returns the new document's bytes."""
    doc = copy.deepcopy(doc)
    parent, key, node = None, None, doc
    for _ in range(rng.randint(1, 5)):  # walk down a random path
        if isinstance(node, dict) and node:
            k = rng.choice(list(node))
        elif isinstance(node, list) and node:
            k = rng.randrange(len(node))
        else:
            break
        parent, key, node = node, k, node[k]
    op = rng.random()
    deep = None
    if parent is None:
        return json.dumps(rng.choice(HOSTILE)).encode()
    if op < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.25 and isinstance(parent, dict):  # rename a key (tensor keys, aliases, metadata)
        parent[rng.choice(["\ud800", "x", "", key + ".", "\u009b", str(key) * 2])] = parent.pop(key)
    elif op < 0.3:
        deep = rng.choice([1000, 5000, 100_000])
        parent[key] = "@@DEEP@@"
    elif op < 0.45 and isinstance(node, int) and not isinstance(node, bool):
        parent[key] = node + rng.choice([-4096, -64, -1, 1, 64, 4096, 2**32, 2**62])
    elif op < 0.5 and isinstance(parent, list):
        parent.append(copy.deepcopy(node))
    else:
        parent[key] = rng.choice(HOSTILE)
    text = json.dumps(doc)  # ensure_ascii: lone surrogates travel as escapes
    if deep is not None:
        text = text.replace('"@@DEEP@@"', "[" * deep + "]" * deep)
    if rng.random() < 0.05:
        text = text.replace(": 1", ": " + "1" * rng.choice([25, 4400]), 1)
    return text.encode()


def mutate(rng: random.Random, name: str, data: bytes) -> tuple[str, bytes]:
    kind = rng.choices(["flip", "truncate", "append", "header", "struct"], weights=[30, 10, 5, 10, 45])[0]
    out = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            region = rng.random()
            if name == "flashpack" and region < 0.3:
                i = rng.randrange(64)
            elif region < 0.7:
                i = rng.randrange(max(0, len(out) - 2048), len(out))  # the weight map / fal footer end
            else:
                i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, bytes(out[:rng.randrange(len(out))])
    if kind == "append":
        return kind, bytes(out) + rng.randbytes(rng.randint(1, 64))
    if kind == "header":
        if name == "flashpack":
            fields = list(struct.unpack_from("<8sIIQQQQ", data))
            i = rng.randrange(1, 7)
            fields[i] = rng.choice([0, 1, 4096, 2**31, 2**32 - 1, (8 << 30), 2**63, 2**64 - 1,
                                    fields[i] + rng.randint(-8, 8)]) % (2**32 if i < 3 else 2**64)
            head = struct.pack("<8sIIQQQQ", *fields)
            head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
            return kind, head + data[len(head):]
        n = rng.choice([0, 1, 2**31, 8 << 30, 2**64 - 1, len(data), len(data) - 16, len(data) - 17])
        return kind, data[:-16] + n.to_bytes(8, "little") + FAL_MAGIC
    if name == "flashpack":
        payload, doc = _split_flashpack(data)
        return kind, _join_flashpack(payload, _mutate_doc(rng, doc))
    payload, doc = _split_fal(data)
    return kind, fal_join(payload, _mutate_doc(rng, doc))


# --------------------------------------------------------------------------- the oracle


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, for any dtype (sub-byte, fp8 and bits dtypes included)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return b""
    flat = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (n,))
    return flat.numpy().tobytes()


def reference_decode(path: str, data: bytes, keys=None) -> dict:
    """What a load must return: the weight map's tensors sliced out of the file bytes."""
    wm = flashpack.read_weight_map(path)
    out = {}
    for k, t in wm.tensors.items():
        out[k] = (fmt.torch_dtype(t.dtype), tuple(t.shape), data[t.offset:t.offset + t.nbytes] if t.nbytes else b"")
    for a, target in wm.aliases.items():
        out[a] = out[target]
    if keys is not None:
        out = {k: out[k] for k in keys}
    return out


def same(sd: dict, expect: dict) -> bool:
    if set(sd) != set(expect):
        return False
    return all(sd[k].dtype == dt and tuple(sd[k].shape) == shape and raw(sd[k]) == b
               for k, (dt, shape, b) in expect.items())


def named(e: BaseException, path: str) -> bool:
    if not isinstance(e, FlashPackError):
        return False
    if isinstance(e, (FormatError, ReadError)):
        return path in str(e) or getattr(e, "filename", None) == path
    return True


class Tally:
    def __init__(self):
        self.cases = 0
        self.calls = 0
        self.identical = 0
        self.named = collections.Counter()
        self.failures: list[str] = []

    def summary(self) -> str:
        return (f"{self.cases} cases, {self.calls} calls: {self.identical} identical, "
                f"{sum(self.named.values())} named errors ({dict(self.named.most_common())}), "
                f"{len(self.failures)} anything else")


def check_call(tally: Tally, label: str, path: str, fn, expect_fn):
    tally.calls += 1
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001 - the oracle classifies every exception
        if named(e, path):
            tally.named[type(e).__name__] += 1
        else:
            tally.failures.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
        return
    try:
        expect = expect_fn()
    except Exception as e:  # noqa: BLE001
        tally.failures.append(f"{label}: succeeded, but the reference decode raised {type(e).__name__}: {str(e)[:200]}")
        return
    if expect is None or got == expect or (isinstance(got, dict) and same(got, expect)):
        tally.identical += 1
    else:
        tally.failures.append(f"{label}: a result that differs from the reference decode")


def uring_available() -> bool:
    info = flashpack.backends().get("uring")
    return bool(info and info.available)


def run_case(tally: Tally, corpus: dict, folder: str, seed: int, case: int, backends: list[str]):
    rng = random.Random(f"{seed}:{case}")
    name = rng.choice(sorted(corpus))
    kind, data = mutate(rng, name, corpus[name])
    path = os.path.join(folder, f"case{case % 4}.{'flashpack' if name == 'flashpack' else 'fp'}")
    with open(path, "wb") as f:
        f.write(data)
    tally.cases += 1
    original = os.path.join(folder, f"orig-{name}")
    if not os.path.exists(original):
        with open(original, "wb") as f:
            f.write(corpus[name])
    # byte-level damage to a flashpack file is caught by checksums: a success must equal the original
    src = original if (name == "flashpack" and kind in ("flip", "truncate", "append")) else path
    src_data = corpus[name] if src == original else data
    label = f"seed {seed} case {case} ({name}, {kind})"
    try:
        keys = list(flashpack.read_weight_map(path).keys())[:3]
    except Exception:  # noqa: BLE001 - judged by the calls below
        keys = ["emb.weight", "a.weight"]
    for backend in backends:
        check_call(tally, f"{label} load({backend})", path, lambda: flashpack.load(path, backend=backend),
                   lambda: reference_decode(src, src_data))
    check_call(tally, f"{label} load(keys=)", path, lambda: flashpack.load(path, keys=keys),
               lambda: reference_decode(src, src_data, keys))
    # mmap=True does not verify unless asked (documented): it returns what the file now holds
    check_call(tally, f"{label} load(mmap=True)", path, lambda: flashpack.load(path, mmap=True),
               lambda: reference_decode(path, data))
    check_call(tally, f"{label} load(mmap=True, verify=True)", path,
               lambda: flashpack.load(path, mmap=True, verify=True), lambda: reference_decode(src, src_data))
    check_call(tally, f"{label} verify", path, lambda: flashpack.verify(path) and None, lambda: None)
    if name == "flashpack":
        def assign():
            net = Net()
            flashpack.assign_from_file(net, path)
            return dict(net.state_dict(keep_vars=False))

        def assign_expect():
            ref = reference_decode(src, src_data)
            ties = {"head.weight": "emb.weight", "emb.weight": "head.weight"}  # one parameter, two names
            sd = Net().state_dict()
            if not all(k in ref or ties.get(k) in ref for k in sd) or not set(ref) <= set(sd):
                return ref  # assign_from_file(strict=True) should have raised: any result is wrong
            return {k: ref[k] if k in ref else ref[ties[k]] for k in sd}

        check_call(tally, f"{label} assign_from_file", path, assign, assign_expect)
    return path


# --------------------------------------------------------------------------- the CLI in a subprocess


def _limits():  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (CLI_AS_LIMIT, CLI_AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def cli_check(tally: Tally, label: str, path: str, folder: str):
    env = {**os.environ, "PYTHONPATH": REPO, "FLASHPACK_DEBUG": "0"}
    for cmd in (["metadata", path, "--json", "--show-index"], ["verify", path],
                ["revert", path, os.path.join(folder, "reverted.safetensors"), "--force", "--quiet"]):
        tally.calls += 1
        try:
            p = subprocess.run([sys.executable, "-m", "flashpack", *cmd], capture_output=True, text=True,
                               timeout=CLI_TIMEOUT, env=env, preexec_fn=_limits, errors="replace")
        except subprocess.TimeoutExpired:
            tally.failures.append(f"{label} cli {cmd[0]}: no answer in {CLI_TIMEOUT} s")
            continue
        err = p.stderr.strip()
        if p.returncode == 0:
            tally.identical += 1
        elif p.returncode in (1, 2) and err.startswith(f"flashpack {cmd[0]}: error: ") and "\n" not in err \
                and path in err and "Traceback" not in err:
            tally.named[f"cli exit {p.returncode}"] += 1
        else:
            tally.failures.append(f"{label} cli {cmd[0]}: exit {p.returncode}: {err[-500:]}")


# --------------------------------------------------------------------------- the runs


def fuzz(corpus, folder: str, *, seed: int, cases: int, cli_every: int) -> Tally:
    tally = Tally()
    backends = ["threads"] + (["uring"] if uring_available() else [])
    t0 = time.perf_counter()
    for case in range(cases):
        path = run_case(tally, corpus, folder, seed, case, backends)
        if cli_every and case % cli_every == 0:
            cli_check(tally, f"seed {seed} case {case}", path, folder)
    summary = f"fuzz seed {seed}: {tally.summary()} in {time.perf_counter() - t0:.1f} s"
    print(summary)
    report = os.environ.get("FLASHPACK_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"seed": seed, "cases": tally.cases, "calls": tally.calls, "identical": tally.identical,
                       "named_errors": dict(tally.named), "anything_else": tally.failures}, f, indent=2)
    return tally


def test_corpus_files_are_sound(corpus, tmp_path):
    for name, data in corpus.items():
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(data)
        assert same(flashpack.load(path), reference_decode(path, data))
    net = Net()
    flashpack.assign_from_file(net, str(tmp_path / "flashpack"))
    ref = reference_net()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


def test_mutations_are_deterministic_and_varied(corpus):
    kinds = collections.Counter()
    for case in range(200):
        rng = random.Random(f"7:{case}")
        name = rng.choice(sorted(corpus))
        kind, data = mutate(rng, name, corpus[name])
        rng2 = random.Random(f"7:{case}")
        assert mutate(rng2, rng2.choice(sorted(corpus)), corpus[name]) == (kind, data)
        kinds[kind] += 1
    assert set(kinds) == {"flip", "truncate", "append", "header", "struct"}


def test_fuzz_short(corpus, tmp_path):
    """The CI run: a fixed seed, a few hundred cases, the CLI on a few of them."""
    tally = fuzz(corpus, str(tmp_path), seed=int(os.environ.get("FLASHPACK_FUZZ_SEED", "14")),
                 cases=int(os.environ.get("FLASHPACK_FUZZ_SHORT_CASES", "400")), cli_every=200)
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.identical > 0 and sum(tally.named.values()) > tally.cases


@pytest.mark.slow
@pytest.mark.skipif("FLASHPACK_FUZZ_CASES" not in os.environ, reason="the long fuzz run: set FLASHPACK_FUZZ_CASES")
def test_fuzz_long(corpus, tmp_path):
    """The long run (skipped unless ``FLASHPACK_FUZZ_CASES`` is set): that many cases from ``FLASHPACK_FUZZ_SEED``, the CLI on
    every ``FLASHPACK_FUZZ_CLI_EVERY``-th case (default 200)."""
    tally = fuzz(corpus, str(tmp_path), seed=int(os.environ.get("FLASHPACK_FUZZ_SEED", "1")),
                 cases=int(os.environ["FLASHPACK_FUZZ_CASES"]),
                 cli_every=int(os.environ.get("FLASHPACK_FUZZ_CLI_EVERY", "200")))
    assert not tally.failures, "\n".join(tally.failures[:50])
