"""Every example of fal's FlashPack user documentation (``../shared/flashpack-user-docs.md``, fal.ai/docs "FlashPack")
runs unchanged against this library and does what its text says (issue 13).

The examples' code is copied as written. What is substituted, and nothing else:

- the Hub repo the docs read from, ``stabilityai/stable-diffusion-xl-base-1.0``, is a tiny SDXL folder of that
  relative name in the test's working folder (plain library classes, float32 weights plus an ``fp16`` variant),
  so the same string names it and diffusers / transformers / the CLI take it for a local folder;
- the Hub repos the docs push to and load from (``my-org/...``) are served by a test double of the Hub
  (``_helpers.FakeHub``: ``HfApi.create_repo``, ``HfApi.upload_folder`` and ``snapshot_download``, the three calls
  flashpack makes): a push records the repo id and the files and keeps a copy, a download hands back the files
  the patterns ask for;
- ``"cuda"`` is ``"cpu"``; ``/path/to/save/directory`` and ``/data/models/my-model.flashpack`` are under tmp_path;
- the CLI's ``flashpack`` is this checkout's ``python -m flashpack`` (a shim on ``PATH``), run by bash from the
  docs' text;
- ``fal`` (App, endpoint, toolkit.Image.from_pil), ``my_model`` and ``my_flashpack_classes`` are small modules put
  in ``sys.modules`` here, so the apps' class bodies run as written; the apps' ``setup()`` and endpoint are called.

The docs' ``"..."`` placeholders (``MyModel(...)``, ``MyModule.__init__``) are filled with small modules.

The CLI commands are run each in a folder of its own: this library's ``convert`` does not replace an existing
destination without ``--force`` (case C37), so the docs' first and third ``convert`` lines, run one after the
other in one folder, would stop at the third.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

import flashpack  # noqa: E402
from _helpers import FakeHub, files_under  # noqa: E402
from _tiny_diffusers import clip_config, write_sdxl_repo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
UPSTREAM = "stabilityai/stable-diffusion-xl-base-1.0"


# --------------------------------------------------------------------------- the docs' "Diffusers Pipelines" classes, as written

from typing import Optional  # noqa: E402

from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: E402
from flashpack.integrations.diffusers import (  # noqa: E402
    FlashPackDiffusersModelMixin,
    FlashPackDiffusionPipeline,
)
from flashpack.integrations.transformers import FlashPackTransformersModelMixin  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

# Define FlashPack-enabled classes
class FlashPackCLIPTextModel(FlashPackTransformersModelMixin, CLIPTextModel):
    pass

class FlashPackCLIPTextModelWithProjection(
    FlashPackTransformersModelMixin, CLIPTextModelWithProjection
):
    pass

class FlashPackAutoencoderKL(FlashPackDiffusersModelMixin, AutoencoderKL):
    pass

class FlashPackUNet2DConditionModel(FlashPackDiffusersModelMixin, UNet2DConditionModel):
    pass

class FlashPackStableDiffusionXLPipeline(
    FlashPackDiffusionPipeline, StableDiffusionXLPipeline
):
    def __init__(
        self,
        vae: FlashPackAutoencoderKL,
        text_encoder: FlashPackCLIPTextModel,
        text_encoder_2: FlashPackCLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: FlashPackUNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        add_watermarker: Optional[bool] = None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            add_watermarker=add_watermarker,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )


PACKED = {"vae": FlashPackAutoencoderKL, "unet": FlashPackUNet2DConditionModel,
          "text_encoder": FlashPackCLIPTextModel, "text_encoder_2": FlashPackCLIPTextModelWithProjection}


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The folder holding ``stabilityai/stable-diffusion-xl-base-1.0/``, the tiny SDXL standing in for that repo."""
    root = tmp_path_factory.mktemp("upstream")
    write_sdxl_repo(root / UPSTREAM)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch, upstream):
    """tmp_path as the working folder, with ``stabilityai/`` linked in (read-only use: nothing writes there)."""
    os.symlink(upstream / "stabilityai", tmp_path / "stabilityai")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub the docs push to and load from: pushes recorded and kept, downloads served from them."""
    return FakeHub(store=tmp_path / "hub").install(monkeypatch, serve=True)


def spy_pack_loads(monkeypatch) -> list[tuple[str, str]]:
    """Record every ``from_pretrained_flashpack`` of a FlashPack model class: (class name, folder name)."""
    calls: list[tuple[str, str]] = []
    for mixin in (FlashPackDiffusersModelMixin, FlashPackTransformersModelMixin):
        original = mixin.__dict__["from_pretrained_flashpack"].__func__

        def spy(cls, name_or_path, *args, _original=original, **kwargs):
            calls.append((cls.__name__, os.path.basename(os.path.normpath(os.fspath(name_or_path)))))
            return _original(cls, name_or_path, *args, **kwargs)

        monkeypatch.setattr(mixin, "from_pretrained_flashpack", classmethod(spy))
    return calls


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_fp16_variant(state_dict: dict, component: str):
    """``state_dict`` holds the upstream component's ``fp16`` variant weights (in its own dtype), not the
    float32 ones (random float32 values are not float16 numbers)."""
    folder = os.path.join(UPSTREAM, component)
    fp16 = load_file(os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".fp16.safetensors"))))
    fp32 = load_file(os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith("model.safetensors"))))
    assert fp16.keys() <= state_dict.keys(), component
    assert all(torch.equal(state_dict[k], fp16[k].to(state_dict[k].dtype)) for k in fp16), component
    assert not all(torch.equal(state_dict[k], fp32[k]) for k in fp32), component


# --------------------------------------------------------------------------- Integration Methods: Direct Function Calling


class MyModel(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.head = nn.Linear(width, 16, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("calls", torch.tensor([3], dtype=torch.int64))


def test_direct_function_calling(tmp_path):
    from flashpack import pack_to_file, assign_from_file

    flashpack_path = str(tmp_path / "data/models/my-model.flashpack")
    os.makedirs(os.path.dirname(flashpack_path))
    torch.manual_seed(0)
    model = MyModel(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    pack_to_file(model, flashpack_path)
    assign_from_file(model, flashpack_path)

    assert flashpack.is_flashpack_file(flashpack_path)
    assert_same_tensors(model.state_dict(), before)  # the model now holds the pack's tensors: the same values
    other = MyModel(8)  # a fresh model, other weights: filled from the pack
    assert not torch.equal(other.body[0].weight, before["body.0.weight"])
    assign_from_file(other, flashpack_path)
    assert_same_tensors(other.state_dict(), before)
    assert other.head.weight is other.embed.weight  # the tie is kept


# --------------------------------------------------------------------------- Integration Methods: PyTorch Mixin


def test_pytorch_mixin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    from flashpack import FlashPackMixin

    class MyModule(nn.Module, FlashPackMixin):
        def __init__(self, some_arg: int = 4) -> None:
            super().__init__()
            self.proj = nn.Linear(some_arg, 6)
            self.norm = nn.LayerNorm(6)
            self.register_buffer("some_arg", torch.tensor([some_arg]))

    torch.manual_seed(0)
    module = MyModule(some_arg=4)
    module.save_flashpack("model.flashpack")

    loaded_module = MyModule.from_flashpack("model.flashpack", some_arg=4)

    assert os.path.isfile(tmp_path / "model.flashpack")
    assert type(loaded_module) is MyModule and loaded_module.proj.in_features == 4
    assert_same_tensors(loaded_module.state_dict(), module.state_dict())
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded_module.norm(loaded_module.proj(x)), module.norm(module.proj(x)))


# --------------------------------------------------------------------------- Integration Methods: Diffusers Models


def test_diffusers_models(workdir, hub, monkeypatch):
    calls = spy_pack_loads(monkeypatch)
    save_dir = str(workdir / "path/to/save/directory")

    from flashpack.integrations.diffusers import FlashPackDiffusersModelMixin
    from diffusers.models import AutoencoderKL

    class FlashPackAutoencoderKL(FlashPackDiffusersModelMixin, AutoencoderKL):
        pass

    # Load from original weights
    sdxl_vae = FlashPackAutoencoderKL.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        variant="fp16",
        subfolder="vae",
    )
    original = {k: v.clone() for k, v in sdxl_vae.state_dict().items()}
    assert_fp16_variant(original, "vae")

    # Save as FlashPack (optionally push to HuggingFace)
    sdxl_vae.save_pretrained_flashpack(
        save_dir,
        push_to_hub=True,
        repo_id="my-org/sdxl-vae-flashpack",
    )

    assert sorted(os.listdir(save_dir)) == ["config.json", "model.flashpack"]
    assert [c["repo_id"] for c in hub.created] == ["my-org/sdxl-vae-flashpack"]
    assert [(u["repo_id"], u["files"]) for u in hub.uploads] == [
        ("my-org/sdxl-vae-flashpack", {"config.json", "model.flashpack"})]

    # Load from FlashPack
    sdxl_vae = FlashPackAutoencoderKL.from_pretrained_flashpack(
        "my-org/sdxl-vae-flashpack",
        device_map="cpu",
    )

    assert calls == [("FlashPackAutoencoderKL", "sdxl-vae-flashpack")]
    assert [(d["repo_id"], sorted(d["files"])) for d in hub.downloads] == [
        ("my-org/sdxl-vae-flashpack", ["config.json", "model.flashpack"])]
    assert type(sdxl_vae) is FlashPackAutoencoderKL and not sdxl_vae.training and sdxl_vae.device.type == "cpu"
    assert_same_tensors(sdxl_vae.state_dict(), original)


# --------------------------------------------------------------------------- Integration Methods: Transformers Models


def test_transformers_models(workdir, hub, monkeypatch):
    calls = spy_pack_loads(monkeypatch)
    save_dir = str(workdir / "path/to/save/directory")

    from flashpack.integrations.transformers import FlashPackTransformersModelMixin
    from transformers import CLIPTextModel

    class FlashPackCLIPTextModel(FlashPackTransformersModelMixin, CLIPTextModel):
        pass

    # Load, convert, and save
    clip = FlashPackCLIPTextModel.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        variant="fp16",
        subfolder="text_encoder",
    )
    original = {k: v.clone() for k, v in clip.state_dict().items()}
    assert_fp16_variant(original, "text_encoder")
    clip.save_pretrained_flashpack(
        save_dir,
        push_to_hub=True,
        repo_id="my-org/sdxl-text-encoder-flashpack",
    )

    assert [(u["repo_id"], u["files"]) for u in hub.uploads] == [
        ("my-org/sdxl-text-encoder-flashpack", set(os.listdir(save_dir)))]
    assert {"config.json", "model.flashpack"} <= set(os.listdir(save_dir))
    assert not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(save_dir))

    # Load from FlashPack
    clip = FlashPackCLIPTextModel.from_pretrained_flashpack(
        "my-org/sdxl-text-encoder-flashpack",
        device_map="cpu",
    )

    assert calls == [("FlashPackCLIPTextModel", "sdxl-text-encoder-flashpack")]
    assert hub.downloads[0]["repo_id"] == "my-org/sdxl-text-encoder-flashpack"
    assert "model.flashpack" in hub.downloads[0]["files"]
    assert type(clip) is FlashPackCLIPTextModel and not clip.training and clip.device.type == "cpu"
    assert_same_tensors(clip.state_dict(), original)
    ids = torch.tensor([[0, 5, 9, 1]])
    reference = FlashPackCLIPTextModel.from_pretrained(UPSTREAM, variant="fp16", subfolder="text_encoder").eval()
    with torch.no_grad():
        assert torch.equal(clip(ids).last_hidden_state, reference(ids).last_hidden_state)


# --------------------------------------------------------------------------- Integration Methods: Diffusers Pipelines


def test_diffusers_pipelines(workdir, hub, monkeypatch):
    # Save entire pipeline as FlashPack
    pipeline = FlashPackStableDiffusionXLPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        variant="fp16",
    )

    for name, klass in PACKED.items():  # FlashPack-enabled components built as the annotated classes ...
        assert type(getattr(pipeline, name)) is klass, name
        assert_fp16_variant(getattr(pipeline, name).state_dict(), name)  # ... from the fp16 variant
    assert type(pipeline.tokenizer).__name__ == type(pipeline.tokenizer_2).__name__ == "CLIPTokenizer"
    torch.manual_seed(0)
    expected = pipeline("A sunset over mountains", num_inference_steps=50).images[0]

    pipeline.save_pretrained_flashpack(
        "flashpack-sdxl",
        push_to_hub=True,
        repo_id="my-org/sdxl-flashpack",
    )

    saved = files_under(workdir / "flashpack-sdxl")
    assert {f"{n}/model.flashpack" for n in PACKED} <= saved
    assert not any(f.endswith((".safetensors", ".bin")) for f in saved), saved
    assert [c["repo_id"] for c in hub.created] == ["my-org/sdxl-flashpack"]
    assert [(u["repo_id"], u["files"]) for u in hub.uploads] == [("my-org/sdxl-flashpack", saved)]

    # Load from FlashPack -- immediately ready to use
    calls = spy_pack_loads(monkeypatch)
    pipeline = FlashPackStableDiffusionXLPipeline.from_pretrained_flashpack(
        "my-org/sdxl-flashpack",
        device_map="cpu",
    )
    torch.manual_seed(0)
    image = pipeline("A sunset over mountains", num_inference_steps=50).images[0]

    # FlashPack-enabled models came from their packs (the repo holds no other weights) ...
    assert sorted(calls) == sorted((k.__name__, n) for n, k in PACKED.items())
    assert all(type(getattr(pipeline, n)) is k for n, k in PACKED.items())
    assert not any(f.endswith((".safetensors", ".bin")) for d in hub.downloads for f in d["files"])
    # ... and the rest with their own from_pretrained
    assert type(pipeline.tokenizer) is CLIPTokenizer and type(pipeline.tokenizer_2) is CLIPTokenizer
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipeline.feature_extractor is None and pipeline.image_encoder is None
    assert image.mode == "RGB" and image.size == (16, 16)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


# --------------------------------------------------------------------------- CLI Commands


def flashpack_cli(workdir, script: str) -> subprocess.CompletedProcess:
    """Run the docs' bash text in ``workdir`` with ``flashpack`` = this checkout's ``python -m flashpack``."""
    bindir = workdir / ".bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "flashpack"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flashpack "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FLASHPACK_DEBUG", None)
    r = subprocess.run(["bash", "-euc", textwrap.dedent(script)], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.fixture
def my_model(tmp_path):
    """``./my_model``: a local transformers model folder (config.json + model.safetensors), with its tensors."""
    torch.manual_seed(0)
    CLIPTextModel(clip_config()).save_pretrained(tmp_path / "my_model")
    return load_file(str(tmp_path / "my_model" / "model.safetensors"))


def test_cli_convert_a_local_model(tmp_path, my_model):
    flashpack_cli(tmp_path, """
        # Convert a local model
        flashpack convert ./my_model ./my_model.flashpack
    """)
    assert_same_tensors(flashpack.load(tmp_path / "my_model.flashpack"), my_model)


def test_cli_convert_from_huggingface(tmp_path, upstream):
    shutil.copytree(upstream / "stabilityai", tmp_path / "stabilityai")  # a copy: this command writes into it
    flashpack_cli(tmp_path, """
        # Convert from HuggingFace
        flashpack convert stabilityai/stable-diffusion-xl-base-1.0 \\
          --subfolder unet --use-diffusers
    """)
    unet = tmp_path / UPSTREAM / "unet"
    assert_same_tensors(flashpack.load(unet / "model.flashpack"),
                        load_file(str(unet / "diffusion_pytorch_model.safetensors")))


def test_cli_convert_with_specific_dtype(tmp_path, my_model):
    flashpack_cli(tmp_path, """
        # Convert with specific dtype
        flashpack convert ./my_model ./my_model.flashpack --dtype float16
    """)
    wm = flashpack.read_weight_map(tmp_path / "my_model.flashpack")
    assert {wm.tensors[k].dtype for k in my_model if my_model[k].is_floating_point()} == {"F16"}
    got = flashpack.load(tmp_path / "my_model.flashpack")
    assert_same_tensors(got, {k: v.half() if v.is_floating_point() else v for k, v in my_model.items()})


@pytest.fixture
def my_pack(tmp_path, my_model):
    """``./my_model.flashpack`` packed from ``./my_model``."""
    flashpack.pack_to_file(my_model, tmp_path / "my_model.flashpack")
    return my_model


def test_cli_metadata(tmp_path, my_pack):
    r = flashpack_cli(tmp_path, """
        flashpack metadata ./my_model.flashpack
    """)
    assert "./my_model.flashpack" in r.stdout
    assert f"tensors:      {len(my_pack)} stored" in r.stdout
    assert "F32" in r.stdout


def test_cli_metadata_show_index_json(tmp_path, my_pack):
    r = flashpack_cli(tmp_path, """
        flashpack metadata ./my_model.flashpack --show-index --json
    """)
    doc = json.loads(r.stdout)
    assert doc["tensors"] == len(my_pack)
    assert {e["name"]: e["shape"] for e in doc["index"]} == {k: list(v.shape) for k, v in my_pack.items()}
    assert sum(e["nbytes"] for e in doc["index"]) == sum(v.nbytes for v in my_pack.values())


def test_cli_revert_to_safetensors(tmp_path, my_pack):
    flashpack_cli(tmp_path, """
        flashpack revert ./my_model.flashpack ./my_model.safetensors
    """)
    assert_same_tensors(load_file(str(tmp_path / "my_model.safetensors")), my_pack)


# --------------------------------------------------------------------------- Using FlashPack on fal


@pytest.fixture
def fal(monkeypatch):
    """A ``fal`` module with what the docs' apps use: ``App``, ``endpoint(path)``, ``toolkit.Image.from_pil``."""
    fal = types.ModuleType("fal")
    toolkit = types.ModuleType("fal.toolkit")

    class App:
        machine_type = None
        requirements: list = []

    def endpoint(path):
        def register(fn):
            fn.fal_endpoint = path
            return fn
        return register

    class Image:
        def __init__(self, pil):
            self.pil = pil

        @classmethod
        def from_pil(cls, pil):
            return cls(pil)

    fal.App, fal.endpoint, fal.toolkit, toolkit.Image = App, endpoint, toolkit, Image
    monkeypatch.setitem(sys.modules, "fal", fal)
    monkeypatch.setitem(sys.modules, "fal.toolkit", toolkit)
    return fal


class PromptModel(nn.Module):
    """``my_model.build_model()``: a module called with a prompt, returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, prompt: str) -> dict:
        ids = torch.tensor([ord(c) % 128 for c in prompt])
        with torch.no_grad():
            return {"scores": self.out(self.embed(ids).mean(0)).tolist()}


def test_fal_app_assign_from_file(tmp_path, monkeypatch, fal):
    my_model = types.ModuleType("my_model")
    my_model.build_model = PromptModel
    monkeypatch.setitem(sys.modules, "my_model", my_model)
    torch.manual_seed(0)
    trained = PromptModel()
    path = str(tmp_path / "data/models/my-model.flashpack")
    os.makedirs(os.path.dirname(path))
    flashpack.pack_to_file(trained, path)  # "Convert your model to FlashPack format, store it on /data"

    import fal
    from flashpack import assign_from_file

    class MyModel(fal.App):
        machine_type = "GPU-A100"
        requirements = ["flashpack", "torch", "diffusers"]

        def setup(self):
            import torch
            from my_model import build_model

            self.model = build_model()
            assign_from_file(self.model, path)

        @fal.endpoint("/")
        def generate(self, prompt: str) -> dict:
            return self.model(prompt)

    app = MyModel()
    app.setup()
    assert MyModel.generate.fal_endpoint == "/"
    assert PromptModel()("a red cat") != trained("a red cat")  # a freshly built model differs ...
    assert app.generate("a red cat") == trained("a red cat")  # ... the app's was filled from the pack
    assert_same_tensors(app.model.state_dict(), trained.state_dict())


def test_fal_app_diffusers_integration(workdir, hub, monkeypatch, fal):
    FlashPackStableDiffusionXLPipeline.from_pretrained(UPSTREAM).save_pretrained_flashpack(
        "flashpack-sdxl", push_to_hub=True, repo_id="my-org/sdxl-flashpack")  # "store it on ... HuggingFace"
    classes = types.ModuleType("my_flashpack_classes")
    classes.FlashPackStableDiffusionXLPipeline = FlashPackStableDiffusionXLPipeline
    monkeypatch.setitem(sys.modules, "my_flashpack_classes", classes)
    calls = spy_pack_loads(monkeypatch)

    import fal

    class SDXLApp(fal.App):
        machine_type = "GPU-A100"
        requirements = ["flashpack", "torch", "diffusers", "transformers"]

        def setup(self):
            from my_flashpack_classes import FlashPackStableDiffusionXLPipeline

            self.pipe = FlashPackStableDiffusionXLPipeline.from_pretrained_flashpack(
                "my-org/sdxl-flashpack",
                device_map="cpu",
            )

        @fal.endpoint("/")
        def generate(self, prompt: str) -> dict:
            image = self.pipe(prompt, num_inference_steps=30).images[0]
            return {"image": fal.toolkit.Image.from_pil(image)}

    app = SDXLApp()
    app.setup()
    assert sorted(calls) == sorted((k.__name__, n) for n, k in PACKED.items())
    out = app.generate("A sunset over mountains")
    assert type(out["image"]) is fal.toolkit.Image
    assert out["image"].pil.mode == "RGB" and out["image"].pil.size == (16, 16)


def test_cli_blocks_run_top_to_bottom_in_one_folder(tmp_path, my_model, upstream):
    """The docs' CLI commands as one script in one folder, in their order: the third ``convert`` writes into the
    pack the first made (fal's convert replaces it; so does ours, atomically, saying so), and ``revert`` ends it."""
    shutil.copytree(upstream / "stabilityai", tmp_path / "stabilityai")
    r = flashpack_cli(tmp_path, """
        flashpack convert ./my_model ./my_model.flashpack
        flashpack convert stabilityai/stable-diffusion-xl-base-1.0 \\
          --subfolder unet --use-diffusers
        flashpack convert ./my_model ./my_model.flashpack --dtype float16
        flashpack metadata ./my_model.flashpack
        flashpack metadata ./my_model.flashpack --show-index --json > index.json
        flashpack revert ./my_model.flashpack ./my_model.safetensors
    """)
    assert f"{tmp_path / 'my_model.flashpack'}: replaced the existing pack" in r.stderr
    half = {k: v.half() if v.is_floating_point() else v for k, v in my_model.items()}
    assert_same_tensors(load_file(str(tmp_path / "my_model.safetensors")), half)
    assert json.loads((tmp_path / "index.json").read_text())["tensors"] == len(my_model)
