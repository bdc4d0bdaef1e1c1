"""Hub paths of the integrations, with the boundary calls patched: ``huggingface_hub.snapshot_download``,
``HfApi.create_repo`` and ``HfApi.upload_folder``. Nothing here reaches the network."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
import huggingface_hub  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from flashpack.integrations.hub import (  # noqa: E402
    ModelNotFoundError,
    default_repo_id,
    pack_name,
    resolve_folder,
)
from flashpack.integrations.transformers import FlashPackTransformersModelMixin  # noqa: E402

from transformers import CLIPTextModel  # noqa: E402

from _helpers import FakeHub  # noqa: E402
from _tiny_diffusers import (  # noqa: E402
    FlashPackAutoencoderKL,
    FlashPackStableDiffusionPipeline,
    MixedStableDiffusionPipeline,
    files_under,
    sd_components,
    tiny_vae,
)

REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


class FlashPackGPT2LMHeadModel(FlashPackTransformersModelMixin, GPT2LMHeadModel):
    pass


def tiny_gpt2():
    torch.manual_seed(0)
    return FlashPackGPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                               bos_token_id=0, eos_token_id=1)).eval()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any boundary call a test did not replace with its own fake fails loudly instead of reaching the Hub."""

    def refuse(*a, **k):
        raise AssertionError(f"unexpected Hub call: args={a!r} kwargs={k!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)


class FakeSnapshot:
    """Stands in for ``huggingface_hub.snapshot_download``: records each call and returns a prepared folder."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.calls: list[dict] = []

    def __call__(self, repo_id, **kwargs):
        self.calls.append({"repo_id": repo_id, **kwargs})
        return self.folder


# --------------------------------------------------------------------------- helpers


def test_default_repo_id_from_folder_names(tmp_path):
    assert default_repo_id("out/my-model") == "my-model"
    assert default_repo_id("out/my-model/") == "my-model"
    assert default_repo_id("out/my-model//") == "my-model"
    assert default_repo_id(pathlib.Path("out") / "pathlike-model") == "pathlike-model"
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert default_repo_id(".") == tmp_path.name
    finally:
        os.chdir(old)


def test_pack_names():
    assert pack_name() == "model.flashpack"
    assert pack_name("fp16") == "model.fp16.flashpack"
    for bad in ("", "a/b", "a.b"):
        with pytest.raises(ValueError):
            pack_name(bad)


def test_c33_local_looking_path_never_reaches_the_hub(monkeypatch, tmp_path):
    def fail(*a, **k):
        raise AssertionError("snapshot_download called for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    for p in ("./missing", str(tmp_path / "missing"), "~/missing-flashpack-model", "a/b/c"):
        with pytest.raises(ModelNotFoundError, match="no such folder"):
            resolve_folder(p, allow_patterns=["config.json"])


# --------------------------------------------------------------------------- downloads


def test_transformers_model_from_hub_fetches_only_config_and_pack(tmp_path, monkeypatch):
    model = tiny_gpt2()
    model.save_pretrained_flashpack(tmp_path / "snap")
    fake = FakeSnapshot(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack("org/gpt2-fp", revision="v1.0", token="hf_secret",
                                                                cache_dir=tmp_path / "cache")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.config._name_or_path == "org/gpt2-fp"
    (call,) = fake.calls
    assert call["repo_id"] == "org/gpt2-fp"
    assert call["allow_patterns"] == ["config.json", "generation_config.json", "model.flashpack",
                                      "model.flashpack.index.json"]
    assert call["revision"] == "v1.0" and call["token"] == "hf_secret"
    assert call["cache_dir"] == str(tmp_path / "cache") and call["local_files_only"] is False


def test_subfolder_and_variant_patterns(tmp_path, monkeypatch):
    model = tiny_gpt2()
    model.save_pretrained_flashpack(tmp_path / "snap" / "text_encoder", variant="fp16", target_dtype=torch.float16)
    fake = FakeSnapshot(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack("org/pipe", subfolder="text_encoder", variant="fp16",
                                                                local_files_only=True)
    assert loaded.lm_head.weight.dtype == torch.float16
    (call,) = fake.calls
    assert call["allow_patterns"] == ["text_encoder/config.json", "text_encoder/generation_config.json",
                                      "text_encoder/model.fp16.flashpack", "text_encoder/model.fp16.flashpack.index.json"]
    assert call["local_files_only"] is True and call["revision"] is None


def test_diffusers_model_from_hub_patterns(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.save_pretrained_flashpack(tmp_path / "snap" / "vae")
    fake = FakeSnapshot(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = FlashPackAutoencoderKL.from_pretrained_flashpack("org/sd-fp", subfolder="vae", revision="main")
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    (call,) = fake.calls
    assert call["repo_id"] == "org/sd-fp" and call["revision"] == "main"
    assert call["allow_patterns"] == ["vae/config.json", "vae/model.flashpack", "vae/model.flashpack.index.json"]


def test_pipeline_from_hub_fetches_packs_and_no_ordinary_weights(tmp_path, monkeypatch):
    pipe = FlashPackStableDiffusionPipeline(**sd_components(tmp_path))
    pipe.save_pretrained_flashpack(tmp_path / "snap")
    fake = FakeSnapshot(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = FlashPackStableDiffusionPipeline.from_pretrained_flashpack("org/sd-fp", token="tok", revision="r1")
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    (call,) = fake.calls  # every component has a pack: one fetch, no weight files asked for
    assert call["repo_id"] == "org/sd-fp" and call["token"] == "tok" and call["revision"] == "r1"
    pats = call["allow_patterns"]
    assert "model_index.json" in pats and "*/model.flashpack" in pats
    assert not any("safetensors" in p or p.endswith("/*") for p in pats)


def test_c36_pipeline_from_hub_fetches_ordinary_weights_only_for_plain_components(tmp_path, monkeypatch):
    """C36 over the Hub: a second fetch asks for the plain text encoder's files, nothing else."""
    pipe = MixedStableDiffusionPipeline(**sd_components(tmp_path, text_encoder_cls=CLIPTextModel))
    pipe.save_pretrained_flashpack(tmp_path / "snap")
    fake = FakeSnapshot(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = MixedStableDiffusionPipeline.from_pretrained_flashpack("org/mixed", variant=None)
    assert type(loaded.text_encoder) is CLIPTextModel
    assert len(fake.calls) == 2
    extra = set(fake.calls[1]["allow_patterns"]) - set(fake.calls[0]["allow_patterns"])
    assert extra == {"text_encoder/*"}


def test_local_files_only_with_empty_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", REAL_SNAPSHOT_DOWNLOAD)  # offline: cache lookup only
    with pytest.raises(ModelNotFoundError) as e:
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack("flashpack-test/not-cached", local_files_only=True,
                                                           cache_dir=tmp_path / "empty-cache")
    msg = str(e.value)
    assert "flashpack-test/not-cached" in msg and "local_files_only=True" in msg and "empty-cache" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="not found in"):
        FlashPackStableDiffusionPipeline.from_pretrained_flashpack("flashpack-test/not-cached", local_files_only=True,
                                                                   cache_dir=tmp_path / "empty-cache")


# --------------------------------------------------------------------------- push


def test_model_push_to_hub_default_repo_id_and_exact_files(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    folder = tmp_path / "tiny-gpt2-fp"
    tiny_gpt2().save_pretrained_flashpack(pathlib.Path(str(folder) + "/"), push_to_hub=True, token="hf_tok",
                                          private=True, commit_message="add pack")
    (created,) = hub.created
    assert created["repo_id"] == "tiny-gpt2-fp" and created["private"] is True and created["token"] == "hf_tok"
    assert created["exist_ok"] is True
    (up,) = hub.uploads
    assert up["repo_id"] == "me/tiny-gpt2-fp" and up["token"] == "hf_tok" and up["commit_message"] == "add pack"
    assert os.path.samefile(up["folder_path"], folder)
    assert up["files"] == {"config.json", "generation_config.json", "model.flashpack"}


def test_model_push_to_hub_explicit_repo_id_variant(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    torch.manual_seed(0)
    tiny_vae().save_pretrained_flashpack(tmp_path / "vae", push_to_hub=True, repo_id="my-org/vae-fp", variant="fp16")
    assert hub.created[0]["repo_id"] == "my-org/vae-fp"
    (up,) = hub.uploads
    assert up["repo_id"] == "my-org/vae-fp" and up["files"] == {"config.json", "model.fp16.flashpack"}


def test_no_push_without_push_to_hub(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    tiny_gpt2().save_pretrained_flashpack(tmp_path / "m")
    assert hub.created == [] and hub.uploads == []


def test_pipeline_push_to_hub_uploads_exactly_the_pipeline(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    pipe = FlashPackStableDiffusionPipeline(**sd_components(tmp_path))
    folder = tmp_path / "sd-flashpack"
    pipe.save_pretrained_flashpack(str(folder), push_to_hub=True, token="t")
    assert hub.created[0]["repo_id"] == "sd-flashpack"
    (up,) = hub.uploads
    assert up["repo_id"] == "me/sd-flashpack"
    files = up["files"]
    assert {"model_index.json", "vae/config.json", "vae/model.flashpack", "unet/config.json", "unet/model.flashpack",
            "text_encoder/config.json", "text_encoder/model.flashpack", "scheduler/scheduler_config.json",
            "tokenizer/tokenizer_config.json"} <= files
    assert {f.split("/")[0] for f in files} == {"model_index.json", "vae", "unet", "text_encoder", "tokenizer",
                                                "scheduler"}
    assert not any(f.endswith((".safetensors", ".bin", ".tmp")) or "/." in f or f.startswith(".") for f in files)
    shutil.rmtree(folder)


# --------------------------------------------------------------------------- sharded packs


class FilteringSnapshot:
    """``snapshot_download`` over a prepared repo folder that, like the Hub, materialises only the files matching
    ``allow_patterns`` (copied into one local snapshot folder); records each call's patterns."""

    def __init__(self, repo, snap):
        self.repo, self.snap = pathlib.Path(repo), pathlib.Path(snap)
        self.calls: list[list[str]] = []

    def __call__(self, repo_id, *, allow_patterns, **kwargs):
        import fnmatch

        self.calls.append(list(allow_patterns))
        for rel in files_under(self.repo):
            if any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (self.snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.repo / rel, self.snap / rel)
        return str(self.snap)


def sharded_gpt2(folder):
    model = tiny_gpt2()
    model.save_pretrained_flashpack(folder, max_shard_size=3000)
    return model


def test_sharded_model_from_hub_fetches_index_then_exactly_its_shards(tmp_path, monkeypatch):
    model = sharded_gpt2(tmp_path / "repo")
    names = sorted(f for f in os.listdir(tmp_path / "repo") if f.endswith("flashpack"))
    assert names == [f"model-{i:05d}-of-00008.flashpack" for i in range(1, 9)]
    fake = FilteringSnapshot(tmp_path / "repo", tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack("org/gpt2-sharded")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    first = ["config.json", "generation_config.json", "model.flashpack", "model.flashpack.index.json"]
    assert fake.calls == [first, first + names]


def test_partial_load_fetches_only_the_shards_of_its_keys(tmp_path, monkeypatch):
    from flashpack.integrations.hub import resolve_pack_folder
    from flashpack.source import read_index

    sharded_gpt2(tmp_path / "repo")
    idx = read_index(tmp_path / "repo" / "model.flashpack.index.json")
    key = "transformer.h.0.mlp.c_fc.weight"
    fake = FilteringSnapshot(tmp_path / "repo", tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = resolve_pack_folder("org/gpt2-sharded", pack="model.flashpack", allow_patterns=["config.json"],
                                 keys=[key])
    assert fake.calls == [["config.json", "model.flashpack", "model.flashpack.index.json"],
                          ["config.json", "model.flashpack", "model.flashpack.index.json", idx.weight_map[key]]]
    got = flashpack_load(folder, keys=[key])
    assert list(got) == [key]


def flashpack_load(folder, **kw):
    import flashpack

    return flashpack.load(folder, **kw)


def test_push_sharded_folder_uploads_every_shard_and_deletes_stale_names(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    monkeypatch.delattr(huggingface_hub.HfApi, "upload_large_folder", raising=False)
    tiny_gpt2().save_pretrained_flashpack(tmp_path / "m", max_shard_size=3000, push_to_hub=True, repo_id="org/m")
    (up,) = hub.uploads
    assert up["files"] == {"config.json", "generation_config.json", "model.flashpack.index.json",
                           *(f"model-{i:05d}-of-00008.flashpack" for i in range(1, 9))}
    assert up["delete_patterns"] == ["model.flashpack", "model.flashpack.index.json", "model-*-of-*.flashpack"]


def test_push_sharded_folder_uses_upload_large_folder_where_the_hub_library_has_it(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    large = []

    def upload_large_folder(api, *, repo_id, folder_path, repo_type, **kw):
        large.append((repo_id, repo_type, files_under(folder_path)))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_large_folder", upload_large_folder, raising=False)
    tiny_gpt2().save_pretrained_flashpack(tmp_path / "m", max_shard_size=3000, push_to_hub=True, repo_id="org/m")
    assert hub.uploads == []
    ((repo, kind, files),) = large
    assert repo == "org/m" and kind == "model" and "model-00008-of-00008.flashpack" in files
    # one file (under the 20 GB default): the ordinary one-commit upload
    tiny_gpt2().save_pretrained_flashpack(tmp_path / "one", push_to_hub=True, repo_id="org/one")
    assert len(hub.uploads) == 1 and "model.flashpack" in hub.uploads[0]["files"]
