#!/usr/bin/env python
"""One file against the same model in N shards: ``flashpack.load`` to CPU, cold and cached, ratio in one run.

Usage:
    .venv/bin/python perf/bench_shards.py [--size 2G] [--shards 8] [--runs 3] [--backend auto] [--out-dir perf/results]

Writes one synthetic state_dict (perf/_common.make_state_dict) twice into ``--workdir``: ``one.flashpack`` and
``model.flashpack`` with ``max_shard_nbytes = size / shards`` (``model-00001-of-0000N.flashpack`` ... + index).
Each run loads both, in alternating order, in this process: *cold* (both sets evicted from the page cache with
perf/_common.evict just before each load) and *cached* (each set read once through the page cache first).
Reports medians and the ratio sharded / one file per mode (target: <= 1.05). Writes
``<out-dir>/<name>.json`` (default name ``bench_shards-<size>``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time

import _common as C


def load_s(path: str, backend: str) -> tuple[float, int]:
    import flashpack

    stats = flashpack.LoadStats()
    t0 = time.perf_counter()
    sd = flashpack.load(path, backend=backend, stats=stats, verify=True)
    dt = time.perf_counter() - t0
    n = sum(t.numel() * t.element_size() for t in sd.values())
    del sd
    return dt, n


def shard_limit(sd: dict, shards: int) -> int:
    """The smallest ``max_shard_nbytes`` that splits ``sd`` into at most ``shards`` shards (tensors are never
    split, so ``total / shards`` alone may give one more)."""
    from flashpack.serialization import split_shards

    total = sum(t.numel() * t.element_size() for t in sd.values())
    lo, hi = -(-total // shards), total
    while lo < hi:
        mid = (lo + hi) // 2
        if len(split_shards(sd, mid)) <= shards:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main(argv=None) -> int:
    from flashpack.settings import parse_nbytes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2G", help="model size (default 2G)")
    p.add_argument("--shards", type=int, default=8, help="shards of the sharded copy (default 8)")
    p.add_argument("--runs", type=int, default=3, help="loads per mode and layout (default 3)")
    p.add_argument("--backend", default="auto", help="reader backend (default auto)")
    p.add_argument("--workdir", default=None, help="where the files go (default: perf/_common.default_workdir())")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default=None, help="basename of the JSON (default bench_shards-<size>)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    a = p.parse_args(argv)

    import flashpack

    nbytes = parse_nbytes(a.size)
    work = os.path.join(a.workdir or C.default_workdir(), f"bench_shards-{a.size}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = C.environment(work)
    print(C.header(env, f"flashpack.load: one file vs {a.shards} shards, {C.human_nbytes(nbytes)}",
                   f"backend {a.backend}; cold: {C.eviction_method()}"))
    sd = C.make_state_dict(nbytes)
    one = os.path.join(work, "one.flashpack")
    flashpack.pack_to_file(sd, one)
    flashpack.pack_to_file(sd, os.path.join(work, "model.flashpack"), max_shard_nbytes=shard_limit(sd, a.shards))
    del sd
    index = os.path.join(work, "model.flashpack.index.json")
    shard_files = sorted(glob.glob(os.path.join(work, "model-*-of-*.flashpack")))
    print(f"files: {one} ({C.human_nbytes(os.path.getsize(one))}); {len(shard_files)} shards + {index}")
    layouts = {"one file": (one, [one]), f"{len(shard_files)} shards": (index, shard_files + [index])}
    times: dict[tuple[str, str], list[float]] = {}
    payload = 0
    for run in range(a.runs):
        order = list(layouts) if run % 2 == 0 else list(reversed(layouts))
        for mode in ("cold", "cached"):
            for lay in order:
                path, files = layouts[lay]
                if mode == "cold":
                    C.evict(files)
                else:
                    for f in files:
                        C.warm_file(f)
                dt, payload = load_s(path, a.backend)
                times.setdefault((mode, lay), []).append(dt)
    rows, out = [], {"environment": env, "size_nbytes": nbytes, "shards": len(shard_files), "backend": a.backend,
                     "runs": a.runs, "results": {}}
    names = list(layouts)
    for mode in ("cold", "cached"):
        m1, mn = C.median(times[(mode, names[0])]), C.median(times[(mode, names[1])])
        ratio = mn / m1
        rows.append([mode, f"{m1:.3f} s ({C.speed(payload, m1)})", f"{mn:.3f} s ({C.speed(payload, mn)})",
                     f"{ratio:.3f}x", "yes" if ratio <= 1.05 else "NO"])
        out["results"][mode] = {"one_file_s": times[(mode, names[0])], "sharded_s": times[(mode, names[1])],
                                "ratio_median": ratio}
    print(C.markdown_table(["mode", names[0], names[1], "sharded / one", "<= 1.05x"], rows))
    os.makedirs(a.out_dir, exist_ok=True)
    dst = os.path.join(a.out_dir, (a.name or f"bench_shards-{a.size}") + ".json")
    C.write_json(dst, out)
    print(f"wrote {dst}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
