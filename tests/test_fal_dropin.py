"""fal's flashpack 0.4.5 public surface works here unchanged (issue 13): names, keywords, positional forms, the CLI's
short flags and filters, metadata JSON, broken pipes, diffusers' own ``use_flashpack=True`` in a fresh process (a
model and a whole pipeline), and the documented pipeline recipe (components built as the annotated FlashPack classes, fal ``["defs", ...]``
index entries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import flashpack
from flashpack.tools.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


class Net(torch.nn.Module, flashpack.FlashPackMixin):
    def __init__(self, some_arg: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(some_arg, 3)
        self.register_buffer("count", torch.tensor([7], dtype=torch.int64))


def test_fresh_import_exposes_fal_names_and_submodules_without_torch():
    code = ("import sys, flashpack; names = ['serialization', 'mixin', 'deserialization', 'commands']; "
            "t = 'torch' in sys.modules; "
            "print(t, [hasattr(flashpack, n) for n in names], flashpack.version, flashpack.version_tuple, "
            "flashpack.commit_id, callable(flashpack.is_flashpack_file), callable(flashpack.get_flashpack_file_metadata), "
            "callable(flashpack.read_flashpack_file_distributed), flashpack.patch_integrations())")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "False [True, True, True, True] 0.1.0 (0, 1, 0) None True True True None"


def test_is_flashpack_file_and_metadata(tmp_path):
    flashpack.pack_to_file({"a": torch.ones(2, 3), "b": torch.zeros(5, dtype=torch.int32)}, tmp_path / "m.flashpack")
    (tmp_path / "junk").write_bytes(b"x" * 100)
    assert flashpack.is_flashpack_file(tmp_path / "m.flashpack") is True
    assert flashpack.is_flashpack_file(tmp_path / "junk") is False
    assert flashpack.is_flashpack_file(tmp_path / "missing") is False
    meta = flashpack.get_flashpack_file_metadata(tmp_path / "m.flashpack")
    assert meta == {"format": "flashpack_v4", "align_bytes": 64, "total_payload_bytes": 8192 + 20, "total_elems": 11,
                    "macroblocks": [{"dtype": "float32", "offset_bytes": 4096, "length_bytes": 24, "length_elems": 6},
                                    {"dtype": "int32", "offset_bytes": 8192, "length_bytes": 20, "length_elems": 5}],
                    "index": [{"name": "a", "shape": [2, 3], "offset": 0, "length": 6, "macroblock": 0},
                              {"name": "b", "shape": [5], "offset": 0, "length": 5, "macroblock": 1}]}


def test_revert_from_file_and_commands(tmp_path):
    from flashpack.commands import convert_to_flashpack, revert_from_flashpack
    from flashpack.deserialization import revert_from_file

    sd = {"enc.w": torch.arange(6.0).reshape(2, 3), "dec.w": torch.ones(4), "enc.skip": torch.zeros(1)}
    dst = convert_to_flashpack(sd, tmp_path / "c.flashpack", dtype="float16", ignore_suffixes=["skip"])
    assert dst == str(tmp_path / "c.flashpack")
    out = revert_from_file(dst)
    assert sorted(out) == ["dec.w", "enc.w"] and out["enc.w"].dtype == torch.float16
    assert torch.equal(out["enc.w"], sd["enc.w"].half())
    st = revert_from_flashpack(dst)
    assert st == str(tmp_path / "c.safetensors") and oct(os.stat(st).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_from_flashpack_takes_fal_keywords(tmp_path):
    Net(some_arg=4).save_flashpack(str(tmp_path / "n.flashpack"), None, None, 128, True, 8)
    m = Net.from_flashpack(str(tmp_path / "n.flashpack"), some_arg=4, silent=True, num_streams=2, chunk_bytes=1 << 20,
                           coerce_dtype=True, strict=None, keep_flash_ref_on_model=True)
    assert m.lin.weight.shape == (3, 4) and m.count.tolist() == [7] and not m.training
    assert set(m._flash_shared_storage) == {"lin.weight", "lin.bias", "count"}


def test_assign_from_file_fal_strictness_and_filters(tmp_path):
    src = Net()
    flashpack.pack_to_file({"lin.weight": src.lin.weight, "lin.bias": src.lin.bias, "extra.x": torch.ones(1)},
                           tmp_path / "p.flashpack")
    dst = Net()
    with pytest.raises(flashpack.ModelMismatchError, match=r"unexpected keys \['extra.x'\]"):
        flashpack.assign_from_file(dst, tmp_path / "p.flashpack")
    r = flashpack.assign_from_file(dst, str(tmp_path / "p.flashpack"), "cpu", None, True, False,
                                   ignore_prefixes=["extra."])
    assert r.missing_keys == ["count"] and r.unexpected_keys == []  # a missing buffer keeps its value (fal's rule)
    assert dst.count.tolist() == [7] and torch.equal(dst.lin.weight, src.lin.weight)
    with pytest.raises(flashpack.ModelMismatchError, match=r"missing keys \['count'\]"):
        flashpack.assign_from_file(Net(), tmp_path / "p.flashpack", strict_buffers=True, ignore_names=["extra.x"])


def test_coerce_dtype_casts_instead_of_raising(tmp_path):
    flashpack.pack_to_file({"lin.weight": torch.ones(3, 4, dtype=torch.float16), "lin.bias": torch.ones(3),
                            "count": torch.tensor([9], dtype=torch.int32)}, tmp_path / "d.flashpack")
    with pytest.raises(flashpack.ModelMismatchError, match="coerce_dtype=True"):
        flashpack.assign_from_file(Net(), tmp_path / "d.flashpack")
    m = Net()
    flashpack.assign_from_file(m, tmp_path / "d.flashpack", coerce_dtype=True)
    assert m.lin.weight.dtype == torch.float32 and m.count.dtype == torch.int64 and m.count.tolist() == [9]


def test_pack_to_file_name_order_selects_and_orders(tmp_path):
    sd = {"a": torch.ones(1), "b": torch.ones(2), "c": torch.ones(3)}
    flashpack.pack_to_file(sd, tmp_path / "o.flashpack", None, ["c", "a", "nope"])
    assert list(flashpack.load(tmp_path / "o.flashpack")) == ["c", "a"]


# --------------------------------------------------------------------------- CLI


def test_cli_short_flags_and_json_superset(tmp_path, capsys):
    flashpack.pack_to_file({"a": torch.ones(2, 3)}, tmp_path / "m.flashpack")
    assert cli_main(["metadata", str(tmp_path / "m.flashpack"), "-i", "-j"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["format"], doc["align_bytes"], doc["total_payload_bytes"], doc["source"]) == (
        "flashpack_v4", 64, 4096 + 24, "flashpack")
    assert doc["macroblocks"] == [{"dtype": "float32", "offset_bytes": 4096, "length_bytes": 24, "length_elems": 6}]
    assert doc["index"] == [{"key": "a", "dtype": "F32", "shape": [2, 3], "offset": 4096, "nbytes": 24, "name": "a",
                             "length": 6, "macroblock": 0, "offset_elems": 0}]
    assert cli_main(["metadata", str(tmp_path / "m.flashpack"), "--json", "--format", "fal"]) == 0
    assert "index" not in json.loads(capsys.readouterr().out)


def test_cli_ignore_filters_and_verbose(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"keep": torch.ones(2), "drop.me": torch.ones(1), "x.lora": torch.ones(1), "gone": torch.ones(1)},
              str(tmp_path / "s.safetensors"))
    assert cli_main(["convert", str(tmp_path / "s.safetensors"), str(tmp_path / "s.flashpack"), "--ignore-names",
                     "gone", "--ignore-prefixes", "drop.", "--ignore-suffixes=.lora", "-v", "--quiet"]) == 0
    assert list(flashpack.load(tmp_path / "s.flashpack")) == ["keep"]


@pytest.mark.parametrize("argv, message", [
    (["metadata", "X", "--bogus"], "unknown option '--bogus' for `flashpack metadata`"),
    (["convert", "X", "--dtype"], "option --dtype needs a value (--dtype=<value>)"),
    (["revert", "X", "--force=yes"], "option --force takes no value"),
])
def test_cli_errors_name_the_flag(argv, message, capsys):
    assert cli_main(argv) == 2
    assert f"flashpack: error: {message};" in capsys.readouterr().err


def test_cli_broken_pipe_exits_quietly(tmp_path):
    flashpack.pack_to_file({f"k{i:05d}": torch.ones(1) for i in range(3000)}, tmp_path / "big.flashpack")
    r = subprocess.run(f"'{sys.executable}' -m flashpack metadata '{tmp_path / 'big.flashpack'}' --show-index --json "
                       f"| head -c 100 > /dev/null; echo ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash",
                       env=ENV, capture_output=True, text=True)
    assert (r.stdout.strip(), r.stderr) == ("0", "")


# --------------------------------------------------------------------------- diffusers


DIFFUSERS_SCRIPT = r"""
import os, sys, torch, diffusers, flashpack
out = sys.argv[1]
torch.manual_seed(0)
vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                              up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16)
vae.save_pretrained(os.path.join(out, "vae"), use_flashpack=True)
again = diffusers.AutoencoderKL.from_pretrained(os.path.join(out, "vae"), use_flashpack=True, device_map="cpu",
                                                flashpack_kwargs=dict(silent=True, num_streams=2, chunk_bytes=1 << 20,
                                                                      strict=True, coerce_dtype=False))
a, b = vae.state_dict(), again.state_dict()
print(sorted(os.listdir(os.path.join(out, "vae"))), a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
"""


def test_diffusers_use_flashpack_fresh_process_with_fal_kwargs(tmp_path):
    pytest.importorskip("diffusers")
    r = subprocess.run([sys.executable, "-c", DIFFUSERS_SCRIPT, str(tmp_path)], env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "['config.json', 'model.flashpack'] True"


PIPELINE_SCRIPT = r"""
import os, sys
import numpy as np, torch
from diffusers import DiffusionPipeline

src, out = sys.argv[1], sys.argv[2]
def image(pipe):
    gen = torch.Generator("cpu").manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, generator=gen, height=32, width=32, output_type="np").images

pipe = DiffusionPipeline.from_pretrained(src)
expected = image(pipe)
pipe.save_pretrained(out, use_flashpack=True)
again = DiffusionPipeline.from_pretrained(out, use_flashpack=True, device_map="cpu",
                                          flashpack_kwargs=dict(silent=True, num_streams=2, chunk_bytes=1 << 20,
                                                                strict=True, coerce_dtype=False))
same = all(torch.equal(a, again.components[n].state_dict()[k]) for n in ("vae", "unet", "text_encoder")
           for k, a in pipe.components[n].state_dict().items())
print(sorted(os.listdir(os.path.join(out, "unet"))), sorted(os.listdir(os.path.join(out, "vae"))),
      "model.safetensors" in os.listdir(os.path.join(out, "text_encoder")), same, np.array_equal(image(again), expected),
      "flashpack.integrations" in sys.modules)
"""


def test_diffusers_pipeline_use_flashpack_fresh_process_with_fal_kwargs(tmp_path):
    """diffusers' own switch on a whole pipeline: ``DiffusionPipeline.save_pretrained(dir, use_flashpack=True)``
    packs its diffusers models (transformers components stay ordinary), ``from_pretrained(dir, use_flashpack=True,
    flashpack_kwargs={fal's keywords})`` loads them, in a process where only diffusers imports flashpack. (diffusers
    0.42.1's pipeline ``from_pretrained`` does not hand ``flashpack_kwargs`` on to its models: it warns that they
    are ignored; the model-level test above covers them reaching ``assign_from_file``.)"""
    pytest.importorskip("diffusers")
    from _tiny_diffusers import clip_config, make_tokenizer
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=CLIPTextModel(clip_config()).eval(),
                                   tokenizer=make_tokenizer(tmp_path / "tok"), unet=unet.eval(),
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "src")
    r = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(tmp_path / "src"), str(tmp_path / "fp")],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == (
        "['config.json', 'model.flashpack'] ['config.json', 'model.flashpack'] True True True False")


def test_documented_pipeline_recipe_packs_and_fal_defs_index_loads(tmp_path):
    pytest.importorskip("diffusers")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from test_hf_diffusers import FlashPackStableDiffusionPipeline, files_under, image, sd_components

    plain = StableDiffusionPipeline(**sd_components(tmp_path), safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    ref = image(plain)
    plain.save_pretrained(tmp_path / "plain")
    pipe = FlashPackStableDiffusionPipeline.from_pretrained(tmp_path / "plain")
    assert {n: type(getattr(pipe, n)).__name__ for n in ("vae", "unet", "text_encoder")} == {
        "vae": "FlashPackAutoencoderKL", "unet": "FlashPackUNet2DConditionModel", "text_encoder": "FlashPackCLIPTextModel"}
    pipe.save_pretrained_flashpack(tmp_path / "fp")
    assert {"vae/model.flashpack", "unet/model.flashpack", "text_encoder/model.flashpack"} <= files_under(tmp_path / "fp")
    index = json.loads((tmp_path / "fp" / "model_index.json").read_text())
    index.update(vae=["defs", "FlashPackAutoencoderKL"], unet=["defs", "FlashPackUNet2DConditionModel"],
                 text_encoder=["defs", "FlashPackCLIPTextModel"])  # as fal's save_pretrained_flashpack records them
    (tmp_path / "fp" / "model_index.json").write_text(json.dumps(index))
    loaded = FlashPackStableDiffusionPipeline.from_pretrained_flashpack(tmp_path / "fp", "cpu", silent=True,
                                                                         num_streams=2)
    assert np.array_equal(image(loaded), ref)


def test_offline_message_tells_network_from_local_files_only(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from flashpack.integrations.hub import resolve_folder

    def down(*a, **k):
        try:
            raise ConnectionError("[Errno 111] Connection refused")
        except ConnectionError as e:
            raise LocalEntryNotFoundError("cannot reach") from e

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", down)
    with pytest.raises(flashpack.errors.ModelNotFoundError) as e:
        resolve_folder("org/name", allow_patterns=["*"])
    assert "the Hub could not be reached (ConnectionError: [Errno 111] Connection refused)" in str(e.value)
    assert "local_files_only" not in str(e.value)
    with pytest.raises(flashpack.errors.ModelNotFoundError, match=r"downloading is disabled \(local_files_only=True\)"):
        resolve_folder("org/name", allow_patterns=["*"], local_files_only=True)


def test_push_failure_names_folder_repo_and_step(monkeypatch, tmp_path):
    import huggingface_hub

    from flashpack.errors import HubPushError
    from flashpack.integrations.hub import push_folder

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            raise ConnectionError("connect failed")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(HubPushError) as e:
        push_folder(tmp_path, repo_id="me/x")
    assert str(e.value) == (f"{tmp_path}: while pushing to the Hub repo 'me/x' (creating the repo): ConnectionError: "
                            f"connect failed; the folder is saved locally, push it again later")
