#!/usr/bin/env python
"""Load time against size: flashpack's best backend against safetensors, cold, restart and warm, log-log.

Usage:
    .venv/bin/python perf/bench_scale.py [--sizes 16M,256M,1G,4G] [--runs 3] [--out-dir perf/results]

For each size compare.py's measurement (a synthetic state_dict written once per format; each load to CPU
in a fresh process; alternating order; medians over ``--runs``) of every available flashpack backend and
``safetensors.load_file`` + touching every page. The best flashpack median per size and mode is
"flashpack best". A GPU machine adds 16G to the default sizes.

Shows the fixed overhead (target: a warm 16 MiB load < 20 ms, median, the first load of a fresh process)
and whether throughput holds as size grows; the intercept of a least-squares line through the warm
times is printed too. Writes ``<out-dir>/<name>.json`` and ``.png`` (log-log seconds vs bytes, and Gbps).
"""

from __future__ import annotations

import argparse
import os
import sys

import _common as C
import bench_load
import compare

OVERHEAD_TARGET_S = 0.020
OVERHEAD_SIZE_NBYTES = 16 * C.MiB


def main(argv=None) -> int:
    p = compare.common_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter),
                            3, "basename of the JSON/PNG (default bench_scale)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default 16M,256M,1G,4G; +16G with a GPU)")
    p.add_argument("--clean", action="store_true", help="delete each size's files after measuring it")
    p.set_defaults(size=None, name="bench_scale")
    args = p.parse_args(argv)
    if (rc := compare.child_dispatch(args)) is not None:
        return rc
    workdir = args.workdir or C.default_workdir()
    env = C.environment(workdir)
    sizes_text = args.sizes or args.size or ("16M,256M,1G,4G,16G" if env["gpu"] != "none" else "16M,256M,1G,4G")
    sizes, modes = [C.parse_nbytes(s) for s in sizes_text.split(",") if s], [m for m in args.modes.split(",") if m]
    print(C.header(env, f"perf/bench_scale.py: sizes {sizes_text}, runs={args.runs}"), flush=True)
    table = compare.loaders()
    runnable = [(table[n], sys.executable) for n in bench_load.flashpack_loaders() + ["safetensors.load_file"]]
    records, per_size, rows, series = [], {}, [], {}
    for size in sizes:
        files, errors = compare.prepare_files(size, workdir, {"flashpack": sys.executable}, args.timeout_s)
        if "flashpack" not in files:
            print(f"size {size}: cannot pack: {errors}")
            continue
        payload = sum(s.nbytes for s in C.synthetic_spec(size))
        recs, _ = compare.measure(runnable, files, modes, args.runs, [], payload, args.timeout_s,
                                  tag=f"size={C.human_nbytes(size).replace(' ', '')} ")
        records += [dict(r, size_nbytes=size, payload_nbytes=payload) for r in recs]
        summ = per_size[size] = compare.summarize(recs, [], payload, modes)
        for mode in modes:
            best = summ["best_flashpack"].get(mode)
            for label, key in (("flashpack best", best), ("safetensors", "safetensors.load_file")):
                d = summ["loaders"].get(f"{key}|{mode}")
                if d and d["load_s"]:
                    series.setdefault((label, mode), []).append((payload, d["load_s_median"], d["load_s_min"],
                                                                 d["load_s_max"]))
                    rows.append([C.human_nbytes(size), mode, label + (f" ({key})" if key == best else ""),
                                 C.fmt(d["load_s_median"] * 1000, 1), f"{C.fmt(d['load_s_min'] * 1000, 1)}-"
                                 f"{C.fmt(d['load_s_max'] * 1000, 1)}", C.fmt(d["gbps_median"]),
                                 C.fmt(d["gib_per_s_median"]), C.fmt(d["peak_rss_nbytes_median"] / C.MiB, 0)])
        for f in files.values() if args.clean else ():
            os.unlink(f)
    table_md = C.markdown_table(["size", "mode", "loader", "median_ms", "min-max_ms", "Gbps", "GiB/s", "peak_rss_MiB"],
                                rows)
    print("\n" + table_md + "\n")

    verdicts, warm = [], sorted(series.get(("flashpack best", "warm"), []))
    small = [(n, t) for n, t, _, _ in warm if n <= OVERHEAD_SIZE_NBYTES * 1.05]
    if small:
        verdicts.append({"target": f"warm {C.human_nbytes(OVERHEAD_SIZE_NBYTES)} load < {OVERHEAD_TARGET_S * 1000:.0f} ms",
                         "pass": small[-1][1] < OVERHEAD_TARGET_S,
                         "detail": f"{C.human_nbytes(small[-1][0])}: {small[-1][1] * 1000:.1f} ms median, "
                                   f"the first load in a fresh process"})
    if len(warm) >= 2:
        xs, ys = [w[0] for w in warm], [w[1] for w in warm]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")
        verdicts.append({"target": "fixed overhead (warm, intercept of a line fit)", "pass": None,
                         "detail": f"{(my - slope * mx) * 1000:.1f} ms; slope {C.gbps(1, slope):.2f} Gbps"})
    for mode in modes:
        big = [(n, t) for n, t, _, _ in sorted(series.get(("flashpack best", mode), [])) if n >= 256 * C.MiB]
        if len(big) >= 2:
            verdicts.append({"target": f"{mode} throughput holds from {C.human_nbytes(big[0][0])} up", "pass": None,
                             "detail": ", ".join(f"{C.human_nbytes(n)}: {C.gbps(n, t):.2f} Gbps" for n, t in big)})
    if verdicts:
        print("### targets\n\n" + C.verdict_table(verdicts) + "\n")
    stem = os.path.join(args.out_dir, args.name)
    C.write_json(stem + ".json", {"script": "perf/bench_scale.py", "argv": sys.argv, "environment": env,
                                  "sizes_nbytes": sizes, "runs": args.runs, "modes": modes, "samples": records,
                                  "per_size": {str(k): v for k, v in per_size.items()}, "targets": verdicts,
                                  "table_markdown": table_md})
    why = plot(series, env, stem + ".png")
    print(f"json: {stem}.json\n" + (f"png: {stem}.png" if why is None else why))
    return 0


def plot(series: dict, env: dict, png_path: str) -> str | None:
    plt = C.pyplot()
    if isinstance(plt, str):
        return plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    style = {"cold": "-", "restart": "-.", "warm": "--"}
    for (label, mode), pts in sorted(series.items()):
        xs, med = [p[0] for p in sorted(pts)], [p[1] for p in sorted(pts)]
        kw = {"marker": "o", "ls": style.get(mode, "-"), "label": f"{label}, {mode}",
              "color": "#2ca02c" if label == "flashpack best" else "#1f77b4"}
        ax.errorbar(xs, med, yerr=[[m - p[2] for m, p in zip(med, sorted(pts))],
                                   [p[3] - m for m, p in zip(med, sorted(pts))]], capsize=3, **kw)
        ax2.plot(xs, [C.gbps(x, t) for x, t in zip(xs, med)], **kw)
    ax.axhline(OVERHEAD_TARGET_S, color="gray", lw=0.8, ls=":", label="20 ms")
    for a, ylabel, title in ((ax, "load time, s (median; bars min-max)", "load time vs size (log-log)"),
                             (ax2, "Gbps (10^9 bit/s)", "throughput vs size")):
        a.set(xscale="log", yscale="log", xlabel="payload bytes", ylabel=ylabel, title=title)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("flashpack vs safetensors, CPU — " + C.machine_title(env), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":
    sys.exit(main())
