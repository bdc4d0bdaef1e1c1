"""``flashpack.load("org/name")``: Hub repo ids resolve through ``huggingface_hub.snapshot_download`` as in the
integrations. Nothing here reaches the network: each test builds a Hugging Face cache folder the way
``huggingface_hub`` lays it out (``models--org--name/refs/main``, ``snapshots/<commit>/...``) and loads offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flashpack
from flashpack.errors import ModelNotFoundError
from flashpack.remote import is_repo_id

huggingface_hub = pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, files: dict[str, dict], *, revision: str = "main", commit: str = COMMIT) -> str:
    """A cache folder holding ``repo_id`` at ``revision``: ``files`` maps a repo path to the state_dict packed there."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for name, sd in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        flashpack.pack_to_file(sd, snap / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return str(root)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sd(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, 3, generator=g), "b": torch.arange(n, dtype=torch.int64)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_of_a_repo_id_reads_its_model_pack_from_the_cache(tmp_path, monkeypatch):
    want = sd()
    cache = hub_cache(tmp_path / "hf", "org/name", {"model.flashpack": want})
    monkeypatch.chdir(tmp_path)  # no local org/name here
    assert same(flashpack.load("org/name", cache_dir=cache), want)
    monkeypatch.setenv("HF_HUB_CACHE", cache)  # the default cache, as huggingface_hub reads it at call time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    assert same(flashpack.load("org/name", keys=["w"]), {"w": want["w"]})


def test_subfolder_revision_and_a_pack_of_another_name(tmp_path, monkeypatch):
    unet, other = sd(seed=1), sd(6, seed=2)
    cache = hub_cache(tmp_path / "hf", "org/pipe", {"unet/model.flashpack": unet, "vae/weights.flashpack": other},
                      revision="v1")
    monkeypatch.chdir(tmp_path)
    assert same(flashpack.load("org/pipe", subfolder="unet", revision="v1", cache_dir=cache), unet)
    assert same(flashpack.load("org/pipe", subfolder="vae", revision="v1", local_files_only=True, cache_dir=cache),
                other)


def test_a_local_path_of_that_name_always_wins(tmp_path, monkeypatch):
    local = sd(seed=3)
    (tmp_path / "org" / "name").mkdir(parents=True)
    flashpack.pack_to_file(local, tmp_path / "org" / "name" / "model.flashpack")
    monkeypatch.chdir(tmp_path)

    def refuse(*a, **k):
        raise AssertionError(f"unexpected Hub call {a} {k}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert same(flashpack.load("org/name"), local)
    assert not is_repo_id("org/name")  # it exists here
    assert not is_repo_id("org/missing.flashpack") and not is_repo_id("./a/b") and not is_repo_id("a/b/c")


def test_a_repo_id_missing_from_the_cache_names_the_id_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = hub_cache(tmp_path / "hf", "org/other", {"model.flashpack": sd()})
    with pytest.raises(ModelNotFoundError) as e:
        flashpack.load("org/absent", cache_dir=cache)
    msg = str(e.value)
    assert msg.startswith("org/absent: not found in " + cache) and "HF_HUB_OFFLINE=1" in msg
    assert "run once with network access" in msg and "pass a local folder" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="local_files_only=True"):
        flashpack.load("org/absent", cache_dir=cache, local_files_only=True)


def test_a_repo_without_a_pack_says_to_convert_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = hub_cache(tmp_path / "hf", "org/plain", {})
    snap = tmp_path / "hf" / "models--org--plain" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError) as e:
        flashpack.load("org/plain", cache_dir=cache)
    assert str(e.value).startswith("org/plain: no .flashpack file") and "flashpack convert org/plain" in str(e.value)


def test_a_missing_local_file_is_still_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        flashpack.load("nothere/model.flashpack")
    assert not isinstance(e.value, ModelNotFoundError)  # never looked up on the Hub


def test_import_flashpack_and_help_import_neither_torch_nor_huggingface_hub():
    code = ("import sys, flashpack, flashpack.remote\n"
            "from flashpack.tools.cli import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n"
            "bad = [m for m in ('torch', 'huggingface_hub') if m in sys.modules]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_subfolder_pack_of_another_name_downloads_from_the_hub(tmp_path, monkeypatch):
    # online, snapshot_download fetches only what the patterns match: the first fetch (model.flashpack and its
    # index) brings nothing of ``vae/``, which must not end the search with "no subfolder 'vae'"
    from _helpers import FakeHub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.chdir(tmp_path)
    other = sd(6, seed=2)
    repo = tmp_path / "store" / "org" / "pipe"
    (repo / "vae").mkdir(parents=True)
    flashpack.pack_to_file(other, repo / "vae" / "weights.flashpack")
    hub = FakeHub(store=tmp_path / "store").install(monkeypatch, serve=True)
    assert same(flashpack.load("org/pipe", subfolder="vae"), other)
    assert hub.downloads[-1]["files"] == ["vae/weights.flashpack"]
    with pytest.raises(ModelNotFoundError, match=r"org/pipe: no subfolder 'unet'"):  # really missing: still said
        flashpack.load("org/pipe", subfolder="unet")
