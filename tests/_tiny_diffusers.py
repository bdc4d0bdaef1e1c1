"""Tiny diffusers/transformers components built from configs (no downloads), shared by
test_hf_diffusers.py, test_hf_hub.py and others: the FlashPack-enabled classes as the user docs write them, a mixed
pipeline whose text encoder is a plain class (case C36), builders for a 64-pixel Stable Diffusion and a tiny SDXL
(``sdxl_components``), and ``write_sdxl_repo``: a folder laid out like stabilityai/stable-diffusion-xl-base-1.0
with an ``fp16`` variant (test_user_docs_examples.py).

Importing this module needs diffusers and transformers: import it after ``pytest.importorskip``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from _helpers import files_under  # noqa: F401  (re-exported for the diffusers tests)
from flashpack.integrations.diffusers import FlashPackDiffusersModelMixin, FlashPackDiffusionPipeline
from flashpack.integrations.transformers import FlashPackTransformersModelMixin


# --------------------------------------------------------------------------- FlashPack classes (as in the user docs)


class FlashPackCLIPTextModel(FlashPackTransformersModelMixin, CLIPTextModel):
    pass


class FlashPackCLIPTextModelWithProjection(FlashPackTransformersModelMixin, CLIPTextModelWithProjection):
    pass


class FlashPackAutoencoderKL(FlashPackDiffusersModelMixin, AutoencoderKL):
    pass


class FlashPackUNet2DConditionModel(FlashPackDiffusersModelMixin, UNet2DConditionModel):
    pass


class FlashPackStableDiffusionPipeline(FlashPackDiffusionPipeline, StableDiffusionPipeline):
    def __init__(
        self,
        vae: FlashPackAutoencoderKL,
        text_encoder: FlashPackCLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: FlashPackUNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Optional[torch.nn.Module] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        requires_safety_checker: bool = False,
    ) -> None:
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)


class MixedStableDiffusionPipeline(FlashPackDiffusionPipeline, StableDiffusionPipeline):
    """VAE and UNet FlashPack-enabled, text encoder a plain transformers class (C36)."""

    def __init__(
        self,
        vae: FlashPackAutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: FlashPackUNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Optional[torch.nn.Module] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        requires_safety_checker: bool = False,
    ) -> None:
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)


class FlashPackStableDiffusionXLPipeline(FlashPackDiffusionPipeline, StableDiffusionXLPipeline):
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
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, add_watermarker=False,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)


# --------------------------------------------------------------------------- tiny components


PROMPT = "a red cat"
SIZE = 64  # pixels; the 2-level VAE gives 32x32 latents


def make_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE tokenizer from a vocab.json and merges.txt written here."""
    os.makedirs(folder, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    for w in ("re", "red</w>", "ca", "cat</w>"):
        vocab[w] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nr e\nre d</w>\nc a\nca t</w>\n")
    return CLIPTokenizer(vocab_file=os.path.join(folder, "vocab.json"),
                         merges_file=os.path.join(folder, "merges.txt"), model_max_length=16, pad_token="!")


def clip_config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=128, max_position_embeddings=16,
                          hidden_act="gelu", **kw)


def tiny_vae(cls=FlashPackAutoencoderKL):
    return cls(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               sample_size=SIZE, norm_num_groups=32, layers_per_block=1)


def tiny_unet(cls=FlashPackUNet2DConditionModel, **kw):
    base = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
                norm_num_groups=32)
    base.update(kw)
    return cls(**base)


def ddim():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def sd_components(tmp_path, text_encoder_cls=FlashPackCLIPTextModel):
    torch.manual_seed(0)
    return dict(vae=tiny_vae().eval(), text_encoder=text_encoder_cls(clip_config()).eval(),
                tokenizer=make_tokenizer(tmp_path / "tok"), unet=tiny_unet().eval(), scheduler=ddim())


def sdxl_components(tmp_path, *, flashpack: bool = True, sample_size: int = SIZE // 2) -> dict:
    """A tiny SDXL's components (two CLIP text encoders, two tokenizers, an added-conditions UNet): the FlashPack
    classes above, or the plain library classes with ``flashpack=False``. The pipeline's default image is
    ``2 * sample_size`` pixels square."""
    torch.manual_seed(0)
    fp = flashpack
    return dict(
        vae=tiny_vae(FlashPackAutoencoderKL if fp else AutoencoderKL).eval(),
        text_encoder=(FlashPackCLIPTextModel if fp else CLIPTextModel)(clip_config()).eval(),
        text_encoder_2=(FlashPackCLIPTextModelWithProjection if fp else CLIPTextModelWithProjection)(
            clip_config(projection_dim=32)).eval(),
        tokenizer=make_tokenizer(tmp_path / "tok"),
        tokenizer_2=make_tokenizer(tmp_path / "tok2"),
        unet=tiny_unet(FlashPackUNet2DConditionModel if fp else UNet2DConditionModel, cross_attention_dim=64,
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                       transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                       sample_size=sample_size).eval(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                         beta_schedule="scaled_linear", timestep_spacing="leading"),
    )


def write_sdxl_repo(folder, *, sample_size: int = 8) -> StableDiffusionXLPipeline:
    """A folder laid out like the Hub repo stabilityai/stable-diffusion-xl-base-1.0: plain library classes in
    ``model_index.json``, every model's float32 weights plus an ``fp16`` variant (``*.fp16.safetensors``), configs
    from the float32 save (so every component loads in one dtype). Returns the float32 pipeline it wrote."""
    import copy

    os.makedirs(folder, exist_ok=True)
    pipe = StableDiffusionXLPipeline(**sdxl_components(Path(folder) / ".tok", flashpack=False,
                                                       sample_size=sample_size), add_watermarker=False)
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(folder, variant="fp16")
    pipe.save_pretrained(folder)
    shutil.rmtree(Path(folder) / ".tok")
    return pipe


def image(pipe) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=2, generator=gen, height=SIZE, width=SIZE, output_type="np").images
