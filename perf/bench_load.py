#!/usr/bin/env python
"""flashpack.load to CPU against the disk and page-cache ceilings, cold, restart and warm (issue 2, section 7).

Usage:
    .venv/bin/python perf/bench_load.py [--size 2G] [--runs 3] [--out-dir perf/results]

compare.py's measurement (each load in a fresh process, alternating order, medians over ``--runs``)
restricted to ``flashpack.load(path, backend=B, verify=True)`` for every available backend B and
``safetensors.torch.load_file`` + touching every page; ceilings: a plain sequential O_DIRECT read (8 MiB
``preadv``, one thread, prefaulted page-aligned buffer) and fio for reference when installed; warm, a
buffered read of the cached file into a prefaulted buffer and, for reference, into a fresh one (which
pays the page faults any loader returning new private memory pays).

Targets (this machine): cold >= 0.9x the plain O_DIRECT read; warm >= the buffered read; peak RSS of a
flashpack child <= file size + 256 MiB. Writes ``<out-dir>/bench_load-<size>.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import _common as C
import compare

RSS_MARGIN_NBYTES = 256 * C.MiB


def flashpack_loaders() -> list[str]:
    import flashpack

    return ["flashpack[auto]"] + [f"flashpack[{n}]" for n, info in flashpack.backends().items() if info.available]


def main(argv=None) -> int:
    p = compare.common_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter),
                            3, "basename of the JSON (default bench_load-<size>)")
    args = p.parse_args(argv)
    if (rc := compare.child_dispatch(args)) is not None:
        return rc
    size, modes = C.parse_nbytes(args.size), [m for m in args.modes.split(",") if m]
    workdir = args.workdir or C.default_workdir()
    env = C.environment(workdir)
    print(C.header(env, f"perf/bench_load.py: {C.human_nbytes(size)}, runs={args.runs}"), flush=True)
    files, errors = compare.prepare_files(size, workdir, {"flashpack": sys.executable}, args.timeout_s)
    if "flashpack" not in files:
        print(f"cannot pack the file: {errors}")
        return 1
    file_nbytes, payload = os.path.getsize(files["flashpack"]), sum(s.nbytes for s in C.synthetic_spec(size))
    table = compare.loaders()
    runnable = [(table[n], sys.executable) for n in flashpack_loaders() + ["safetensors.load_file"]]
    ceilings = [(k, m) for k, m in [("disk-odirect", "cold")] + ([("disk-fio", "cold")] if shutil.which("fio") else [])
                + [("buffered", "warm"), ("buffered-fresh", "warm")] if m in modes]
    records, ceils = compare.measure(runnable, files, modes, args.runs, ceilings, payload, args.timeout_s,
                                           settle_s=args.cold_settle_s)
    summ = compare.summarize(records, ceils, payload, modes)

    verdicts = []
    for mode, need, kind in (("cold", 0.9, "disk-odirect"), ("warm", 1.0, "buffered")):
        best, ceil = summ["best_flashpack"].get(mode), summ["ceilings"].get(kind, {}).get("gbps_median", float("nan"))
        for d in summ["loaders"].values():  # the plain O_DIRECT read is this script's cold ceiling, never fio
            if d["mode"] == mode and d["load_s"]:
                d["ceiling"], d["ratio_to_ceiling"] = kind, d["gbps_median"] / ceil
        if best:
            d = summ["loaders"][f"{best}|{mode}"]
            verdicts.append({"target": f"{mode} load >= {need}x {kind}", "pass": d["ratio_to_ceiling"] >= need,
                             "detail": f"{best} {d['gbps_median']:.2f} Gbps vs {ceil:.2f} Gbps = "
                                       f"{d['ratio_to_ceiling']:.2f}x"})
    ours = [d for d in summ["loaders"].values() if d["loader"].startswith("flashpack")]
    rss = max((x for d in ours for x in d["peak_rss_nbytes"] if x), default=0)
    base = C.median(x for d in ours for x in d["baseline_rss_nbytes"] if x)
    verdicts.append({"target": "peak RSS <= file + 256 MiB", "pass": rss <= file_nbytes + RSS_MARGIN_NBYTES,
                     "detail": f"max peak RSS {rss / C.MiB:.0f} MiB vs limit {(file_nbytes + RSS_MARGIN_NBYTES) / C.MiB:.0f}"
                               f" MiB (interpreter + imports {base / C.MiB:.0f} MiB; above that {(rss - base) / C.MiB:.0f}"
                               f" MiB for a {file_nbytes / C.MiB:.0f} MiB file)"})
    table_md = compare.render_table(summ, modes, payload)
    print("\n" + table_md + "\n\n### targets\n\n" + C.verdict_table(verdicts))
    json_path = os.path.join(args.out_dir, (args.name or f"bench_load-{C.human_nbytes(size).replace(' ', '')}") + ".json")
    C.write_json(json_path, {"script": "perf/bench_load.py", "argv": sys.argv, "environment": env, "size_nbytes": size,
                             "payload_nbytes": payload, "file_nbytes": file_nbytes, "runs": args.runs, "modes": modes,
                             "samples": records, "ceiling_samples": ceils, "summary": summ, "targets": verdicts,
                             "table_markdown": table_md})
    print(f"\njson: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
