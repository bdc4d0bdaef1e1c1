"""Benchmark ``flashpack convert`` on a synthetic safetensors file against the disk's buffered write speed.

Usage:
  bench_convert.py [--size=<nbytes>] [--dir=<folder>] [--tensor=<nbytes>] [--repeat=<n>] [--cold] [--keep]

Options:
  --size=<nbytes>    Bytes of tensors in the synthetic file (1M, 64M, 2G...) [default: 2G].
  --dir=<folder>     Where the files go (same disk for every step) [default: .].
  --tensor=<nbytes>  Bytes per tensor (the shard is one file; its largest tensor this size) [default: 64M].
  --repeat=<n>       Samples of write speed and convert, alternating; medians reported [default: 3].
  --cold             Drop the source's cached pages before converting (default: warm, as just written).
  --keep             Keep the files.

Steps, in one run: (1) write the synthetic safetensors file (mixed bf16 ~90%, fp32, int64, bool);
(2) the ceiling: write the same number of bytes with plain ``os.write`` and one ``fsync`` (buffered);
(3) ``python -m flashpack convert`` in a subprocess, timed, with its peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``). Targets: convert >= 0.7x the write speed; peak
RSS <= largest shard + 512 MiB. Throughput in GiB/s (2^30 bytes/s) and Gbps (10^9 bits/s).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import resource
import subprocess
import sys
import time

from docopt import docopt

GiB = 1 << 30
MiB = 1 << 20


def parse_nbytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB}.get(t[-1:], 1)
    return int(float(t[:-1] if mult != 1 else t) * mult)


def make_source(path: str, size: int, tensor_nbytes: int) -> int:
    """A safetensors file of about ``size`` bytes; returns the bytes of tensor data."""
    import torch
    from safetensors.torch import save_file

    sd, total, i = {}, 0, 0
    mix = [(torch.bfloat16, 0.90), (torch.float32, 0.07), (torch.int64, 0.02), (torch.bool, 0.01)]
    for dt, frac in mix:
        budget = max(int(size * frac), dt.itemsize)
        while budget > 0:
            nb = min(budget, tensor_nbytes)
            n = max(1, nb // dt.itemsize)
            t = torch.empty(n, dtype=torch.uint8 if dt == torch.bool else dt)
            if dt.is_floating_point:
                t.normal_()
            else:
                t.random_(0, 2 if dt in (torch.bool,) else 1000)
            sd[f"layer{i}.{str(dt).removeprefix('torch.')}"] = t.bool() if dt == torch.bool else t
            total += n * dt.itemsize
            budget -= n * dt.itemsize
            i += 1
    save_file(sd, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # no writeback of the source competes with the measurements below
    finally:
        os.close(fd)
    return total


def disk_write_speed(path: str, nbytes: int, piece: int = 64 * MiB) -> float:
    """Seconds to write ``nbytes`` with os.write (buffered) and one fsync: the ceiling of a convert."""
    buf = os.urandom(min(piece, nbytes))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        left = nbytes
        while left:
            n = os.write(fd, memoryview(buf)[:min(left, len(buf))])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def drop_cached(path: str) -> None:
    """Ask the kernel to drop the file's cached pages (best effort; needs no privileges)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    args = docopt(__doc__, argv)
    size = parse_nbytes(args["--size"])
    tensor_nbytes = parse_nbytes(args["--tensor"])
    folder = os.path.abspath(args["--dir"])
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "bench_convert_src.safetensors")
    dst = os.path.join(folder, "bench_convert_dst.flashpack")
    ceiling = os.path.join(folder, "bench_convert_write.bin")
    print(f"# bench_convert: python {platform.python_version()}, {platform.platform()}, "
          f"{os.cpu_count()} cpus, folder {folder}")
    try:
        t0 = time.perf_counter()
        payload = make_source(src, size, tensor_nbytes)
        src_nbytes = os.path.getsize(src)
        print(f"source: {src_nbytes} bytes ({payload} bytes of tensors) written in {time.perf_counter() - t0:.2f} s")

        repeat = int(args["--repeat"])
        writes, walls, convs, rss_kib = [], [], [], 0
        cmd = [sys.executable, "-m", "flashpack", "convert", src, dst, "--force", "--quiet"]
        for r in range(repeat):  # alternate ceiling and convert so both see the same machine load
            w = disk_write_speed(ceiling, src_nbytes)
            os.unlink(ceiling)
            writes.append(w)
            if args["--cold"]:
                drop_cached(src)  # read the source from the disk, not the page cache (best effort)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            rss_kib = max(rss_kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
            if proc.returncode:
                print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
                return 1
            m = re.search(r" in ([0-9.]+) s ", proc.stdout)
            own_s = float(m.group(1)) if m else 0.0
            convs.append(own_s if own_s > 0 else walls[-1])  # a tiny input can print "in 0.000 s"
            print(f"sample {r}: write+fsync {w:.3f} s ({src_nbytes / w / GiB:.3f} GiB/s); convert {convs[-1]:.3f} s "
                  f"({src_nbytes / convs[-1] / GiB:.3f} GiB/s, own timer), {walls[-1]:.3f} s whole subprocess")
        print(f"convert stdout (last): {proc.stdout.strip()}")
        med = statistics.median
        write_gibps = src_nbytes / med(writes) / GiB
        conv_gibps = src_nbytes / med(convs) / GiB
        wall_gibps = src_nbytes / med(walls) / GiB
        print(f"disk buffered write (os.write + fsync), median of {repeat}: {write_gibps:.3f} GiB/s "
              f"({write_gibps * GiB * 8 / 1e9:.2f} Gbps)")
        print(f"convert, median of {repeat} (own timer: resolve, plan, read, hash, write, fsync): {conv_gibps:.3f} GiB/s "
              f"({conv_gibps * GiB * 8 / 1e9:.2f} Gbps); whole subprocess incl. interpreter and torch import: "
              f"{wall_gibps:.3f} GiB/s")
        print(f"ratio to disk write speed: {conv_gibps / write_gibps:.2f}x own timer, "
              f"{wall_gibps / write_gibps:.2f}x whole subprocess (target >= 0.70x)")
        rss_nbytes = rss_kib * 1024
        limit = src_nbytes + 512 * MiB
        print(f"peak RSS of the convert process: {rss_nbytes / MiB:.0f} MiB; largest shard {src_nbytes / MiB:.0f} MiB "
              f"+ 512 MiB = {limit / MiB:.0f} MiB: {'OK' if rss_nbytes <= limit else 'OVER'}")
    finally:
        if not args["--keep"]:
            for p in (src, dst, ceiling):
                if os.path.exists(p):
                    os.unlink(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
