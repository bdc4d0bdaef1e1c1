#!/usr/bin/env python
"""``flashpack convert`` of a synthetic safetensors file against the disk's buffered write speed.

Usage:
    python perf/bench_convert.py [--size 2G] [--dir .] [--tensor 64M] [--runs 3] [--cold] [--keep]

Steps, in one run: (1) write a synthetic safetensors file (``_common.make_state_dict``: ~90% bf16, fp32,
int64, bool; tensors larger than ``--tensor`` split into pieces of at most that size); (2) the ceiling:
write as many bytes with plain ``os.write`` and one ``fsync`` (buffered); (3) ``python -m flashpack
convert`` in a fresh subprocess, timed by its own timer and as a whole, with its own peak RSS. (2) and (3)
alternate ``--runs`` times; medians reported. The source is warm (just written) unless ``--cold``
evicts it before each convert. Targets: convert >= 0.7x the write speed; peak RSS <= largest shard + 512 MiB.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import _common as C


def make_source(path: str, size: int, tensor_nbytes: int) -> int:
    """The synthetic state_dict as one safetensors file, fsynced; returns the bytes of tensor data."""
    from safetensors.torch import save_file

    sd = {}
    for name, t in C.make_state_dict(size).items():
        flat, per = t.reshape(-1), max(1, tensor_nbytes // t.element_size())
        sd.update({name: t} if flat.numel() <= per else
                  {f"{name}.{i}": flat[o:o + per].clone() for i, o in enumerate(range(0, flat.numel(), per))})
    save_file(sd, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # no writeback of the source competes with the measurements
    os.close(fd)
    return C.state_dict_nbytes(sd)


def write_ceiling(path: str, nbytes: int, piece: int = 64 * C.MiB) -> float:
    """Seconds to write ``nbytes`` with os.write (buffered) and one fsync: the ceiling of a convert."""
    buf = memoryview(os.urandom(min(piece, nbytes)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    left = nbytes
    while left:
        left -= os.write(fd, buf[:min(left, len(buf))])
    os.fsync(fd)
    os.close(fd)
    os.unlink(path)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G", help="bytes of tensors in the synthetic file (1M, 64M, 2G...)")
    ap.add_argument("--dir", default=".", help="where the files go (same disk for every step)")
    ap.add_argument("--tensor", default="64M", help="largest tensor in the file (bigger ones are split)")
    ap.add_argument("--runs", "--repeat", type=int, default=3, help="write/convert pairs, alternating (median)")
    ap.add_argument("--cold", action="store_true", help="evict the source before each convert (default: warm)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args(argv)
    folder = os.path.abspath(args.dir)
    os.makedirs(folder, exist_ok=True)
    src, dst, ceiling = (os.path.join(folder, f"bench_convert_{n}") for n in ("src.safetensors", "dst.flashpack",
                                                                              "write.bin"))
    print(C.header(C.environment(folder), f"perf/bench_convert.py: {args.size}, runs={args.runs}"), flush=True)
    try:
        t0 = time.perf_counter()
        payload = make_source(src, C.parse_nbytes(args.size), C.parse_nbytes(args.tensor))
        nbytes = os.path.getsize(src)
        print(f"source: {nbytes} bytes ({payload} bytes of tensors) written in {time.perf_counter() - t0:.2f} s")
        writes, walls, convs, rss = [], [], [], 0
        for r in range(args.runs):  # alternate ceiling and convert so both see the same machine load
            writes.append(write_ceiling(ceiling, nbytes))
            if args.cold:
                C.evict([src])
            res = C.run_child(C.module_argv("flashpack", "convert", src, dst, "--force", "--quiet"), cwd=C.REPO_ROOT)
            if res.returncode:
                print(res.stdout, res.stderr, sep="\n", file=sys.stderr)
                return 1
            m = re.search(r" in ([0-9.]+) s ", res.stdout)
            walls.append(res.wall_s)
            convs.append(float(m.group(1)) if m and float(m.group(1)) > 0 else res.wall_s)  # tiny inputs: "0.000 s"
            rss = max(rss, res.peak_rss_nbytes or 0)  # the convert process's own VmHWM
            print(f"sample {r}: write+fsync {writes[-1]:.3f} s ({C.speed(nbytes, writes[-1])}); convert {convs[-1]:.3f} s "
                  f"({C.speed(nbytes, convs[-1])}, own timer), {walls[-1]:.3f} s whole subprocess", flush=True)
        out = "\n".join(ln for ln in res.stdout.splitlines() if not ln.startswith(C.RESULT_PREFIX))
        print(f"convert stdout (last): {out.strip()}")
        w, c, wall = C.median(writes), C.median(convs), C.median(walls)
        print(f"disk buffered write (os.write + fsync), median of {args.runs}: {C.speed(nbytes, w)}")
        print(f"convert, median of {args.runs} (own timer: resolve, plan, read, hash, write, fsync): {C.speed(nbytes, c)};"
              f" whole subprocess incl. interpreter and torch import: {C.speed(nbytes, wall)}")
        print(f"ratio to disk write speed: {w / c:.2f}x own timer, {w / wall:.2f}x whole subprocess (target >= 0.70x)")
        limit = nbytes + 512 * C.MiB
        print(f"peak RSS of the convert process: {rss / C.MiB:.0f} MiB; largest shard {nbytes / C.MiB:.0f} MiB "
              f"+ 512 MiB = {limit / C.MiB:.0f} MiB: {'OK' if rss <= limit else 'OVER'}")
    finally:
        for p in () if args.keep else (src, dst, ceiling):
            if os.path.exists(p):
                os.unlink(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
