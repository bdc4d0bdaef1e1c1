"""fal's flashpack API names and keyword arguments keep working (diffusers 0.42 calls them by keyword)."""

import os

import pytest
import torch

import flashpack
import flashpack.mixin
import flashpack.serialization


def test_pack_to_file_takes_fal_keyword_names(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "ids": torch.tensor([1001, 1002])}
    dst = tmp_path / "x.flashpack"
    flashpack.serialization.pack_to_file(state_dict_or_model=sd, destination_path=str(dst), target_dtype=torch.bfloat16)
    out = flashpack.load(dst)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], sd["w"].to(torch.bfloat16))
    assert out["ids"].dtype == torch.int64 and out["ids"].tolist() == [1001, 1002]


def test_pack_to_file_target_dtype_third_positional(tmp_path):
    flashpack.pack_to_file({"w": torch.ones(4)}, tmp_path / "y.flashpack", torch.float16)
    assert flashpack.load(tmp_path / "y.flashpack")["w"].dtype == torch.float16


def test_assign_from_file_importable_from_mixin_with_keywords(tmp_path):
    src = torch.nn.Linear(3, 2)
    flashpack.pack_to_file(src, tmp_path / "l.flashpack")
    dst = torch.nn.Linear(3, 2)
    result = flashpack.mixin.assign_from_file(model=dst, path=str(tmp_path / "l.flashpack"), device=torch.device("cpu"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)


def test_diffusers_builtin_use_flashpack_round_trip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                                  sample_size=16)
    vae.save_pretrained(tmp_path / "vae", use_flashpack=True)
    assert sorted(os.listdir(tmp_path / "vae")) == ["config.json", "model.flashpack"]
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae", use_flashpack=True, device_map="cpu")
    a, b = vae.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_assign_from_file_importable_from_deserialization_as_in_fal(tmp_path):
    from flashpack.deserialization import assign_from_file as from_deserialization
    from flashpack.mixin import assign_from_file as from_mixin

    assert from_deserialization is from_mixin is flashpack.assign_from_file  # one implementation
    src = torch.nn.Linear(3, 2)
    flashpack.pack_to_file(src, tmp_path / "d.flashpack")
    dst = torch.nn.Linear(3, 2)
    result = from_deserialization(dst, str(tmp_path / "d.flashpack"), "cpu", None, True, False)  # fal's positions
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
