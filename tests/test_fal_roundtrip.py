"""Round trips with the real fal flashpack 0.4.5, installed by this test into its own virtualenv
(``.venv-fal045/`` at the repository root, git-ignored, reused across runs): files fal writes load here bit-exactly,
and files written with ``flashpack revert --format fal`` load there bit-exactly. Skipped, with pip's error as the
reason, where fal 0.4.5 cannot be installed. The only download is ``pip install --no-deps flashpack==0.4.5``."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig

import pytest
import torch

import flashpack
from flashpack.tools.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-fal045")


def _venv_python() -> str:
    """A virtualenv holding fal's flashpack 0.4.5 only (``--no-deps``); torch, numpy, accelerate and safetensors come
    from this interpreter's site-packages through a ``.pth`` file (no ``.pth`` of those folders runs there, so this
    repository's own flashpack is not importable in it)."""
    py = os.path.join(VENV, "bin", "python")
    marker = os.path.join(VENV, ".fal-0.4.5-installed")
    if os.path.exists(marker):
        return py
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", VENV], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot create a virtualenv for fal 0.4.5: {r.stderr.strip()[-500:]}")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    with open(os.path.join(purelib, "_parent_site.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(parents)) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "--target", purelib, "flashpack==0.4.5"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot install fal's flashpack 0.4.5: {(r.stderr or r.stdout).strip()[-800:]}")
    open(marker, "w").close()
    return py


@pytest.fixture(scope="module")
def fal_python():
    return _venv_python()


def run_fal(py: str, code: str, cwd) -> str:
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=cwd,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def sample_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "enc.weight": torch.randn(5, 7, generator=g),
        "enc.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 3, generator=g).to(torch.float16),
        "ids": torch.tensor([3, -1, 2**40], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(11, dtype=torch.uint8),
        "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
    }


def test_fal_is_the_real_package(fal_python, tmp_path):
    out = run_fal(fal_python, "import flashpack, os; print(flashpack.__version__, os.path.dirname(flashpack.__file__))",
                  tmp_path)
    version, where = out.split()
    assert version == "0.4.5"
    assert where.startswith(VENV)


def test_fal_written_files_load_here_bit_exactly(fal_python, tmp_path):
    sd = sample_state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    run_fal(fal_python, "import torch, flashpack; sd = torch.load('sd.pt'); "
            "flashpack.pack_to_file(sd, 'fal.flashpack', None)", tmp_path)
    out = flashpack.load(tmp_path / "fal.flashpack")
    assert flashpack.read_weight_map(tmp_path / "fal.flashpack").source == "fal-flashpack-v4"
    assert sorted(out) == sorted(sd)
    for k, t in sd.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape, k
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("how", ["cli", "python"])
def test_revert_format_fal_loads_in_fal_bit_exactly(fal_python, tmp_path, how):
    sd = sample_state_dict()
    sd["tied"] = sd["enc.weight"]  # an alias here: written as a copy in fal's layout
    flashpack.pack_to_file(sd, tmp_path / "ours.flashpack")
    if how == "cli":
        assert cli_main(["revert", str(tmp_path / "ours.flashpack"), "--format", "fal", "--quiet"]) == 0
    else:
        from flashpack.commands import revert_from_flashpack

        assert revert_from_flashpack(tmp_path / "ours.flashpack", tmp_path / "ours.fal.flashpack",
                                     format="fal") == str(tmp_path / "ours.fal.flashpack")
    code = """
import json, torch, flashpack
from flashpack.deserialization import read_flashpack_file, iterate_from_flash_tensor
assert flashpack.is_flashpack_file('ours.fal.flashpack')
storage, meta = read_flashpack_file('ours.fal.flashpack', device='cpu')
out = {}
for name, view in iterate_from_flash_tensor(storage, meta):
    out[name] = {"dtype": str(view.dtype), "shape": list(view.shape),
                 "bytes": view.contiguous().reshape(-1).view(torch.uint8).tolist()}
class M(torch.nn.Module, flashpack.FlashPackMixin):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(7, 5)
m = M()
flashpack.assign_from_file(m, 'ours.fal.flashpack', device='cpu', strict=False,
                           ignore_names=['half', 'ids', 'mask', 'bytes', 'f8', 'empty', 'tied'])
out['__assigned_weight'] = m.enc.weight.contiguous().view(-1).view(torch.uint8).tolist()
print(json.dumps(out))
"""
    got = json.loads(run_fal(fal_python, code, tmp_path))
    for k, t in sd.items():
        assert got[k]["dtype"] == str(t.dtype), k
        assert got[k]["shape"] == list(t.shape), k
        assert got[k]["bytes"] == t.reshape(-1).view(torch.uint8).tolist(), k
    assert got["__assigned_weight"] == sd["enc.weight"].reshape(-1).view(torch.uint8).tolist()
