"""fal's ``AutoFlashPackModel``: the config's diffusers class, given the FlashPack mixin, loaded from its pack
(``use_flashpack=True`` / ``from_pretrained_flashpack``) or the ordinary way. Folders are built here."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from _tiny_diffusers import tiny_vae  # noqa: E402
from flashpack.integrations.diffusers import AutoFlashPackModel, FlashPackDiffusersModelMixin  # noqa: E402


def same_weights(a, b) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_auto_model_loads_a_flashpack_folder_as_its_config_class(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae(diffusers.AutoencoderKL)
    plain = type("FlashPackAutoencoderKL", (FlashPackDiffusersModelMixin, diffusers.AutoencoderKL), {})
    plain.save_pretrained_flashpack(vae, tmp_path / "pipe" / "vae")
    got = AutoFlashPackModel.from_pretrained_flashpack(str(tmp_path / "pipe"), subfolder="vae")
    assert isinstance(got, diffusers.AutoencoderKL) and isinstance(got, FlashPackDiffusersModelMixin)
    assert type(got).__name__ == "FlashPackAutoencoderKL" and same_weights(got, vae)
    again = AutoFlashPackModel.from_pretrained(str(tmp_path / "pipe" / "vae"), use_flashpack=True)
    assert same_weights(again, vae)

    vae.save_pretrained(tmp_path / "ordinary")  # use_flashpack=False: the class's own from_pretrained
    ordinary = AutoFlashPackModel.from_pretrained(str(tmp_path / "ordinary"))
    assert isinstance(ordinary, FlashPackDiffusersModelMixin) and same_weights(ordinary, vae)


def test_auto_model_refuses_instantiation_and_non_diffusers_configs(tmp_path):
    with pytest.raises(OSError, match="from_pretrained"):
        AutoFlashPackModel()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="transformers config.*FlashPackTransformersModelMixin"):
        AutoFlashPackModel.from_pretrained(str(tmp_path / "bert"), use_flashpack=True)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AutoFlashPackModel.from_pretrained(str(tmp_path), use_flashpack=True)
