#!/usr/bin/env python
"""flashpack against every peer loader: cold and warm, with the hardware ceilings, in one run.

Usage:
    .venv/bin/python perf/compare.py [--size 2G] [--runs 5] [--modes cold,warm]
        [--peer-python .venv-peers/bin/python] [--loaders NAME,...] [--out-dir perf/results]

Every load ends with every byte resident in writable memory on the CPU: lazy loaders (mmap) are
followed by touching every page (one byte per 4096, :func:`_common.touch`), and the same touch is
applied to every loader so that all finish at the same point; flashpack verifies its xxh3 chunk
checksums while loading (``verify=True``). Each load runs in its own subprocess, so imports, memory
and caches do not leak between loaders; the time measured is the load (plus touch) inside the child,
not the interpreter start. Cold: the page cache is dropped inside the child after its imports (root:
drop_caches, else posix_fadvise DONTNEED on the file; the report says which). Warm: the child reads
the file through the page cache, loads once, then times a second load.

Order alternates A B C ... A B C ... so drift hits every loader alike. The ceilings are measured in
the same rounds: disk (fio io_uring O_DIRECT when installed, else a plain sequential O_DIRECT read),
a buffered read of the cached file into a preallocated buffer, memcpy bandwidth, and pinned H2D on
a GPU machine.

Output: a markdown table on stdout, ``<out-dir>/<name>.json`` (raw samples, environment, summaries)
and ``<out-dir>/<name>.png`` (bars with min/max error bars, ceilings as lines, the machine in the title).
Peers are optional and never installed by this script: see perf/requirements-peers.txt and
scripts/make_peer_env.sh. Fal's flashpack 0.4.5 shares our import name, so it only runs under
``--peer-python``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# --------------------------------------------------------------------------- loaders (run in children)

FORMATS = {  # format -> file suffix
    "flashpack": ".flashpack",
    "safetensors": ".safetensors",
    "pt": ".pt",
    "tensorizer": ".tensors",
    "falflashpack": ".fal.flashpack",
}


def _our_flashpack():
    """Import this repository's flashpack (the child's sys.path has perf/ first, then site-packages)."""
    if C.REPO_ROOT not in sys.path:
        sys.path.insert(1, C.REPO_ROOT)
    import flashpack

    if not hasattr(flashpack, "LoadStats"):
        raise RuntimeError(f"the flashpack imported from {flashpack.__file__} is not this repository's")
    return flashpack


def _fal_flashpack():
    import flashpack

    if hasattr(flashpack, "LoadStats") or not hasattr(flashpack, "deserialization"):
        raise RuntimeError(f"fal's flashpack is not installed here ({flashpack.__file__} is this repository's); "
                           f"run it with --peer-python .venv-peers/bin/python")
    return flashpack


def load_flashpack(path: str, backend: str):
    fp = _our_flashpack()
    stats = fp.LoadStats()
    sd = fp.load(path, backend=backend, verify=True, stats=stats)
    return sd, None, {"backend": stats.backend, "bytes_direct": stats.bytes_direct,
                      "bytes_buffered": stats.bytes_buffered, "chunks_verified": stats.chunks_verified}


def load_flashpack_mmap(path: str):
    fp = _our_flashpack()
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
    fal = _fal_flashpack()
    from flashpack.deserialization import iterate_from_flash_tensor, read_flashpack_file

    storage, meta = read_flashpack_file(path, device="cpu")
    sd = dict(iterate_from_flash_tensor(storage, meta))
    return sd, (fal, storage), {}


def _safetensors_has_pread() -> bool:
    try:
        import inspect

        from safetensors.torch import load_file

        return "backend" in inspect.signature(load_file).parameters
    except Exception:  # noqa: BLE001
        return False


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
        Loader("flashpack[threads]", "flashpack", "main", lambda p: load_flashpack(p, "threads"),
               "private anonymous, checksums verified", ours=True, private_anon=True),
        Loader("flashpack[uring]", "flashpack", "main", lambda p: load_flashpack(p, "uring"),
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
    """Body of ``--child LOADER``: one cold or warm load (plus touch), timed inside this process."""
    import torch

    ld = loaders()[args.child]
    path = args.file
    # Import what the loader needs before any cache drop or timing (a tiny file of the same format
    # is not needed: importing the modules is what costs).
    if ld.ours:
        _our_flashpack()
    elif ld.fmt == "falflashpack":
        _fal_flashpack()
    info: dict = {"loader": ld.name, "mode": args.mode, "file": path, "file_nbytes": os.path.getsize(path),
                  "torch_threads": torch.get_num_threads(), "python": sys.executable}
    if ld.name == "safetensors[pread]" and not _safetensors_has_pread():
        raise RuntimeError("this safetensors has no load_file(backend='pread')")
    samples = []
    info["baseline_rss_nbytes"] = C.current_rss_nbytes()  # interpreter + imports, before any load
    if args.mode == "warm":
        C.warm_file(path)
        sd, keep, _ = ld.fn(path)
        C.touch(sd)
        del sd, keep
        gc.collect()
    for i in range(max(1, args.repeats)):
        if args.mode == "cold":
            info["cache_method"] = C.drop_caches([path])
        info.setdefault("resident_fraction_before", C.resident_fraction(path))
        t0 = time.perf_counter()
        sd, keep, extra = ld.fn(path)
        info["touch_sum"] = C.touch(sd)
        samples.append(time.perf_counter() - t0)
        info.update(extra)
        info["nbytes"] = C.state_dict_nbytes(sd)
        info["resident_fraction_after"] = C.resident_fraction(path)  # < 1 warm: someone dropped the cache
        info["tensors"] = len(sd)
        del sd, keep
        gc.collect()
    info["load_s"] = samples
    return info


# --------------------------------------------------------------------------- writers (run in children)


def child_write(args) -> dict:
    """Body of ``--write FORMAT``: read the safetensors source and write it in ``FORMAT`` to ``--file``."""
    import torch
    from safetensors.torch import load_file

    src = load_file(args.src)
    tmp = args.file + ".tmp"
    t0 = time.perf_counter()
    if args.write == "pt":
        torch.save(src, tmp)
    elif args.write == "tensorizer":
        from tensorizer import TensorSerializer

        s = TensorSerializer(tmp)
        s.write_state_dict(src)
        s.close()
    elif args.write == "falflashpack":
        fal = _fal_flashpack()
        fal.pack_to_file(src, tmp, target_dtype=None, name_order=list(src))
    elif args.write == "flashpack":
        _our_flashpack().pack_to_file(src, tmp)
    else:
        raise ValueError(f"unknown format {args.write}")
    os.replace(tmp, args.file)
    return {"format": args.write, "file_nbytes": os.path.getsize(args.file), "write_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- ceilings (run in children)


def child_ceiling(args) -> dict:
    """Body of ``--ceiling KIND``: disk-odirect | buffered | memcpy | h2d."""
    import ctypes
    import mmap

    path = args.file
    size = os.path.getsize(path)
    chunk = 8 * C.MiB
    info: dict = {"ceiling": args.ceiling, "file_nbytes": size}
    if args.ceiling in ("disk-odirect", "buffered", "buffered-fresh"):
        alloc = (size + C.PAGE_NBYTES - 1) // C.PAGE_NBYTES * C.PAGE_NBYTES
        buf = mmap.mmap(-1, max(alloc, C.PAGE_NBYTES))  # anonymous mappings are page-aligned
        mv = memoryview(buf)
        if args.ceiling != "buffered-fresh":  # preallocated: faulted in before the clock starts
            ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(buf)), 0, len(buf))
        if args.ceiling == "disk-odirect":
            info["cache_method"] = C.drop_caches([path])
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            body = size - size % C.PAGE_NBYTES
        else:
            C.warm_file(path)
            fd = os.open(path, os.O_RDONLY)
            body = size
        info["resident_fraction_before"] = C.resident_fraction(path)
        try:
            t0 = time.perf_counter()
            off = 0
            while off < body:
                n = os.preadv(fd, [mv[off:min(off + chunk, body)]], off)
                if n <= 0:
                    break
                off += n
            if off < size:  # the unaligned tail of an O_DIRECT read, buffered
                fd2 = os.open(path, os.O_RDONLY)
                off += os.preadv(fd2, [mv[off:size]], off)
                os.close(fd2)
            dt = time.perf_counter() - t0
        finally:
            os.close(fd)
        info.update(nbytes=off, seconds=dt, method=f"preadv {chunk // C.MiB} MiB, 1 thread" +
                    {"disk-odirect": ", O_DIRECT", "buffered": ", page cache, prefaulted buffer",
                     "buffered-fresh": ", page cache, fresh (unfaulted) buffer"}[args.ceiling])
        info["resident_fraction_after"] = C.resident_fraction(path)
        del mv
        buf.close()
    elif args.ceiling == "memcpy":
        n = 512 * C.MiB  # well past the caches: DRAM bandwidth
        a = mmap.mmap(-1, n)
        b = mmap.mmap(-1, n)
        pa = ctypes.addressof(ctypes.c_char.from_buffer(a))
        pb = ctypes.addressof(ctypes.c_char.from_buffer(b))
        ctypes.memset(pa, 1, n)
        ctypes.memset(pb, 0, n)
        ctypes.memmove(pb, pa, n)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            ctypes.memmove(pb, pa, n)
            ts.append(time.perf_counter() - t0)
        info.update(nbytes=n, seconds=min(ts), method="libc memcpy, 1 thread, prefaulted buffers, best of 3")
    elif args.ceiling == "h2d":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        n = min(size, 1 * C.GiB)
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        info.update(nbytes=n, seconds=min(ts), method=f"pinned H2D to {torch.cuda.get_device_name()}, best of 3")
    else:
        raise ValueError(f"unknown ceiling {args.ceiling}")
    return info


def fio_disk(path: str, timeout_s: float = 300) -> dict:
    """Sequential O_DIRECT read of ``path`` with fio (io_uring, else libaio), caches dropped first."""
    size = os.path.getsize(path) // C.MiB * C.MiB
    bs_mib = max(1, min(8, size // C.MiB))
    last = ""
    for engine in ("io_uring", "libaio"):
        method = C.drop_caches([path])
        cmd = ["fio", "--name=ceiling", f"--filename={path}", "--readonly", "--rw=read", f"--bs={bs_mib}M",
               f"--ioengine={engine}", "--direct=1", "--iodepth=8", f"--size={size}", "--numjobs=1",
               "--output-format=json"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": "fio timed out"}
        if out.returncode == 0:
            try:
                job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
                nbytes = int(job["io_bytes"])
                seconds = job["runtime"] / 1000.0
                return {"nbytes": nbytes, "seconds": seconds, "cache_method": method,
                        "method": f"fio {engine} O_DIRECT bs={bs_mib}M iodepth=8", "command": " ".join(cmd)}
            except (ValueError, KeyError, IndexError) as e:
                last = f"cannot parse fio output: {e}"
        else:
            last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
            last = f"fio {engine}: {last[0]}"
    return {"error": last}


# --------------------------------------------------------------------------- the parent


def child_argv(python: str, *args: str) -> list[str]:
    return [python, os.path.abspath(__file__), *args]


def python_has(python: str, code: str, timeout_s: float = 120) -> tuple[bool, str]:
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout_s, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if out.returncode == 0:
        return True, out.stdout.strip()
    tail = (out.stderr or out.stdout).strip().splitlines()
    return False, tail[-1] if tail else f"exit {out.returncode}"


PROBES = {
    "flashpack[uring]": None,  # probed through flashpack.backends()
    "safetensors[pread]": ("import inspect; from safetensors.torch import load_file; "
                           "assert 'backend' in inspect.signature(load_file).parameters, "
                           "'this safetensors has no load_file(backend=...)'"),
    "fastsafetensors": "import fastsafetensors",
    "runai-streamer": "import runai_model_streamer",
    "tensorizer": "import tensorizer",
    "fal-flashpack[eager]": "import flashpack; assert not hasattr(flashpack, 'LoadStats'), 'not fal flashpack'; "
                            "print(flashpack.__version__)",
    "fal-flashpack[lazy]": "import flashpack; assert not hasattr(flashpack, 'LoadStats'), 'not fal flashpack'",
}


def plan_loaders(args) -> tuple[list[tuple[Loader, str]], dict[str, str]]:
    """(loader, python) pairs that can run here, and loader -> reason for those skipped."""
    main_py = sys.executable
    peer_py = os.path.abspath(args.peer_python) if args.peer_python else None
    chosen, skipped = [], {}
    wanted = [n.strip() for n in args.loaders.split(",")] if args.loaders else list(loaders())
    table = loaders()
    for name in wanted:
        if name not in table:
            raise SystemExit(f"unknown loader {name!r}; choose from {', '.join(table)}")
        ld = table[name]
        if name == "flashpack[uring]":
            ok, why = python_has(main_py, "import sys; sys.path.insert(0, %r); import flashpack; "
                                          "i = flashpack.backends()['uring']; "
                                          "assert i.available, i.reason" % C.REPO_ROOT)
            if not ok:
                skipped[name] = f"backend unavailable: {why}"
                continue
        candidates = []
        if ld.python == "peer" and peer_py:
            candidates.append(peer_py)
        if not ld.peer_only:
            candidates.append(main_py)
        probe = PROBES.get(name)
        why = "no python to run it"
        for py in dict.fromkeys(candidates):
            ok, why = (True, "") if probe is None else python_has(py, probe)
            if ok:
                chosen.append((ld, py))
                break
        else:
            if ld.peer_only and not peer_py:
                why = "needs --peer-python (fal's flashpack shares our import name)"
            skipped[name] = f"not installed: {why}"
    return chosen, skipped


def prepare_files(size_nbytes: int, workdir: str, formats: set[str], pythons: dict[str, str], timeout_s: float,
                  seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """Write the synthetic state_dict once per format (reused when a file of the same spec exists)."""
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.join(workdir, f"synthetic-{size_nbytes}-s{seed}")
    files: dict[str, str] = {}
    errors: dict[str, str] = {}
    st_path = stem + FORMATS["safetensors"]
    tag_path = stem + ".spec.json"
    spec = {"size_nbytes": size_nbytes, "seed": seed, "v": 1}
    fresh = os.path.exists(tag_path) and json.load(open(tag_path)) == spec
    if not (fresh and os.path.exists(st_path)):
        for suffix in FORMATS.values():
            if os.path.exists(stem + suffix):
                os.unlink(stem + suffix)
        from safetensors.torch import save_file

        sd = C.make_state_dict(size_nbytes, seed)
        save_file(sd, st_path + ".tmp")
        os.replace(st_path + ".tmp", st_path)
        del sd
        gc.collect()
        C.write_json(tag_path, spec)
    files["safetensors"] = st_path
    for fmt in sorted(formats - {"safetensors"}):
        path = stem + FORMATS[fmt]
        if not os.path.exists(path):
            py = pythons.get(fmt, sys.executable)
            r = C.run_child(child_argv(py, "--write", fmt, "--src", st_path, "--file", path), timeout_s=timeout_s)
            if not r.ok:
                errors[fmt] = r.error_line()
                continue
        files[fmt] = path
    os.sync()
    return files, errors


def _ceiling_plan(args, files) -> list[tuple[str, str]]:
    """(ceiling kind, mode it belongs to) for this machine."""
    plan = [("disk-fio" if shutil.which("fio") and not args.no_fio else "disk-odirect", "cold"),
            ("buffered", "warm"), ("buffered-fresh", "warm"), ("memcpy", "warm")]
    if args.gpu:
        plan.append(("h2d", "warm"))
    return plan


def run_ceiling(kind: str, path: str, timeout_s: float) -> dict:
    if kind == "disk-fio":
        r = fio_disk(path, timeout_s)
        if "error" not in r:
            r["peak_rss_nbytes"] = None
            return r
        fallback = run_ceiling("disk-odirect", path, timeout_s)
        fallback["fio_error"] = r["error"]
        fallback["kind"] = "disk-odirect"
        return fallback
    r = C.run_child(child_argv(sys.executable, "--ceiling", kind, "--file", path), timeout_s=timeout_s)
    if not r.ok:
        return {"error": r.error_line()}
    out = dict(r.result)
    out["peak_rss_nbytes"] = r.peak_rss_nbytes
    return out


def summarize(records: list[dict], ceilings: list[dict], payload_nbytes: int, modes: list[str]) -> dict:
    """Per (loader, mode): times, throughput, RSS; ratios to flashpack's best backend and the ceiling."""
    out: dict = {"loaders": {}, "ceilings": {}}
    for c in ceilings:
        key = c["kind"]
        d = out["ceilings"].setdefault(key, {"mode": c["mode"], "gbps": [], "method": c.get("method", "")})
        if "seconds" in c:
            d["gbps"].append(C.gbps(c["nbytes"], c["seconds"]))
    for d in out["ceilings"].values():
        xs = sorted(d["gbps"])
        d["gbps_median"] = C.median(xs)
        d["gib_per_s_median"] = d["gbps_median"] * C.GBPS_BITS_PER_S / 8 / C.GiB if xs else float("nan")
    for rec in records:
        key = f"{rec['loader']}|{rec['mode']}"
        d = out["loaders"].setdefault(key, {"loader": rec["loader"], "mode": rec["mode"], "load_s": [],
                                            "peak_rss_nbytes": [], "errors": [], "memory": rec.get("memory", "")})
        if rec.get("error"):
            d["errors"].append(rec["error"])
            continue
        d["load_s"].extend(rec["load_s"])
        d["peak_rss_nbytes"].append(rec["peak_rss_nbytes"])
        d.setdefault("baseline_rss_nbytes", []).append(rec.get("baseline_rss_nbytes"))
        d["backend"] = rec.get("backend", d.get("backend"))
        d["cache_method"] = rec.get("cache_method", d.get("cache_method"))
    for d in out["loaders"].values():
        s = C.summary(d["load_s"])
        d["load_s_median"], d["load_s_min"], d["load_s_max"] = s["median"], s["min"], s["max"]
        d["gbps_median"] = C.gbps(payload_nbytes, s["median"])
        d["gbps_min"] = C.gbps(payload_nbytes, s["max"])
        d["gbps_max"] = C.gbps(payload_nbytes, s["min"])
        d["gib_per_s_median"] = C.gibps(payload_nbytes, s["median"])
        d["peak_rss_nbytes_median"] = C.median([x for x in d["peak_rss_nbytes"] if x])
        d["baseline_rss_nbytes_median"] = C.median([x for x in d.get("baseline_rss_nbytes", []) if x])
    for mode in modes:
        rows = [d for d in out["loaders"].values() if d["mode"] == mode and d["load_s"]]
        ours = [d for d in rows if d["loader"].startswith("flashpack[") and d["loader"] != "flashpack[mmap]"]
        best = min(ours, key=lambda d: d["load_s_median"]) if ours else None
        ceil_key = [k for k, c in out["ceilings"].items() if c["mode"] == mode and k in ("disk-fio", "disk-odirect",
                                                                                          "buffered")]
        ceil = out["ceilings"][ceil_key[0]]["gbps_median"] if ceil_key else float("nan")
        out.setdefault("best_flashpack", {})[mode] = best["loader"] if best else None
        for d in rows:
            d["ratio_to_flashpack_best"] = d["gbps_median"] / best["gbps_median"] if best else float("nan")
            d["ratio_to_ceiling"] = d["gbps_median"] / ceil if ceil and not math.isnan(ceil) else float("nan")
            d["ceiling"] = ceil_key[0] if ceil_key else None
    return out


def targets(summ: dict, file_nbytes: int) -> list[dict]:
    """Issue 7's targets, judged on this run's medians."""
    L = summ["loaders"]
    anon = {n for n, ld in loaders().items() if ld.private_anon and not ld.ours}
    out = []

    def add(target, ok, detail):
        out.append({"target": target, "pass": bool(ok), "detail": detail})

    for mode in ("cold", "warm"):
        best = summ.get("best_flashpack", {}).get(mode)
        if not best:
            continue
        fp = L[f"{best}|{mode}"]["gbps_median"]
        peers = {d["loader"]: d["gbps_median"] for d in L.values()
                 if d["mode"] == mode and d["load_s"] and not d["loader"].startswith("flashpack")}
        anon_peers = {k: v for k, v in peers.items() if k in anon}
        top_anon = max(anon_peers.items(), key=lambda kv: kv[1], default=(None, float("nan")))
        if mode == "cold":
            disk = next((c["gbps_median"] for k, c in summ["ceilings"].items() if k.startswith("disk")), float("nan"))
            top_peer = max(peers.items(), key=lambda kv: kv[1], default=(None, float("nan")))
            ref = max(disk, top_peer[1]) if not math.isnan(top_peer[1]) else disk
            add("cold >= 0.95x max(disk ceiling, fastest peer)", fp >= 0.95 * ref,
                f"{best} {fp:.2f} Gbps; disk {disk:.2f}, fastest peer {top_peer[0]} {top_peer[1]:.2f} -> {fp / ref:.2f}x")
            need = 1.3
        else:
            buf = summ["ceilings"].get("buffered", {}).get("gbps_median", float("nan"))
            add("warm >= 0.8x buffered read", fp >= 0.8 * buf, f"{best} {fp:.2f} Gbps vs buffered {buf:.2f} -> {fp / buf:.2f}x")
            need = 2.0
        if top_anon[0]:
            add(f"{mode} >= {need}x fastest private-anonymous peer", fp >= need * top_anon[1],
                f"{best} {fp:.2f} Gbps vs {top_anon[0]} {top_anon[1]:.2f} -> {fp / top_anon[1]:.2f}x")
    mm, tl = L.get("flashpack[mmap]|warm"), L.get("torch.load(mmap)|warm")
    if mm and tl and mm["load_s"] and tl["load_s"]:
        ratio = mm["load_s_median"] / tl["load_s_median"]
        add("zero-copy warm within 1.2x torch.load(mmap)", ratio <= 1.2,
            f"{mm['load_s_median']:.3f} s vs {tl['load_s_median']:.3f} s -> {ratio:.2f}x the time")
    rss = [x for d in L.values() if d["loader"].startswith("flashpack[") and d["loader"] != "flashpack[mmap]"
           for x in d["peak_rss_nbytes"] if x]
    if rss:
        add("flashpack peak RSS <= file + 256 MiB", max(rss) <= file_nbytes + 256 * C.MiB,
            f"max {max(rss) / C.MiB:.0f} MiB vs {(file_nbytes + 256 * C.MiB) / C.MiB:.0f} MiB")
    return out


def render_table(summ: dict, modes: list[str], payload_nbytes: int) -> str:
    parts = []
    for mode in modes:
        rows = sorted((d for d in summ["loaders"].values() if d["mode"] == mode),
                      key=lambda d: -(d["gbps_median"] if d["load_s"] else -1))
        body = []
        for d in rows:
            if not d["load_s"]:
                body.append([d["loader"], "error: " + "; ".join(sorted(set(d["errors"])))[:120]] + ["-"] * 9)
                continue
            body.append([d["loader"], C.fmt(d["load_s_median"], 3), f"{C.fmt(d['load_s_min'], 3)}-{C.fmt(d['load_s_max'], 3)}",
                         C.fmt(d["gbps_median"]), C.fmt(d["gib_per_s_median"]),
                         C.fmt(d["gbps_median"] / 8), C.fmt((d["peak_rss_nbytes_median"] or float("nan")) / C.MiB, 0),
                         C.fmt((d["baseline_rss_nbytes_median"] or float("nan")) / C.MiB, 0),
                         C.fmt(d["ratio_to_flashpack_best"]), C.fmt(d["ratio_to_ceiling"])])
        ceil_name = next((d.get("ceiling") for d in rows if d.get("ceiling")), "ceiling")
        parts.append(f"### {mode} ({C.human_nbytes(payload_nbytes)} payload, n={max((len(d['load_s']) for d in rows), default=0)})\n")
        parts.append(C.markdown_table(["loader", "median_s", "min-max_s", "Gbps", "GiB/s", "GB/s", "peak_rss_MiB",
                                       "import_rss_MiB", "x flashpack best", f"x {ceil_name}"], body))
        parts.append("")
    crow = [[k, c["mode"], C.fmt(c["gbps_median"]), C.fmt(c["gib_per_s_median"]), C.fmt(c["gbps_median"] / 8),
             " ".join(C.fmt(x) for x in c["gbps"]), c["method"]] for k, c in summ["ceilings"].items()]
    parts.append("### ceilings\n")
    parts.append(C.markdown_table(["ceiling", "mode", "Gbps", "GiB/s", "GB/s", "samples_Gbps", "method"], crow))
    return "\n".join(parts)


def plot(summ: dict, modes: list[str], env: dict, png_path: str, payload_nbytes: int) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no chart: {e}"
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 6), squeeze=False)
    colors = {"cold": "#1f77b4", "warm": "#ff7f0e"}
    for ax, mode in zip(axes[0], modes):
        rows = sorted((d for d in summ["loaders"].values() if d["mode"] == mode and d["load_s"]),
                      key=lambda d: -d["gbps_median"])
        names = [d["loader"] for d in rows]
        med = [d["gbps_median"] for d in rows]
        err = [[m - d["gbps_min"] for m, d in zip(med, rows)], [d["gbps_max"] - m for m, d in zip(med, rows)]]
        bar_colors = ["#2ca02c" if n.startswith("flashpack") else colors.get(mode, "gray") for n in names]
        ax.bar(range(len(rows)), med, yerr=err, capsize=4, color=bar_colors)
        for i, m in enumerate(med):
            ax.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        for j, (k, c) in enumerate((k, c) for k, c in summ["ceilings"].items() if c["mode"] == mode):
            if not math.isnan(c["gbps_median"]):
                ax.axhline(c["gbps_median"], ls="--", color=f"C{j + 3}", label=f"{k} {c['gbps_median']:.1f} Gbps")
        top = max(med + [c["gbps_median"] for c in summ["ceilings"].values() if c["mode"] == mode
                         and not math.isnan(c["gbps_median"])], default=1)
        if med and max(med) / max(min(med), 1e-9) > 20:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, top * 1.15)
        ax.set_ylabel("Gbps (10^9 bit/s), median; bars: min-max")
        sec = ax.secondary_yaxis("right", functions=(lambda g: g * 1e9 / 8 / C.GiB, lambda x: x * C.GiB * 8 / 1e9))
        sec.set_ylabel("GiB/s")
        ax.set_title(f"{mode}: {C.human_nbytes(payload_nbytes)} to CPU, every byte resident")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("flashpack vs peers — " + C.machine_title(env), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None


def main_parent(args) -> int:
    size = C.parse_nbytes(args.size)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    workdir = args.workdir or C.default_workdir()
    env = C.environment(workdir)
    if args.gpu is None:
        args.gpu = env["gpu"] != "none"
    print(C.format_environment(env, f"perf/compare.py: {C.human_nbytes(size)}, runs={args.runs}, modes={modes}"))
    print(f"- cache dropping: {C.cache_method()}; peer python: {args.peer_python or 'none'}")
    print(f"- command: {' '.join([os.path.relpath(sys.executable, C.REPO_ROOT)] + sys.argv)}\n", flush=True)

    chosen, skipped = plan_loaders(args)
    pythons = {ld.fmt: py for ld, py in chosen if ld.fmt not in ("flashpack", "safetensors", "pt")}
    files, write_errors = prepare_files(size, workdir, {ld.fmt for ld, _ in chosen} | {"flashpack"}, pythons,
                                        args.timeout_s)
    runnable = []
    for ld, py in chosen:
        if ld.fmt in files:
            runnable.append((ld, py))
        else:
            skipped[ld.name] = f"could not write its {ld.fmt} file: {write_errors.get(ld.fmt)}"
    for name, why in skipped.items():
        print(f"- skipped {name}: {why}")
    payload = sum(s.nbytes for s in C.synthetic_spec(size))
    print(f"- payload {payload} bytes ({C.human_nbytes(payload)}), "
          f"files: " + ", ".join(f"{k} {os.path.getsize(v)} B" for k, v in files.items()) + "\n", flush=True)

    records: list[dict] = []
    ceilings: list[dict] = []
    cplan = _ceiling_plan(args, files)
    for r in range(args.runs):
        for mode in modes:
            for kind, cmode in cplan:
                if cmode != mode:
                    continue
                c = run_ceiling(kind, files["flashpack"], args.timeout_s)
                c.setdefault("kind", kind)
                c.update(mode=mode, run=r)
                ceilings.append(c)
                print(f"run {r} {mode:4s} ceiling {c['kind']:13s} " +
                      (f"{C.gbps(c['nbytes'], c['seconds']):7.2f} Gbps  ({c['seconds']:.3f} s)" if "seconds" in c
                       else f"error: {c.get('error')}"), flush=True)
            for ld, py in runnable:
                argv = child_argv(py, "--child", ld.name, "--file", files[ld.fmt], "--mode", mode)
                res = C.run_child(argv, timeout_s=args.timeout_s)
                rec = {"loader": ld.name, "mode": mode, "run": r, "python": py, "memory": ld.memory,
                       "peak_rss_nbytes": res.peak_rss_nbytes, "child_wall_s": res.wall_s}
                if res.ok:
                    rec.update({k: v for k, v in res.result.items() if k not in ("loader", "mode")})
                    print(f"run {r} {mode:4s} {ld.name:24s} {res.result['load_s'][0]:7.3f} s "
                          f"{C.gbps(payload, res.result['load_s'][0]):7.2f} Gbps  rss {res.peak_rss_nbytes / C.MiB:6.0f} MiB",
                          flush=True)
                else:
                    rec["error"] = res.error_line()
                    print(f"run {r} {mode:4s} {ld.name:24s} error: {rec['error']}", flush=True)
                    if args.verbose:
                        print(res.stderr[-2000:])
                records.append(rec)
    summ = summarize(records, ceilings, payload, modes)
    table = render_table(summ, modes, payload)
    print("\n" + table + "\n")
    verdicts = targets(summ, os.path.getsize(files["flashpack"]))
    print("### targets (issue 7)\n")
    print(C.markdown_table(["target", "verdict", "detail"],
                           [[v["target"], "PASS" if v["pass"] else "MISS", v["detail"]] for v in verdicts]) + "\n")
    name = args.name or f"compare-{C.human_nbytes(size).replace(' ', '')}"
    json_path = os.path.join(args.out_dir, name + ".json")
    png_path = os.path.join(args.out_dir, name + ".png")
    C.write_json(json_path, {"script": "perf/compare.py", "argv": sys.argv, "environment": env,
                             "size_nbytes": size, "payload_nbytes": payload, "runs": args.runs, "modes": modes,
                             "cache_method": C.cache_method(), "skipped": skipped,
                             "files": {k: {"path": v, "nbytes": os.path.getsize(v)} for k, v in files.items()},
                             "samples": records, "ceiling_samples": ceilings, "summary": summ,
                             "targets": verdicts, "table_markdown": table})
    why = plot(summ, modes, env, png_path, payload)
    print(f"json: {json_path}")
    print(f"png: {png_path}" if why is None else why)
    if args.clean:
        for p in files.values():
            os.unlink(p)
    failed = [d for d in summ["loaders"].values() if d["loader"].startswith("flashpack") and not d["load_s"]]
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2G", help="synthetic state_dict size (bytes, or K/M/G), default 2G")
    p.add_argument("--runs", type=int, default=5, help="rounds; each round runs every loader once per mode")
    p.add_argument("--modes", default="cold,warm")
    p.add_argument("--loaders", default="", help="comma-separated subset (default: all that can run)")
    p.add_argument("--peer-python", default=None, help="python of .venv-peers (fal flashpack and other peers)")
    p.add_argument("--workdir", default=None, help="where the big files go (default perf/out or $FLASHPACK_PERF_DIR)")
    p.add_argument("--out-dir", default=os.path.join(C.PERF_DIR, "results"), help="JSON and PNG go here")
    p.add_argument("--name", default=None, help="basename of the JSON/PNG (default compare-<size>)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per child process")
    p.add_argument("--no-fio", action="store_true", help="use the plain O_DIRECT read as the disk ceiling")
    p.add_argument("--gpu", action="store_true", default=None, help="measure pinned H2D (default: if a GPU exists)")
    p.add_argument("--clean", action="store_true", help="delete the benchmark files afterwards")
    p.add_argument("--verbose", action="store_true")
    # child modes (internal)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--write", help=argparse.SUPPRESS)
    p.add_argument("--ceiling", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="cold", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return C.child_guard(lambda: child_load(args))
    if args.write:
        return C.child_guard(lambda: child_write(args))
    if args.ceiling:
        return C.child_guard(lambda: child_ceiling(args))
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
