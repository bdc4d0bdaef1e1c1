"""``python -m flashpack.tools.doctor [path]``: what flashpack can use on this machine, and why not.

Prints the kernel, liburing, ``kernel.io_uring_disabled``, RLIMIT_MEMLOCK, whether O_DIRECT open and
read work for ``path`` (default: the current directory; a directory is tested with a temporary file
in it), every reader backend with its reason or features, how an extent is copied (one C call or Python
steps), whether userfaultfd can fill load destinations, how the page cache is asked which pages it holds,
whether the machine hands free memory back to its hypervisor (free page reporting), whether the kernel evicts
idle memory on its own (DAMON proactive reclaim), the FLASHPACK_* settings,
and the GPU.
torch is imported only for the GPU line.
"""

from __future__ import annotations

import mmap
import os
import platform
import resource
import subprocess
import sys
import tempfile

PAGE_NBYTES = 4096


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def liburing_version() -> str:
    """From the built extension when its headers carry a version (liburing >= 2.4), else the package manager."""
    parts = []
    try:
        from flashpack import _uring

        major, minor = _uring.ffi.new("int *"), _uring.ffi.new("int *")
        if _uring.lib.fp_liburing_version(major, minor) == 0:
            parts.append(f"{major[0]}.{minor[0]} (compiled into flashpack._uring)")
        else:
            parts.append("flashpack._uring built (liburing <= 2.3 headers carry no version)")
    except ImportError:
        parts.append("flashpack._uring not built")
    for cmd in (["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "liburing-dev", "liburing2"],
                ["rpm", "-q", "liburing", "liburing-devel"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip() and "not installed" not in ln]
        if lines:
            parts.append("package: " + ", ".join(lines))
            break
    return "; ".join(parts)


def extent_copy() -> str:
    """How the reader's worker threads copy an extent: one C call (``fp_copy_extent``, native/fp_copy.c) or the
    Python steps, and what to install for the first."""
    try:
        from flashpack import _uring
    except ImportError:
        return ("Python steps (flashpack._uring not built): each worker gives up and takes back the GIL at every "
                "step of an extent, slow while another thread runs Python; install liburing-dev and libxxhash-dev "
                "(Debian/Ubuntu) and reinstall flashpack")
    if _uring.lib.fp_copy_available():
        return "one C call per extent (fp_copy_extent: the copy and its XXH3 hash, the GIL released once)"
    return ("Python steps (flashpack._uring was built without xxhash.h): slow while another thread runs Python; "
            "install libxxhash-dev (Debian/Ubuntu) or xxhash-devel (Fedora) and reinstall flashpack")


def memlock() -> str:
    def fmt(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else f"{v} bytes ({v // 1024} KiB)"

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    cap = ""
    status = _read("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            has = bool(int(line.split()[1], 16) >> 14 & 1)
            cap = "; CAP_IPC_LOCK: yes (the limit does not apply)" if has else "; CAP_IPC_LOCK: no"
    return f"soft {fmt(soft)}, hard {fmt(hard)}{cap}"


def filesystem_of(path: str) -> str:
    path = os.path.realpath(path)
    best, fstype = "", "?"
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mnt = fields[4]
        post = line.split(" - ", 1)[1].split()
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, post[0]
    return f"{fstype} at {best or '?'}"


def o_direct_check(path: str) -> str:
    """Open ``path`` (or a temporary file in it) with O_DIRECT and read 4096 bytes into an aligned buffer."""
    tmp = None
    try:
        if os.path.isdir(path):
            fd, tmp = tempfile.mkstemp(prefix=".flashpack-env-", dir=path)
            try:
                os.write(fd, b"\x5a" * 2 * PAGE_NBYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            target = tmp
        else:
            target = path
        try:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            return f"refused at open ({e.strerror}); flashpack reads this file system buffered"
        try:
            buf = mmap.mmap(-1, PAGE_NBYTES)  # page-aligned
            try:
                n = os.preadv(fd, [buf], 0)
            except OSError as e:
                return f"open works, read refused ({e.strerror}); flashpack falls back to buffered reads"
            finally:
                buf.close()
        finally:
            os.close(fd)
        return f"works (read {n} bytes)"
    except OSError as e:
        return f"cannot test: {e}"
    finally:
        if tmp:
            os.unlink(tmp)


def gpu() -> str:
    try:
        import torch
    except ImportError:
        return "torch not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}: torch.cuda.is_available() = False"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}: {names}"


def free_page_reporting(sysfs: str = "/sys", buddyinfo: str = "/proc/buddyinfo") -> str:
    """Whether this (virtual) machine hands free memory back to its hypervisor, and what that costs a load
    (:func:`flashpack.io.pagecache.free_page_reporting`; ``sysfs`` and ``buddyinfo`` for tests).

    Measured on a 2-vCPU Firecracker VM (Linux 6.18): fresh 2 MiB pages filled at 0.5 GB/s after 5 s idle against
    10 GB/s when reused at once; a cold ``keep`` load of 1 GiB, which fills fresh page cache, took 0.89-1.36 s when
    the caches had been dropped 4-8 s before (6 runs), 0.50-0.63 s in 3 of 4 runs when dropped just before, while
    O_DIRECT (``cache="bypass"``) took 0.65-0.76 s either way (4 runs).

    Returns:
        ``"off (...)"``, or ``"on (...)"`` with the device, the reported block size and its cost.
    """
    from flashpack.io.pagecache import free_page_reporting as device_reporting  # no torch import

    dev = device_reporting(sysfs, buddyinfo)
    if not dev:
        return "off (no virtio balloon reports free pages)"
    order = _read(os.path.join(sysfs, "module", "page_reporting", "parameters", "page_reporting_order"))
    block = f"{PAGE_NBYTES << int(order) >> 10} KiB" if order and order.isdigit() and int(order) < 20 else "?"
    return (f"on (virtio balloon {dev}, free blocks of {block} and up): memory free for more than ~2 s goes back to "
            f"the hypervisor and is slow on its first touch, so loads use 4 KiB pages (FLASHPACK_HUGE_PAGES=auto), and "
            f"a cold cache='keep' load, which fills fresh page cache, can take up to twice as long as cache='bypass' "
            f"after a quiet spell")


def _damon_schemes(sysfs: str):
    """(kdamond, idle seconds, quota bytes, quota seconds) of each running DAMON context on the physical address
    space whose scheme pages out memory that was not accessed: the sysfs admin interface,
    ``kernel/mm/damon/admin/kdamonds/<k>/contexts/<c>/schemes/<s>`` (Documentation/admin-guide/mm/damon/usage.rst).
    A scheme's ``access_pattern/age/min`` counts aggregation intervals (``monitoring_attrs/intervals/aggr_us``);
    ``nr_accesses/min`` 0 takes regions not accessed; ``quotas/bytes`` per ``quotas/reset_interval_ms`` caps it
    (0: no cap)."""
    root = os.path.join(sysfs, "kernel", "mm", "damon", "admin", "kdamonds")
    try:
        kdamonds = sorted((d for d in os.listdir(root) if d.isdigit()), key=int)
    except OSError:
        return
    for k in kdamonds:
        if _read(os.path.join(root, k, "state")) != "on":
            continue
        contexts = os.path.join(root, k, "contexts")
        for c in sorted((d for d in _listdir(contexts) if d.isdigit()), key=int):
            ctx = os.path.join(contexts, c)
            if _read(os.path.join(ctx, "operations")) != "paddr":
                continue
            aggr_us = _int(os.path.join(ctx, "monitoring_attrs", "intervals", "aggr_us"))
            schemes = os.path.join(ctx, "schemes")
            for s in sorted((d for d in _listdir(schemes) if d.isdigit()), key=int):
                scheme = os.path.join(schemes, s)
                if _read(os.path.join(scheme, "action")) != "pageout" or \
                        _int(os.path.join(scheme, "access_pattern", "nr_accesses", "min")) != 0:
                    continue
                age = _int(os.path.join(scheme, "access_pattern", "age", "min"))
                idle_s = None if age is None or aggr_us is None else age * aggr_us / 1e6
                yield (k, idle_s, _int(os.path.join(scheme, "quotas", "bytes")),
                       (_int(os.path.join(scheme, "quotas", "reset_interval_ms")) or 0) / 1000)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _int(path: str) -> int | None:
    text = _read(path)
    return int(text) if text is not None and text.isdigit() else None


def proactive_reclaim(sysfs: str = "/sys") -> str:
    """Whether the kernel evicts memory that was idle for a while on its own, page cache included: a running DAMON
    scheme that pages out cold physical memory (sysfs admin interface), or the DAMON_RECLAIM module
    (``module/damon_reclaim/parameters``: ``enabled``, ``min_age`` in microseconds, ``quota_sz`` bytes per
    ``quota_reset_interval_ms``; Documentation/admin-guide/mm/damon/reclaim.rst). Seen on the Firecracker VM this
    project is developed on (a scheme paging out memory idle 60 s, at most 128 MiB a second): of a cached 1 GiB
    file left alone, 4% was gone after about a minute and 13% after two, so a load after a pause reads that part
    from the disk whatever its ``cache`` policy (``sysfs`` for tests).

    Returns:
        ``"off (...)"``, or ``"on (...)"`` naming the scheme, how long memory must be idle and the rate cap.
    """
    def words(who: str, idle_s, quota_nbytes, quota_s) -> str:
        idle = "?" if idle_s is None else f"{idle_s:g} s"
        cap = "" if not quota_nbytes else f", at most {quota_nbytes / 2**20:g} MiB per {quota_s:g} s"
        return (f"on ({who}: pages out memory idle for {idle} or more{cap}): the page cache of a pack left idle "
                f"that long is evicted bit by bit, and a load after such a pause reads that part from the disk "
                f"again whatever its cache policy")

    for k, idle_s, quota_nbytes, quota_s in _damon_schemes(sysfs):
        return words(f"DAMON kdamond {k}, physical memory", idle_s, quota_nbytes, quota_s)
    params = os.path.join(sysfs, "module", "damon_reclaim", "parameters")
    if _read(os.path.join(params, "enabled")) in ("Y", "1"):
        min_age_us = _int(os.path.join(params, "min_age"))
        quota_ms = _int(os.path.join(params, "quota_reset_interval_ms")) or 0
        return words("DAMON_RECLAIM", None if min_age_us is None else min_age_us / 1e6,
                     _int(os.path.join(params, "quota_sz")), quota_ms / 1000)
    return "off (no DAMON scheme pages out idle memory)"


def _residency_of_others_known(pagecache) -> bool:
    """Whether the kernel tells this process the page-cache residency of a file it neither owns nor could write
    (:func:`flashpack.io.pagecache.mincore_reports_cache`), asked of the first file of another user it can open
    (any file, for a user who owns them all)."""
    fds = []
    try:
        for path in (os.path.realpath(sys.executable), os.__file__, "/etc/passwd"):
            try:
                fds.append(os.open(path, os.O_RDONLY))
            except OSError:
                continue
            if os.fstat(fds[-1]).st_uid != os.geteuid():
                break
        return pagecache.mincore_reports_cache(fds[-1]) if fds else True
    finally:
        for fd in fds:
            os.close(fd)


def report(path: str) -> list[tuple[str, str]]:
    rows = [
        ("kernel", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("liburing", liburing_version()),
    ]
    disabled = _read("/proc/sys/kernel/io_uring_disabled")
    group = _read("/proc/sys/kernel/io_uring_group")
    meaning = {"0": "allowed", "1": f"privileged processes and group {group} only", "2": "disabled"}
    rows.append(("kernel.io_uring_disabled", "absent (kernel before 6.6: io_uring allowed)" if disabled is None
                 else f"{disabled} ({meaning.get(disabled, '?')})"))
    rows.append(("RLIMIT_MEMLOCK", memlock()))
    rows.append((f"O_DIRECT on {path}", f"{o_direct_check(path)}; file system {filesystem_of(path)}"))
    try:
        from flashpack.io import backends, resolve_backend
        from flashpack.settings import settings

        for name, info in backends().items():
            rows.append((f"backend {name}", f"available; features: {', '.join(sorted(info.features)) or '-'}"
                         if info.available else f"unavailable: {info.reason}"))
        rows.append(("backend auto", f"-> {resolve_backend('auto')}"))
        rows.append(("extent copy", extent_copy()))
        from flashpack.io import uffd

        ok, why = uffd.probe()
        rows.append(("userfaultfd (UFFDIO_COPY fill)", "available" if ok else f"unavailable: {why}; fresh memory "
                     "is faulted in by the reads instead"))
        from flashpack.io import pagecache

        with tempfile.TemporaryFile() as own:  # a file of this user: the kernel answers unless it lacks the call
            asked = pagecache.cached_pages(own.fileno(), 0, PAGE_NBYTES)
        theirs = _residency_of_others_known(pagecache)
        rows.append(("page-cache residency", ("cachestat(2)" if asked is not None else
                     "mincore(2) snapshots (cachestat(2) needs Linux 6.5 and a seccomp profile that allows it; "
                     "each load of a cached file then spends ~15 ms per GiB asking)") + ("" if theirs else
                     "; unknown for files you neither own nor can write (the kernel will not tell): loads read "
                     "those ahead as if cold")))
        rows.append(("free page reporting", free_page_reporting()))
        rows.append(("proactive reclaim", proactive_reclaim()))
        cfg = settings()
        rows.append(("settings", ", ".join(f"{k}={v}" for k, v in vars(cfg).items())))
    except Exception as e:  # noqa: BLE001 - report what is wrong instead of a traceback
        rows.append(("flashpack", f"cannot probe backends: {type(e).__name__}: {e}"))
    rows.append(("GPU", gpu()))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    path = argv[0] if argv else os.getcwd()
    rows = report(path)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
