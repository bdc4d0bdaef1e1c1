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


def test_doctor_has_a_free_page_reporting_row(tmp_path):
    rows = dict(doctor.report(str(tmp_path)))
    assert rows["free page reporting"] == doctor.free_page_reporting()


def test_doctor_says_how_an_extent_is_copied(tmp_path):
    import flashpack.io.base as io_base

    row = dict(doctor.report(str(tmp_path)))["extent copy"]
    if io_base.native_copy is not None:
        assert row.startswith("one C call per extent"), row
    else:
        assert row.startswith("Python steps") and "reinstall flashpack" in row, row
