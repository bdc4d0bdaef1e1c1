"""Shared pieces of the perf scripts: environment header, synthetic state_dicts, cache dropping, units,
a subprocess runner that reports per-child peak RSS, and summaries.

Units (STYLE.md habit 6): ``Gbps`` is 10^9 bits per second (:data:`GBPS_BITS_PER_S`, defined here and
only here); ``GiB/s`` is 2^30 bytes per second. Every script reports both side by side. Times are in
seconds (``*_s``), sizes in bytes (``*_nbytes``).

This module never imports ``flashpack`` at import time, so a child running in another virtualenv
(fal's flashpack in ``.venv-peers``) can import it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE_NBYTES = 4096

#: One Gbps: 10^9 bits per second.
GBPS_BITS_PER_S = 1e9

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PERF_DIR)
#: A child prints exactly one line starting with this, followed by JSON.
RESULT_PREFIX = "PERF-RESULT "


# --------------------------------------------------------------------------- units


def gbps(nbytes: int | float, seconds: float) -> float:
    """Throughput in Gbps (10^9 bit/s); ``nan`` for a non-positive time."""
    return nbytes * 8 / seconds / GBPS_BITS_PER_S if seconds > 0 else float("nan")


def gibps(nbytes: int | float, seconds: float) -> float:
    """Throughput in GiB/s (2^30 byte/s); ``nan`` for a non-positive time."""
    return nbytes / seconds / GiB if seconds > 0 else float("nan")


def gb_per_s(nbytes: int | float, seconds: float) -> float:
    """Throughput in GB/s (10^9 byte/s), the unit the issues quote; ``gbps / 8``."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def parse_nbytes(text: str) -> int:
    """``"4M"``, ``"2G"``, ``"16MiB"``, ``"123"`` -> bytes (powers of 1024)."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    return int(float(t) * mult)


def human_nbytes(nbytes: int | float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(nbytes) >= size:
            v = nbytes / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{int(nbytes)} B"


# --------------------------------------------------------------------------- environment


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_nbytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def disk_of(path: str) -> dict[str, Any]:
    """The block device holding ``path``: name, model, rotational flag, logical block size, filesystem."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    info: dict[str, Any] = {"path": path, "device": f"{major}:{minor}"}
    sysdir = f"/sys/dev/block/{major}:{minor}"
    if os.path.exists(sysdir):
        real = os.path.realpath(sysdir)
        name = os.path.basename(real)
        disk_dir = real if os.path.exists(os.path.join(real, "queue")) else os.path.dirname(real)
        info["device"] = name
        model = _read(os.path.join(disk_dir, "device", "model")) or _read(os.path.join(disk_dir, "device", "vendor"))
        if model == "0x1af4":
            model = "virtio"
        info["model"] = model or os.path.basename(disk_dir)
        info["rotational"] = _read(os.path.join(disk_dir, "queue", "rotational")) == "1"
        lbs = _read(os.path.join(disk_dir, "queue", "logical_block_size"))
        info["logical_block_nbytes"] = int(lbs) if lbs.isdigit() else None
    best = ""
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) >= len(best):
            best = parts[1]
            info["filesystem"] = parts[2]
            info["mount"] = parts[1]
    return info


def _gpu() -> str:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return "; ".join(line.strip() for line in out.stdout.strip().splitlines())
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - the header reports what it can
        pass
    return "none"


def environment(data_path: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, kernel, disk under ``data_path``, GPU, versions."""
    env: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_nbytes": _ram_nbytes(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gpu": _gpu(),
        "root": os.geteuid() == 0,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if data_path:
        env["disk"] = disk_of(data_path)
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    for mod in ("safetensors", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        sys.path.insert(0, REPO_ROOT)
        import flashpack

        env["flashpack"] = flashpack.__version__
        env["flashpack_backends"] = {n: (i.reason or "available") if not i.available else "available"
                                     for n, i in flashpack.backends().items()}
    except Exception as e:  # noqa: BLE001
        env["flashpack"] = f"unavailable: {e}"
    finally:
        if sys.path and sys.path[0] == REPO_ROOT:
            sys.path.pop(0)
    env["fio"] = shutil.which("fio") or "not installed"
    try:
        env["git_commit"] = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        pass
    return env


def disk_words(env: dict[str, Any]) -> str:
    d = env.get("disk") or {}
    if not d:
        return "?"
    kind = "rotational=1" if d.get("rotational") else "rotational=0"
    return f"{d.get('model', '?')} {d.get('device', '')} ({d.get('filesystem', '?')}, {kind})".strip()


def machine_title(env: dict[str, Any]) -> str:
    """One line for chart titles: CPU, cores, RAM, kernel, disk, GPU."""
    return (f"{env['cpu_model']}, {env['cores']} cores, {env['ram_nbytes'] / GiB:.0f} GiB RAM, "
            f"Linux {env['kernel']}, disk {disk_words(env)}, GPU {env['gpu']}")


def format_environment(env: dict[str, Any], title: str = "") -> str:
    """The environment header every script prints first (markdown-friendly)."""
    lines = [f"# {title}" if title else "# environment", ""]
    lines.append(f"- CPU: {env['cpu_model']}, {env['cores']} cores; RAM {env['ram_nbytes'] / GiB:.1f} GiB; "
                 f"kernel {env['kernel']}; root: {env['root']}")
    lines.append(f"- disk: {disk_words(env)}" + (f", logical block {env['disk'].get('logical_block_nbytes')} B"
                                                  if env.get("disk") else ""))
    lines.append(f"- GPU: {env['gpu']}")
    lines.append(f"- python {env['python']}, torch {env.get('torch', '?')} ({env.get('torch_threads', '?')} threads), "
                 f"safetensors {env.get('safetensors', '?')}, flashpack {env.get('flashpack', '?')}, "
                 f"fio: {env['fio']}; git {env.get('git_commit', '?')}")
    if "flashpack_backends" in env:
        lines.append("- flashpack backends: " + ", ".join(f"{k}: {v}" for k, v in env["flashpack_backends"].items()))
    lines.append(f"- units: Gbps = 10^9 bit/s, GiB/s = 2^30 B/s, GB/s = 10^9 B/s; measured {env['time_utc']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- synthetic state_dicts


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16", "float32", "int64", "bool"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * {"bfloat16": 2, "float32": 4, "int64": 8, "bool": 1}[self.dtype]


def _hidden_for(nbytes: int) -> int:
    for limit, h in ((8 * MiB, 128), (64 * MiB, 256), (512 * MiB, 1024), (4 * GiB, 2048)):
        if nbytes <= limit:
            return h
    return 4096


def synthetic_spec(nbytes: int) -> list[TensorSpec]:
    """Tensor names, shapes and dtypes of a transformer-like state_dict of about ``nbytes`` bytes.

    ~90% bfloat16 (embedding, attention and MLP projections), ~9% float32 (norms, an fp32 ``lm_head``),
    the rest int64 (position ids) and bool (a causal mask). The total is within 1% of ``nbytes`` for
    ``nbytes >= 1 MiB``.
    """
    h = _hidden_for(nbytes)
    inter = max(64, (8 * h // 3 + 63) // 64 * 64)
    specs: list[TensorSpec] = []
    bf16_left = int(nbytes * 0.90)
    fp32_left = int(nbytes * 0.09)
    vocab = max(16, min(32000, bf16_left // 10 // (2 * h)))
    specs.append(TensorSpec("model.embed_tokens.weight", (vocab, h), "bfloat16"))
    bf16_left -= vocab * h * 2
    layer = 0
    while bf16_left >= 2 * h and layer < 10_000:
        p = f"model.layers.{layer}."
        for name, rows, cols in (("self_attn.q_proj.weight", h, h), ("self_attn.k_proj.weight", h, h),
                                 ("self_attn.v_proj.weight", h, h), ("self_attn.o_proj.weight", h, h),
                                 ("mlp.gate_proj.weight", inter, h), ("mlp.up_proj.weight", inter, h),
                                 ("mlp.down_proj.weight", h, inter)):
            r = min(rows, bf16_left // (2 * cols))
            if r <= 0:
                break
            specs.append(TensorSpec(p + name, (r, cols), "bfloat16"))
            bf16_left -= r * cols * 2
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            if fp32_left >= 4 * h:
                specs.append(TensorSpec(p + norm, (h,), "float32"))
                fp32_left -= 4 * h
        layer += 1
    specs.append(TensorSpec("model.norm.weight", (h,), "float32"))
    fp32_left -= 4 * h
    if fp32_left >= 4 * h:
        specs.append(TensorSpec("lm_head.weight", (fp32_left // (4 * h), h), "float32"))
    int64_nbytes = max(8, int(nbytes * 0.006))
    specs.append(TensorSpec("model.rotary_emb.position_ids", (1, int64_nbytes // 8), "int64"))
    rest = nbytes - sum(s.nbytes for s in specs)
    side = max(1, math.isqrt(max(1, rest)))
    specs.append(TensorSpec("model.causal_mask", (side, side), "bool"))
    return specs


def make_state_dict(nbytes: int, seed: int = 0) -> dict:
    """A synthetic state_dict of about ``nbytes`` bytes (see :func:`synthetic_spec`), CPU, contiguous.

    bf16 values are random with the top exponent bit cleared (finite: no NaN/Inf, so ``torch.equal``
    works); fp32 values are normal; int64 is ``arange``; bool is random. Deterministic for a ``seed``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in synthetic_spec(nbytes):
        if s.dtype == "bfloat16":
            t = torch.randint(-(2 ** 15), 2 ** 15, s.shape, dtype=torch.int16, generator=g)
            t.bitwise_and_(~0x4000)
            out[s.name] = t.view(torch.bfloat16)
        elif s.dtype == "float32":
            out[s.name] = torch.randn(s.shape, dtype=torch.float32, generator=g)
        elif s.dtype == "int64":
            out[s.name] = torch.arange(math.prod(s.shape), dtype=torch.int64).reshape(s.shape)
        else:
            out[s.name] = torch.randint(0, 2, s.shape, dtype=torch.uint8, generator=g).bool()
    return out


def state_dict_nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def dtype_mix(sd: dict) -> dict[str, float]:
    """Share of bytes per dtype, e.g. ``{"bfloat16": 0.9, ...}``."""
    total = state_dict_nbytes(sd) or 1
    mix: dict[str, float] = {}
    for t in sd.values():
        k = str(t.dtype).removeprefix("torch.")
        mix[k] = mix.get(k, 0.0) + t.numel() * t.element_size() / total
    return mix


def touch(sd: dict) -> int:
    """Fault in every page of every tensor: sum one byte per 4096 of each tensor's bytes.

    For lazy loaders (mmap) this is what turns "returned" into "every byte resident". Returns the sum
    (so the work cannot be optimised away) as an int.
    """
    import torch

    total = 0
    for t in sd.values():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        b = t.detach().reshape(-1).view(torch.uint8) if t.is_contiguous() else t.detach().contiguous().reshape(-1).view(torch.uint8)
        total += int(b[::PAGE_NBYTES].sum(dtype=torch.int64)) + int(b[-1])
    return total


# --------------------------------------------------------------------------- cache control


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches(paths: Iterable[str] = ()) -> str:
    """Evict file pages from the page cache; returns the method used.

    Root: ``sync; echo 3 > /proc/sys/vm/drop_caches`` (the whole cache), ``"drop_caches"``. Otherwise
    ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each of ``paths``, ``"fadvise"`` (clean pages only; a page
    another process maps may stay).
    """
    os.sync()
    if can_drop_caches():
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def cache_method() -> str:
    return "drop_caches" if can_drop_caches() else "fadvise"


def warm_file(path: str, chunk_nbytes: int = 16 * MiB) -> None:
    """Read a file through the page cache so that it is resident (buffered, into one reused buffer)."""
    buf = bytearray(chunk_nbytes)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            n = os.preadv(fd, [mv], off)
            if n <= 0:
                break
            off += n
    finally:
        os.close(fd)


def resident_fraction(path: str) -> float:
    """Fraction of a file's pages in the page cache now (mincore(2) on a read-only mapping, which
    faults nothing), or nan if unknown."""
    import ctypes
    import ctypes.util
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        try:
            npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * npages)()
            if libc.mincore(addr, size, vec) != 0:
                return float("nan")
            import numpy as np

            return float((np.frombuffer(vec, dtype=np.uint8) & 1).mean())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- subprocesses


@dataclass
class ChildResult:
    """One child process: what it printed as its result, its exit status, its own wall time and peak RSS."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_nbytes: int
    result: dict[str, Any] | None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None and not self.result.get("error")

    def error_line(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.result and self.result.get("error"):
            return str(self.result["error"])
        tail = (self.stderr or self.stdout).strip().splitlines()
        return f"exit {self.returncode}: " + (tail[-1] if tail else "no output")


def run_child(argv: Sequence[str], timeout_s: float = 600, env: dict[str, str] | None = None,
              cwd: str | None = None) -> ChildResult:
    """Run ``argv`` and return its result line, wall time and peak RSS.

    The peak RSS is the child's own ``ru_maxrss`` from ``wait4(2)`` (per child, unlike
    ``RUSAGE_CHILDREN``, which keeps the maximum over every child ever waited for). The child reports
    its result by printing one line ``PERF-RESULT {json}`` (see :func:`emit_result`).
    """
    out_path = f"/tmp/perf-child-{os.getpid()}-{threading.get_ident()}.out"
    err_path = out_path[:-4] + ".err"
    with open(out_path, "w+") as out, open(err_path, "w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        timed_out = threading.Event()

        def _kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

        timer = threading.Timer(timeout_s, _kill)
        timer.start()
        try:
            while True:
                try:
                    _, status, ru = os.wait4(proc.pid, 0)
                    break
                except InterruptedError:
                    continue
        finally:
            timer.cancel()
        wall_s = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for p in (out_path, err_path):
        try:
            os.unlink(p)
        except OSError:
            pass
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    return ChildResult(list(argv), proc.returncode, wall_s, ru.ru_maxrss * 1024, result, stdout[-4000:],
                       stderr[-4000:], timed_out.is_set())


def current_rss_nbytes() -> int:
    """This process's resident set size now (VmRSS), in bytes; 0 if unknown."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def emit_result(result: dict[str, Any]) -> None:
    """Print the child's result line (with its own peak RSS so far) and flush."""
    result = dict(result)
    result.setdefault("self_peak_rss_nbytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def child_guard(fn: Callable[[], dict[str, Any]]) -> int:
    """Run a child's body; any exception becomes ``{"error": ...}`` in its result line and exit 1."""
    try:
        emit_result(fn())
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        emit_result({"error": f"{type(e).__name__}: {e}"[:500]})
        return 1


# --------------------------------------------------------------------------- summaries


def summary(samples: Sequence[float]) -> dict[str, float]:
    """median, min, max, n of a list of seconds (empty -> nan)."""
    xs = [x for x in samples if x is not None and not math.isnan(x)]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def median(xs: Sequence[float]) -> float:
    return summary(xs)["median"]


def fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def default_workdir() -> str:
    """Where big benchmark files go: ``$FLASHPACK_PERF_DIR`` or ``perf/out`` (git-ignored)."""
    return os.environ.get("FLASHPACK_PERF_DIR") or os.path.join(PERF_DIR, "out")


__all__ = [n for n in dir() if not n.startswith("_")]
