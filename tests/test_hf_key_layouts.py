"""Packs written under an older transformers or diffusers, whose keys follow that release's layout, load with
``from_pretrained_flashpack`` under the installed one whenever the library's own ``from_pretrained`` loads the
same keys from safetensors (issue 13, point 6): the library's checkpoint key renames are applied to the pack's
keys, the tensors stay views of the pack; conversions that merge or split tensors are refused clearly.

The old layouts are written here by renaming the keys of a tiny model the way the older release stored them
(transformers 4.57's ``CLIPTextModel``: ``text_model.`` before every key; TensorFlow-era BERT: ``LayerNorm.gamma``;
a ``BertForMaskedLM`` checkpoint loaded as ``BertModel``: ``bert.``; transformers 4.x Mixtral: per-expert
``block_sparse_moe.experts.N.w1``, written by transformers' own ``revert_weight_conversion``; diffusers' deprecated
VAE attention block: ``query``/``key``/``value``/``proj_attn``)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from _helpers import mapping_of  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    MixtralConfig,
    MixtralForCausalLM,
)

import flashpack  # noqa: E402
from flashpack import ModelMismatchError, pack_to_file, read_weight_map  # noqa: E402
from flashpack.integrations import _shared  # noqa: E402
from flashpack.integrations import transformers as fp_transformers  # noqa: E402
from flashpack.integrations.transformers import FlashPackTransformersModelMixin, checkpoint_key_renames  # noqa: E402

from _tiny_diffusers import SIZE, FlashPackAutoencoderKL, tiny_vae  # noqa: E402


class FlashPackCLIPTextModel(FlashPackTransformersModelMixin, CLIPTextModel):
    pass


class FlashPackBertModel(FlashPackTransformersModelMixin, BertModel):
    pass


class FlashPackMixtralForCausalLM(FlashPackTransformersModelMixin, MixtralForCausalLM):
    pass


IDS = torch.tensor([[0, 5, 9, 17, 1]])


def tiny_clip() -> FlashPackCLIPTextModel:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=16)
    return FlashPackCLIPTextModel(cfg).eval()


def tiny_bert() -> FlashPackBertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     max_position_embeddings=32)
    return FlashPackBertModel(cfg).eval()


def rewrite_pack(folder, rename) -> dict[str, torch.Tensor]:
    """Rewrite ``folder/model.flashpack`` with every key ``k`` stored as ``rename(k)`` (the older layout);
    returns the old-layout state dict (also what the safetensors twin holds)."""
    path = os.path.join(folder, "model.flashpack")
    old = {rename(k): v.clone() for k, v in flashpack.load(path).items()}
    pack_to_file(old, path)
    return old


def save_safetensors_twin(folder, model, state_dict) -> str:
    """The same weights as an ordinary checkpoint: the config and ``model.safetensors`` with the old keys."""
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(folder, "model.safetensors"))
    return str(folder)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- transformers


def test_clip_text_model_packed_in_the_4_57_layout_loads(tmp_path):
    clip = tiny_clip()
    clip.save_pretrained_flashpack(tmp_path / "te")
    old = rewrite_pack(tmp_path / "te", lambda k: "text_model." + k)  # 4.57: .text_model = CLIPTextTransformer
    stored = read_weight_map(tmp_path / "te" / "model.flashpack").tensors
    assert "text_model.embeddings.token_embedding.weight" in stored and "embeddings.token_embedding.weight" not in stored

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a lenient load would warn about missing / unexpected keys
        loaded = FlashPackCLIPTextModel.from_pretrained_flashpack(tmp_path / "te", keep_flash_ref_on_model=True)
    assert_same_weights(clip, loaded)
    with torch.no_grad():
        want, got = clip(IDS), loaded(IDS)
    assert torch.equal(want.last_hidden_state, got.last_hidden_state)
    assert torch.equal(want.pooler_output, got.pooler_output)
    # renamed, not copied: the parameter is the loaded view itself
    shared = loaded._flash_shared_storage
    assert sorted(shared) == sorted(clip.state_dict())
    assert loaded.embeddings.token_embedding.weight.data_ptr() == shared["embeddings.token_embedding.weight"].data_ptr()

    # parity: transformers' own loader takes the same old keys from safetensors with nothing missing
    twin = save_safetensors_twin(tmp_path / "st", clip, old)
    ref, info = CLIPTextModel.from_pretrained(twin, output_loading_info=True)
    assert (sorted(info["missing_keys"]), sorted(info["unexpected_keys"])) == ([], [])
    assert_same_weights(clip, ref)


def test_renames_computed_from_the_installed_transformers():
    clip = tiny_clip()
    keys = ["text_model." + k for k in clip.state_dict()]
    renames = checkpoint_key_renames(clip, keys)
    assert renames == {"text_model." + k: k for k in clip.state_dict()}
    assert checkpoint_key_renames(clip, list(clip.state_dict())) == {}  # own layout: nothing renamed


def test_clip_old_layout_in_a_sharded_pack_loads(tmp_path):
    clip = tiny_clip()
    clip.save_pretrained_flashpack(tmp_path / "te")
    path = tmp_path / "te" / "model.flashpack"
    old = {"text_model." + k: v.clone() for k, v in flashpack.load(path).items()}
    os.remove(path)
    pack_to_file(old, path, max_shard_nbytes=20_000)
    assert not path.exists() and (tmp_path / "te" / "model.flashpack.index.json").is_file()
    loaded = FlashPackCLIPTextModel.from_pretrained_flashpack(tmp_path / "te")
    assert_same_weights(clip, loaded)


def test_clip_old_layout_in_a_sharded_pack_loads_with_mmap(tmp_path):
    # mmap=True maps each shard on its own and looks the keys up in the shard's weight map: the renames must
    # reach the shards' maps too (it was a KeyError on the first renamed key)
    clip = tiny_clip()
    clip.save_pretrained_flashpack(tmp_path / "te")
    path = tmp_path / "te" / "model.flashpack"
    old = {"text_model." + k: v.clone() for k, v in flashpack.load(path).items()}
    os.remove(path)
    pack_to_file(old, path, max_shard_nbytes=20_000)
    loaded = FlashPackCLIPTextModel.from_pretrained_flashpack(tmp_path / "te", mmap=True, verify=True)
    assert_same_weights(clip, loaded)
    assert "model-" in mapping_of(loaded.embeddings.token_embedding.weight)  # a view of a shard's mapping


def test_bert_tensorflow_era_gamma_beta_and_task_prefix(tmp_path):
    """``LayerNorm.gamma``/``beta`` (transformers' legacy renames) and a ``bert.`` prefix (a task model's
    checkpoint loaded as the base model: ``base_model_prefix`` stripped), together."""
    bert = tiny_bert()
    bert.save_pretrained_flashpack(tmp_path / "bert")

    def old_name(k: str) -> str:
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        return "bert." + k

    old = rewrite_pack(tmp_path / "bert", old_name)
    assert "bert.embeddings.LayerNorm.gamma" in old
    loaded = FlashPackBertModel.from_pretrained_flashpack(tmp_path / "bert")
    assert_same_weights(bert, loaded)
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        assert torch.equal(bert(ids).last_hidden_state, loaded(ids).last_hidden_state)

    ref, info = BertModel.from_pretrained(save_safetensors_twin(tmp_path / "st", bert, old), output_loading_info=True)
    assert (sorted(info["missing_keys"]), sorted(info["unexpected_keys"])) == ([], [])
    assert_same_weights(bert, ref)


def test_fallback_without_transformers_conversion_functions(tmp_path, monkeypatch):
    """A transformers without ``get_model_conversion_mapping``/``rename_source_key`` (4.x): the 4.x rules."""
    monkeypatch.setattr(fp_transformers, "_transformers_conversion_functions", lambda: None)
    bert = tiny_bert()
    bert.save_pretrained_flashpack(tmp_path / "bert")
    rewrite_pack(tmp_path / "bert", lambda k: "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma"))
    assert_same_weights(bert, FlashPackBertModel.from_pretrained_flashpack(tmp_path / "bert"))


def test_key_mapping_renames_stored_keys(tmp_path):
    clip = tiny_clip()
    clip.save_pretrained_flashpack(tmp_path / "te")
    rewrite_pack(tmp_path / "te", lambda k: "my_encoder." + k)
    with pytest.raises(ModelMismatchError, match="missing keys"):
        FlashPackCLIPTextModel.from_pretrained_flashpack(tmp_path / "te")
    loaded = FlashPackCLIPTextModel.from_pretrained_flashpack(tmp_path / "te", key_mapping={r"^my_encoder\.": ""})
    assert_same_weights(clip, loaded)


def test_layout_transformers_cannot_map_is_the_missing_keys_error(tmp_path):
    clip = tiny_clip()
    clip.save_pretrained_flashpack(tmp_path / "te")
    old = rewrite_pack(tmp_path / "te", lambda k: "legacy_clip." + k)
    with pytest.raises(ModelMismatchError) as err:
        FlashPackCLIPTextModel.from_pretrained_flashpack(tmp_path / "te")
    msg = str(err.value)
    assert str(tmp_path / "te" / "model.flashpack") in msg
    assert "missing keys ['embeddings.token_embedding.weight'" in msg
    assert "unexpected keys ['legacy_clip.embeddings.token_embedding.weight'" in msg
    # transformers' own loader cannot map it either
    _, info = CLIPTextModel.from_pretrained(save_safetensors_twin(tmp_path / "st", clip, old), output_loading_info=True)
    assert "embeddings.token_embedding.weight" in info["missing_keys"]
    assert "legacy_clip.embeddings.token_embedding.weight" in info["unexpected_keys"]


def test_conversion_that_merges_tensors_is_refused_with_the_keys(tmp_path):
    """transformers 5 stores Mixtral's experts fused (``experts.gate_up_proj``); 4.x stored one ``w1``/``w2``/``w3``
    per expert. Merging them is a tensor operation, not a rename: refused, naming the keys and the way out."""
    from transformers.core_model_loading import revert_weight_conversion

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                        max_position_embeddings=32)
    moe = FlashPackMixtralForCausalLM(cfg).eval()
    moe.save_pretrained_flashpack(tmp_path / "moe")
    old = {k: v.clone() for k, v in revert_weight_conversion(moe, moe.state_dict()).items()}
    assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in old
    pack_to_file(old, tmp_path / "moe" / "model.flashpack")
    with pytest.raises(ModelMismatchError) as err:
        FlashPackMixtralForCausalLM.from_pretrained_flashpack(tmp_path / "moe")
    msg = str(err.value)
    assert "6 stored key(s)" in msg  # 2 experts x (w1, w2, w3); the gate is a plain rename
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight -> model.layers.0.mlp.experts.gate_up_proj" in msg
    assert "flashpack revert" in msg and "MixtralForCausalLM.from_pretrained" in msg
    # strict=False: the renames apply (the router gate), the per-expert keys stay as stored and are reported
    with pytest.warns(UserWarning, match=r"missing keys \['model.layers.0.mlp.experts.gate_up_proj'"):
        lenient = FlashPackMixtralForCausalLM.from_pretrained_flashpack(tmp_path / "moe", strict=False)
    assert torch.equal(lenient.model.layers[0].mlp.gate.weight, moe.model.layers[0].mlp.gate.weight)
    # transformers' own loader merges them (what the error tells the user to re-pack through)
    ref, info = MixtralForCausalLM.from_pretrained(save_safetensors_twin(tmp_path / "st", moe, old),
                                                   output_loading_info=True)
    assert (sorted(info["missing_keys"]), sorted(info["unexpected_keys"])) == ([], [])
    assert_same_weights(moe, ref)


def test_two_stored_keys_renamed_to_one_name_are_refused(tmp_path):
    pack_to_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "x.flashpack")
    wm = read_weight_map(tmp_path / "x.flashpack")
    with pytest.raises(ModelMismatchError, match=r"stored keys 'a' and 'b' both become 'b'"):
        _shared.rename_weight_map(wm, {"a": "b"})
    renamed = _shared.rename_weight_map(wm, {"a": "c"})
    assert list(renamed.tensors) == ["c", "b"] and renamed.tensors["c"].offset == wm.tensors["a"].offset
    assert torch.equal(flashpack.load(renamed)["c"], torch.zeros(2))


# --------------------------------------------------------------------------- diffusers


DEPRECATED = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def deprecated_attention_name(k: str) -> str:
    """diffusers' old ``AttentionBlock`` names of the VAE mid-block attention (``to_q`` was ``query``, ...)."""
    if ".mid_block.attentions." in k:
        for new, old in DEPRECATED.items():
            k = k.replace(f".{new}.", f".{old}.")
    return k


def test_vae_with_deprecated_attention_block_keys_loads(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    vae.save_pretrained_flashpack(tmp_path / "vae")
    old = rewrite_pack(tmp_path / "vae", deprecated_attention_name)
    assert "encoder.mid_block.attentions.0.query.weight" in old
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in old and "encoder.mid_block.attentions.0.to_q.weight" not in old

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = FlashPackAutoencoderKL.from_pretrained_flashpack(tmp_path / "vae")
    assert_same_weights(vae, loaded)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x).latent_dist.mean).sample,
                           loaded.decode(loaded.encode(x).latent_dist.mean).sample)

    # parity: diffusers' own loader renames the same keys from an ordinary (unsharded) checkpoint
    (tmp_path / "st").mkdir()
    vae.save_config(tmp_path / "st")
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "st" / "diffusion_pytorch_model.safetensors")
    ref, info = AutoencoderKL.from_pretrained(tmp_path / "st", output_loading_info=True)
    assert (sorted(info["missing_keys"]), sorted(info["unexpected_keys"])) == ([], [])
    assert_same_weights(vae, ref)
