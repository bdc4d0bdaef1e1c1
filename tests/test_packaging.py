"""The source distribution builds a wheel that has the io_uring backend (when liburing is present here),
tagged abi3, with the version from ``flashpack.__version__``, and the build prints no warning of ours.

Builds with setuptools' PEP 517 backend in this interpreter (no network, no build isolation): the
tracked files -> sdist -> unpacked -> wheel -> unzipped into a ``--target``-style folder, then a fresh
interpreter whose path has that folder and not this checkout asks ``flashpack.backends()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BUILD = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("always")
    from setuptools import build_meta
    kind, out = sys.argv[1], sys.argv[2]
    name = build_meta.build_sdist(out) if kind == "sdist" else build_meta.build_wheel(out)
    print("BUILT", name)
""")


def _build(kind: str, src: str, out: str) -> tuple[str, str]:
    res = subprocess.run([sys.executable, "-c", _BUILD, kind, out], cwd=src, capture_output=True, text=True,
                         timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-4000:]
    name = [line.split(" ", 1)[1] for line in res.stdout.splitlines() if line.startswith("BUILT ")][-1]
    return os.path.join(out, name), res.stdout + res.stderr


def _tracked_copy(dest: str) -> None:
    """Copy the files git tracks (as the working tree has them) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in files.decode().split("\0"):
        if not rel or not os.path.isfile(os.path.join(REPO, rel)):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        with open(os.path.join(REPO, rel), "rb") as a, open(os.path.join(dest, rel), "wb") as b:
            b.write(a.read())


def test_wheel_built_from_the_sdist_has_the_uring_backend(tmp_path):
    pytest.importorskip("cffi")
    sys.path.insert(0, os.path.join(REPO, "native"))
    try:
        import build_uring
    finally:
        sys.path.pop(0)
    src = tmp_path / "src"
    _tracked_copy(str(src))
    sdist, log1 = _build("sdist", str(src), str(tmp_path / "dist"))
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        top = names[0].split("/")[0]
        for want in ("native/fp_uring.h", "native/fp_uring.c", "native/build_uring.py", "tests/conftest.py",
                     "MANIFEST.in"):
            assert f"{top}/{want}" in names, want
        tf.extractall(tmp_path / "unpacked", filter="data")
    wheel, log2 = _build("wheel", str(tmp_path / "unpacked" / top), str(tmp_path / "wheels"))
    for log in (log1, log2):
        bad = [line for line in log.splitlines()
               if ("Warning" in line and ("flashpack" in line or "license" in line.lower() or "depends" in line))
               or "redefined" in line or ("warning:" in line and "byte-compiling is disabled" not in line)]
        assert not bad, bad
    import flashpack

    assert os.path.basename(wheel).startswith(f"flashpack-{flashpack.__version__}-")
    can = build_uring.can_build()
    if can:
        assert os.path.basename(wheel).endswith("-abi3-linux_x86_64.whl") or "-abi3-" in os.path.basename(wheel), wheel
    target = tmp_path / "target"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    probe = ("import json, flashpack, flashpack.io as io; b = flashpack.backends(); "
             "print(json.dumps({'file': flashpack.__file__, 'uring': b['uring'].available, 'why': b['uring'].reason}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(target))
    if can:
        from flashpack.io import uring

        assert out["uring"] == uring.probe()[0], out["why"]
