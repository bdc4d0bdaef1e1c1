"""What every perf script shares: units, byte sizes, page-cache control, the filesystem under a path,
synthetic state_dicts, one load per fresh subprocess, summaries, and the environment header.

Units (STYLE.md habit 6): ``Gbps`` is 10^9 bits per second (:func:`gbps`); ``GiB/s`` is 2^30 bytes per
second (:func:`gibps`). Scripts report both side by side. Sizes are parsed by
``flashpack.settings.parse_nbytes`` (``4096``, ``64K``, ``16M``, ``2G``: powers of 1024); times are in
seconds (``*_s``), sizes in bytes (``*_nbytes``).

Cache states, the same in every script:

- ``cold``: the file's pages evicted (:func:`evict`) just before the load;
- ``restart``: nothing done in between: the page cache is what the same loader's own earlier load, in an
  earlier process, left behind (an O_DIRECT loader leaves nothing; a buffered or mmap one the whole file);
- ``warm``: after a plain buffered read of the whole file (:func:`warm_file`): every page cached.

Importing this module imports ``flashpack.settings`` and ``flashpack.io.pagecache`` (numpy only, no
torch) from this repository: ``REPO_ROOT`` is put first on ``sys.path``. A child that must import
fal's flashpack instead calls :func:`forget_our_flashpack` first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PERF_DIR)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from flashpack.io.pagecache import drop_from_cache, resident_pages  # noqa: E402
from flashpack.settings import GiB, MiB, PAGE_NBYTES, parse_nbytes  # noqa: E402

#: A child prints exactly one line starting with this, followed by JSON.
RESULT_PREFIX = "PERF-RESULT "
__all__ = ["GiB", "MiB", "PAGE_NBYTES", "parse_nbytes"]  # re-exported; the rest is added at the end


def forget_our_flashpack() -> None:
    """Let ``import flashpack`` find another installation (fal's, in ``.venv-peers``): drop this
    repository from ``sys.path`` and its modules from ``sys.modules`` (functions imported above keep working)."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != REPO_ROOT]
    for name in [m for m in sys.modules if m == "flashpack" or m.startswith("flashpack.")]:
        del sys.modules[name]


# --------------------------------------------------------------------------- units


def gbps(nbytes: float, seconds: float) -> float:
    """Throughput in Gbps (10^9 bit/s); ``nan`` for a non-positive time."""
    return nbytes * 8 / seconds / 1e9 if seconds and seconds > 0 else float("nan")


def gibps(nbytes: float, seconds: float) -> float:
    """Throughput in GiB/s (2^30 byte/s); ``nan`` for a non-positive time."""
    return nbytes / seconds / GiB if seconds and seconds > 0 else float("nan")


def human_nbytes(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(nbytes) >= size:
            v = nbytes / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{int(nbytes)} B"


def speed(nbytes: float, seconds: float) -> str:
    """``"12.34 Gbps 1.437 GiB/s"``: both units, side by side."""
    return f"{gbps(nbytes, seconds):.2f} Gbps {gibps(nbytes, seconds):.3f} GiB/s"


# --------------------------------------------------------------------------- summaries and output


def summary(samples: Iterable[float | None]) -> dict[str, float]:
    """median, min, max, n of the samples that are numbers (none -> nan, n=0)."""
    xs = [x for x in samples if x is not None and not math.isnan(x)]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def median(xs: Iterable[float | None]) -> float:
    return summary(xs)["median"]


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def verdict_table(verdicts: list[dict]) -> str:
    """Targets as a table: ``pass`` True -> PASS, False -> MISS, None -> info."""
    return markdown_table(["target", "verdict", "detail"], [[v["target"], {True: "PASS", False: "MISS", None: "info"}
                                                              [v["pass"]], v["detail"]] for v in verdicts])


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def default_workdir() -> str:
    """Where big benchmark files go: ``$FLASHPACK_PERF_DIR`` or ``perf/out`` (git-ignored)."""
    return os.environ.get("FLASHPACK_PERF_DIR") or os.path.join(PERF_DIR, "out")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or the reason there is none (a str)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no chart: {e}"
    return plt


# --------------------------------------------------------------------------- environment


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_field(path: str, key: str) -> str:
    return next((ln.split(":", 1)[1].strip() for ln in _read(path).splitlines() if ln.startswith(key)), "")


def filesystem_of(path: str) -> dict[str, Any]:
    """The mount holding ``path`` (filesystem type, source, mount point) and its block device (name, model,
    rotational flag, logical block size) when it has one."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.stat(path)
    info: dict[str, Any] = {"path": path, "device": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"}
    sysdir = f"/sys/dev/block/{info['device']}"
    if os.path.exists(sysdir):
        real = os.path.realpath(sysdir)
        disk = real if os.path.exists(os.path.join(real, "queue")) else os.path.dirname(real)
        model = _read(os.path.join(disk, "device", "model")) or _read(os.path.join(disk, "device", "vendor"))
        lbs = _read(os.path.join(disk, "queue", "logical_block_size"))
        info.update(device=os.path.basename(real), model={"0x1af4": "virtio"}.get(model, model or os.path.basename(disk)),
                    rotational=_read(os.path.join(disk, "queue", "rotational")) == "1",
                    logical_block_nbytes=int(lbs) if lbs.isdigit() else None)
    best = ""
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and (path + "/").startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best):
            best = parts[1]
            info.update(filesystem=parts[2], source=parts[0], mount=parts[1])
    return info


def filesystem_words(info: dict[str, Any]) -> str:
    words = f"{info.get('filesystem', '?')} at {info.get('mount', '?')}, device {info.get('model', '')} " \
            f"{info.get('device', '?')}, rotational={int(bool(info.get('rotational')))}"
    if info.get("filesystem") in ("tmpfs", "ramfs", "overlay"):
        words += " (WARNING: cold may not measure a disk here: tmpfs cannot be evicted, overlay may refuse O_DIRECT)"
    return words


def _gpu() -> str:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return "; ".join(line.strip() for line in out.stdout.strip().splitlines())
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "none"


def environment(data_path: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, kernel, filesystem under ``data_path``, GPU,
    versions, flashpack's backends, the git commit."""
    import torch

    import flashpack

    env: dict[str, Any] = {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.machine(),
        "cores": os.cpu_count(), "ram_nbytes": int((_proc_field("/proc/meminfo", "MemTotal").split() or [0])[0]) * 1024,
        "kernel": platform.release(), "python": platform.python_version(), "gpu": _gpu(), "root": os.geteuid() == 0,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "flashpack": flashpack.__version__,
        "flashpack_backends": {n: "available" if i.available else (i.reason or "unavailable")
                               for n, i in flashpack.backends().items()},
        "fio": shutil.which("fio") or "not installed", "cache_eviction": eviction_method(),
    }
    from flashpack.tools.doctor import free_page_reporting, proactive_reclaim

    env["free_page_reporting"] = free_page_reporting()  # why cold loads vary with --cold-settle-s (evict)
    env["proactive_reclaim"] = proactive_reclaim()  # why a restart after a pause is partly cold
    if data_path:
        env["disk"] = filesystem_of(data_path)
    for mod in ("safetensors", "numpy", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    git = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    env["git_commit"] = git.stdout.strip() or "?"
    return env


def machine_title(env: dict[str, Any]) -> str:
    """One line for chart titles: CPU, cores, RAM, kernel, filesystem, GPU."""
    d = env.get("disk") or {}
    return (f"{env['cpu_model']}, {env['cores']} cores, {env['ram_nbytes'] / GiB:.0f} GiB RAM, Linux {env['kernel']}, "
            f"{d.get('filesystem', '?')} on {d.get('model', '?')}, GPU {env['gpu']}")


def _first_words(row: str | None) -> str:
    """A doctor row up to its explanation: ``"on (DAMON kdamond 0, ...)"`` without what follows the colon."""
    return "?" if not row else row.split("):", 1)[0] + (")" if "):" in row else "")


def header(env: dict[str, Any], title: str, *extra: str) -> str:
    """The environment header every script prints first (markdown), then ``extra`` lines and the command."""
    lines = [f"# {title}", "",
             f"- CPU: {env['cpu_model']}, cpu count {env['cores']}; RAM {env['ram_nbytes'] / GiB:.1f} GiB; "
             f"kernel {env['kernel']}; root: {env['root']}",
             f"- disk: {filesystem_words(env['disk'])}" if env.get("disk") else "- disk: ?",
             f"- GPU: {env['gpu']}",
             f"- python {env['python']}, torch {env['torch']} ({env['torch_threads']} threads), safetensors "
             f"{env.get('safetensors', '?')}, flashpack {env['flashpack']}, fio: {env['fio']}; git {env['git_commit']}",
             "- flashpack backends: " + ", ".join(f"{k}: {v}" for k, v in env["flashpack_backends"].items()),
             f"- cache eviction: {env['cache_eviction']}",
             f"- host memory: free page reporting {_first_words(env.get('free_page_reporting'))}; proactive reclaim "
             f"{_first_words(env.get('proactive_reclaim'))} (python -m flashpack.tools.doctor says more)",
             f"- units: Gbps = 10^9 bit/s, GiB/s = 2^30 B/s; measured {env['time_utc']}",
             *(f"- {x}" for x in extra),
             f"- command: {' '.join([os.path.relpath(sys.executable, REPO_ROOT)] + sys.argv)}", ""]
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


def synthetic_spec(nbytes: int) -> list[TensorSpec]:
    """Names, shapes and dtypes of a transformer-like state_dict of about ``nbytes`` bytes (within 1% for
    ``nbytes >= 1 MiB``): ~90% bfloat16 (embedding, attention and MLP projections), ~9% float32 (norms, an
    fp32 ``lm_head``), the rest int64 (position ids) and bool (a causal mask)."""
    h = next((h for limit, h in ((8 * MiB, 128), (64 * MiB, 256), (512 * MiB, 1024), (4 * GiB, 2048))
              if nbytes <= limit), 4096)
    inter = max(64, (8 * h // 3 + 63) // 64 * 64)
    bf16_left, fp32_left = int(nbytes * 0.90), int(nbytes * 0.09)
    vocab = max(16, min(32000, bf16_left // 10 // (2 * h)))
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), "bfloat16")]
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
    specs.append(TensorSpec("model.rotary_emb.position_ids", (1, max(8, int(nbytes * 0.006)) // 8), "int64"))
    side = max(1, math.isqrt(max(1, nbytes - sum(s.nbytes for s in specs))))
    specs.append(TensorSpec("model.causal_mask", (side, side), "bool"))
    return specs


def make_state_dict(nbytes: int, seed: int = 0) -> dict:
    """A synthetic state_dict of about ``nbytes`` bytes (:func:`synthetic_spec`), CPU, contiguous, one storage
    per tensor. bf16 values are finite (the top exponent bit cleared, so ``torch.equal`` works) and are
    copied from one random 16 MiB block at a different offset per tensor (fast at many GiB); fp32 values
    are normal, int64 is ``arange``, bool is random. Deterministic for a ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    block = torch.randint(-(2 ** 15), 2 ** 15, (8 * MiB,), dtype=torch.int16, generator=g).bitwise_and_(~0x4000)
    block = torch.cat([block, block])
    out, shift = {}, 0
    for s in synthetic_spec(nbytes):
        n = math.prod(s.shape)
        if s.dtype == "bfloat16":
            t = torch.empty(n, dtype=torch.int16)
            for o in range(0, n, 8 * MiB):
                m = min(8 * MiB, n - o)
                t[o:o + m] = block[shift:shift + m]
            shift = (shift + 7919) % (8 * MiB)
            out[s.name] = t.view(torch.bfloat16).reshape(s.shape)
        elif s.dtype == "float32":
            out[s.name] = torch.randn(s.shape, dtype=torch.float32, generator=g)
        elif s.dtype == "int64":
            out[s.name] = torch.arange(n, dtype=torch.int64).reshape(s.shape)
        else:
            out[s.name] = torch.randint(0, 2, s.shape, dtype=torch.uint8, generator=g).bool()
    return out


def state_dict_nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def touch(tensors: Iterable) -> int:
    """Fault in every page of every tensor (one byte per 4096 read, and the last byte of each range read), so that a
    lazy (mmap) load has really read its bytes when the clock stops; meta tensors are skipped. Returns the sum, so
    nothing is optimised away.

    Contiguous CPU tensors are grouped by the storage they view: the byte ranges of one storage's tensors are sorted
    and merged where less than a page apart, and each merged range is read with one strided sum. The pages read are
    the same as tensor by tensor (plus at most the bytes of a gap shorter than a page); the cost is one torch call
    per range instead of five per tensor (~25 us each: 5 ms for BERT's 200 tensors, a sixth of its load), which
    would otherwise be counted as load time. Same rule for every loader."""
    import torch

    total = 0
    by_storage: dict[tuple[int, int], tuple] = {}
    for t in tensors.values() if isinstance(tensors, dict) else tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
            continue
        if t.device.type != "cpu" or not t.is_contiguous():
            total += _read_pages(t.detach().contiguous().reshape(-1).view(torch.uint8))
            continue
        storage = t.untyped_storage()
        lo = t.storage_offset() * t.element_size()
        # by address and size: two storages may start at one address (frombuffer over part of a buffer and over all)
        by_storage.setdefault((storage.data_ptr(), storage.nbytes()), (storage, []))[1].append(
            (lo, lo + t.numel() * t.element_size()))
    for storage, spans in by_storage.values():
        whole = torch.empty(0, dtype=torch.uint8).set_(storage)
        spans.sort()
        merged = [list(spans[0])]
        for lo, hi in spans[1:]:
            if lo - merged[-1][1] < PAGE_NBYTES:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        total += sum(_read_pages(whole[lo:hi]) for lo, hi in merged)
    return total


def _read_pages(b) -> int:
    """Read one byte of each page of the 1-D uint8 tensor ``b`` (every 4096th from its first) and its last byte."""
    import torch

    return int(b[::PAGE_NBYTES].sum(dtype=torch.int64)) + int(b[-1])


# --------------------------------------------------------------------------- page cache


def can_drop_caches() -> bool:
    """Root, and ``$FLASHPACK_PERF_FADVISE_ONLY`` unset (the smoke tests set it: a shared machine keeps its cache)."""
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK) \
        and not os.environ.get("FLASHPACK_PERF_FADVISE_ONLY")


def eviction_method() -> str:
    return "sync; drop_caches (root) + posix_fadvise DONTNEED per file" if can_drop_caches() \
        else "sync; posix_fadvise DONTNEED per file (clean pages only; a page another process maps may stay)"


def evict(paths: Iterable[str], whole_cache: bool = True, settle_s: float = 0.0) -> str:
    """The one way the perf scripts evict files from the page cache: ``sync``; as root (and ``whole_cache``)
    ``echo 3 > /proc/sys/vm/drop_caches``; then ``posix_fadvise(DONTNEED)`` on each file; then ``settle_s``
    seconds of sleep. Returns what ran.

    Why ``settle_s``: on a VM whose balloon device reports free pages to the hypervisor (virtio-balloon
    ``VIRTIO_BALLOON_F_REPORTING``; mm/page_reporting.c reports free blocks of ``page_reporting_order`` and up about
    2 s after they were freed), the memory the eviction freed is handed back to the host once it has been free that
    long, and whatever the next load allocates from it (page cache, destination) is faulted in again by the host on
    first touch. A load that starts at once gets memory still backed by the host; one that starts later, as a server
    after a quiet spell does, does not. ``--cold-settle-s 8`` measures the second case
    (``flashpack doctor`` says whether this machine reports free pages)."""
    os.sync()
    how = "fadvise"
    if whole_cache and can_drop_caches():
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            how = "drop_caches+fadvise"
        except OSError:
            pass
    for p in paths:
        drop_from_cache(p)
    if settle_s > 0:
        time.sleep(settle_s)
        how += f"+settle {settle_s:g} s"
    return how


def warm_file(path: str, chunk_nbytes: int = 16 * MiB) -> None:
    """Read a file through the page cache (buffered, into one reused buffer) so that it is resident."""
    mv = memoryview(bytearray(chunk_nbytes))
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass


def resident_fraction(path: str) -> float:
    """Fraction of a file's pages in the page cache now (mincore(2), faults nothing); nan if unknown."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = resident_pages(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return float("nan") if pages is None else float(pages.mean()) if len(pages) else 1.0


# --------------------------------------------------------------------------- one load per fresh subprocess


def peak_rss_nbytes() -> int:
    """This process's own peak resident set size so far (``VmHWM`` of /proc/self/status), in bytes; 0 if unknown.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``, nor what ``wait4(2)`` returns for a child: on Linux execve(2) carries
    the spawning address space's high-water mark into the new process's ``ru_maxrss`` (``exec_mmap`` records the old
    mm's peak, fork and vfork alike), so every child of a parent that once held 2 GiB reports at least 2 GiB,
    whatever it did itself. ``VmHWM`` belongs to the address space execve created, so it is the process's own.
    """
    return int((_proc_field("/proc/self/status", "VmHWM").split() or [0])[0]) * 1024


@dataclass
class ChildResult:
    """One child process: its result line, exit status, wall time and own peak RSS.

    ``peak_rss_nbytes`` is the child's own peak (its ``VmHWM`` after its body, reported in its result line by
    :func:`child_main` or :func:`module_argv`; ``None`` when it printed none). ``wait4_maxrss_nbytes`` is what
    ``wait4(2)`` says, which is at least the parent's own peak (see :func:`peak_rss_nbytes`): kept for reference,
    never a child's figure."""

    returncode: int
    wall_s: float
    peak_rss_nbytes: int | None
    result: dict[str, Any] | None
    stdout: str = ""
    stderr: str = ""
    wait4_maxrss_nbytes: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None and not self.result.get("error")

    def error_line(self) -> str:
        if self.result and self.result.get("error"):
            return str(self.result["error"])
        tail = (self.stderr or self.stdout).strip().splitlines()
        return f"exit {self.returncode}: " + (tail[-1] if tail else "no output")


def run_child(argv: Sequence[str], timeout_s: float = 600, cwd: str | None = None) -> ChildResult:
    """Run ``argv`` in a fresh process; return its ``PERF-RESULT`` line (:func:`child_main`), wall time and
    peak RSS. The peak RSS is the one the child reports for itself (``peak_rss_nbytes`` of its result line, its
    ``VmHWM``), not ``ru_maxrss`` from ``wait4(2)``, which starts at this parent's own peak (see
    :func:`peak_rss_nbytes`). A command that is not one of our children reports it when run through
    :func:`module_argv`. A child past ``timeout_s`` is killed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, cwd=cwd, start_new_session=True)

        def kill():
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall_s = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln[len(RESULT_PREFIX):] for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1]) if lines else None
    own = result.get("peak_rss_nbytes") if isinstance(result, dict) else None
    return ChildResult(proc.returncode, wall_s, own if isinstance(own, int) and own > 0 else None, result,
                       stdout[-4000:], stderr[-4000:], ru.ru_maxrss * 1024)


_RUN_MODULE = """\
import atexit, json, runpy, sys
def _report():
    with open("/proc/self/status") as f:
        hwm = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:")), None)
    print(%r + json.dumps({"peak_rss_nbytes": hwm}), flush=True)
atexit.register(_report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
""" % RESULT_PREFIX


def module_argv(module: str, *args: str) -> list[str]:
    """``python -m module args...`` for :func:`run_child`, that also prints the process's own peak RSS
    (``VmHWM``, bytes) as its last ``PERF-RESULT`` line when it exits (``sys.exit`` included), so that
    :attr:`ChildResult.peak_rss_nbytes` is that command's own figure."""
    return [sys.executable, "-c", _RUN_MODULE, module, *args]


def child_main(fn: Callable[[], dict[str, Any]]) -> int:
    """Run a child's body and print its result line ``PERF-RESULT {json}`` with its own peak RSS
    (``peak_rss_nbytes``: :func:`peak_rss_nbytes` after the body, bytes); an exception becomes ``{"error": ...}``
    and exit status 1."""
    try:
        result, rc = dict(fn()), 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        result, rc = {"error": f"{type(e).__name__}: {e}"[:500]}, 1
    result.setdefault("peak_rss_nbytes", peak_rss_nbytes())
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return rc


def current_rss_nbytes() -> int:
    """This process's resident set size now (VmRSS), in bytes; 0 if unknown."""
    return int((_proc_field("/proc/self/status", "VmRSS").split() or [0])[0]) * 1024


def fio_read(path: str, nbytes: int, bs: int, iodepth: int = 8, fixedbufs: bool = False,
             engines: Sequence[str] = ("io_uring", "libaio"), timeout_s: float = 600,
             whole_cache: bool = True, settle_s: float = 0.0) -> dict[str, Any]:
    """A sequential O_DIRECT read of ``path`` with fio, the file evicted first: ``nbytes`` read, ``seconds``
    (io_bytes / bandwidth), ``cpu_s`` (fio's own usr+sys, which leaves out its start-up), ``method``, ``command``;
    or ``{"error": ...}``. The first engine of ``engines`` that runs is used; eviction as :func:`evict`."""
    last = "fio not installed"
    for engine in engines if shutil.which("fio") else ():
        cmd = ["fio", "--name=ceiling", f"--filename={path}", "--readonly", "--rw=read", f"--bs={bs}",
               f"--ioengine={engine}", "--direct=1", f"--iodepth={iodepth}", f"--size={nbytes}", "--numjobs=1",
               "--output-format=json"] + (["--fixedbufs"] if fixedbufs else [])
        evict([path], whole_cache, settle_s)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": "fio timed out"}
        try:
            job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
        except (ValueError, KeyError, IndexError):
            last = f"fio {engine}: " + ((out.stderr or out.stdout).strip().splitlines() or ["?"])[-1]
            continue
        read = job["read"]
        cpu_s = (job.get("usr_cpu", 0.0) + job.get("sys_cpu", 0.0)) / 100 * job.get("job_runtime", read["runtime"]) / 1000
        return {"nbytes": int(read["io_bytes"]), "seconds": read["io_bytes"] / read["bw_bytes"] if read["bw_bytes"]
                else float("nan"), "cpu_s": cpu_s, "command": " ".join(cmd),
                "method": f"fio {engine} O_DIRECT bs={human_nbytes(bs)} iodepth={iodepth}" + (" fixedbufs" * fixedbufs)}
    return {"error": last}


__all__ += [n for n in dir() if not n.startswith("_") and n not in __all__]
