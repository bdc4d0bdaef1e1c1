#!/usr/bin/env python
"""flashpack.load to CPU against the disk and page-cache ceilings, cold and warm (issue 2, section 7).

Usage:
    .venv/bin/python perf/bench_load.py [--size 2G] [--runs 3] [--out-dir perf/results]

Packs a synthetic state_dict (~90% bf16, fp32, int64, bool; transformer-like shapes), then, in one
run and in alternating order, each in its own subprocess:

- ``flashpack.load(path, backend=B, verify=True)`` for every available backend B, cold and warm;
- the disk ceiling: a plain sequential O_DIRECT read of the same file (8 MiB ``preadv``, one thread)
  into a page-aligned, prefaulted buffer; plus fio (io_uring, iodepth 8) when installed, for reference;
- the warm ceiling: a plain buffered read of the cached file into a prefaulted buffer; and, for
  reference, the same read into a fresh (not yet faulted) buffer, which pays the page faults that any
  loader returning new private memory pays;
- ``safetensors.torch.load_file`` of the same tensors followed by touching every page, cold and warm.

Targets (this machine): cold >= 0.9x the plain O_DIRECT read; warm >= the buffered read; peak RSS of
the flashpack subprocess <= file size + 256 MiB. Prints an environment header, every raw sample,
a markdown table and the verdicts; writes ``<out-dir>/bench_load-<size>.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import compare  # noqa: E402

RSS_MARGIN_NBYTES = 256 * C.MiB


def available_backends() -> list[str]:
    sys.path.insert(0, C.REPO_ROOT)
    import flashpack

    return [name for name, info in flashpack.backends().items() if info.available]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2G")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out-dir", default=os.path.join(C.PERF_DIR, "results"))
    p.add_argument("--name", default=None)
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)

    size = C.parse_nbytes(args.size)
    workdir = args.workdir or C.default_workdir()
    env = C.environment(workdir)
    print(C.format_environment(env, f"perf/bench_load.py: {C.human_nbytes(size)}, runs={args.runs}"))
    print(f"- cache dropping: {C.cache_method()}")
    print(f"- command: {' '.join([os.path.relpath(sys.executable, C.REPO_ROOT)] + sys.argv)}\n", flush=True)

    backends = available_backends()
    files, errors = compare.prepare_files(size, workdir, {"flashpack"}, {}, args.timeout_s)
    if "flashpack" not in files:
        print(f"cannot pack the file: {errors}")
        return 1
    fp_path, st_path = files["flashpack"], files["safetensors"]
    file_nbytes = os.path.getsize(fp_path)
    payload = sum(s.nbytes for s in C.synthetic_spec(size))
    print(f"- backends: {', '.join(backends)}; payload {payload} B, flashpack file {file_nbytes} B, "
          f"safetensors file {os.path.getsize(st_path)} B\n", flush=True)

    loader_names = [f"flashpack[{b}]" for b in backends] + ["safetensors.load_file"]
    loader_file = {n: (fp_path if n.startswith("flashpack") else st_path) for n in loader_names}
    records: list[dict] = []
    ceilings: list[dict] = []
    for r in range(args.runs):
        for mode in ("cold", "warm"):
            kinds = ["disk-odirect"] + (["disk-fio"] if shutil.which("fio") else []) if mode == "cold" else ["buffered", "buffered-fresh"]
            for kind in kinds:
                c = compare.run_ceiling(kind, fp_path, args.timeout_s)
                c.setdefault("kind", kind)
                c.update(mode=mode, run=r)
                ceilings.append(c)
                print(f"sample run={r} mode={mode} ceiling={c['kind']} " +
                      (f"seconds={c['seconds']:.4f} gbps={C.gbps(c['nbytes'], c['seconds']):.2f} "
                       f"gib_per_s={C.gibps(c['nbytes'], c['seconds']):.3f}" if "seconds" in c else f"error={c.get('error')}"),
                      flush=True)
            for name in loader_names:
                res = C.run_child(compare.child_argv(sys.executable, "--child", name, "--file", loader_file[name],
                                                     "--mode", mode), timeout_s=args.timeout_s)
                rec = {"loader": name, "mode": mode, "run": r, "peak_rss_nbytes": res.peak_rss_nbytes}
                if res.ok:
                    rec.update({k: v for k, v in res.result.items() if k not in ("loader", "mode")})
                    s = res.result["load_s"][0]
                    print(f"sample run={r} mode={mode} loader={name} seconds={s:.4f} gbps={C.gbps(payload, s):.2f} "
                          f"gib_per_s={C.gibps(payload, s):.3f} peak_rss_mib={res.peak_rss_nbytes / C.MiB:.0f} "
                          f"bytes_direct={res.result.get('bytes_direct', '-')} "
                          f"bytes_buffered={res.result.get('bytes_buffered', '-')}", flush=True)
                else:
                    rec["error"] = res.error_line()
                    print(f"sample run={r} mode={mode} loader={name} error={rec['error']}", flush=True)
                records.append(rec)

    summ = compare.summarize(records, [dict(c) for c in ceilings], payload, ["cold", "warm"])
    # bench_load's targets use the plain O_DIRECT read (issue 2), not fio: recompute the ratio for cold.
    ceil = summ["ceilings"]
    disk = ceil.get("disk-odirect", {}).get("gbps_median", float("nan"))
    buffered = ceil.get("buffered", {}).get("gbps_median", float("nan"))
    for d in summ["loaders"].values():
        if d["load_s"]:
            d["ceiling"] = "disk-odirect" if d["mode"] == "cold" else "buffered"
            d["ratio_to_ceiling"] = d["gbps_median"] / (disk if d["mode"] == "cold" else buffered)
    table = compare.render_table(summ, ["cold", "warm"], payload)
    print("\n" + table + "\n")

    verdicts = []
    for mode, need, ceil_name, ceil_gbps in (("cold", 0.9, "plain O_DIRECT read", disk),
                                             ("warm", 1.0, "buffered read", buffered)):
        best = summ["best_flashpack"].get(mode)
        d = summ["loaders"].get(f"{best}|{mode}") if best else None
        if d is None:
            verdicts.append({"target": f"{mode} >= {need}x {ceil_name}", "pass": False, "detail": "no flashpack result"})
            continue
        ratio = d["gbps_median"] / ceil_gbps
        verdicts.append({"target": f"{mode} load >= {need}x {ceil_name}", "pass": ratio >= need,
                         "detail": f"{best} {d['gbps_median']:.2f} Gbps vs {ceil_gbps:.2f} Gbps = {ratio:.2f}x"})
    rss = max((x for d in summ["loaders"].values() if d["loader"].startswith("flashpack") for x in d["peak_rss_nbytes"]
               if x), default=0)
    base = C.median([x for d in summ["loaders"].values() if d["loader"].startswith("flashpack")
                     for x in d.get("baseline_rss_nbytes", []) if x])
    verdicts.append({"target": "peak RSS <= file + 256 MiB", "pass": rss <= file_nbytes + RSS_MARGIN_NBYTES,
                     "detail": f"max peak RSS {rss / C.MiB:.0f} MiB vs limit {(file_nbytes + RSS_MARGIN_NBYTES) / C.MiB:.0f} MiB "
                               f"(of which interpreter + torch import {base / C.MiB:.0f} MiB; above that: "
                               f"{(rss - base) / C.MiB:.0f} MiB for a {file_nbytes / C.MiB:.0f} MiB file)"})
    print("### targets\n")
    print(C.markdown_table(["target", "verdict", "detail"],
                           [[v["target"], "PASS" if v["pass"] else "MISS", v["detail"]] for v in verdicts]))
    name = args.name or f"bench_load-{C.human_nbytes(size).replace(' ', '')}"
    json_path = os.path.join(args.out_dir, name + ".json")
    C.write_json(json_path, {"script": "perf/bench_load.py", "argv": sys.argv, "environment": env, "size_nbytes": size,
                             "payload_nbytes": payload, "file_nbytes": file_nbytes, "runs": args.runs,
                             "cache_method": C.cache_method(), "samples": records, "ceiling_samples": ceilings,
                             "summary": summ, "targets": verdicts, "table_markdown": table})
    print(f"\njson: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
