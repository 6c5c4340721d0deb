"""Train the tiny Stable Diffusion on captioned synthetic shapes: `python -m rcgdm.tiny --train OUT_DIR`.

Same recipe as SD, at toy scale, on CPU:
1. the VAE learns to reconstruct 32x32 images (MSE + a small KL), then its `scaling_factor` is set
   so that scaled latents have unit std;
2. the text encoder stays frozen (as in SD) and encodes every caption;
3. the UNet learns the epsilon loss on the scaled latents, conditioned on the caption embeddings,
   with 10% of captions dropped to "" so that classifier-free guidance works.
Everything is seeded; the run prints a summary (held-out PSNR, final losses) and writes it to
`training_summary.json` beside the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rcgdm.data import SyntheticShapes

TRAIN_SEED, HELD_OUT_SEED = 1000, 1001  # neither is the demo's synthetic:0


@dataclass(frozen=True)
class Recipe:
    train_images: int = 20_000
    held_out_images: int = 512
    vae_steps: int = 3500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 7e-4
    caption_dropout: float = 0.1
    seed: int = 0

    def quick(self) -> Recipe:
        """A few steps of everything, to check the plumbing."""
        return Recipe(train_images=256, held_out_images=64, vae_steps=20, unet_steps=20, seed=self.seed)


def images_and_captions(seed: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Synthetic images scaled to [-1, 1], float32 (count, 3, 32, 32), and their captions."""
    source = SyntheticShapes(seed=seed, size=count)
    drawn = [source.draw(i) for i in tqdm(range(count), desc="drawing images", unit="img", leave=False)]
    images = torch.stack([image for image, _ in drawn]).float() / 127.5 - 1
    return images, [caption for _, caption in drawn]


def cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, steps: int) -> None:
    """Warm up over 2% of the steps, then cosine decay to 5% of `base`."""
    warmup = max(1, steps // 50)
    scale = step / warmup if step < warmup else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = base * scale


def psnr(vae, images: torch.Tensor) -> float:
    """Mean PSNR in dB of the VAE's reconstructions (posterior mean) of images in [-1, 1], on [0, 1]."""
    with torch.no_grad():
        decoded = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in images.split(64)])
    mse = ((decoded.clamp(-1, 1) - images) / 2).pow(2).mean((1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


def fit(name: str, optimizer: torch.optim.Optimizer, base_lr: float, steps: int, loss_of_a_batch) -> float:
    """`steps` optimizer steps on loss_of_a_batch() (which draws its own batch), with the cosine schedule and a
    progress bar -> the final running loss."""
    running = None
    bar = tqdm(range(steps), desc=name, unit="step")
    for step in bar:
        cosine_lr(optimizer, base_lr, step, steps)
        loss = loss_of_a_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    return running


def train_vae(vae, images: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> float:
    """Reconstruction (MSE) plus a small KL to N(0, I); returns the final running loss."""

    def loss_of_a_batch() -> torch.Tensor:
        batch = images[torch.randint(len(images), (recipe.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        decoded = vae.decode(posterior.sample(generator=generator)).sample
        return F.mse_loss(decoded, batch) + recipe.kl_weight * posterior.kl().mean()

    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    vae.train()
    running = fit("VAE", optimizer, recipe.vae_lr, recipe.vae_steps, loss_of_a_batch)
    vae.eval()
    return running


def set_scaling_factor(vae, images: torch.Tensor) -> float:
    """scaling_factor = 1 / std of the latents (posterior samples), as SD's 0.18215 was chosen."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in images[:4096].split(256)])
    factor = round(1.0 / latents.std().item(), 5)
    vae.register_to_config(scaling_factor=factor)
    return factor


def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text-encoder states of each caption (N, L, D), and of the empty prompt (1, L, D)."""
    with torch.no_grad():
        states = [pipe.encode_prompt(list(chunk), "cpu", 1, False)[0] for chunk in _chunks(captions, 512)]
        empty = pipe.encode_prompt("", "cpu", 1, False)[0]
    return torch.cat(states), empty


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def train_unet(pipe, latents: torch.Tensor, states: torch.Tensor, empty: torch.Tensor, recipe: Recipe,
               generator: torch.Generator) -> float:
    """The epsilon loss at uniform timesteps, with caption dropout; returns the final running loss."""
    unet, scheduler = pipe.unet.train(), pipe.scheduler

    def loss_of_a_batch() -> torch.Tensor:
        pick = torch.randint(len(latents), (recipe.unet_batch,), generator=generator)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        dropped = torch.rand(len(x0), generator=generator) < recipe.caption_dropout
        context = torch.where(dropped.view(-1, 1, 1), empty, states[pick])
        eps = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(eps, noise)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.01)
    running = fit("UNet", optimizer, recipe.unet_lr, recipe.unet_steps, loss_of_a_batch)
    unet.eval()
    return running


def train_tiny(pipe, recipe: Recipe) -> dict:
    """Train the VAE, then the UNet, of a freshly built tiny pipeline in place -> a summary of what they reached."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    images, captions = images_and_captions(TRAIN_SEED, recipe.train_images)
    held_out, _ = images_and_captions(HELD_OUT_SEED, recipe.held_out_images)
    vae_loss = train_vae(pipe.vae, images, recipe, generator)
    held_out_psnr = psnr(pipe.vae, held_out)
    factor = set_scaling_factor(pipe.vae, images)
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)]) * factor
    states, empty = encode_captions(pipe, captions)
    unet_loss = train_unet(pipe, latents, states, empty, recipe, generator)
    summary = {
        "held_out_psnr_db": round(held_out_psnr, 2),
        "vae_final_loss": round(vae_loss, 5),
        "scaling_factor": factor,
        "latent_std_after_scaling": round(latents.std().item(), 4),
        "unet_final_loss": round(unet_loss, 5),
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "recipe": asdict(recipe),
        "data": f"synthetic:{TRAIN_SEED} (first {recipe.train_images}); PSNR on synthetic:{HELD_OUT_SEED}",
    }
    return summary
