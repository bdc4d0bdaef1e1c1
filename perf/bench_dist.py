"""Distributed cold load: how long, and how many bytes each rank reads from disk.

Usage:
    python perf/bench_dist.py [--world-size N] [--size 2G] [--dir DIR] [--exchange auto|all_gather|broadcast|both]
                              [--backend gloo] [--repeat 1] [--keep] [--no-baseline]

Writes a synthetic pack of ``--size`` bytes (bf16 tensors of 64 MiB and a remainder), then for world sizes
1 and N loads it cold (its pages evicted with posix_fadvise(DONTNEED) before every run) with
``flashpack.load(path, process_group=...)`` in N processes on this machine (forked from a forkserver). Timing starts after a
barrier, once every process is up, and ends after a barrier following the load; it does not include
process start-up or the ``init_process_group`` handshake.

Prints an environment header, one ``sample`` line per rank and run, and one ``result`` line per run:
wall time (the slowest rank), bytes read from the file by each rank and in total, and throughput
(file bytes / wall time) in Gbps (10^9 bits per second) and GiB/s. Target: total bytes read = file size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import flashpack  # noqa: E402
from flashpack.deserialization import LoadStats  # noqa: E402
from flashpack.io import pagecache, resolve_backend  # noqa: E402
from flashpack.settings import GiB, MiB, parse_nbytes  # noqa: E402

TENSOR_NBYTES = 64 * MiB


def make_pack(path: str, nbytes: int) -> int:
    """A pack of about ``nbytes`` of bf16 payload; returns the file size."""
    sd, left, i = {}, nbytes, 0
    g = torch.Generator().manual_seed(0)
    while left > 0:
        n = min(TENSOR_NBYTES, left) // 2 or 1
        sd[f"layer{i:04d}.weight"] = torch.randint(-32768, 32767, (n,), dtype=torch.int16, generator=g).view(torch.bfloat16)
        left -= 2 * n
        i += 1
    size = flashpack.pack_to_file(sd, path)
    del sd
    return size


def evict(path: str) -> float:
    """Drop the file's pages from the page cache; returns the fraction still resident afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.fstat(fd).st_size
        pages = pagecache.resident_pages(fd, size)
        return float(pages.mean()) if pages is not None and len(pages) else 0.0
    finally:
        os.close(fd)


def _rank(rank: int, world: int, port: int, path: str, exchange: str, backend: str, q) -> None:
    import torch.distributed as dist
    import xxhash

    from flashpack.distributed import init_local_group, load_distributed

    init_local_group(rank, world, port, backend=backend, timeout_s=600)
    stats = LoadStats()
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
        h.update(t.view(torch.uint8).numpy())
    got = [None] * world
    dist.all_gather_object(got, h.intdigest())
    q.put((rank, load_s, wall_s, stats.bytes_read, stats.bytes_direct, stats.backend, len(set(got)) == 1))
    dist.destroy_process_group()


def run_once(path: str, world: int, exchange: str, backend: str) -> dict:
    from flashpack.distributed import free_port

    resident = evict(path)
    ctx = mp.get_context("forkserver")  # ranks fork from one interpreter that imported torch once
    ctx.set_forkserver_preload(["torch", "torch.distributed", "flashpack", "flashpack.distributed"])
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, path, exchange, backend, q)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [q.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    rows.sort()
    return {"rows": rows, "resident_before": resident}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--size", default="2G", help="payload bytes (K/M/G suffixes), default 2G")
    ap.add_argument("--dir", default=None, help="folder for the pack (default: the temp folder)")
    ap.add_argument("--exchange", default="auto", choices=["auto", "all_gather", "broadcast", "both"])
    ap.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo on CPU)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the pack file")
    ap.add_argument("--no-baseline", action="store_true", help="skip the world size 1 run (smoke tests)")
    args = ap.parse_args(argv)
    nbytes = parse_nbytes(args.size)

    print(f"# flashpack {flashpack.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.platform()}, {os.cpu_count()} cpus")
    folder = tempfile.mkdtemp(prefix="bench_dist.", dir=args.dir)
    path = os.path.join(folder, "synthetic.flashpack")
    t0 = time.perf_counter()
    size = make_pack(path, nbytes)
    print(f"# pack {path}: {size} bytes ({size / GiB:.3f} GiB), written in {time.perf_counter() - t0:.1f} s; "
          f"reader backend {resolve_backend()}, "
          f"dist backend {args.backend}")
    exchanges = ["all_gather", "broadcast"] if args.exchange == "both" else [args.exchange]
    worlds = ([] if args.no_baseline else [1]) + ([args.world_size] if args.world_size > 1 else [])
    try:
        for world in worlds:
            for exchange in (exchanges if world > 1 else ["-"]):
                for rep in range(args.repeat):
                    out = run_once(path, world, exchange, args.backend)
                    rows = out["rows"]
                    for rank, load_s, wall_s, read, direct, rb, ok in rows:
                        print(f"sample world={world} exchange={exchange} rep={rep} rank={rank} load_s={load_s:.3f} "
                              f"wall_s={wall_s:.3f} read_nbytes={read} direct_nbytes={direct} reader={rb}")
                    wall = max(r[2] for r in rows)
                    total = sum(r[3] for r in rows)
                    gbps = size * 8 / wall / 1e9
                    print(f"result world={world} exchange={exchange} rep={rep} file_nbytes={size} wall_s={wall:.3f} "
                          f"per_rank_read_nbytes={','.join(str(r[3]) for r in rows)} total_read_nbytes={total} "
                          f"read_x_file={total / size:.3f} gbps={gbps:.2f} gib_s={size / wall / GiB:.3f} "
                          f"resident_before={out['resident_before']:.2f} ok={all(r[6] for r in rows)}")
                    sys.stdout.flush()
    finally:
        if not args.keep:
            os.remove(path)
            os.rmdir(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
