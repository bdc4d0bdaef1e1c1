#!/usr/bin/env python
"""Load time against size: flashpack's best backend against safetensors, cold and warm, log-log.

Usage:
    .venv/bin/python perf/bench_scale.py [--sizes 16M,256M,1G,4G] [--runs 3] [--out-dir perf/results]

For each size a synthetic state_dict is written once (flashpack and safetensors), then loaded to CPU
in its own subprocess per load, cold (page cache dropped) and warm (file cached; one untimed load
first), in alternating order. Every available flashpack backend is measured and the best median per
size and mode is "flashpack best"; safetensors is ``load_file`` + touching every page. Warm loads of
files <= 256 MiB repeat ``--warm-repeats`` times inside the child (median taken) because they are
short. A GPU machine adds 16G to the default sizes.

Shows the fixed overhead (target: a warm 16 MiB load < 20 ms, median) and whether throughput holds
as size grows; the intercept of a least-squares line through the warm times is printed too.
Writes ``<out-dir>/<name>.json`` and ``<out-dir>/<name>.png`` (log-log seconds vs bytes, and Gbps).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import compare  # noqa: E402

OVERHEAD_TARGET_S = 0.020
OVERHEAD_SIZE_NBYTES = 16 * C.MiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default 16M,256M,1G,4G; +16G with a GPU)")
    p.add_argument("--size", default=None, help="one size (the smoke test's flag); same as --sizes SIZE")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default="cold,warm")
    p.add_argument("--warm-repeats", type=int, default=5, help="timed warm loads per child for sizes <= 256 MiB")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out-dir", default=os.path.join(C.PERF_DIR, "results"))
    p.add_argument("--name", default="bench_scale")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--clean", action="store_true", help="delete each size's files after measuring it")
    args = p.parse_args(argv)

    workdir = args.workdir or C.default_workdir()
    env = C.environment(workdir)
    sizes_text = args.sizes or args.size or ("16M,256M,1G,4G,16G" if env["gpu"] != "none" else "16M,256M,1G,4G")
    sizes = [C.parse_nbytes(s) for s in sizes_text.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    print(C.format_environment(env, f"perf/bench_scale.py: sizes {sizes_text}, runs={args.runs}"))
    print(f"- cache dropping: {C.cache_method()}")
    print(f"- command: {' '.join([os.path.relpath(sys.executable, C.REPO_ROOT)] + sys.argv)}\n", flush=True)

    import bench_load

    backends = bench_load.available_backends()
    loader_names = [f"flashpack[{b}]" for b in backends] + ["safetensors.load_file"]
    records: list[dict] = []
    per_size: dict[int, dict] = {}
    for size in sizes:
        files, errors = compare.prepare_files(size, workdir, {"flashpack"}, {}, args.timeout_s)
        if "flashpack" not in files:
            print(f"size {size}: cannot pack: {errors}")
            continue
        payload = sum(s.nbytes for s in C.synthetic_spec(size))
        recs = []
        for r in range(args.runs):
            for mode in modes:
                for name in loader_names:
                    path = files["flashpack"] if name.startswith("flashpack") else files["safetensors"]
                    reps = args.warm_repeats if mode == "warm" and size <= 256 * C.MiB else 1
                    res = C.run_child(compare.child_argv(sys.executable, "--child", name, "--file", path, "--mode", mode,
                                                         "--repeats", str(reps)), timeout_s=args.timeout_s)
                    rec = {"size_nbytes": size, "payload_nbytes": payload, "loader": name, "mode": mode, "run": r,
                           "peak_rss_nbytes": res.peak_rss_nbytes}
                    if res.ok:
                        rec.update({k: v for k, v in res.result.items() if k not in ("loader", "mode")})
                        # One sample per child: the median of its repeats.
                        rec["repeat_load_s"] = res.result["load_s"]
                        rec["load_s"] = [C.median(res.result["load_s"])]
                        s = rec["load_s"][0]
                        print(f"sample size={C.human_nbytes(size)} run={r} mode={mode} loader={name} seconds={s:.4f} "
                              f"gbps={C.gbps(payload, s):.2f} gib_per_s={C.gibps(payload, s):.3f} "
                              f"repeats_s={[round(x, 4) for x in res.result['load_s']]} "
                              f"peak_rss_mib={res.peak_rss_nbytes / C.MiB:.0f}", flush=True)
                    else:
                        rec["error"] = res.error_line()
                        print(f"sample size={C.human_nbytes(size)} run={r} mode={mode} loader={name} error={rec['error']}",
                              flush=True)
                    recs.append(rec)
        records += recs
        summ = compare.summarize(recs, [], payload, modes)
        per_size[size] = {"payload_nbytes": payload, "summary": summ}
        if args.clean:
            for f in files.values():
                os.unlink(f)

    rows, series = [], {}
    for size, ps in per_size.items():
        summ = ps["summary"]
        for mode in modes:
            best = summ["best_flashpack"].get(mode)
            for label, key in (("flashpack best", best), ("safetensors", "safetensors.load_file")):
                d = summ["loaders"].get(f"{key}|{mode}") if key else None
                if not d or not d["load_s"]:
                    continue
                series.setdefault((label, mode), []).append((ps["payload_nbytes"], d["load_s_median"], d["load_s_min"],
                                                             d["load_s_max"]))
                rows.append([C.human_nbytes(size), mode, label + (f" ({key})" if label == "flashpack best" else ""),
                             C.fmt(d["load_s_median"] * 1000, 1), f"{C.fmt(d['load_s_min'] * 1000, 1)}-{C.fmt(d['load_s_max'] * 1000, 1)}",
                             C.fmt(d["gbps_median"]), C.fmt(d["gib_per_s_median"]),
                             C.fmt(d["peak_rss_nbytes_median"] / C.MiB, 0)])
    table = C.markdown_table(["size", "mode", "loader", "median_ms", "min-max_ms", "Gbps", "GiB/s", "peak_rss_MiB"], rows)
    print("\n" + table + "\n")

    verdicts = []
    warm = sorted(series.get(("flashpack best", "warm"), []))
    small = [t for n, t, _, _ in warm if n <= OVERHEAD_SIZE_NBYTES * 1.05]
    if small:
        t16 = small[-1]
        # The first timed repeat is the child's second load (memory not yet recycled by the allocator);
        # later repeats may reuse freed pages. Both are shown; the verdict uses the stricter first one.
        small_size = max(n for n in sizes if n <= OVERHEAD_SIZE_NBYTES * 1.05)
        best16 = per_size[small_size]["summary"]["best_flashpack"].get("warm")
        firsts = [r["repeat_load_s"][0] for r in records if r.get("repeat_load_s") and r["mode"] == "warm"
                  and r["loader"] == best16 and r["size_nbytes"] == small_size]
        first = C.median(firsts)
        verdicts.append({"target": f"warm {C.human_nbytes(OVERHEAD_SIZE_NBYTES)} load < {OVERHEAD_TARGET_S * 1000:.0f} ms",
                         "pass": max(t16, first) < OVERHEAD_TARGET_S,
                         "detail": f"{best16}: first timed load (the 2nd in its process) {first * 1000:.1f} ms median; "
                                   f"median of repeats {t16 * 1000:.1f} ms"})
    if len(warm) >= 2:
        n = len(warm)
        xs, ys = [w[0] for w in warm], [w[1] for w in warm]
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")
        intercept = my - slope * mx
        verdicts.append({"target": "fixed overhead (warm, intercept of a line fit)", "pass": None,
                         "detail": f"{intercept * 1000:.1f} ms; slope {C.gbps(1, slope):.2f} Gbps"})
    for mode in modes:
        pts = sorted(series.get(("flashpack best", mode), []))
        big = [(n, t) for n, t, _, _ in pts if n >= 256 * C.MiB]
        if len(big) >= 2:
            g = [C.gbps(n, t) for n, t in big]
            verdicts.append({"target": f"{mode} throughput holds from {C.human_nbytes(big[0][0])} up", "pass": None,
                             "detail": ", ".join(f"{C.human_nbytes(n)}: {x:.2f} Gbps" for (n, _), x in zip(big, g))})
    if verdicts:
        print("### targets\n")
        print(C.markdown_table(["target", "verdict", "detail"],
                               [[v["target"], {True: "PASS", False: "MISS", None: "info"}[v["pass"]], v["detail"]]
                                for v in verdicts]) + "\n")

    json_path = os.path.join(args.out_dir, args.name + ".json")
    png_path = os.path.join(args.out_dir, args.name + ".png")
    C.write_json(json_path, {"script": "perf/bench_scale.py", "argv": sys.argv, "environment": env, "sizes_nbytes": sizes,
                             "runs": args.runs, "cache_method": C.cache_method(), "samples": records,
                             "per_size": {str(k): v for k, v in per_size.items()}, "targets": verdicts,
                             "table_markdown": table})
    why = plot(series, env, png_path)
    print(f"json: {json_path}")
    print(f"png: {png_path}" if why is None else why)
    return 0


def plot(series: dict, env: dict, png_path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no chart: {e}"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    style = {"cold": "-", "warm": "--"}
    color = {"flashpack best": "#2ca02c", "safetensors": "#1f77b4"}
    for (label, mode), pts in sorted(series.items()):
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        med = [p[1] for p in pts]
        err = [[m - p[2] for m, p in zip(med, pts)], [p[3] - m for m, p in zip(med, pts)]]
        ax.errorbar(xs, med, yerr=err, marker="o", ls=style.get(mode, "-"), color=color.get(label), capsize=3,
                    label=f"{label}, {mode}")
        ax2.plot(xs, [C.gbps(x, t) for x, t in zip(xs, med)], marker="o", ls=style.get(mode, "-"), color=color.get(label),
                 label=f"{label}, {mode}")
    ax.axhline(OVERHEAD_TARGET_S, color="gray", lw=0.8, ls=":", label="20 ms")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("payload bytes")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("load time, s (median; bars min-max)")
    ax2.set_ylabel("Gbps (10^9 bit/s)")
    ax2.set_yscale("log")
    ax.set_title("load time vs size (log-log)")
    ax2.set_title("throughput vs size")
    fig.suptitle("flashpack vs safetensors, CPU — " + C.machine_title(env), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":
    sys.exit(main())
