"""``python -m flashpack.tools.doctor``: every row it promises, each saying what is active here."""

from __future__ import annotations

import os
import subprocess
import sys

from flashpack.io import pagecache
from flashpack.tools import doctor


def test_doctor_reports_what_is_active(tmp_path):
    rows = dict(doctor.report(str(tmp_path)))
    for name in ("kernel", "liburing", "RLIMIT_MEMLOCK", "backend threads", "backend auto",
                 "userfaultfd (UFFDIO_COPY fill)", "page-cache residency", "settings", "GPU"):
        assert name in rows, name
    assert rows["backend threads"].startswith("available")
    fd = os.open(sys.executable, os.O_RDONLY)
    try:
        has_cachestat = pagecache.cached_pages(fd, 0, 4096) is not None
    finally:
        os.close(fd)
    assert rows["page-cache residency"].startswith("cachestat(2)" if has_cachestat else "mincore(2)")
    assert "verify=True" in rows["settings"] or "verify=False" in rows["settings"]


def test_doctor_runs_as_a_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flashpack.tools.doctor", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "page-cache residency" in out.stdout and "backend auto" in out.stdout


def test_doctor_says_when_other_users_files_have_unknown_residency(tmp_path, monkeypatch):
    """As a user the kernel will not tell about other users' files (mincore says all resident, cachestat EPERM),
    the residency row says so; where it tells (root here), the row names the method alone."""
    plain = dict(doctor.report(str(tmp_path)))["page-cache residency"]
    expect_known = os.geteuid() == 0
    assert ("unknown for files you neither own nor can write" not in plain) == expect_known, plain
    monkeypatch.setattr(pagecache, "mincore_reports_cache", lambda fd: False)
    row = dict(doctor.report(str(tmp_path)))["page-cache residency"]
    assert row.endswith("; unknown for files you neither own nor can write (the kernel will not tell): loads "
                        "read those ahead as if cold"), row



def test_doctor_says_what_free_page_reporting_costs(tmp_path):
    buddy = tmp_path / "buddyinfo"
    buddy.write_text("Node 0, zone   Normal  9  9  9  9  9  9  9  9  9  3  2\n")
    dev = tmp_path / "bus" / "virtio" / "drivers" / "virtio_balloon" / "virtio0"
    dev.mkdir(parents=True)
    (dev / "features").write_text("0110010100000000\n")
    params = tmp_path / "module" / "page_reporting" / "parameters"
    params.mkdir(parents=True)
    (params / "page_reporting_order").write_text("9\n")
    row = doctor.free_page_reporting(str(tmp_path), str(buddy))
    assert row.startswith("on (virtio balloon virtio0, free blocks of 2048 KiB and up)"), row
    assert "FLASHPACK_HUGE_PAGES=auto" in row and "cache='bypass'" in row
    (params / "page_reporting_order").write_text("11\n")  # above the largest order: reports nothing
    assert doctor.free_page_reporting(str(tmp_path), str(buddy)) == "off (no virtio balloon reports free pages)"


def _damon_tree(root, *, state="on", operations="paddr", action="pageout", age_min="12", aggr_us="5000000",
                nr_accesses_min="0", quota="134217728"):
    ctx = root / "kernel" / "mm" / "damon" / "admin" / "kdamonds" / "0" / "contexts" / "0"
    scheme = ctx / "schemes" / "0"
    for d, name, text in ((ctx.parent.parent, "state", state), (ctx, "operations", operations),
                          (ctx / "monitoring_attrs" / "intervals", "aggr_us", aggr_us), (scheme, "action", action),
                          (scheme / "access_pattern" / "age", "min", age_min),
                          (scheme / "access_pattern" / "nr_accesses", "min", nr_accesses_min),
                          (scheme / "quotas", "bytes", quota), (scheme / "quotas", "reset_interval_ms", "1000")):
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text + "\n")
    return root


def test_doctor_says_when_damon_pages_out_idle_memory(tmp_path):
    """A running DAMON scheme on physical memory that pages out regions not accessed for 12 aggregation intervals
    of 5 s (this project's VM): idle 60 s, capped at 128 MiB a second. Anything else is off."""
    row = doctor.proactive_reclaim(str(_damon_tree(tmp_path / "vm")))
    assert row == ("on (DAMON kdamond 0, physical memory: pages out memory idle for 60 s or more, at most 128 MiB "
                   "per 1 s): the page cache of a pack left idle that long is evicted bit by bit, and a load after "
                   "such a pause reads that part from the disk again whatever its cache policy"), row
    off = "off (no DAMON scheme pages out idle memory)"
    assert doctor.proactive_reclaim(str(tmp_path / "bare")) == off
    for i, change in enumerate(({"state": "off"}, {"operations": "vaddr"}, {"action": "stat"},
                                {"nr_accesses_min": "3"})):
        assert doctor.proactive_reclaim(str(_damon_tree(tmp_path / f"t{i}", **change))) == off, change
    params = tmp_path / "rec" / "module" / "damon_reclaim" / "parameters"
    params.mkdir(parents=True)
    for name, text in (("enabled", "Y"), ("min_age", "120000000"), ("quota_sz", "0"),
                       ("quota_reset_interval_ms", "1000")):
        (params / name).write_text(text + "\n")
    assert doctor.proactive_reclaim(str(tmp_path / "rec")).startswith(
        "on (DAMON_RECLAIM: pages out memory idle for 120 s or more): ")


def test_doctor_has_a_free_page_reporting_row(tmp_path):
    rows = dict(doctor.report(str(tmp_path)))
    assert rows["free page reporting"] == doctor.free_page_reporting()
    assert rows["proactive reclaim"] == doctor.proactive_reclaim()


def test_doctor_says_how_an_extent_is_copied(tmp_path):
    import flashpack.io.base as io_base

    row = dict(doctor.report(str(tmp_path)))["extent copy"]
    if io_base.native_copy is not None:
        assert row.startswith("one C call per extent"), row
    else:
        assert row.startswith("Python steps") and "reinstall flashpack" in row, row
