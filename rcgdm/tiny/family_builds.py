"""Tiny random-weight SDXL, SD3, SD3.5 and FLUX, offline, for tests of the plumbing (`--model tiny-sdxl-random`,
`tiny-sd3-random`, `tiny-sd35-random`, `tiny-flux-random`, `tiny-flux-schnell-random`).

The same diffusers classes as the real models, at toy sizes, loaded through the same `from_pretrained` path:

- SDXL: `StableDiffusionXLPipeline`: two CLIP text encoders (the second with a projection, whose pooled
  embedding is SDXL's added conditioning with the size/crop time ids), a UNet with `text_time` addition
  embedding, Euler as SDXL ships. 64x64 images, 4x8x8 latents.
- SD3: `StableDiffusion3Pipeline`: two CLIP text encoders with projections, no T5 (diffusers allows it
  absent), an `SD3Transformer2DModel`, a 16-channel VAE with a `shift_factor`, `FlowMatchEulerDiscreteScheduler`.
  64x64 images, 16x8x8 latents. `tiny-sd35-random` is shaped as SD3.5 medium: RMS-norm on queries and keys
  (`qk_norm`) and a dual-attention first layer.
- FLUX: `FluxPipeline`: a CLIP text encoder (its pooled embedding), a T5 encoder over a small unigram
  vocabulary, a `FluxTransformer2DModel` on 2x2-packed tokens (64 channels = 16 latent channels x 4), a
  16-channel VAE with a shift factor and no quant convolutions, as FLUX's. Dev-shaped (`tiny-flux-random`): a
  guidance embedding and a dynamically shifted flow schedule. Schnell-shaped (`tiny-flux-schnell-random`): no
  guidance embedding, shift 1, no dynamic shifting. Sampled at 64x64 (`--height 64 --width 64`): 16x8x8 latents, 4x4
  tokens; left unset, the size is FluxPipeline's default, 1024 px (128x128 latents), as for the real models.

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


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None, **extra):
    vae = tiny_vae({**_VAE, **extra}, latent_channels, scaling_factor, shift_factor)
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


def build_random_sd3(out_dir: str | Path, seed: int = 0, sd35: bool = False) -> Path:
    """Write a tiny random StableDiffusion3Pipeline folder (no T5) to `out_dir` (which must not exist); with `sd35`,
    shaped as SD3.5 medium (qk_norm, a dual-attention layer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tokenizer_and_text_encoder(projection=True)
    tokenizer_2, text_encoder_2 = _tokenizer_and_text_encoder(projection=True)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, pos_embed_max_size=16,
        joint_attention_dim=2 * _TEXT["hidden_size"],  # both CLIP encoders' hidden states, concatenated (and T5's width)
        pooled_projection_dim=2 * _TEXT["projection_dim"],
        **({"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, 1.5305, 0.0609),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8}


def _t5_tokenizer_and_encoder():
    """A T5 tokenizer over a unigram vocabulary of single characters (and word-initial letters), and a T5 encoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    letters, others = "abcdefghijklmnopqrstuvwxyz", "0123456789 ,.'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in letters + others] + [("\u2581" + c, -2.5) for c in letters]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2))
    unigram.pre_tokenizer, unigram.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=unigram, extra_ids=0, eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **_T5)
    return tokenizer, T5EncoderModel(config)


def build_random_flux(out_dir: str | Path, seed: int = 0, schnell: bool = False) -> Path:
    """Write a tiny random FluxPipeline folder to `out_dir` (which must not exist): dev-shaped, or `schnell`-shaped."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tokenizer_and_text_encoder(projection=False)
    tokenizer_2, text_encoder_2 = _t5_tokenizer_and_encoder()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=_T5["d_model"], pooled_projection_dim=_TEXT["hidden_size"], guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),  # text/row/column position channels; they sum to attention_head_dim
    )
    shifts = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0 if schnell else 3.0, use_dynamic_shifting=not schnell, **shifts)
    vae = _vae(16, 0.3611, 0.1159, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)
