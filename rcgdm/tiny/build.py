"""Tiny Stable Diffusions, offline: the trained `tiny` model and random-weight builders.

All use the same diffusers classes and folder layout as SD v1.5 (UNet2DConditionModel,
AutoencoderKL with 4 latent channels, CLIPTextModel + CLIPTokenizer, PNDMScheduler with SD's
betas), so every code path that loads SD v1.5 loads these too.

- `tiny` (`--model tiny`): TRAINED on captioned synthetic shapes (rcgdm/tiny/train.py) and
  committed under models/tiny-sd (32x32 images, 4x8x8 latents); loading checks its sha256 manifest.
  `python -m rcgdm.tiny --train OUT_DIR` retrains it (about an hour on 2 CPU cores).
- `tiny-random` (`--model tiny-random`): RANDOM weights, built in seconds (64x64 images, 4x8x8
  latents), for tests of the plumbing. Its VAE posterior is narrowed (`shape_like_a_trained_vae`)
  and its UNet gets a few dozen epsilon-loss steps (`_fit_unet`), so that samples stay at a
  trained model's scale; it shows no learned behaviour.
- `sd15-random`: SD v1.5's exact architecture with random weights (~4 GB), for speed benchmarks.

    python -m rcgdm.tiny --train OUT_DIR                # train the tiny model (what models/tiny-sd holds)
    python -m rcgdm.tiny OUT_DIR --arch tiny-random     # a random-weight build
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
from pathlib import Path

import torch

from rcgdm.files.atomic import atomic_folder, save_json

TINY_SEED = 0
_LATENT_GAIN = 18.0  # random encoder means have std ~0.3; 0.3 * 18 * 0.18215 ~ 1
_FIT_STEPS, _FIT_BATCH, _FIT_IMAGES, _FIT_LR = 40, 32, 256, 3e-3
_FIT_PROMPTS = ("", "a nice photo", "a cat with a glass of water.", "an astronaut on the horseback", "a dog")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def caption_words() -> list[str]:
    """Every word the synthetic captions use (rcgdm.data.SyntheticShapes)."""
    from rcgdm.data import COLOURS, SHAPES

    return sorted({*COLOURS, *SHAPES, "a", "an", "and", "on", "background"})


def write_tokenizer(folder: Path, words: bool) -> None:
    """A CLIP BPE vocabulary: every character, alone and word-final (`</w>`); with `words`, also each
    caption word as one token, through merges that build it letter by letter (longest words first, so
    that a short word's merge never splits a longer word)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = list(SPECIAL_TOKENS) + list(chars) + [c + "</w>" for c in chars]
    merges = []
    for word in sorted(caption_words(), key=len, reverse=True) if words else []:
        prefix = word[0]
        for k, char in enumerate(word[1:], start=2):
            piece = char + ("</w>" if k == len(word) else "")
            merges.append(f"{prefix} {piece}")
            prefix += piece
            if prefix not in tokens:
                tokens.append(prefix)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *dict.fromkeys(merges)]) + "\n")


def shape_like_a_trained_vae(vae) -> None:
    """Give the random VAE a trained one's latent statistics: a narrow posterior (std ~ e^-6) and
    latents of roughly unit std after the scaling factor. Left random, the posterior std is ~1 and a
    latent sample is mostly sampling noise, which no reward predictor could learn from."""
    channels = vae.config.latent_channels
    # the last layer before (mean, log variance) and the first after the latents; FLUX's VAE has no quant convolutions
    moments = vae.encoder.conv_out if vae.quant_conv is None else vae.quant_conv
    latent_input = vae.decoder.conv_in if vae.post_quant_conv is None else vae.post_quant_conv
    with torch.no_grad():
        moments.weight[:channels] *= _LATENT_GAIN
        moments.bias[:channels] *= _LATENT_GAIN
        moments.weight[channels:] = 0.0
        moments.bias[channels:] = -12.0
        latent_input.weight /= _LATENT_GAIN  # the decoder sees inputs of the scale it was initialised for


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
    # the trained tiny model (models/tiny-sd, `--model tiny`): 32x32 images, 4x8x8 latents (VAE down-sampling 4)
    "tiny": {
        "tokenizer": {"words": True, "model_max_length": 32},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "vae": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 32,
                "mid_block_add_attention": False},
        "unet": {
            "sample_size": 8,
            "block_out_channels": (32, 64),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 16,
        },
    },
    # random weights, built in seconds (tests of the plumbing): 64x64 images, 4x8x8 latents, ~5 MB
    "tiny-random": {
        "tokenizer": {"words": False, "model_max_length": 77},
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
        "tokenizer": {"words": False, "model_max_length": 77},
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


def clip_tokenizer(words: bool, model_max_length: int):
    """A CLIPTokenizer over the vocabulary `write_tokenizer` writes (with `words`, each caption word one token)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "tok", words)
        tokenizer = CLIPTokenizer(str(Path(tmp) / "tok" / "vocab.json"), str(Path(tmp) / "tok" / "merges.txt"),
                                  pad_token=SPECIAL_TOKENS[1], model_max_length=model_max_length)
    if words:
        split = [w for w in caption_words() if tokenizer.tokenize(w) != [w + "</w>"]]
        assert not split, f"caption words split into several tokens: {split}"
    return tokenizer


def clip_text_config(tokenizer, sizes: dict) -> dict:
    """A CLIP text encoder's config for `tokenizer` (its vocabulary, positions, special tokens) and `sizes`."""
    bos, eos = (tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS)
    return {"vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length, "bos_token_id": bos,
            "eos_token_id": eos, "pad_token_id": eos, **sizes}


def tiny_vae(sizes: dict, latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    """An AutoencoderKL of plain encoder/decoder blocks, one per entry of sizes["block_out_channels"]."""
    from diffusers import AutoencoderKL

    blocks = len(sizes["block_out_channels"])
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         latent_channels=latent_channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         **sizes)


def build_pipeline(arch: str = "tiny", seed: int = TINY_SEED):
    """A StableDiffusionPipeline of architecture `arch` with freshly initialised weights (seeded)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sizes = ARCHITECTURES[arch]
    tokenizer = clip_tokenizer(**sizes["tokenizer"])
    torch.manual_seed(seed)
    text_config = clip_text_config(tokenizer, sizes["text"])
    vae = tiny_vae(sizes["vae"], latent_channels=4, scaling_factor=0.18215)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **sizes["unet"]),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_random_sd(out_dir: str | Path, arch: str = "tiny-random", seed: int = TINY_SEED) -> Path:
    """Write a random-weight Stable Diffusion folder of architecture `arch` to `out_dir` (which must not exist).

    tiny-random also gets its VAE shaped and its UNet fitted briefly (see the module docstring);
    sd15-random stays purely random: only its speed matters.
    """
    pipe = build_pipeline(arch, seed)
    if arch == "tiny-random":
        shape_like_a_trained_vae(pipe.vae)
        _fit_unet(pipe, seed)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def train_sd(out_dir: str | Path, quick: bool = False) -> dict:
    """Build the tiny architecture, train it (rcgdm.tiny.train), write it with its manifest -> the training summary."""
    from rcgdm.tiny.manifest import write_manifest
    from rcgdm.tiny.train import Recipe, train_tiny

    recipe = Recipe().quick() if quick else Recipe()
    pipe = build_pipeline("tiny", recipe.seed)
    summary = train_tiny(pipe, recipe)
    with atomic_folder(out_dir) as folder:  # an interrupted run leaves no half-written model folder
        pipe.save_pretrained(folder)
        save_json(summary, folder / "training_summary.json")
        write_manifest(folder)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m rcgdm.tiny", description=__doc__.split("\n\n")[0],
                                epilog="--model tiny loads the committed, trained models/tiny-sd; "
                                       "tiny-random and sd15-random are built on first use into $RCGDM_CACHE_DIR")
    p.add_argument("out_dir", help="a new folder")
    p.add_argument("--train", action="store_true", help="train the tiny model (about an hour on 2 CPU cores)")
    p.add_argument("--quick", action="store_true", help="with --train: a few steps only, to check the plumbing")
    p.add_argument("--arch", default="tiny-random", choices=[a for a in ARCHITECTURES if a != "tiny"],
                   help="without --train: which random-weight build (default: tiny-random)")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    if out_dir.exists():
        p.error(f"{str(out_dir)!r} exists; expected a new folder")
    if args.train:
        summary = train_sd(out_dir, args.quick)
        print(json.dumps({k: v for k, v in summary.items() if k != "recipe"}, indent=1))
        print(f"trained tiny Stable Diffusion written to {out_dir}")
    else:
        with atomic_folder(out_dir) as folder:
            build_random_sd(folder, args.arch)
        print(f"{args.arch} Stable Diffusion (random weights) written to {out_dir}")


if __name__ == "__main__":
    main()
