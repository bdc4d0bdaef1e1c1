#!/usr/bin/env python
"""Distributed cold load: how long, and how many bytes each rank reads from disk.

Usage:
    python perf/bench_dist.py [--world-size N] [--size 2G] [--dir DIR] [--exchange auto|all_gather|broadcast|both]
                              [--cache auto|keep|bypass|both] [--backend gloo] [--runs 3] [--keep] [--no-baseline]

Packs a synthetic state_dict (``_common.make_state_dict``) of ``--size`` bytes, then for world sizes 1
and N loads it cold (evicted before every run) with ``flashpack.load(path, process_group=..., cache=...)`` in N
fresh processes on this machine (forked from a forkserver that imported torch once). Timing starts after
a barrier, once every process is up, and ends after a barrier following the load: process start-up and
the ``init_process_group`` handshake are left out. The configurations alternate within each run (run 0 of
every configuration, then run 1, ...), so a slow moment of a shared machine does not land on one of them.

``--cache`` is the page-cache policy (``both``: ``keep`` and ``bypass`` side by side). With ``keep`` (or
``auto`` on a file that fits), rank 0 of this one host reads the whole file through the page cache into shared
memory that the other ranks map, and nothing is exchanged; with ``bypass`` each reads a share with O_DIRECT and the
shares are exchanged.

Prints an environment header, one ``sample`` line per rank and run (with ``cpu_s``, the CPU seconds the rank's
process spent in the load, user and system, ``time.process_time``: a waiting rank that spins shows here), and one
``result`` line per world
size, exchange and cache policy: the median over ``--runs`` of the wall time (the slowest rank), bytes read
from the file by each rank and in total (``read_nbytes``, what the loader asked for), bytes each rank made the
disk read (``disk_nbytes``: ``read_bytes`` of /proc/self/io around the load, proc(5); the kernel reads a page
shared through the page cache once, charged to whichever rank faulted it), throughput (file bytes / wall time)
in Gbps and GiB/s, the wall time over world size 1's with the same policy (``x_world1``), and whether every
rank holds the same bytes. Targets: total disk bytes = file size; two local ranks <= 1.2x one rank.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import _common as C


def _disk_read_nbytes() -> int:
    """Bytes this process made the storage layer read (``read_bytes`` of /proc/self/io, proc(5)); -1 if unknown."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return -1


def _rank(rank: int, world: int, port: int, path: str, exchange: str, backend: str, cache: str, q) -> None:
    import torch
    import torch.distributed as dist
    import xxhash

    import flashpack
    from flashpack.loading.distributed import load_distributed
    from flashpack.testing import init_local_group

    init_local_group(rank, world, port, backend=backend, timeout_s=600)
    stats = flashpack.LoadStats()
    dist.barrier()
    disk0 = _disk_read_nbytes()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if world == 1:
        sd = flashpack.load(path, stats=stats, cache=cache)
    else:
        sd = load_distributed(path, process_group=dist.group.WORLD, stats=stats, exchange=exchange, cache=cache)
    load_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    disk = _disk_read_nbytes() - disk0 if disk0 >= 0 else -1
    dist.barrier()
    wall_s = time.perf_counter() - t0
    h = xxhash.xxh3_64()
    for k, t in sd.items():
        h.update(k.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    got = [None] * world
    dist.all_gather_object(got, h.intdigest())
    q.put((rank, load_s, wall_s, stats.bytes_read, stats.bytes_direct, stats.backend, len(set(got)) == 1, disk,
           stats.cache, cpu_s))
    dist.barrier()  # gloo may abort a rank that tears down while its peer already has
    dist.destroy_process_group()


def run_once(path: str, world: int, exchange: str, backend: str, cache: str = "auto") -> tuple[list, float]:
    """One cold load by ``world`` ranks: (per-rank rows sorted by rank, resident fraction before)."""
    from flashpack.testing import free_port

    C.evict([path])
    resident = C.resident_fraction(path)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "flashpack", "flashpack.loading.distributed"])
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, path, exchange, backend, cache, q)) for r in range(world)]
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
    ap.add_argument("--cache", default="auto", choices=["auto", "keep", "bypass", "both"],
                    help="page-cache policy of the loads (both: keep and bypass side by side)")
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
    caches = ["keep", "bypass"] if args.cache == "both" else [args.cache]
    worlds = ([] if args.no_baseline else [1]) + ([args.world_size] if args.world_size > 1 else [])
    configs = [(world, exchange, cache) for cache in caches for world in worlds
               for exchange in (exchanges if world > 1 else ["-"])]
    samples: dict[tuple, list] = {c: [] for c in configs}
    try:
        for run in range(args.runs):
            for world, exchange, cache in configs:
                rows, resident = run_once(path, world, exchange, args.backend, cache)
                for rank, load_s, wall_s, read, direct, rb, same, disk, decided, cpu_s in rows:
                    print(f"sample world={world} exchange={exchange} cache={cache} run={run} rank={rank} "
                          f"load_s={load_s:.3f} wall_s={wall_s:.3f} cpu_s={cpu_s:.3f} read_nbytes={read} direct_nbytes={direct} "
                          f"disk_nbytes={disk} decided={decided} reader={rb} resident_before={resident:.2f}", flush=True)
                samples[(world, exchange, cache)].append(rows)
        base = {cache: C.median([max(r[2] for r in rows) for rows in samples[(1, "-", cache)]])
                for cache in caches if (1, "-", cache) in samples}
        for (world, exchange, cache), runs in samples.items():
            wall = C.median([max(r[2] for r in rows) for rows in runs])
            rows = runs[-1]
            total = sum(r[3] for r in rows)
            disk = C.median([sum(r[7] for r in rows) for rows in runs])
            ok = all(r[6] for rows in runs for r in rows)
            print(f"result world={world} exchange={exchange} cache={cache} decided={rows[0][8]} runs={args.runs} "
                  f"file_nbytes={size} wall_s={wall:.3f} x_world1={wall / base[cache] if cache in base else float('nan'):.2f} "
                  f"per_rank_read_nbytes={','.join(str(r[3]) for r in rows)} total_read_nbytes={total} "
                  f"read_x_file={total / size:.3f} per_rank_disk_nbytes={','.join(str(r[7]) for r in rows)} "
                  f"total_disk_nbytes={disk:.0f} disk_x_file={disk / size:.3f} gbps={C.gbps(size, wall):.2f} "
                  f"gib_s={C.gibps(size, wall):.3f} ok={ok}", flush=True)
    finally:
        if not args.keep:
            os.remove(path)
            os.rmdir(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
