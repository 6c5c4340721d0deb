"""The tiny Stable Diffusions: the trained `tiny` (committed, verified, it has learned) and the random
`tiny-random` builder; both real diffusers folders that the stock pipeline loads and runs."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rcgdm import models
from rcgdm.cli import UserError
from rcgdm.data import COLOURS, SHAPES, SyntheticShapes
from rcgdm.demo import CFG
from rcgdm.models import TINY_FOLDER, load_pipeline, resolve_model
from rcgdm.sampling.sampler import decode, sample_latents
from rcgdm.seeds import image_generators
from rcgdm.tiny.manifest import MANIFEST, verify_manifest
from rcgdm.tiny.train import HELD_OUT_SEED, images_and_captions, psnr

# --- tiny-random: the plumbing model -------------------------------------------------------------------------------------------


def test_random_folder_is_small_and_complete(tiny_model_dir):
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


def test_random_build_is_deterministic(tmp_path, tiny_model_dir):
    from rcgdm.tiny.build import build_random_sd

    build_random_sd(tmp_path / "again", "tiny-random")
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model_dir / name).read_bytes()


# --- tiny: the trained model ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny")


def test_trained_tiny_is_the_committed_folder_with_sd_classes(tiny):
    assert resolve_model("tiny") == str(TINY_FOLDER)
    assert sum(p.stat().st_size for p in TINY_FOLDER.rglob("*") if p.is_file()) < 12 * 2**20
    assert isinstance(tiny.unet, UNet2DConditionModel) and isinstance(tiny.vae, AutoencoderKL)
    assert isinstance(tiny.text_encoder, CLIPTextModel) and isinstance(tiny.scheduler, PNDMScheduler)
    assert tiny.vae_scale_factor == 4 and tiny.vae.config.latent_channels == 4
    assert tiny.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 8, 8)
    cfg = tiny.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    for word in (*COLOURS, *SHAPES, "background"):  # a caption word is one token
        assert tiny.tokenizer.tokenize(word) == [word + "</w>"]


def test_trained_vae_reconstructs_held_out_images(tiny):
    images, _ = images_and_captions(HELD_OUT_SEED, 64)
    assert psnr(tiny.vae, images) >= 24.0
    with torch.no_grad():
        latents = tiny.vae.encode(images).latent_dist.mode() * tiny.vae.config.scaling_factor
    assert 0.7 < latents.std().item() < 1.3  # the scaling factor gives SD's unit-std latents


def colour_means(pipe, prompt: str, count: int = 8) -> torch.Tensor:
    """Mean (red, green, blue) of `count` unguided 20-step images of `prompt`, at the demo's cfg."""
    generators = image_generators(0, range(count))
    images = decode(pipe, sample_latents(pipe, prompt, generators, None, 20, CFG, progress_bar=False), generators)
    assert images.shape == (count, 3, 32, 32)
    return images.mean((0, 2, 3))


def test_prompts_that_name_colours_show_them(tiny):
    red_background = colour_means(tiny, "a white circle on a red background")
    blue_background = colour_means(tiny, "a white circle on a blue background")
    assert red_background[0] > blue_background[0] + 0.2  # red channel
    assert blue_background[2] > red_background[2] + 0.2  # blue channel


def test_unguided_samples_look_like_the_data(tiny):
    """Samples for a caption have the data's statistics: per-channel means near the training images' for that caption."""
    source = SyntheticShapes(seed=HELD_OUT_SEED, size=400)
    caption = "a yellow square on a purple background"
    with_caption = [source[i] for i in range(len(source)) if source.caption(i).endswith("on a purple background")]
    data_mean = torch.stack(with_caption).float().div(255).mean((0, 2, 3))
    assert (colour_means(tiny, caption) - data_mean).abs().max() < 0.15


@pytest.mark.parametrize("damage", ["changed", "missing", "extra"])
def test_a_damaged_tiny_folder_names_the_file(tmp_path, monkeypatch, damage):
    folder = tmp_path / "tiny-sd"
    shutil.copytree(TINY_FOLDER, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "changed":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        weights.unlink()
    else:
        (folder / "unet" / "extra.bin").write_bytes(b"x")
    monkeypatch.setattr(models, "TINY_FOLDER", folder)
    with pytest.raises(UserError) as err:
        load_pipeline("tiny")
    message = str(err.value)
    assert "\n" not in message
    assert ("extra.bin" if damage == "extra" else str(weights)) in message


def test_the_manifest_lists_every_weight_file():
    verify_manifest(TINY_FOLDER)
    listed = (TINY_FOLDER / MANIFEST).read_text()
    for weights in TINY_FOLDER.rglob("*.safetensors"):
        assert weights.relative_to(TINY_FOLDER).as_posix() in listed
