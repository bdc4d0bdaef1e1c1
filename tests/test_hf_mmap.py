"""``mmap=True`` on the model loaders (issue 12): ``from_pretrained_flashpack`` of the transformers and diffusers
mixins and of the pipeline, and ``FlashPackMixin.from_flashpack``. The parameters must be views of a private
writable mapping of the pack (checked in /proc/self/maps), equal to the saved ones; writes stay in the process;
``verify=True`` turns a damaged pack into a ChecksumMismatchError; a CUDA target is refused with a UsageError
before anything is read, built or any CUDA call made (so it is checked on CPU-only machines too)."""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import flashpack  # noqa: E402
from flashpack import ChecksumMismatchError, FlashPackMixin, assign_from_file, read_weight_map  # noqa: E402
from flashpack.errors import UsageError  # noqa: E402
from flashpack.integrations.transformers import FlashPackTransformersModelMixin  # noqa: E402

from _helpers import file_bytes, flip_byte  # noqa: E402
from _tiny_diffusers import (  # noqa: E402
    FlashPackAutoencoderKL,
    FlashPackStableDiffusionPipeline,
    sd_components,
    tiny_vae,
)


class FlashPackGPT2LMHeadModel(FlashPackTransformersModelMixin, GPT2LMHeadModel):
    pass


def tiny_gpt2() -> FlashPackGPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=1)
    return FlashPackGPT2LMHeadModel(cfg).eval()


def mapping_of(ptr: int) -> tuple[str, str]:
    """(permissions, path) of the /proc/self/maps line holding address ``ptr``; ("", "") if none does."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[1], parts[5].strip() if len(parts) == 6 else ""
    return "", ""


def mapped_files(module: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """state_dict key -> (permissions, file) of the memory behind every non-empty tensor of ``module``."""
    return {k: mapping_of(t.data_ptr()) for k, t in module.state_dict().items() if t.numel()}


def assert_views_of(module: torch.nn.Module, pack: str) -> None:
    real = os.path.realpath(pack)
    maps = mapped_files(module)
    assert maps and all(v == ("rw-p", real) for v in maps.values()), {k: v for k, v in maps.items() if v[1] != real}


# --------------------------------------------------------------------------- transformers


def test_transformers_mmap_parameters_are_views_of_the_pack(tmp_path):
    model = tiny_gpt2()
    pack = model.save_pretrained_flashpack(tmp_path / "m")
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", mmap=True)
    ref = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert_views_of(loaded, pack)  # every tensor: private writable mapping of this very file
    assert loaded.transformer.wte.weight is loaded.lm_head.weight and not loaded.training
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the default (mmap=False) copies into anonymous memory: nothing is backed by the pack
    copied = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m")
    assert not [k for k, (_, f) in mapped_files(copied).items() if f == os.path.realpath(pack)]


def test_transformers_mmap_writes_never_reach_the_file(tmp_path):
    model = tiny_gpt2()
    pack = model.save_pretrained_flashpack(tmp_path / "m")
    before = file_bytes(pack)
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", mmap=True)
    w = loaded.transformer.h[0].attn.c_attn.weight
    with torch.no_grad():
        w.add_(1.0)
        w[0, 0] = -7.0
    assert w[0, 0].item() == -7.0 and torch.equal(w[1:], model.transformer.h[0].attn.c_attn.weight[1:] + 1.0)
    assert file_bytes(pack) == before
    again = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", mmap=True)
    assert torch.equal(again.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)


def test_transformers_mmap_verify_catches_a_damaged_pack(tmp_path):
    model = tiny_gpt2()
    pack = model.save_pretrained_flashpack(tmp_path / "m")
    key = "transformer.h.1.mlp.c_fc.weight"
    flip_byte(pack, read_weight_map(pack).tensors[key].offset + 5)
    with pytest.raises(ChecksumMismatchError, match=re.escape(f"{pack}: checksum mismatch in block 0 (F32) chunk 0")):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", mmap=True, verify=True)
    # without verify=True mmap checks nothing (documented): the model holds the file's bytes, one byte flipped
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", mmap=True)
    a = loaded.get_parameter(key).detach().reshape(-1).view(torch.uint8)
    b = model.get_parameter(key).detach().reshape(-1).view(torch.uint8)
    assert (a != b).nonzero().flatten().tolist() == [5] and int(a[5]) == int(b[5]) ^ 0xFF


def test_transformers_mmap_with_dtype_conversion_copies(tmp_path):
    tiny_gpt2().save_pretrained_flashpack(tmp_path / "m")
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", mmap=True, dtype=torch.float16)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    pack = os.path.realpath(tmp_path / "m" / "model.flashpack")
    assert not [k for k, (_, f) in mapped_files(loaded).items() if f == pack]


# --------------------------------------------------------------------------- CUDA targets: refused up front


@pytest.mark.parametrize("where", [{"device_map": "cuda"}, {"device_map": "cuda:0"}, {"device_map": 0},
                                   {"device_map": {"": "cuda:0"}}, {"device": "cuda"},
                                   {"device_map": torch.device("cuda", 1)}])
def test_mmap_with_a_cuda_target_is_refused_before_any_work(tmp_path, where):
    missing = tmp_path / "not-saved"  # nothing here: the error must come before any file is looked at
    loaders = (FlashPackGPT2LMHeadModel.from_pretrained_flashpack, FlashPackAutoencoderKL.from_pretrained_flashpack,
               FlashPackStableDiffusionPipeline.from_pretrained_flashpack)
    for load in loaders:
        with pytest.raises(UsageError, match=r"not-saved: mmap=True keeps the weights in a private mapping .* "
                                             r"target device is cuda.*device_map='cpu'.*leave mmap=False"):
            load(missing, mmap=True, **where)


def test_mmap_with_a_cuda_target_core_api(tmp_path):
    class Lin(torch.nn.Module, FlashPackMixin):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

    def never(*a, **k):
        raise AssertionError("the module must not be built when the arguments are refused")

    with pytest.raises(UsageError, match="nothing.flashpack: mmap=True .* target device is cuda:0"):
        Lin.from_flashpack(tmp_path / "nothing.flashpack", device="cuda:0", mmap=True, init_fn=never)
    with pytest.raises(UsageError, match="target device is cuda"):
        assign_from_file(Lin(), tmp_path / "nothing.flashpack", device="cuda", mmap=True)
    # to the CPU the same call maps the pack
    Lin().save_flashpack(tmp_path / "lin.flashpack")
    m = Lin.from_flashpack(tmp_path / "lin.flashpack", mmap=True)
    assert_views_of(m, str(tmp_path / "lin.flashpack"))


# --------------------------------------------------------------------------- diffusers


def test_diffusers_model_mmap(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae()
    pack = vae.save_pretrained_flashpack(tmp_path / "vae")
    before = file_bytes(pack)
    loaded = FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae", mmap=True)
    ref, got = vae.state_dict(), loaded.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert_views_of(loaded, pack)
    with torch.no_grad():
        next(loaded.parameters()).mul_(3.0)
    assert file_bytes(pack) == before
    flip_byte(pack, read_weight_map(pack).tensors["decoder.conv_out.weight"].offset)
    with pytest.raises(ChecksumMismatchError, match=re.escape(f"{pack}: checksum mismatch in block 0 (F32)")):
        FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae", mmap=True, verify=True)


def test_pipeline_mmap_maps_every_packed_component(tmp_path):
    pipe = FlashPackStableDiffusionPipeline(**sd_components(tmp_path / "src"))
    folder = tmp_path / "pipe"
    pipe.save_pretrained_flashpack(folder)
    loaded = FlashPackStableDiffusionPipeline.from_pretrained_flashpack(folder, mmap=True)
    for name in ("vae", "unet", "text_encoder"):
        src, comp = getattr(pipe, name), getattr(loaded, name)
        ref, got = src.state_dict(), comp.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
        assert_views_of(comp, str(folder / name / "model.flashpack"))
    unet_pack = str(folder / "unet" / "model.flashpack")
    flip_byte(unet_pack, read_weight_map(unet_pack).tensors["mid_block.resnets.0.conv1.weight"].offset)
    with pytest.raises(ChecksumMismatchError, match=re.escape(f"{unet_pack}: checksum mismatch in block 0 (F32)")):
        FlashPackStableDiffusionPipeline.from_pretrained_flashpack(folder, mmap=True, verify=True)
    assert flashpack.load(folder / "vae" / "model.flashpack", mmap=True, verify=True)  # the others are intact
