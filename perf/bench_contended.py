#!/usr/bin/env python
"""A load on a background thread while the calling thread runs Python: what the GIL costs it.

Usage:
    python perf/bench_contended.py [--size 1G] [--dir perf/out] [--runs 3] [--switch-interval-s S]
                                   [--copy native,python] [--keep]

``from_pretrained_flashpack`` reads the pack on a background thread while the main thread builds the model
(``flashpack.deserialization.EarlyLoad``), and users load in threads of their own. The reader's worker threads
release the GIL in every preadv(2), ``UFFDIO_COPY`` and hash call, and need it back after each: a thread that
runs Python meanwhile gives it up only every ``sys.getswitchinterval()`` (5 ms by default), so each return can
wait that long. Per run, the pack in the page cache (cached state), two fresh processes: ``alone`` (the main
thread joins the loading thread) and ``busy`` (the main thread counts in a Python loop until the load is done).
Prints the load time of each (medians), their ratio, and the busy loop's rate against its rate alone.
``--switch-interval-s`` sets ``sys.setswitchinterval`` in the children first (the default leaves it).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import _common as C


def child(mode: str, path: str, switch_interval_s: float, copy: str) -> dict:
    """One cached load of ``path`` on a background thread, the main thread ``alone`` (joining) or ``busy``;
    ``copy="python"`` turns the one-call C extent copy off (``flashpack.io.base.native_copy = None``)."""
    import flashpack
    import flashpack.io.base

    if copy == "python":
        flashpack.io.base.native_copy = None
    elif flashpack.io.base.native_copy is None:
        raise RuntimeError("this build has no fp_copy_extent (built without xxhash.h?); pass --copy python")
    if switch_interval_s > 0:
        sys.setswitchinterval(switch_interval_s)
    C.warm_file(path)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.1:  # the busy loop's rate alone
        n += 1
    rate_alone = n / (time.perf_counter() - t0)
    stats, out = flashpack.LoadStats(), {}

    def run():
        t = time.perf_counter()
        out["sd"] = flashpack.load(path, stats=stats)
        out["load_s"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    t0, n = time.perf_counter(), 0
    th.start()
    if mode == "busy":
        while th.is_alive():
            n += 1
    th.join()
    wall = time.perf_counter() - t0
    if "sd" not in out:
        raise RuntimeError("the load failed on its thread")
    return {"mode": mode, "load_s": out["load_s"], "busy_rate_fraction": n / wall / rate_alone if n else None,
            "memory": stats.memory, "backend": stats.backend, "nbytes": stats.bytes_read, "copy": copy,
            "switch_interval_s": sys.getswitchinterval()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes of tensors in the synthetic pack (4M, 64M, 1G...)")
    ap.add_argument("--dir", default=C.default_workdir(), help="where the pack goes")
    ap.add_argument("--runs", type=int, default=3, help="alone/busy pairs (medians)")
    ap.add_argument("--switch-interval-s", type=float, default=0.0, help="sys.setswitchinterval in the children")
    ap.add_argument("--copy", default="native",
                    help="comma-separated: native (an extent copied and hashed in one C call, the default), python "
                         "(the per-step Python path, as before fp_copy_extent); each run does every one, side by side")
    ap.add_argument("--keep", action="store_true", help="keep the pack")
    ap.add_argument("--child", choices=("alone", "busy"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return C.child_main(lambda: child(args.child, args.path, args.switch_interval_s, args.copy))
    copies = [c.strip() for c in args.copy.split(",") if c.strip()]
    if not copies or set(copies) - {"native", "python"}:
        ap.error(f"--copy {args.copy!r}: expected native and/or python")
    folder = os.path.abspath(args.dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "bench_contended.flashpack")
    print(C.header(C.environment(folder), f"perf/bench_contended.py: {args.size}, runs={args.runs}, "
                   f"switch interval {args.switch_interval_s or 'default'}, copy {','.join(copies)}"), flush=True)
    try:
        import flashpack

        sd = C.make_state_dict(C.parse_nbytes(args.size))
        flashpack.pack_to_file(sd, path)
        payload = C.state_dict_nbytes(sd)
        del sd
        res: dict[tuple[str, str], list[dict]] = {(c, m): [] for c in copies for m in ("alone", "busy")}
        for run in range(args.runs):
            for copy, mode in res:
                r = C.run_child([sys.executable, os.path.abspath(__file__), "--child", mode, "--path", path,
                                 "--switch-interval-s", str(args.switch_interval_s), "--copy", copy],
                                cwd=C.REPO_ROOT)
                if not r.ok:
                    print(r.error_line(), file=sys.stderr)
                    return 1
                res[copy, mode].append(r.result)
                print(f"sample run={run} copy={copy} mode={mode} seconds={r.result['load_s']:.4f} "
                      f"{C.speed(payload, r.result['load_s'])} memory={r.result['memory']}", flush=True)
        rows = []
        labels = {"alone": "main thread joins the load", "busy": "main thread runs Python"}
        for (copy, mode), got in res.items():
            sec = C.median([x["load_s"] for x in got])
            frac = C.median([x["busy_rate_fraction"] for x in got]) if mode == "busy" else None
            rows.append([f"{labels[mode]}, {copy} copy", got[0]["memory"], f"{sec:.3f}", C.speed(payload, sec),
                         "-" if frac is None else f"{frac:.2f}"])
        print("\n" + C.markdown_table(["cached load on a thread", "memory", "median s", "throughput",
                                       "busy loop rate / alone"], rows))
        for copy in copies:
            alone = C.median([x["load_s"] for x in res[copy, "alone"]])
            busy = C.median([x["load_s"] for x in res[copy, "busy"]])
            print(f"{copy} copy: busy / alone: {busy / alone:.2f}x the load time")
    finally:
        if not args.keep and os.path.exists(path):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
