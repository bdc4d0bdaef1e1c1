"""Raw reader throughput, file to memory (no tensors): flashpack's ``uring`` and ``threads`` backends
against fio's io_uring engine as the ceiling, from a cold page cache.

Usage:
    python perf/bench_reader.py [--size 2G] [--runs 3] [--extent 8M] [--queue-depths 8]
                                [--fixed off] [--direct auto] [--file PATH] [--cache auto|fadvise]
                                [--no-fio] [--json OUT]

Every run evicts the file from the page cache first (``_common.evict``: as root also the whole cache;
``--cache fadvise``: posix_fadvise DONTNEED on the file only) and reads the whole file in
``--extent`` pieces into one pre-faulted, page-aligned buffer of the file's size. The variants alternate
(A B C A B C ...), so drift hits each alike. For each variant: raw samples, median time, Gbps
(10^9 bit/s), GiB/s, the ratio to fio at the same queue depth (fio's command as printed;
``--fio-fixedbufs`` adds fio with registered buffers as a second ceiling), and CPU seconds per GiB read
(getrusage of this process for the readers, which counts io_uring's kernel workers too; fio's own
usr+sys figures for fio, which leave out its start-up). ``--queue-depths 4,8,16,32`` sweeps the
queue depth (threads: that many threads); ``--fixed off,on`` adds ``uring`` with registered buffers;
``--dest ring`` streams through queue-depth reused slots of one extent each (a staging ring, like fio's
buffers) instead of one file-sized buffer, so registration is paid once per slot.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import time

import numpy as np

import _common as C


def make_file(path: str, nbytes: int) -> None:
    """Random (incompressible, non-zero-page) bytes, written once and fsynced."""
    if os.path.exists(path) and os.path.getsize(path) == nbytes:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rng = np.random.default_rng(1)
    chunk = 64 * C.MiB
    with open(path + ".tmp", "wb") as f:
        for off in range(0, nbytes, chunk):
            f.write(rng.integers(0, 256, min(chunk, nbytes - off), dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def aligned_buffer(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + C.PAGE_NBYTES, dtype=np.uint8)
    start = (-raw.ctypes.data) % C.PAGE_NBYTES
    buf = raw[start:start + nbytes]
    buf[:: C.PAGE_NBYTES] = 1  # fault every page in now, not during the timed read
    return buf


def cpu_s(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def read_through_slots(r, nbytes: int, extent: int, slots: list[memoryview]) -> None:
    """Stream the file through a few reused destination slots, as a staging ring does: each finished
    extent's slot takes the next extent (the bytes are overwritten; only throughput counts here)."""
    from flashpack.io import Extent

    next_off = 0
    first = []
    for i, slot in enumerate(slots):
        if next_off < nbytes:
            first.append(Extent(next_off, min(extent, nbytes - next_off), slot, tag=i))
            next_off += extent
    r.submit(first)
    while r.in_flight:
        for c in r.wait():
            if c.error is not None:
                raise c.error
            if next_off < nbytes:
                r.submit([Extent(next_off, min(extent, nbytes - next_off), slots[c.extent.tag], tag=c.extent.tag)])
                next_off += extent


def run_reader(path: str, buf: np.ndarray, backend: str, extent: int, qd: int, direct: str, fixed: bool,
               nbytes: int, dest: str) -> dict:
    from flashpack.io import Extent, open_reader, read_all

    mv = memoryview(buf)
    opts = {"direct": direct, "queue_depth": qd}
    if backend == "threads":
        opts["threads"] = qd
    else:
        opts["registered_buffers"] = fixed
    cpu0, t0 = cpu_s(resource.RUSAGE_SELF), time.perf_counter()
    with open_reader(path, backend=backend, **opts) as r:
        if dest == "ring":
            read_through_slots(r, nbytes, extent, [mv[i * extent:(i + 1) * extent] for i in range(qd)])
        else:
            read_all(r, [Extent(o, min(extent, nbytes - o), mv[o:o + extent]) for o in range(0, nbytes, extent)])
        stats, feats = r.stats, sorted(r.features)
    wall = time.perf_counter() - t0
    cpu = cpu_s(resource.RUSAGE_SELF) - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "bytes_direct": stats.bytes_direct, "bytes_buffered": stats.bytes_buffered,
            "features": feats}


def verify(path: str, buf: np.ndarray, samples: int = 32) -> None:
    """Compare random 4 KiB pieces (and the last bytes) of the buffer with the file."""
    rng = random.Random(0)
    n = buf.nbytes
    offs = [rng.randrange(0, max(1, n - 4096)) for _ in range(samples)] + [max(0, n - 4096)]
    with open(path, "rb") as f:
        for o in offs:
            f.seek(o)
            want = f.read(min(4096, n - o))
            if bytes(buf[o:o + len(want)]) != want:
                raise AssertionError(f"wrong bytes at offset {o} of {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G", help="file size (K/M/G suffixes; rounded up to 4096)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--extent", default="8M", help="bytes per read request, and fio's --bs")
    ap.add_argument("--queue-depths", default="", help="comma list (default FLASHPACK_QUEUE_DEPTH)")
    ap.add_argument("--fixed", default="off", help="uring registered buffers: off, on, or off,on")
    ap.add_argument("--direct", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--dest", default="file", choices=["file", "ring"],
                    help="file: one buffer of the file's size; ring: queue-depth slots of one extent, reused")
    ap.add_argument("--backends", default="uring,threads,fio")
    ap.add_argument("--file", default="")
    ap.add_argument("--cache", default="auto", choices=["auto", "fadvise"],
                    help="auto: _common.evict (drop_caches too as root); fadvise: only this file")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--fio-fixedbufs", action="store_true",
                    help="also run fio with --fixedbufs (buffers registered and pinned before its clock starts)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    from flashpack.io import backend_info
    from flashpack.settings import settings

    size = -(-C.parse_nbytes(a.size) // C.PAGE_NBYTES) * C.PAGE_NBYTES
    extent = min(C.parse_nbytes(a.extent), size)
    qds = [int(x) for x in a.queue_depths.split(",") if x] or [settings().queue_depth]
    fixed_modes = [m.strip() == "on" for m in a.fixed.split(",") if m.strip()]
    path = a.file or os.path.join(C.default_workdir(), f"bench_reader_{size}.bin")
    make_file(path, size)

    variants = []  # (label, kind, qd, fixed)
    wanted = [b.strip() for b in a.backends.split(",") if b.strip()]
    skipped = []
    for qd in qds:
        for b in wanted:
            if b == "fio":
                if a.no_fio:
                    continue
                if shutil.which("fio") is None:
                    skipped.append("fio: not installed, no ceiling (apt-get install fio)")
                    continue
                variants.append((f"fio qd={qd}", "fio", qd, False))
                if a.fio_fixedbufs:
                    variants.append((f"fio+fixedbufs qd={qd}", "fio", qd, True))
                continue
            info = backend_info(b)
            if not info.available:
                skipped.append(f"{b}: {info.reason}")
                continue
            for fx in (fixed_modes if b == "uring" else [False]):
                variants.append((f"{b}{'+fixed' if fx else ''} qd={qd}", b, qd, fx))

    env = C.environment(path)
    whole = a.cache == "auto"
    cache = "drop_caches+fadvise" if whole and C.can_drop_caches() else "fadvise"
    print(C.header(env, "bench_reader: raw reader throughput, file to memory, cold cache",
                   f"file: {path} ({C.human_nbytes(size)}), extent {C.human_nbytes(extent)}, direct={a.direct}, "
                   f"dest {a.dest}, runs {a.runs}, cold cache by {cache}", *(f"skipped {s}" for s in skipped)))

    buf = aligned_buffer(size if a.dest == "file" else extent * max(qds))
    samples: dict[str, list[dict]] = {v[0]: [] for v in variants}
    print(C.markdown_table(["run", "variant", "wall s", "Gbps", "GiB/s", "CPU s", "direct/buffered MiB"], []))
    for run in range(a.runs):
        for label, kind, qd, fx in variants:
            if kind == "fio":
                s = C.fio_read(path, size, extent, qd, fx, engines=["io_uring"], whole_cache=whole)
                if "error" in s:
                    raise RuntimeError(s["error"])
                s["wall_s"] = s["seconds"]
                db = "fio O_DIRECT"
            else:
                C.evict([path], whole)
                buf[:: C.PAGE_NBYTES] = 0
                s = run_reader(path, buf, kind, extent, qd, a.direct, fx, size, a.dest)
                if a.dest == "file":
                    verify(path, buf)
                db = f"{s['bytes_direct'] / C.MiB:.0f}/{s['bytes_buffered'] / C.MiB:.0f}"
            samples[label].append(s)
            print(f"| {run + 1} | {label} | {s['wall_s']:.3f} | {C.gbps(size, s['wall_s']):.2f} | "
                  f"{C.gibps(size, s['wall_s']):.3f} | {s['cpu_s']:.3f} | {db} |", flush=True)
    print()

    rows, out = [], {"environment": env, "size_nbytes": size, "extent_nbytes": extent, "cache": cache,
                     "direct": a.direct, "variants": {}}
    for label, kind, qd, fx in variants:
        xs = samples[label]
        t = C.median([s["wall_s"] for s in xs])
        cpu = C.median([s["cpu_s"] for s in xs])
        ceiling = samples.get(f"fio qd={qd}")
        ratio = C.median([s["wall_s"] for s in ceiling]) / t if ceiling else float("nan")
        fb = samples.get(f"fio+fixedbufs qd={qd}")
        ratio_fb = C.median([s["wall_s"] for s in fb]) / t if fb else float("nan")
        rows.append([label, C.fmt(t, 3), C.fmt(C.gbps(size, t)), C.fmt(C.gibps(size, t), 3),
                     C.fmt(ratio), C.fmt(ratio_fb), C.fmt(cpu / (size / C.GiB), 3)])
        out["variants"][label] = {"median_s": t, "throughput_gbps": C.gbps(size, t),
                                  "throughput_gibps": C.gibps(size, t), "ratio_to_fio": ratio,
                                  "ratio_to_fio_fixedbufs": ratio_fb,
                                  "cpu_s_per_gib": cpu / (size / C.GiB), "samples": xs}
    print(C.markdown_table(["variant", "median s", "Gbps", "GiB/s", "x fio", "x fio+fixedbufs", "CPU s/GiB"], rows))
    if a.json:
        C.write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
