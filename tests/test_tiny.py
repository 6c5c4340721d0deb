"""The tiny Stable Diffusion: a real diffusers folder that the stock pipeline loads and runs."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rcgdm.models import load_pipeline, resolve_model


def test_folder_is_small_and_complete(tiny_model_dir):
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / sub).is_dir()
    assert resolve_model("tiny-random") == str(tiny_model_dir)


def test_stock_pipeline_loads_and_generates(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True, safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    out = pipe("a nice photo", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert out.images.dtype.kind == "f" and 0.0 <= out.images.min() <= out.images.max() <= 1.0
    assert out.images.std() > 0  # not a blank image


def test_sd15_facts(tiny_model_dir):
    pipe = load_pipeline("tiny-random")
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == 0.18215
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    assert pipe.vae.encode(image).latent_dist.mean.shape == (1, 4, 8, 8)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert cfg.skip_prk_steps and cfg.steps_offset == 1
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a nice photo", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    from rcgdm.tiny import build_random_sd

    build_random_sd(tmp_path / "again", "tiny-random")
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model_dir / name).read_bytes()
