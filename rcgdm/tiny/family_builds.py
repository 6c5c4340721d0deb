"""Tiny random-weight SDXL and SD3, offline, for tests of the plumbing (`--model tiny-sdxl-random`, `tiny-sd3-random`).

The same diffusers classes as the real models, at toy sizes, loaded through the same `from_pretrained` path:

- SDXL: `StableDiffusionXLPipeline`: two CLIP text encoders (the second with a projection, whose pooled
  embedding is SDXL's added conditioning with the size/crop time ids), a UNet with `text_time` addition
  embedding, Euler as SDXL ships. 64x64 images, 4x8x8 latents.
- SD3: `StableDiffusion3Pipeline`: two CLIP text encoders with projections, no T5 (diffusers allows it
  absent), an `SD3Transformer2DModel`, a 16-channel VAE with a `shift_factor`, `FlowMatchEulerDiscreteScheduler`.
  64x64 images, 16x8x8 latents.

Weights are random (seeded); the VAEs get a trained one's latent statistics (rcgdm/tiny/build.py).
They show no learned behaviour.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rcgdm.tiny.build import clip_text_config, clip_tokenizer, shape_like_a_trained_vae, tiny_vae

_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32}
_VAE = {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64}


def _tokenizer_and_text_encoder(projection: bool):
    """A CLIP tokenizer (characters only, 77 positions) and a CLIP text encoder, with a projection if asked."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer(words=False, model_max_length=77)
    config = CLIPTextConfig(**clip_text_config(tokenizer, _TEXT))
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    vae = tiny_vae(_VAE, latent_channels, scaling_factor, shift_factor)
    shape_like_a_trained_vae(vae)
    return vae


def build_random_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionXLPipeline folder to `out_dir` (which must not exist)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tokenizer_and_text_encoder(projection=False)
    tokenizer_2, text_encoder_2 = _tokenizer_and_text_encoder(projection=True)
    time_embed_dim = 8  # per time id; SDXL has 6 (original size, crop corner, target size)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * _TEXT["hidden_size"],  # both encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + _TEXT["projection_dim"],
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(4, 0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def build_random_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusion3Pipeline folder (no T5) to `out_dir` (which must not exist)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tokenizer_and_text_encoder(projection=True)
    tokenizer_2, text_encoder_2 = _tokenizer_and_text_encoder(projection=True)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, pos_embed_max_size=16,
        joint_attention_dim=2 * _TEXT["hidden_size"],  # both CLIP encoders' hidden states, concatenated (and T5's width)
        pooled_projection_dim=2 * _TEXT["projection_dim"],
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, 1.5305, 0.0609),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)
