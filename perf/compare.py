#!/usr/bin/env python
"""flashpack against every peer loader, cold, restart and warm, with the hardware ceilings, in one run.

Usage:
    .venv/bin/python perf/compare.py [--size 2G] [--runs 5] [--modes cold,restart,warm]
        [--peer-python .venv-peers/bin/python] [--loaders NAME,...] [--out-dir perf/results]

Every load runs in a fresh subprocess and ends with every byte resident in memory on the CPU: each
loader's result is touched (one byte per 4096, ``_common.touch``), which is what makes a lazy (mmap)
load read its bytes; flashpack verifies its xxh3 chunk checksums (``verify=True``). The time is the load
plus the touch inside the child, not the interpreter start; ``peak_rss`` is that child's own peak resident
set (its ``VmHWM`` after the load and touch, ``_common.peak_rss_nbytes``; not ``wait4``'s ``ru_maxrss``, which
starts at this parent's peak), the table shows its median per loader and mode. Per loader and round: ``cold`` (the file
evicted after the child's imports), then ``restart`` (a new process right after that load: the page
cache is what the loader itself left), then ``warm`` (the child first reads the file buffered).
Loaders alternate A B C ... A B C ... so drift hits each alike; medians over ``--runs`` rounds.
``flashpack[auto]`` is what a user gets by default (backend ``auto``: the threads backend for a file wholly in the
page cache, else io_uring where it runs); ``flashpack[uring]`` and ``flashpack[threads]`` name a backend, which is
then used whatever the cache holds.

Ceilings, measured in the same rounds: disk (fio io_uring O_DIRECT when installed, else one-thread
sequential 8 MiB O_DIRECT preadv), a buffered read of the cached file into a prefaulted buffer (and
into a fresh one), memcpy, and pinned H2D on a GPU machine. Ratios to flashpack's best backend and to
the ceiling stand side by side in one table.

Output: a markdown table, ``<out-dir>/<name>.json`` (raw samples, environment, summaries) and
``<out-dir>/<name>.png``. Peers are optional and never installed here (perf/requirements-peers.txt,
scripts/make_peer_env.sh); fal's flashpack 0.4.5 shares our import name, so it runs only under ``--peer-python``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import mmap
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import _common as C

MODES = ("cold", "restart", "warm")
FORMATS = {"flashpack": ".flashpack", "safetensors": ".safetensors", "pt": ".pt", "tensorizer": ".tensors",
           "falflashpack": ".fal.flashpack"}


def fal_flashpack():
    """fal's flashpack, from the peer virtualenv (never this repository's)."""
    C.forget_our_flashpack()
    import flashpack

    if hasattr(flashpack, "LoadStats") or not hasattr(flashpack, "deserialization"):
        raise RuntimeError(f"{flashpack.__file__} is not fal's flashpack; run it with --peer-python .venv-peers/bin/python")
    return flashpack


# --------------------------------------------------------------------------- loaders (run in children)


def load_flashpack(path: str, backend: str, cache: str | None = None):
    import flashpack as fp

    stats = fp.LoadStats()
    sd = fp.load(path, backend=backend, verify=True, stats=stats, cache=cache)
    return sd, None, {"backend": stats.backend, "bytes_direct": stats.bytes_direct,
                      "bytes_buffered": stats.bytes_buffered, "chunks_verified": stats.chunks_verified,
                      "cache": stats.cache}


def load_flashpack_mmap(path: str):
    import flashpack as fp

    stats = fp.LoadStats()
    sd = fp.load(path, mmap=True, verify=False, stats=stats)
    return sd, None, {"backend": stats.backend}


def load_safetensors(path: str, backend: str | None = None):
    from safetensors.torch import load_file

    return (load_file(path) if backend is None else load_file(path, backend=backend)), None, {}


def load_torch_mmap(path: str):
    import torch

    return torch.load(path, mmap=True, weights_only=True), None, {}


def load_fastsafetensors(path: str):
    from fastsafetensors import fastsafe_open

    f = fastsafe_open(filenames=[path], nogds=True, device="cpu")
    sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, f, {}


def load_runai(path: str):
    from runai_model_streamer import SafetensorsStreamer

    sd = {}
    with SafetensorsStreamer() as s:
        s.stream_file(path, device="cpu")
        for name, t in s.get_tensors():
            sd[name] = t
    return sd, None, {}


def load_tensorizer(path: str):
    from tensorizer import TensorDeserializer

    d = TensorDeserializer(path, device="cpu")
    sd = {k: d[k] for k in d.keys()}
    return sd, d, {}


def load_fal(path: str, eager: bool):
    os.environ["FLASHPACK_CPU_PARALLEL_READ"] = "1" if eager else "0"
    fal = fal_flashpack()
    from flashpack.deserialization import iterate_from_flash_tensor, read_flashpack_file  # fal's module

    storage, meta = read_flashpack_file(path, device="cpu")
    sd = dict(iterate_from_flash_tensor(storage, meta))
    return sd, (fal, storage), {}


@dataclass(frozen=True)
class Loader:
    name: str
    fmt: str
    python: str  # "main": this repo's .venv; "peer": --peer-python (falls back to main unless peer_only)
    fn: object
    memory: str  # what the returned tensors are backed by
    ours: bool = False
    peer_only: bool = False
    private_anon: bool = False  # returns private anonymous (copied) memory


def loaders() -> dict[str, Loader]:
    out = [
        # the library's default: backend "auto" (threads for a file wholly in the page cache, else uring where it runs)
        Loader("flashpack[auto]", "flashpack", "main", lambda p: load_flashpack(p, "auto"),
               "private anonymous, checksums verified", ours=True, private_anon=True),
        Loader("flashpack[threads]", "flashpack", "main", lambda p: load_flashpack(p, "threads"),
               "private anonymous, checksums verified", ours=True, private_anon=True),
        Loader("flashpack[uring]", "flashpack", "main", lambda p: load_flashpack(p, "uring"),
               "private anonymous, checksums verified", ours=True, private_anon=True),
        # the page-cache policy forced to bypass (O_DIRECT, nothing left cached); the two above run the default, auto
        Loader("flashpack[uring/bypass]", "flashpack", "main", lambda p: load_flashpack(p, "uring", "bypass"),
               "private anonymous, checksums verified", ours=True, private_anon=True),
        Loader("flashpack[threads/bypass]", "flashpack", "main", lambda p: load_flashpack(p, "threads", "bypass"),
               "private anonymous, checksums verified", ours=True, private_anon=True),
        Loader("flashpack[mmap]", "flashpack", "main", load_flashpack_mmap,
               "private copy-on-write mapping (zero-copy mode)", ours=True),
        Loader("safetensors.load_file", "safetensors", "main", load_safetensors,
               "private copy-on-write mapping"),
        Loader("safetensors[pread]", "safetensors", "main", lambda p: load_safetensors(p, "pread"),
               "private anonymous (pread)", private_anon=True),
        Loader("torch.load(mmap)", "pt", "main", load_torch_mmap, "private copy-on-write mapping"),
        Loader("fastsafetensors", "safetensors", "peer", load_fastsafetensors, "private anonymous (nogds)",
               private_anon=True),
        Loader("runai-streamer", "safetensors", "peer", load_runai, "private anonymous (owned)", private_anon=True),
        Loader("tensorizer", "tensorizer", "peer", load_tensorizer, "private anonymous", private_anon=True),
        Loader("fal-flashpack[eager]", "falflashpack", "peer", lambda p: load_fal(p, True),
               "private anonymous (FLASHPACK_CPU_PARALLEL_READ=1)", peer_only=True, private_anon=True),
        Loader("fal-flashpack[lazy]", "falflashpack", "peer", lambda p: load_fal(p, False),
               "read-only shared np.memmap (not writable)", peer_only=True),
    ]
    return {ld.name: ld for ld in out}


def child_load(args) -> dict:
    """``--child LOADER``: one load (plus touch) in this fresh process, timed inside it."""
    import torch

    ld = loaders()[args.child]
    if ld.fmt == "falflashpack":
        fal_flashpack()
    elif ld.ours:
        from flashpack import LoadStats, load  # noqa: F401 - imported before the clock starts
    info = {"loader": ld.name, "mode": args.mode, "file_nbytes": os.path.getsize(args.file),
            "torch_threads": torch.get_num_threads(), "baseline_rss_nbytes": C.current_rss_nbytes()}
    if args.mode == "cold":
        info["cache_method"] = C.evict([args.file], settle_s=args.cold_settle_s)
    elif args.mode == "warm":
        C.warm_file(args.file)
    info["resident_fraction_before"] = C.resident_fraction(args.file)
    t0 = time.perf_counter()
    sd, keep, extra = ld.fn(args.file)
    info["touch_sum"] = C.touch(sd)
    info["load_s"] = [time.perf_counter() - t0]
    info.update(extra, nbytes=C.state_dict_nbytes(sd), tensors=len(sd),
                resident_fraction_after=C.resident_fraction(args.file))
    return info


def child_write(args) -> dict:
    """``--write FORMAT``: read the safetensors source and write it as ``FORMAT`` to ``--file``."""
    import torch
    from safetensors.torch import load_file

    src, tmp = load_file(args.src), args.file + ".tmp"
    if args.write == "pt":
        torch.save(src, tmp)
    elif args.write == "tensorizer":
        from tensorizer import TensorSerializer

        s = TensorSerializer(tmp)
        s.write_state_dict(src)
        s.close()
    elif args.write == "falflashpack":
        fal_flashpack().pack_to_file(src, tmp, target_dtype=None, name_order=list(src))
    else:
        import flashpack

        flashpack.pack_to_file(src, tmp)
    os.replace(tmp, args.file)
    return {"format": args.write, "file_nbytes": os.path.getsize(args.file)}


def child_ceiling(args) -> dict:
    """``--ceiling KIND``: disk-odirect | buffered | buffered-fresh | memcpy | h2d, timed in this process."""
    path, size, chunk = args.file, os.path.getsize(args.file), 8 * C.MiB
    if args.ceiling in ("disk-odirect", "buffered", "buffered-fresh"):
        buf = mmap.mmap(-1, max(C.PAGE_NBYTES, -(-size // C.PAGE_NBYTES) * C.PAGE_NBYTES))  # page-aligned
        mv = memoryview(buf)
        if args.ceiling != "buffered-fresh":  # fault the buffer in before the clock starts
            ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(buf)), 0, len(buf))
        direct = args.ceiling == "disk-odirect"
        C.evict([path], settle_s=args.cold_settle_s) if direct else C.warm_file(path)
        before = C.resident_fraction(path)
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        body, off = size - size % C.PAGE_NBYTES if direct else size, 0
        t0 = time.perf_counter()
        while off < body and (n := os.preadv(fd, [mv[off:min(off + chunk, body)]], off)) > 0:
            off += n
        os.close(fd)
        if off < size:  # the unaligned tail of an O_DIRECT read, buffered
            with open(path, "rb", buffering=0) as f:
                f.seek(off)
                off += f.readinto(mv[off:size])
        dt = time.perf_counter() - t0
        del mv
        buf.close()
        how = {"disk-odirect": "O_DIRECT", "buffered": "page cache, prefaulted buffer",
               "buffered-fresh": "page cache, fresh (unfaulted) buffer"}[args.ceiling]
        return {"nbytes": off, "seconds": dt, "resident_fraction_before": before,
                "method": f"preadv {chunk // C.MiB} MiB, 1 thread, {how}"}
    if args.ceiling == "memcpy":
        n = 512 * C.MiB  # well past the caches: DRAM bandwidth
        bufs = [mmap.mmap(-1, n) for _ in range(2)]
        pa, pb = (ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in bufs)
        ctypes.memset(pa, 1, n)
        ctypes.memset(pb, 0, n)
        copy, sync, how = lambda: ctypes.memmove(pb, pa, n), lambda: None, "libc memcpy, 1 thread, prefaulted, best of 3"
    else:
        import torch

        n = min(size, C.GiB)
        a = torch.ones(n, dtype=torch.uint8, pin_memory=True)
        b = torch.empty(n, dtype=torch.uint8, device="cuda")
        copy, sync = lambda: b.copy_(a, non_blocking=True), torch.cuda.synchronize
        how = f"pinned H2D to {torch.cuda.get_device_name()}, best of 3"
    ts = []
    for _ in range(4):  # the first is a warm-up
        t0 = time.perf_counter()
        copy()
        sync()
        ts.append(time.perf_counter() - t0)
    return {"nbytes": n, "seconds": min(ts[1:]), "method": how}


# --------------------------------------------------------------------------- the parent


def child_argv(python: str, *args: str) -> list[str]:
    return [python, os.path.abspath(__file__), *args]


PROBES = {
    "safetensors[pread]": "import inspect; from safetensors.torch import load_file; "
                          "assert 'backend' in inspect.signature(load_file).parameters, 'no load_file(backend=...)'",
    "fastsafetensors": "import fastsafetensors",
    "runai-streamer": "import runai_model_streamer",
    "tensorizer": "import tensorizer",
    "fal-flashpack[eager]": "import flashpack; assert not hasattr(flashpack, 'LoadStats'), 'not fal flashpack'",
}
PROBES["fal-flashpack[lazy]"] = PROBES["fal-flashpack[eager]"]


def python_has(python: str, code: str) -> tuple[bool, str]:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    return out.returncode == 0, ((out.stderr or out.stdout).strip().splitlines() or [""])[-1]


def plan_loaders(names: list[str], peer_python: str | None) -> tuple[list[tuple[Loader, str]], dict[str, str]]:
    """(loader, python) pairs that can run here, and loader -> reason for those skipped."""
    import flashpack

    table, chosen, skipped = loaders(), [], {}
    for name in names:
        if name not in table:
            raise SystemExit(f"unknown loader {name!r}; choose from {', '.join(table)}")
        ld = table[name]
        if name == "flashpack[uring]" and not flashpack.backends()["uring"].available:
            skipped[name] = f"backend unavailable: {flashpack.backends()['uring'].reason}"
            continue
        candidates = ([os.path.abspath(peer_python)] if ld.python == "peer" and peer_python else []) + \
                     ([] if ld.peer_only else [sys.executable])
        why = "needs --peer-python (fal's flashpack shares our import name)"
        for py in dict.fromkeys(candidates):
            ok, why = python_has(py, PROBES[name]) if name in PROBES else (True, "")
            if ok:
                chosen.append((ld, py))
                break
        else:
            skipped[name] = f"not installed: {why}"
    return chosen, skipped


def prepare_files(size_nbytes: int, workdir: str, pythons: dict[str, str], timeout_s: float,
                  seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """The synthetic state_dict written once per format (``pythons``: format -> interpreter that writes it);
    files of the same size and seed are reused. Returns (format -> path, format -> error)."""
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.join(workdir, f"synthetic-{size_nbytes}-s{seed}-v2")
    files, errors = {"safetensors": stem + FORMATS["safetensors"]}, {}
    if not os.path.exists(files["safetensors"]):
        from safetensors.torch import save_file

        save_file(C.make_state_dict(size_nbytes, seed), files["safetensors"] + ".tmp")
        os.replace(files["safetensors"] + ".tmp", files["safetensors"])
        gc.collect()
    for fmt, py in pythons.items():
        path = stem + FORMATS[fmt]
        if fmt != "safetensors" and not os.path.exists(path):
            r = C.run_child(child_argv(py, "--write", fmt, "--src", files["safetensors"], "--file", path), timeout_s)
            if not r.ok:
                errors[fmt] = r.error_line()
                continue
        files[fmt] = path
    os.sync()
    return files, errors


def run_ceiling(kind: str, path: str, timeout_s: float, settle_s: float = 0.0) -> dict:
    if kind == "disk-fio":
        r = C.fio_read(path, os.path.getsize(path) // C.MiB * C.MiB, 8 * C.MiB, timeout_s=timeout_s, settle_s=settle_s)
        if "error" not in r:
            return r
        return dict(run_ceiling("disk-odirect", path, timeout_s, settle_s), fio_error=r["error"], kind="disk-odirect")
    r = C.run_child(child_argv(sys.executable, "--ceiling", kind, "--file", path, "--cold-settle-s", str(settle_s)),
                    timeout_s)
    return dict(r.result, peak_rss_nbytes=r.peak_rss_nbytes) if r.ok else {"error": r.error_line()}


def ceiling_plan(modes: list[str], fio: bool, gpu: bool) -> list[tuple[str, str]]:
    """(ceiling kind, the mode it bounds)."""
    plan = [("disk-fio" if fio and shutil.which("fio") else "disk-odirect", "cold"),
            ("buffered", "warm"), ("buffered-fresh", "warm"), ("memcpy", "warm")] + ([("h2d", "warm")] if gpu else [])
    return [(k, m) for k, m in plan if m in modes]


def measure(runnable: list[tuple[Loader, str]], files: dict[str, str], modes: list[str], runs: int,
            ceilings_wanted: list[tuple[str, str]], payload: int, timeout_s: float, tag: str = "",
            settle_s: float = 0.0) -> tuple[list, list]:
    """``runs`` rounds; per round the ceilings, then per loader (alternating A B C) one fresh child per mode in
    the order cold, restart, warm (a restart without cold in ``modes`` gets an untimed earlier load first).
    ``settle_s``: seconds between a cold eviction and the load (:func:`_common.evict`).
    Prints one ``sample`` line per child; returns (load records, ceiling records)."""
    records, ceilings = [], []
    for r in range(runs):
        for kind, mode in ceilings_wanted:
            c = {"kind": kind, **run_ceiling(kind, files["flashpack"], timeout_s, settle_s), "mode": mode, "run": r}
            ceilings.append(c)
            print(f"sample {tag}run={r} mode={mode} ceiling={c['kind']} " + (
                f"seconds={c['seconds']:.4f} {C.speed(c['nbytes'], c['seconds'])}" if "seconds" in c
                else f"error={c.get('error')}"), flush=True)
        for ld, py in runnable:
            for mode in [m for m in MODES if m in modes]:
                argv = child_argv(py, "--child", ld.name, "--file", files[ld.fmt], "--cold-settle-s", str(settle_s),
                                  "--mode", mode)
                if mode == "restart" and "cold" not in modes:
                    C.run_child(argv[:-1] + ["cold"], timeout_s)
                res = C.run_child(argv, timeout_s)
                rec = {"loader": ld.name, "mode": mode, "run": r, "python": py, "memory": ld.memory,
                       "peak_rss_nbytes": res.peak_rss_nbytes, "child_wall_s": res.wall_s}
                if res.ok:
                    rec.update({k: v for k, v in res.result.items() if k not in ("loader", "mode")})
                    s = rec["load_s"][0]
                    print(f"sample {tag}run={r} mode={mode} loader={ld.name} seconds={s:.4f} {C.speed(payload, s)} "
                          f"peak_rss_mib={res.peak_rss_nbytes / C.MiB:.0f} resident_before="
                          f"{rec['resident_fraction_before']:.2f} bytes_direct={rec.get('bytes_direct', '-')}", flush=True)
                else:
                    rec["error"] = res.error_line()
                    print(f"sample {tag}run={r} mode={mode} loader={ld.name} error={rec['error']}", flush=True)
                records.append(rec)
    return records, ceilings


def summarize(records: list[dict], ceilings: list[dict], payload: int, modes: list[str]) -> dict:
    """Per (loader, mode): times, throughput, RSS, and the ratios to flashpack's best backend and the ceiling."""
    out: dict = {"loaders": {}, "ceilings": {}, "best_flashpack": {}}
    for c in ceilings:
        d = out["ceilings"].setdefault(c["kind"], {"mode": c["mode"], "gbps": [], "method": c.get("method", "")})
        d["gbps"] += [C.gbps(c["nbytes"], c["seconds"])] if "seconds" in c else []
    for d in out["ceilings"].values():
        d["gbps_median"] = C.median(d["gbps"])
        d["gib_per_s_median"] = d["gbps_median"] * 1e9 / 8 / C.GiB
    for rec in records:
        d = out["loaders"].setdefault(f"{rec['loader']}|{rec['mode']}", {
            "loader": rec["loader"], "mode": rec["mode"], "load_s": [], "peak_rss_nbytes": [],
            "baseline_rss_nbytes": [], "errors": [], "memory": rec.get("memory", "")})
        if rec.get("error"):
            d["errors"].append(rec["error"])
            continue
        d["load_s"] += rec["load_s"]
        d["peak_rss_nbytes"].append(rec["peak_rss_nbytes"])
        d["baseline_rss_nbytes"].append(rec.get("baseline_rss_nbytes"))
        d["backend"] = rec.get("backend", d.get("backend"))
    for d in out["loaders"].values():
        s = C.summary(d["load_s"])
        d.update(load_s_median=s["median"], load_s_min=s["min"], load_s_max=s["max"],
                 gbps_median=C.gbps(payload, s["median"]), gbps_min=C.gbps(payload, s["max"]),
                 gbps_max=C.gbps(payload, s["min"]), gib_per_s_median=C.gibps(payload, s["median"]),
                 peak_rss_nbytes_median=C.median(d["peak_rss_nbytes"]),
                 baseline_rss_nbytes_median=C.median(d["baseline_rss_nbytes"]))
    for mode in modes:
        rows = [d for d in out["loaders"].values() if d["mode"] == mode and d["load_s"]]
        ours = [d for d in rows if d["loader"].startswith("flashpack[") and d["loader"] != "flashpack[mmap]"]
        best = min(ours, key=lambda d: d["load_s_median"]) if ours else None
        ceil = next((k for k, c in out["ceilings"].items() if c["mode"] == mode and k in ("disk-fio", "disk-odirect",
                                                                                            "buffered")), None)
        out["best_flashpack"][mode] = best["loader"] if best else None
        for d in rows:
            d["ratio_to_flashpack_best"] = d["gbps_median"] / best["gbps_median"] if best else float("nan")
            d["ceiling"] = ceil
            d["ratio_to_ceiling"] = d["gbps_median"] / out["ceilings"][ceil]["gbps_median"] if ceil else float("nan")
    return out


def targets(summ: dict, file_nbytes: int) -> list[dict]:
    """The targets (issue 12), judged on this run's medians of flashpack's best copying backend (not ``mmap``):

    - cold >= 0.95x the disk ceiling (fio io_uring O_DIRECT);
    - restart and warm (cached) >= 0.5x the buffered-read ceiling, and >= 1.5x the fastest peer returning private
      anonymous memory (tensorizer, fal eager, fastsafetensors, Run:ai);
    - zero-copy (``mmap=True``) warm within 1.2x torch.load(mmap=True);
    - peak RSS growth over the child's RSS after its imports (torch alone is ~280 MiB) <= file + 256 MiB.
    """
    L, out = summ["loaders"], []
    anon = {n for n, ld in loaders().items() if ld.private_anon and not ld.ours}
    for mode in ("cold", "restart", "warm"):
        best = summ["best_flashpack"].get(mode)
        if not best:
            continue
        fp = L[f"{best}|{mode}"]["gbps_median"]
        peers = {d["loader"]: d["gbps_median"] for d in L.values()
                 if d["mode"] == mode and d["load_s"] and not d["loader"].startswith("flashpack")}
        top_anon = max(((k, v) for k, v in peers.items() if k in anon), key=lambda kv: kv[1], default=(None, 0))
        if mode == "cold":
            disk = next((c["gbps_median"] for k, c in summ["ceilings"].items() if k.startswith("disk")), float("nan"))
            out.append({"target": "cold >= 0.95x disk ceiling", "pass": fp >= 0.95 * disk,
                        "detail": f"{best} {fp:.2f} Gbps vs disk {disk:.2f} -> {fp / disk:.2f}x"})
            continue
        buf = summ["ceilings"].get("buffered", {}).get("gbps_median", float("nan"))
        out.append({"target": f"{mode} >= 0.5x buffered read", "pass": fp >= 0.5 * buf,
                    "detail": f"{best} {fp:.2f} Gbps vs buffered {buf:.2f} -> {fp / buf:.2f}x"})
        if top_anon[0]:
            out.append({"target": f"{mode} >= 1.5x fastest private-anonymous peer", "pass": fp >= 1.5 * top_anon[1],
                        "detail": f"{best} {fp:.2f} Gbps vs {top_anon[0]} {top_anon[1]:.2f} -> {fp / top_anon[1]:.2f}x"})
    mm, tl = L.get("flashpack[mmap]|warm"), L.get("torch.load(mmap)|warm")
    if mm and tl and mm["load_s"] and tl["load_s"]:
        ratio = mm["load_s_median"] / tl["load_s_median"]
        out.append({"target": "zero-copy warm within 1.2x torch.load(mmap)", "pass": ratio <= 1.2,
                    "detail": f"{mm['load_s_median']:.3f} s vs {tl['load_s_median']:.3f} s -> {ratio:.2f}x the time"})
    growth = [p - b for d in L.values() if d["loader"].startswith("flashpack[") and d["loader"] != "flashpack[mmap]"
              for p, b in zip(d["peak_rss_nbytes"], d["baseline_rss_nbytes"]) if p and b]
    if growth:
        out.append({"target": "flashpack peak RSS growth over its imports <= file + 256 MiB",
                    "pass": max(growth) <= file_nbytes + 256 * C.MiB,
                    "detail": f"max {max(growth) / C.MiB:.0f} MiB vs {(file_nbytes + 256 * C.MiB) / C.MiB:.0f} MiB"})
    return out


def render_table(summ: dict, modes: list[str], payload: int) -> str:
    parts = []
    for mode in modes:
        rows = sorted((d for d in summ["loaders"].values() if d["mode"] == mode), key=lambda d: -(d["gbps_median"]
                                                                                                  if d["load_s"] else -1))
        body = [[d["loader"], "error: " + "; ".join(sorted(set(d["errors"])))[:120]] + ["-"] * 8 if not d["load_s"] else
                [d["loader"], C.fmt(d["load_s_median"], 3), f"{C.fmt(d['load_s_min'], 3)}-{C.fmt(d['load_s_max'], 3)}",
                 C.fmt(d["gbps_median"]), C.fmt(d["gib_per_s_median"]), C.fmt(d["peak_rss_nbytes_median"] / C.MiB, 0),
                 C.fmt(d["baseline_rss_nbytes_median"] / C.MiB, 0), C.fmt(d.get("ratio_to_flashpack_best")),
                 C.fmt(d.get("ratio_to_ceiling"))] for d in rows]
        ceil = next((d.get("ceiling") for d in rows if d.get("ceiling")), None) or "ceiling"
        parts += [f"### {mode} ({C.human_nbytes(payload)} payload, n={max((len(d['load_s']) for d in rows), default=0)})\n",
                  C.markdown_table(["loader", "median_s", "min-max_s", "Gbps", "GiB/s", "peak_rss_MiB", "import_rss_MiB",
                                    "x flashpack best", f"x {ceil}"], body), ""]
    crow = [[k, c["mode"], C.fmt(c["gbps_median"]), C.fmt(c["gib_per_s_median"]), " ".join(C.fmt(x) for x in c["gbps"]),
             c["method"]] for k, c in summ["ceilings"].items()]
    return "\n".join(parts + ["### ceilings\n", C.markdown_table(["ceiling", "mode", "Gbps", "GiB/s", "samples_Gbps",
                                                                   "method"], crow)])


def plot(summ: dict, modes: list[str], env: dict, png_path: str, payload: int) -> str | None:
    plt = C.pyplot()
    if isinstance(plt, str):
        return plt
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = sorted((d for d in summ["loaders"].values() if d["mode"] == mode and d["load_s"]),
                      key=lambda d: -d["gbps_median"])
        med = [d["gbps_median"] for d in rows]
        ax.bar(range(len(rows)), med, capsize=4, yerr=[[m - d["gbps_min"] for m, d in zip(med, rows)],
                                                       [d["gbps_max"] - m for m, d in zip(med, rows)]],
               color=["#2ca02c" if d["loader"].startswith("flashpack") else "#1f77b4" for d in rows])
        for i, m in enumerate(med):
            ax.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [d["loader"] for d in rows], rotation=35, ha="right", fontsize=8)
        for j, (k, c) in enumerate((k, c) for k, c in summ["ceilings"].items() if c["mode"] == mode):
            if not math.isnan(c["gbps_median"]):
                ax.axhline(c["gbps_median"], ls="--", color=f"C{j + 3}", label=f"{k} {c['gbps_median']:.1f} Gbps")
        if med and max(med) / max(min(med), 1e-9) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("Gbps (10^9 bit/s), median; bars: min-max")
        ax.secondary_yaxis("right", functions=(lambda g: g * 1e9 / 8 / C.GiB, lambda x: x * C.GiB * 8 / 1e9)) \
            .set_ylabel("GiB/s")
        ax.set_title(f"{mode}: {C.human_nbytes(payload)} to CPU, every byte resident")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("flashpack vs peers — " + C.machine_title(env), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None


def common_args(p: argparse.ArgumentParser, runs: int, name_help: str) -> argparse.ArgumentParser:
    """The flags compare.py, bench_load.py and bench_scale.py share, and the hidden child flags."""
    p.add_argument("--size", default="2G", help="synthetic state_dict size (bytes, or K/M/G), default 2G")
    p.add_argument("--runs", type=int, default=runs, help="rounds; each runs every loader once per mode (median)")
    p.add_argument("--modes", default=",".join(MODES), help="subset of cold,restart,warm")
    p.add_argument("--workdir", default=None, help="where the big files go (default perf/out or $FLASHPACK_PERF_DIR)")
    p.add_argument("--out-dir", default=os.path.join(C.PERF_DIR, "results"), help="JSON and PNG go here")
    p.add_argument("--name", default=None, help=name_help)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per child process")
    p.add_argument("--cold-settle-s", type=float, default=0.0,
                   help="seconds between a cold eviction and the load (default 0; see _common.evict: on a VM that "
                        "reports free pages to its host, 8 measures a load after a quiet spell)")
    for flag in ("--child", "--write", "--ceiling", "--file", "--src", "--mode"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    return p


def child_dispatch(args) -> int | None:
    """Run the hidden child mode named in ``args``, or return None in the parent."""
    for flag, body in (("child", child_load), ("write", child_write), ("ceiling", child_ceiling)):
        if getattr(args, flag):
            return C.child_main(lambda: body(args))
    return None


def main(argv=None) -> int:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
                    5, "basename of the JSON/PNG (default compare-<size>)")
    p.add_argument("--loaders", default="", help="comma-separated subset (default: all that can run)")
    p.add_argument("--peer-python", default=None, help="python of .venv-peers (fal flashpack and other peers)")
    p.add_argument("--no-fio", action="store_true", help="use the plain O_DIRECT read as the disk ceiling")
    p.add_argument("--gpu", action="store_true", default=None, help="measure pinned H2D (default: if a GPU exists)")
    p.add_argument("--clean", action="store_true", help="delete the benchmark files afterwards")
    args = p.parse_args(argv)
    if (rc := child_dispatch(args)) is not None:
        return rc
    size, modes = C.parse_nbytes(args.size), [m for m in args.modes.split(",") if m]
    workdir = args.workdir or C.default_workdir()
    env = C.environment(workdir)
    print(C.header(env, f"perf/compare.py: {C.human_nbytes(size)}, runs={args.runs}, modes={modes}",
                   f"peer python: {args.peer_python or 'none'}"), flush=True)
    chosen, skipped = plan_loaders([n for n in args.loaders.split(",") if n] or list(loaders()), args.peer_python)
    files, errors = prepare_files(size, workdir, {"flashpack": sys.executable, **{ld.fmt: py for ld, py in chosen}},
                                  args.timeout_s)
    runnable = [(ld, py) for ld, py in chosen if ld.fmt in files]
    skipped.update({ld.name: f"could not write its {ld.fmt} file: {errors[ld.fmt]}" for ld, _ in chosen
                    if ld.fmt not in files})
    payload = sum(s.nbytes for s in C.synthetic_spec(size))
    print("\n".join(f"- skipped {n}: {why}" for n, why in skipped.items()))
    print(f"- payload {payload} B; files: " + ", ".join(f"{k} {os.path.getsize(v)} B" for k, v in files.items()) + "\n")
    gpu = env["gpu"] != "none" if args.gpu is None else args.gpu
    records, ceilings = measure(runnable, files, modes, args.runs, ceiling_plan(modes, not args.no_fio, gpu), payload,
                                args.timeout_s, settle_s=args.cold_settle_s)
    summ = summarize(records, ceilings, payload, modes)
    table = render_table(summ, modes, payload)
    verdicts = targets(summ, os.path.getsize(files["flashpack"]))
    print("\n" + table + "\n\n### targets (issue 12)\n\n" + C.verdict_table(verdicts) + "\n")
    name = args.name or f"compare-{C.human_nbytes(size).replace(' ', '')}"
    stem = os.path.join(args.out_dir, name)
    C.write_json(stem + ".json", {"script": "perf/compare.py", "argv": sys.argv, "environment": env, "size_nbytes": size,
                                  "payload_nbytes": payload, "runs": args.runs, "modes": modes, "skipped": skipped,
                                  "files": {k: {"path": v, "nbytes": os.path.getsize(v)} for k, v in files.items()},
                                  "samples": records, "ceiling_samples": ceilings, "summary": summ,
                                  "targets": verdicts, "table_markdown": table})
    why = plot(summ, modes, env, stem + ".png", payload)
    print(f"json: {stem}.json\n" + (f"png: {stem}.png" if why is None else why))
    for path in files.values() if args.clean else ():
        os.unlink(path)
    return 1 if any(d["loader"].startswith("flashpack") and not d["load_s"] for d in summ["loaders"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
