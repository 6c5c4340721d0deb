"""A tiny Stable Diffusion, built offline from a fixed seed in about ten seconds.

Same diffusers classes and folder layout as SD v1.5 (UNet2DConditionModel, AutoencoderKL with
4 latent channels and a down-sampling factor of 8, CLIPTextModel + CLIPTokenizer, PNDMScheduler
with SD's betas), so every code path that loads SD v1.5 loads this too. 64x64 images, 4x8x8 latents.

Weights are random, with two adjustments that keep the pipeline's statistics like a trained one:
the VAE's posterior is narrowed (see `_shape_like_a_trained_vae`), and the UNet gets a few dozen
steps of the usual epsilon loss on latents of synthetic images (`_fit_unet`). A purely random UNet
does not denoise: its samples end with latent std ~9 instead of ~1, where a reward predictor trained
on real latents says nothing, and reward guidance can push the wrong way.

    python -m rcgdm.tiny OUT_DIR
"""

from __future__ import annotations

import json
import string
import sys
import tempfile
from pathlib import Path

import torch

TINY_SEED = 0
_LATENT_GAIN = 18.0  # random encoder means have std ~0.3; 0.3 * 18 * 0.18215 ~ 1
_FIT_STEPS, _FIT_BATCH, _FIT_IMAGES, _FIT_LR = 40, 32, 256, 3e-3
_FIT_PROMPTS = ("", "a nice photo", "a cat with a glass of water.", "an astronaut on the horseback", "a dog")
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _write_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary: every character, alone and word-final (`</w>`)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = list(_SPECIALS) + [c for c in chars] + [c + "</w>" for c in chars]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def _shape_like_a_trained_vae(vae) -> None:
    """Give the random VAE a trained one's latent statistics: a narrow posterior (std ~ e^-6) and
    latents of roughly unit std after the scaling factor. Left random, the posterior std is ~1 and a
    latent sample is mostly sampling noise, which no reward predictor could learn from."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:channels] *= _LATENT_GAIN
        vae.quant_conv.bias[:channels] *= _LATENT_GAIN
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -12.0
        vae.post_quant_conv.weight /= _LATENT_GAIN  # the decoder sees inputs of the scale it was initialised for


def _fit_unet(pipe, seed: int) -> None:
    """A few Adam steps of the epsilon-prediction loss on latents of synthetic images, various prompts."""
    from rcgdm.data import SyntheticShapes, load_batch

    source = SyntheticShapes(seed=10_000 + seed, size=_FIT_IMAGES)
    with torch.no_grad():
        images = load_batch(source, range(_FIT_IMAGES), 64) * 2 - 1
        x0 = pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
        prompts = torch.cat([pipe.encode_prompt(p, "cpu", 1, False)[0] for p in _FIT_PROMPTS])
    generator = torch.Generator().manual_seed(seed)
    unet, scheduler = pipe.unet.train(), pipe.scheduler
    optimizer = torch.optim.Adam(unet.parameters(), lr=_FIT_LR)
    for _ in range(_FIT_STEPS):
        pick = torch.randint(_FIT_IMAGES, (_FIT_BATCH,), generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (_FIT_BATCH,), generator=generator)
        noise = torch.randn(x0[pick].shape, generator=generator)
        context = prompts[torch.randint(len(prompts), (_FIT_BATCH,), generator=generator)]
        eps = unet(scheduler.add_noise(x0[pick], noise, timesteps), timesteps, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(eps, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()


def build_tiny_sd(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny random-weight Stable Diffusion folder to `out_dir` (which must not exist)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp) / "tok")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "tok" / "vocab.json"),
            str(Path(tmp) / "tok" / "merges.txt"),
            pad_token="<|endoftext|>",
            model_max_length=77,
        )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.convert_tokens_to_ids(_SPECIALS[0]),
            eos_token_id=tokenizer.convert_tokens_to_ids(_SPECIALS[1]),
            pad_token_id=tokenizer.convert_tokens_to_ids(_SPECIALS[1]),
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    _shape_like_a_trained_vae(vae)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _fit_unet(pipe, seed)
    pipe.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m rcgdm.tiny OUT_DIR")
    out_dir = Path(argv[0])
    if out_dir.exists():
        sys.exit(f"error: {str(out_dir)!r} exists; expected a new folder")
    build_tiny_sd(out_dir)
    print(f"tiny Stable Diffusion written to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
