"""Smoke tests of the benchmark scripts in perf/ (STYLE.md habit 11): each runs on a 4 MiB input with one
run, in a subprocess under a timeout, and its output must hold what the script promises (an environment
header, samples with units, a table, a JSON file). perf/ itself is never collected by pytest.

Peers (fastsafetensors, runai-model-streamer, tensorizer, fal's flashpack) are never required: the peer
test runs only when ``.venv-peers`` exists (scripts/make_peer_env.sh). A script that is not in perf/
yet is skipped with a reason; a script added later without an entry in ``SMOKE`` is still run, with
``--size 4M`` / ``--runs 1`` when its ``--help`` lists them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF = os.path.join(ROOT, "perf")
PEER_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")
TIMEOUT_S = 420

#: script -> argv builder (tmp folder -> arguments) for a 4 MiB, one-run smoke.
SMOKE = {
    "compare.py": lambda d: ["--size", "4M", "--runs", "1", "--workdir", d, "--out-dir", d, "--name", "smoke",
                             "--timeout-s", "180",
                             "--loaders", "flashpack[threads],flashpack[uring],flashpack[mmap],"
                                          "safetensors.load_file,torch.load(mmap)"],
    "bench_load.py": lambda d: ["--size", "4M", "--runs", "1", "--workdir", d, "--out-dir", d, "--name", "smoke",
                                "--timeout-s", "180"],
    "bench_scale.py": lambda d: ["--sizes", "4M", "--runs", "1", "--warm-repeats", "2", "--workdir", d,
                                 "--out-dir", d, "--name", "smoke", "--timeout-s", "180"],
    "bench_reader.py": lambda d: ["--size", "4M", "--runs", "1", "--extent", "1M", "--file", os.path.join(d, "r.bin"),
                                  "--json", os.path.join(d, "smoke.json")],
    "gpu_check.py": lambda d: ["--size", "4M", "--dir", d, "--dry-cpu", "--deadline-s", "240"],
    "bench_convert.py": lambda d: ["--size=4M", f"--dir={d}", "--tensor=1M"],
    "bench_hf.py": None,  # generic flags from --help
    "bench_dist.py": lambda d: ["--world-size", "2", "--size", "4M", "--dir", d, "--no-baseline"],
}


def _scripts() -> list[str]:
    found = {os.path.basename(p) for p in glob.glob(os.path.join(PERF, "*.py")) if not os.path.basename(p).startswith("_")}
    return sorted(found | set(SMOKE))


def _run(argv: list[str], cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(argv)} did not finish in {TIMEOUT_S} s; output so far:\n{e.stdout}\n{e.stderr}")


def _generic_args(script: str, tmp: str) -> list[str]:
    out = _run([sys.executable, os.path.join(PERF, script), "--help"])
    assert out.returncode == 0, f"{script} --help failed:\n{out.stdout}\n{out.stderr}"
    text = out.stdout
    args = []
    for flag, value in (("--size", "4M"), ("--runs", "1"), ("--out-dir", tmp), ("--workdir", tmp), ("--dir", tmp)):
        if re.search(rf"{flag}\b", text):
            args += [flag, value]
    return args


def _check_common(script: str, proc: subprocess.CompletedProcess) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{text[-4000:]}"
    assert re.search(r"(?i)gbps|gib/s|gib_s", text), f"{script}: no throughput with units in its output:\n{text[-3000:]}"
    assert re.search(r"(?i)cpu|cores", text), f"{script}: no environment header:\n{text[:2000]}"
    return text


@pytest.mark.parametrize("script", _scripts())
def test_perf_script_smoke(script, tmp_path):
    path = os.path.join(PERF, script)
    if not os.path.exists(path):
        pytest.skip(f"perf/{script} does not exist yet")
    tmp = str(tmp_path)
    build = SMOKE.get(script)
    args = build(tmp) if build else _generic_args(script, tmp)
    proc = _run([sys.executable, path, *args])
    text = _check_common(script, proc)
    if script in ("compare.py", "bench_load.py", "bench_scale.py"):
        _check_ours(script, text, tmp)


def _check_ours(script: str, text: str, tmp: str) -> None:
    # The environment header names the machine and the units.
    assert "Gbps = 10^9 bit/s" in text
    assert "- CPU:" in text and "- disk:" in text and "- GPU:" in text
    # A markdown table with flashpack in it.
    assert re.search(r"^\|---", text, re.M), text[-3000:]
    assert re.search(r"^\| flashpack\[threads\]|^\| 4 MiB \| (cold|warm) \| flashpack best", text, re.M), text[-3000:]
    with open(os.path.join(tmp, "smoke.json")) as f:
        data = json.load(f)
    assert data["environment"]["cores"] >= 1
    samples = [s for s in data["samples"] if not s.get("error")]
    loaders = {s["loader"] for s in samples}
    assert "flashpack[threads]" in loaders and "safetensors.load_file" in loaders, data["samples"]
    for s in samples:
        assert s["load_s"] and all(t > 0 for t in s["load_s"]), s
        assert s["peak_rss_nbytes"] > 0, s
        assert s["nbytes"] == data.get("payload_nbytes", s["nbytes"]) and s["nbytes"] > 3 * 2 ** 20, s
    modes = {s["mode"] for s in samples}
    assert modes == {"cold", "warm"}, modes
    # Every flashpack load verified its checksums; cold ones really started cold.
    for s in samples:
        if s["loader"] in ("flashpack[threads]", "flashpack[uring]"):
            assert s["chunks_verified"] >= 1, s
        if s["mode"] == "cold":
            assert s["resident_fraction_before"] < 0.5, s
        else:
            assert s["resident_fraction_before"] > 0.9, s
    if script in ("compare.py", "bench_load.py"):
        kinds = {c["kind"] for c in data["ceiling_samples"] if "seconds" in c}
        assert {"buffered"} <= kinds and kinds & {"disk-fio", "disk-odirect"}, data["ceiling_samples"]
        assert data["targets"], data
    if script in ("compare.py", "bench_scale.py"):
        with open(os.path.join(tmp, "smoke.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_peers_smoke(tmp_path):
    """The peers, each in its own subprocess, when .venv-peers exists (never required)."""
    if not os.path.exists(PEER_PYTHON):
        pytest.skip("no .venv-peers (scripts/make_peer_env.sh creates it); peers are optional")
    tmp = str(tmp_path)
    proc = _run([sys.executable, os.path.join(PERF, "compare.py"), "--size", "4M", "--runs", "1", "--modes", "warm",
                 "--workdir", tmp, "--out-dir", tmp, "--name", "smoke", "--timeout-s", "180",
                 "--peer-python", PEER_PYTHON])
    text = _check_common("compare.py", proc)
    with open(os.path.join(tmp, "smoke.json")) as f:
        data = json.load(f)
    ran = {s["loader"] for s in data["samples"] if not s.get("error")}
    failed = {s["loader"]: s["error"] for s in data["samples"] if s.get("error")}
    assert not failed, failed
    expected = {"fal-flashpack[eager]", "fal-flashpack[lazy]"} - set(data["skipped"])
    assert expected <= ran, (ran, data["skipped"], text[-2000:])


def test_common_units_and_synthetic():
    sys.path.insert(0, PERF)
    try:
        import _common as C
    finally:
        sys.path.remove(PERF)
    assert C.gbps(125_000_000, 1.0) == pytest.approx(1.0)  # 10^9 bit/s
    assert C.gibps(2 ** 30, 2.0) == pytest.approx(0.5)
    for nbytes in (4 * 2 ** 20, 256 * 2 ** 20, 2 * 2 ** 30):
        specs = C.synthetic_spec(nbytes)
        total = sum(s.nbytes for s in specs)
        assert abs(total - nbytes) <= 0.01 * nbytes
        share = {d: sum(s.nbytes for s in specs if s.dtype == d) / total for d in ("bfloat16", "float32", "int64", "bool")}
        assert 0.85 <= share["bfloat16"] <= 0.92 and share["float32"] >= 0.05, share
        assert share["int64"] > 0 and share["bool"] > 0, share
    sd = C.make_state_dict(4 * 2 ** 20)
    assert all(t.isfinite().all() for t in sd.values() if t.is_floating_point())
    assert C.touch(sd) > 0
