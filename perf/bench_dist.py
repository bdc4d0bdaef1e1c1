#!/usr/bin/env python
"""Distributed cold load: how long, and how many bytes each rank reads from disk.

Usage:
    python perf/bench_dist.py [--world-size N] [--size 2G] [--dir DIR] [--exchange auto|all_gather|broadcast|both]
                              [--backend gloo] [--runs 3] [--keep] [--no-baseline]

Packs a synthetic state_dict (``_common.make_state_dict``) of ``--size`` bytes, then for world sizes 1
and N loads it cold (evicted before every run) with ``flashpack.load(path, process_group=...)`` in N
fresh processes on this machine (forked from a forkserver that imported torch once). Timing starts after
a barrier, once every process is up, and ends after a barrier following the load: process start-up and
the ``init_process_group`` handshake are left out.

Prints an environment header, one ``sample`` line per rank and run, and one ``result`` line per world
size and exchange: the median over ``--runs`` of the wall time (the slowest rank), bytes read from the
file by each rank and in total, throughput (file bytes / wall time) in Gbps and GiB/s, and whether
every rank holds the same bytes. Target: total bytes read = file size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import _common as C


def _rank(rank: int, world: int, port: int, path: str, exchange: str, backend: str, q) -> None:
    import torch
    import torch.distributed as dist
    import xxhash

    import flashpack
    from flashpack.loading.distributed import load_distributed
    from flashpack.testing import init_local_group

    init_local_group(rank, world, port, backend=backend, timeout_s=600)
    stats = flashpack.LoadStats()
    dist.barrier()
    t0 = time.perf_counter()
    if world == 1:
        sd = flashpack.load(path, stats=stats)
    else:
        sd = load_distributed(path, process_group=dist.group.WORLD, stats=stats, exchange=exchange)
    load_s = time.perf_counter() - t0
    dist.barrier()
    wall_s = time.perf_counter() - t0
    h = xxhash.xxh3_64()
    for k, t in sd.items():
        h.update(k.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    got = [None] * world
    dist.all_gather_object(got, h.intdigest())
    q.put((rank, load_s, wall_s, stats.bytes_read, stats.bytes_direct, stats.backend, len(set(got)) == 1))
    dist.destroy_process_group()


def run_once(path: str, world: int, exchange: str, backend: str) -> tuple[list, float]:
    """One cold load by ``world`` ranks: (per-rank rows sorted by rank, resident fraction before)."""
    from flashpack.testing import free_port

    C.evict([path])
    resident = C.resident_fraction(path)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "flashpack", "flashpack.loading.distributed"])
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, path, exchange, backend, q)) for r in range(world)]
    for p in procs:
        p.start()
    rows = sorted(q.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return rows, resident


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--size", default="2G", help="payload bytes (K/M/G suffixes), default 2G")
    ap.add_argument("--dir", default=None, help="folder for the pack (default: the temp folder)")
    ap.add_argument("--exchange", default="auto", choices=["auto", "all_gather", "broadcast", "both"])
    ap.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo on CPU)")
    ap.add_argument("--runs", "--repeat", type=int, default=3, help="cold loads per world size and exchange (median)")
    ap.add_argument("--keep", action="store_true", help="keep the pack file")
    ap.add_argument("--no-baseline", action="store_true", help="skip the world size 1 run (smoke tests)")
    args = ap.parse_args(argv)
    import flashpack
    from flashpack.io import resolve_backend

    folder = tempfile.mkdtemp(prefix="bench_dist.", dir=args.dir)
    path = os.path.join(folder, "synthetic.flashpack")
    print(C.header(C.environment(folder), f"perf/bench_dist.py: {args.size}, world size {args.world_size}",
                   f"reader backend {resolve_backend()}, dist backend {args.backend}"), flush=True)
    t0 = time.perf_counter()
    size = flashpack.pack_to_file(C.make_state_dict(C.parse_nbytes(args.size)), path)
    print(f"# pack {path}: {size} bytes ({C.human_nbytes(size)}), written in {time.perf_counter() - t0:.1f} s")
    exchanges = ["all_gather", "broadcast"] if args.exchange == "both" else [args.exchange]
    worlds = ([] if args.no_baseline else [1]) + ([args.world_size] if args.world_size > 1 else [])
    try:
        for world in worlds:
            for exchange in exchanges if world > 1 else ["-"]:
                walls, ok = [], True
                for run in range(args.runs):
                    rows, resident = run_once(path, world, exchange, args.backend)
                    for rank, load_s, wall_s, read, direct, rb, same in rows:
                        print(f"sample world={world} exchange={exchange} run={run} rank={rank} load_s={load_s:.3f} "
                              f"wall_s={wall_s:.3f} read_nbytes={read} direct_nbytes={direct} reader={rb} "
                              f"resident_before={resident:.2f}", flush=True)
                    walls.append(max(r[2] for r in rows))
                    ok = ok and all(r[6] for r in rows)
                wall, total = C.median(walls), sum(r[3] for r in rows)
                print(f"result world={world} exchange={exchange} runs={args.runs} file_nbytes={size} wall_s={wall:.3f} "
                      f"per_rank_read_nbytes={','.join(str(r[3]) for r in rows)} total_read_nbytes={total} "
                      f"read_x_file={total / size:.3f} gbps={C.gbps(size, wall):.2f} gib_s={C.gibps(size, wall):.3f} "
                      f"ok={ok}", flush=True)
    finally:
        if not args.keep:
            os.remove(path)
            os.rmdir(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
