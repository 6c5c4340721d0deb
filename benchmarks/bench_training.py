"""The training loop: train_epoch on memory-resident latents against the original's per-sample Dataset and DataLoader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timing import interleaved, paired_ratio, spread

from rcgdm.models import load_scheduler
from rcgdm.predictor import ThreeLayerConvNet
from rcgdm.training import add_training_noise, train_epoch


class OriginalStyleDataset(torch.utils.data.Dataset):
    """What the original did: a per-sample Dataset of (latent, label), batched by a DataLoader."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        self.latents, self.labels = latents, labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int):
        return self.latents[index], self.labels[index]


def bench_training_loop(device: torch.device, num_data: int, latent_size: int, repeats: int) -> dict:
    """Optimizer steps per second: train_epoch on memory-resident latents vs a per-sample Dataset + DataLoader."""
    scheduler = load_scheduler("tiny-random")
    scheduler.set_timesteps(50)
    pool = torch.unique(scheduler.timesteps)
    latents = torch.randn(num_data, 4, latent_size, latent_size)
    labels = torch.randn(num_data, 1)
    net = ThreeLayerConvNet().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = latents.to(device), labels.to(device)
    steps = -(-num_data // 10)

    def ours():
        train_epoch(net, optimizer, scheduler, x, y, pool, torch.Generator().manual_seed(0), 10, "bench")

    def original():
        loader = torch.utils.data.DataLoader(OriginalStyleDataset(latents, labels), batch_size=10, shuffle=True)
        generator = torch.Generator().manual_seed(0)
        net.train()
        for batch_latents, batch_labels in loader:
            batch_latents, batch_labels = batch_latents.to(device), batch_labels.to(device)
            noisy, _, _ = add_training_noise(scheduler, batch_latents, pool, generator)
            loss = F.mse_loss(net(noisy), batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the original logged every step

    times = interleaved({"ours": ours, "original_style": original}, repeats, device)
    return {
        "num_data": num_data,
        "latent_size": latent_size,
        "batch": 10,
        "steps_per_second": {name: spread([steps / t for t in ts]) for name, ts in times.items()},
        "speedup_ours": paired_ratio(times["original_style"], times["ours"]),
    }
