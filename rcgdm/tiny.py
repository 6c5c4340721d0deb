"""A tiny Stable Diffusion, built offline from a fixed seed in about ten seconds.

Same diffusers classes and folder layout as SD v1.5 (UNet2DConditionModel, AutoencoderKL with
4 latent channels and a down-sampling factor of 8, CLIPTextModel + CLIPTokenizer, PNDMScheduler
with SD's betas), so every code path that loads SD v1.5 loads this too. 64x64 images, 4x8x8 latents.

Weights are random, with two adjustments that keep the pipeline's statistics like a trained one:
the VAE's posterior is narrowed (see `_shape_like_a_trained_vae`), and the UNet gets a few dozen
steps of the usual epsilon loss on latents of synthetic images (`_fit_unet`). A purely random UNet
does not denoise: its samples end with latent std ~9 instead of ~1, where a reward predictor trained
on real latents says nothing, and reward guidance can push the wrong way.

    python -m rcgdm.tiny OUT_DIR                      # the tiny model
    python -m rcgdm.tiny OUT_DIR --arch sd15-random   # SD v1.5's architecture, random weights (benchmarks)
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


ARCHITECTURES = {
    # the tiny model: 64x64 images, 4x8x8 latents, ~5 MB
    "tiny": {
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "vae": {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64},
        "unet": {
            "sample_size": 8,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
    },
    # Stable Diffusion v1.5's exact architecture (UNet 860M parameters), for speed benchmarks only
    "sd15-random": {
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "vocab_size": 49408,  # CLIP's embedding table; our small tokenizer uses its first ids
        },
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512},
        "unet": {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
    },
}


def build_random_sd(out_dir: str | Path, arch: str = "tiny", seed: int = TINY_SEED) -> Path:
    """Write a random-weight Stable Diffusion folder of architecture `arch` to `out_dir` (which must not exist).

    The tiny architecture also gets its VAE shaped and its UNet fitted (see the module docstring);
    sd15-random stays purely random: only its speed matters.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sizes = ARCHITECTURES[arch]
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
    special = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(_SPECIALS[0]),
        "eos_token_id": tokenizer.convert_tokens_to_ids(_SPECIALS[1]),
        "pad_token_id": tokenizer.convert_tokens_to_ids(_SPECIALS[1]),
    }
    text_config = {"vocab_size": len(tokenizer), "max_position_embeddings": 77, **special, **sizes["text"]}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        scaling_factor=0.18215,
        **sizes["vae"],
    )
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **sizes["unet"])
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
    if arch == "tiny":
        _shape_like_a_trained_vae(vae)
        _fit_unet(pipe, seed)
    pipe.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str]) -> None:
    arch = argv.pop(argv.index("--arch") + 1) if "--arch" in argv[:-1] else "tiny"
    argv = [a for a in argv if a != "--arch"]
    if len(argv) != 1 or arch not in ARCHITECTURES:
        sys.exit(f"usage: python -m rcgdm.tiny OUT_DIR [--arch {'|'.join(ARCHITECTURES)}]")
    out_dir = Path(argv[0])
    if out_dir.exists():
        sys.exit(f"error: {str(out_dir)!r} exists; expected a new folder")
    build_random_sd(out_dir, arch)
    print(f"{arch} Stable Diffusion written to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
