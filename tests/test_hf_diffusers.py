"""diffusers integration: FlashPackDiffusersModelMixin and FlashPackDiffusionPipeline on tiny models built from
configs (no downloads). Images from a pipeline loaded with ``from_pretrained_flashpack`` must be bitwise equal to
the source pipeline's on CPU with a fixed generator and 2 steps (cases C13, C36, C37)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from flashpack import read_weight_map  # noqa: E402
from flashpack.integrations.diffusers import FlashPackDiffusersModelMixin, FlashPackDiffusionPipeline  # noqa: E402
from flashpack.integrations.hub import ModelNotFoundError  # noqa: E402
from flashpack.integrations.transformers import FlashPackTransformersModelMixin  # noqa: E402

from _tiny_diffusers import (  # noqa: E402
    SIZE,
    FlashPackAutoencoderKL,
    FlashPackCLIPTextModel,
    FlashPackCLIPTextModelWithProjection,
    FlashPackStableDiffusionPipeline,
    FlashPackStableDiffusionXLPipeline,
    FlashPackUNet2DConditionModel,
    MixedStableDiffusionPipeline,
    files_under,
    image,
    sd_components,
    sdxl_components,
    tiny_unet,
    tiny_vae,
)


@pytest.fixture(scope="module")
def sd_source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    pipe = FlashPackStableDiffusionPipeline(**sd_components(tmp))
    return pipe, image(pipe)


@pytest.fixture(scope="module")
def sd_saved(sd_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_saved") / "pipe"
    sd_source[0].save_pretrained_flashpack(folder)
    return folder


# --------------------------------------------------------------------------- models


def test_c13_vae_roundtrip_equal_outputs_and_eval(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.train()  # saved in train mode: comes back in eval mode (C13)
    path = vae.save_pretrained_flashpack(tmp_path / "vae")
    assert os.path.basename(path) == "model.flashpack"
    assert sorted(os.listdir(tmp_path / "vae")) == ["config.json", "model.flashpack"]
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL"  # the diffusers class, importable anywhere
    loaded = FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae")
    assert type(loaded) is FlashPackAutoencoderKL and not loaded.training
    sd_a, sd_b = vae.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(vae.eval().decode(vae.encode(x).latent_dist.mean).sample,
                           loaded.decode(loaded.encode(x).latent_dist.mean).sample)


def test_plain_from_pretrained_still_loads_ordinary_checkpoints(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "plain")
    again = FlashPackAutoencoderKL.from_pretrained(tmp_path / "plain")
    assert type(again) is FlashPackAutoencoderKL
    assert torch.equal(again.decoder.conv_out.weight, vae.decoder.conv_out.weight)


def test_model_variant_fp16(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet().to(torch.float16)
    unet.save_pretrained_flashpack(tmp_path / "unet", variant="fp16")
    assert sorted(os.listdir(tmp_path / "unet")) == ["config.json", "model.fp16.flashpack"]
    with pytest.raises(ModelNotFoundError, match="model.flashpack"):
        FlashPackUNet2DConditionModel.from_pretrained_flashpack(tmp_path / "unet")
    loaded = FlashPackUNet2DConditionModel.from_pretrained_flashpack(tmp_path / "unet", variant="fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)


def test_target_dtype_casts_pack(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.save_pretrained_flashpack(tmp_path / "vae", target_dtype=torch.bfloat16)
    dtypes = {t.dtype for t in read_weight_map(tmp_path / "vae" / "model.flashpack").tensors.values()}
    assert dtypes == {"BF16"}
    loaded = FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight.to(torch.bfloat16))


def test_config_overrides_and_unknown_override(tmp_path):
    torch.manual_seed(0)
    tiny_vae().save_pretrained_flashpack(tmp_path / "vae")
    m = FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae", scaling_factor=0.5)
    assert m.config.scaling_factor == 0.5
    with pytest.raises(TypeError, match="no_such_option"):
        FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae", no_such_option=3)


# --------------------------------------------------------------------------- pipelines


@pytest.mark.slow
def test_sd_pipeline_saved_layout(sd_saved):
    files = files_under(sd_saved)
    assert {"model_index.json", "vae/config.json", "vae/model.flashpack", "unet/config.json",
            "unet/model.flashpack", "text_encoder/config.json", "text_encoder/model.flashpack",
            "scheduler/scheduler_config.json"} <= files
    assert not any(f.endswith((".safetensors", ".bin", ".tmp")) for f in files), files
    assert not any(os.path.basename(f).startswith(".") for f in files), files
    index = json.loads((sd_saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]


@pytest.mark.slow
def test_sd_pipeline_images_bitwise_equal(sd_source, sd_saved):
    pipe, expected = sd_source
    loaded = FlashPackStableDiffusionPipeline.from_pretrained_flashpack(sd_saved, device_map="cpu")
    assert type(loaded.vae) is FlashPackAutoencoderKL
    assert type(loaded.unet) is FlashPackUNet2DConditionModel
    assert type(loaded.text_encoder) is FlashPackCLIPTextModel
    assert not loaded.unet.training and not loaded.text_encoder.training
    got = image(loaded)
    assert got.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(got, expected)


@pytest.mark.slow
def test_sdxl_pipeline_images_bitwise_equal(tmp_path):
    comps = sdxl_components(tmp_path)
    pipe = FlashPackStableDiffusionXLPipeline(**comps)
    expected = image(pipe)
    pipe.save_pretrained_flashpack(tmp_path / "sdxl")
    assert {"text_encoder_2/model.flashpack", "tokenizer_2/tokenizer_config.json"} <= files_under(tmp_path / "sdxl")
    loaded = FlashPackStableDiffusionXLPipeline.from_pretrained_flashpack(tmp_path / "sdxl")
    assert type(loaded.text_encoder_2) is FlashPackCLIPTextModelWithProjection
    assert torch.equal(loaded.text_encoder_2.text_projection.weight, pipe.text_encoder_2.text_projection.weight)
    assert np.array_equal(image(loaded), expected)


def test_c36a_mixed_pipeline_plain_text_encoder_class(tmp_path):
    """C36 (a): the pipeline annotates a plain CLIPTextModel: it is saved and loaded the ordinary way."""
    comps = sd_components(tmp_path, text_encoder_cls=CLIPTextModel)
    pipe = MixedStableDiffusionPipeline(**comps)
    expected = image(pipe)
    pipe.save_pretrained_flashpack(tmp_path / "mixed")
    te = os.listdir(tmp_path / "mixed" / "text_encoder")
    assert "model.safetensors" in te and not any(f.endswith(".flashpack") for f in te)
    assert os.path.isfile(tmp_path / "mixed" / "unet" / "model.flashpack")
    loaded = MixedStableDiffusionPipeline.from_pretrained_flashpack(tmp_path / "mixed")
    assert type(loaded.text_encoder) is CLIPTextModel and type(loaded.unet) is FlashPackUNet2DConditionModel
    assert np.array_equal(image(loaded), expected)


def test_c36b_mixed_pipeline_flashpack_class_without_pack(sd_source, tmp_path):
    """C36 (b): FlashPack-enabled text encoder class, but its folder holds only ordinary safetensors."""
    pipe, expected = sd_source
    folder = tmp_path / "mixed"
    pipe.save_pretrained_flashpack(folder)
    te = folder / "text_encoder"
    for f in os.listdir(te):
        os.unlink(te / f)
    pipe.text_encoder.save_pretrained(te)  # ordinary: config.json + model.safetensors
    assert "model.safetensors" in os.listdir(te)
    loaded = FlashPackStableDiffusionPipeline.from_pretrained_flashpack(folder)
    assert type(loaded.text_encoder) is FlashPackCLIPTextModel  # loaded by its own from_pretrained
    assert np.array_equal(image(loaded), expected)


def test_c37_pipeline_saved_twice_into_one_folder(sd_source, tmp_path):
    """C37: no temporary files; the second save reads back exactly (with changed weights)."""
    pipe, _ = sd_source
    folder = tmp_path / "twice"
    pipe.save_pretrained_flashpack(folder)
    first = files_under(folder)
    torch.manual_seed(1)
    other_vae = tiny_vae().eval()
    pipe2 = FlashPackStableDiffusionPipeline(vae=other_vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                             unet=pipe.unet, scheduler=pipe.scheduler)
    pipe2.save_pretrained_flashpack(folder)
    assert files_under(folder) == first
    assert not any(".tmp" in f or os.path.basename(f).startswith(".") for f in first)
    loaded = FlashPackStableDiffusionPipeline.from_pretrained_flashpack(folder)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, other_vae.decoder.conv_out.weight)
    assert not torch.equal(loaded.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)


def test_pipeline_variant_fp16(sd_source, tmp_path):
    pipe, _ = sd_source
    comps = {k: (v.to(torch.float16) if isinstance(v, torch.nn.Module) else v) for k, v in pipe.components.items()}
    comps = {k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe16 = FlashPackStableDiffusionPipeline(**comps)
    pipe16.save_pretrained_flashpack(tmp_path / "p16", variant="fp16")
    files = files_under(tmp_path / "p16")
    assert {"vae/model.fp16.flashpack", "unet/model.fp16.flashpack", "text_encoder/model.fp16.flashpack"} <= files
    assert not any(f.endswith("/model.flashpack") for f in files)
    loaded = FlashPackStableDiffusionPipeline.from_pretrained_flashpack(tmp_path / "p16", variant="fp16")
    for name in ("vae", "unet", "text_encoder"):
        m = getattr(loaded, name)
        assert {p.dtype for p in m.parameters()} == {torch.float16}, name
    assert torch.equal(loaded.unet.conv_in.weight, pipe16.unet.conv_in.weight)
    # torch_dtype converts FlashPack components after loading
    loaded32 = FlashPackStableDiffusionPipeline.from_pretrained_flashpack(tmp_path / "p16", variant="fp16",
                                                                          torch_dtype=torch.float32)
    assert loaded32.unet.dtype == torch.float32
    assert torch.equal(loaded32.unet.conv_in.weight, pipe16.unet.conv_in.weight.float())
    # restore the shared source pipeline
    for k in ("vae", "text_encoder", "unet"):
        getattr(pipe, k).to(torch.float32)


def test_pipeline_pack_without_flashpack_annotation_is_a_clear_error(sd_saved):
    class Plain(FlashPackDiffusionPipeline, StableDiffusionPipeline):
        pass

    with pytest.raises(TypeError, match="FlashPack-enabled"):
        Plain.from_pretrained_flashpack(sd_saved)


def test_pack_keys_the_model_ignores_on_load_are_skipped_as_by_from_pretrained(tmp_path):
    """diffusers' from_pretrained drops checkpoint keys the model does not have that match its class's
    ``_keys_to_ignore_on_load_unexpected`` (Wan's ``norm_added_q`` in image-to-video checkpoints);
    from_pretrained_flashpack skips them too, and still refuses an unexpected key outside those rules."""
    from flashpack import ModelMismatchError, pack_to_file

    class IgnoringVAE(FlashPackAutoencoderKL):
        _keys_to_ignore_on_load_unexpected = ["norm_added_q"]

    torch.manual_seed(0)
    vae = tiny_vae()
    vae.save_pretrained_flashpack(tmp_path / "vae")
    extra = dict(vae.state_dict(), **{"decoder.norm_added_q.weight": torch.ones(4)})
    pack_to_file(extra, str(tmp_path / "vae" / "model.flashpack"))
    loaded = IgnoringVAE.from_pretrained_flashpack(tmp_path / "vae")
    want, got = vae.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ModelMismatchError, match="decoder.norm_added_q.weight"):
        FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae")
