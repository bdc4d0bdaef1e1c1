#!/usr/bin/env python
"""Lazy reads: the bytes a ``safe_open(...).get_slice(k)[rows]`` reads, and the peak memory of ``iter_tensors``.

Usage:
    python perf/bench_lazy.py [--size 2G] [--dir .] [--fraction 8] [--window 64M] [--runs 1] [--keep]

Steps: (1) pack a synthetic state_dict (``_common.make_state_dict``: ~90% bf16, fp32, int64, bool) into one
file; (2) in this process, on the largest 2-D tensor: a dim-0 slice of ``1/--fraction`` of its rows, with
checksums verified and with ``verify=False``, and a dim-1 slice of as many columns, each on a fresh handle:
bytes read (``safe_open.stats``) against the tensor's bytes; (3) in a fresh subprocess per run, the file evicted
first (cold): ``iter_tensors`` over the whole pack dropping each tensor, and ``flashpack.load`` for contrast:
the growth of the peak RSS over the RSS just before the read (VmHWM reset with ``/proc/self/clear_refs``), wall
time and throughput. The bound iter_tensors documents is the read window plus the largest tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common as C


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS (proc(5), Linux 4.0)


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(mode: str, path: str, window: int) -> dict:
    """One cold read of the whole pack in this fresh process: ``iter`` (iter_tensors, each tensor dropped) or
    ``load`` (flashpack.load, the state_dict kept until the end)."""
    import flashpack
    from flashpack.loading.memory import resident_nbytes

    for _ in flashpack.iter_tensors(path, keys=[next(iter(flashpack.read_weight_map(path).tensors))]):
        pass  # imports and the first allocations, before the baseline
    C.evict([path], whole_cache=False)
    stats = flashpack.LoadStats()
    base = resident_nbytes()
    _hwm_reset()
    t0 = time.perf_counter()
    n = largest = 0
    if mode == "iter":
        for _, t in flashpack.iter_tensors(path, window_nbytes=window, stats=stats):
            n += 1
            largest = max(largest, t.numel() * t.element_size())
            del t
    else:
        sd = flashpack.load(path, stats=stats)
        n, largest = len(sd), max(t.numel() * t.element_size() for t in sd.values())
        del sd
    seconds = time.perf_counter() - t0
    return {"mode": mode, "seconds": seconds, "tensors": n, "largest_nbytes": largest, "base_rss_nbytes": base,
            "peak_growth_nbytes": _hwm() - base, "bytes_read": stats.bytes_read, "chunks_verified": stats.chunks_verified}


def slices(path: str, fraction: int) -> list[list]:
    """Bytes read by a dim-0 and a dim-1 slice of 1/fraction of the largest 2-D tensor, fresh handle each."""
    import flashpack

    wm = flashpack.read_weight_map(path)
    t = max((t for t in wm.tensors.values() if len(t.shape) == 2), key=lambda t: t.nbytes)
    rows, cols = max(1, t.shape[0] // fraction), max(1, t.shape[1] // fraction)
    mid = t.shape[0] // 2
    out = []
    for label, verify, index in ((f"[{mid}:{mid + rows}] (1/{fraction} of the rows)", True, slice(mid, mid + rows)),
                                 (f"[{mid}:{mid + rows}] (1/{fraction} of the rows)", False, slice(mid, mid + rows)),
                                 (f"[:, 0:{cols}] (1/{fraction} of the columns)", True, (slice(None), slice(0, cols))),
                                 (f"[:, 0:{cols}] (1/{fraction} of the columns)", False, (slice(None), slice(0, cols)))):
        with flashpack.safe_open(path, framework="pt", verify=verify) as f:
            t0 = time.perf_counter()
            part = f.get_slice(t.key)[index]
            s = time.perf_counter() - t0
            st = f.stats
        got = part.numel() * part.element_size()
        out.append([f"`{t.key}`{label}", "on" if verify else "off", t.nbytes, got, st.bytes_read,
                    f"{st.bytes_read / t.nbytes:.3f}", st.chunks_verified, f"{s * 1e3:.1f}"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G", help="bytes of tensors in the synthetic pack (4M, 64M, 2G...)")
    ap.add_argument("--dir", default=".", help="where the pack goes")
    ap.add_argument("--fraction", type=int, default=8, help="slice 1/N of the rows (and of the columns)")
    ap.add_argument("--window", default="64M", help="iter_tensors' window_nbytes")
    ap.add_argument("--runs", type=int, default=1, help="cold iter_tensors / load pairs (median)")
    ap.add_argument("--keep", action="store_true", help="keep the pack")
    ap.add_argument("--child", choices=("iter", "load"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    window = C.parse_nbytes(args.window)
    if args.child:
        return C.child_main(lambda: child(args.child, args.path, window))
    folder = os.path.abspath(args.dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "bench_lazy.flashpack")
    print(C.header(C.environment(folder), f"perf/bench_lazy.py: {args.size}, fraction 1/{args.fraction}, "
                   f"window {args.window}, runs={args.runs}"), flush=True)
    try:
        import flashpack

        t0 = time.perf_counter()
        sd = C.make_state_dict(C.parse_nbytes(args.size))
        flashpack.pack_to_file(sd, path)
        payload = C.state_dict_nbytes(sd)
        del sd
        print(f"pack: {os.path.getsize(path)} bytes ({payload} bytes of tensors), written in "
              f"{time.perf_counter() - t0:.1f} s\n")
        print("## bytes read by one slice (fresh handle; verify on: whole 8 MiB checksum chunks)\n")
        print(C.markdown_table(["slice", "verify", "tensor bytes", "result bytes", "bytes read", "read / tensor",
                                "chunks verified", "ms"], slices(path, args.fraction)), flush=True)
        rows, res = [], {"iter": [], "load": []}
        for _ in range(args.runs):
            for mode in ("iter", "load"):
                r = C.run_child([sys.executable, os.path.abspath(__file__), "--child", mode, "--path", path,
                                 "--window", args.window], cwd=C.REPO_ROOT)
                if not r.ok:
                    print(r.stdout, r.stderr, sep="\n", file=sys.stderr)
                    return 1
                res[mode].append(r.result)
        print(f"\n## peak memory of a whole-pack read, cold, fresh process (median of {args.runs})\n")
        for mode, label in (("iter", f"iter_tensors(window_nbytes={args.window}), each tensor dropped"),
                            ("load", "flashpack.load (state_dict kept)")):
            s = res[mode]
            sec = C.median([x["seconds"] for x in s])
            grow = C.median([x["peak_growth_nbytes"] for x in s])
            rows.append([label, s[0]["tensors"], C.human_nbytes(s[0]["bytes_read"]), C.human_nbytes(grow),
                         f"{grow / payload:.3f}", f"{sec:.2f}", C.speed(payload, sec)])
        print(C.markdown_table(["reader", "tensors", "bytes read", "peak RSS growth", "growth / payload", "s",
                                "throughput"], rows))
        it = res["iter"][0]
        bound = max(window, 2 * 8 * C.MiB) + it["largest_nbytes"]
        grow = C.median([x["peak_growth_nbytes"] for x in res["iter"]])
        print(f"\niter_tensors documented bound: window {C.human_nbytes(max(window, 16 * C.MiB))} + largest tensor "
              f"{C.human_nbytes(it['largest_nbytes'])} = {C.human_nbytes(bound)}; measured growth "
              f"{C.human_nbytes(grow)}: {'within' if grow <= bound else 'OVER'} (allocator slack included)")
    finally:
        if not args.keep and os.path.exists(path):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
