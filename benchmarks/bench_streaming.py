"""Training from a latent cache larger than a memory budget: batches read from its shards against the cache held in
memory, each in a fresh process so that its peak resident memory is its own.

Both sides run rcgdm.training.train_epoch for the same steps on the same rows, drawn from across the whole cache; the
in-memory side holds every latent, as train.py does below latents_in_memory_gb. A full epoch over a 1 GB cache would
take hours of CPU convolutions here, hence a fixed number of steps. Streaming is measured at two cache sizes: its memory
should not grow with the cache. The shards sit in the page cache (just written), as on a machine that reads them twice.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from timing import spread

MODES = ("in_memory", "streamed", "streamed_small_cache")


class TensorRows:
    """Rows `rows` of latents held in memory, gathered per batch as LatentRows gathers them from the shards."""

    def __init__(self, latents: torch.Tensor, rows: torch.Tensor) -> None:
        self.latents, self.rows, self.device = latents, rows, latents.device

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return self.latents[self.rows[indices]]


def write_cache(folder: Path, images: int, shape: tuple[int, ...], per_shard: int) -> None:
    from rcgdm.distributed import batches
    from rcgdm.latent_shards import write_shard

    generator = torch.Generator().manual_seed(0)
    for rows in batches(images, per_shard):
        write_shard(folder, "bench", rows, torch.randn(len(rows), *shape, generator=generator))


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that across fork and exec,
    so a child started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def _train(mode: str, folder: str, images: int, shape: tuple, per_shard: int, steps: int, batch: int, out) -> None:
    """In a fresh process: steps/s and peak RSS of train_epoch on `steps` batches from the cache in `folder`."""
    from rcgdm.distributed import batches
    from rcgdm.latent_shards import LatentRows, ShardedLatents
    from rcgdm.models import load_scheduler
    from rcgdm.predictor import ThreeLayerConvNet
    from rcgdm.training import train_epoch

    store = ShardedLatents(Path(folder), batches(images, per_shard), shape)
    rows = torch.randperm(images, generator=torch.Generator().manual_seed(1))[: steps * batch]
    scheduler = load_scheduler("tiny-random")
    scheduler.set_timesteps(50)
    torch.manual_seed(0)
    net = ThreeLayerConvNet(shape[0])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    labels = torch.randn(len(rows), 1, generator=torch.Generator().manual_seed(2))
    pool = torch.unique(scheduler.timesteps)

    def epoch(x) -> None:
        train_epoch(net, optimizer, scheduler, x, labels[: len(x)], pool, torch.Generator().manual_seed(0), batch,
                    progress=False)

    epoch(TensorRows(torch.randn(batch, *shape), torch.arange(batch)))  # one warm-up step: the training's own memory
    before = peak_rss_bytes()  # torch, the model, a training step: what either side needs anyway
    x = TensorRows(store.load(), rows) if mode == "in_memory" else LatentRows(store, rows)
    start = time.perf_counter()
    epoch(x)
    seconds = time.perf_counter() - start
    out.put({"steps_per_second": steps / seconds, "peak_rss_bytes": peak_rss_bytes(), "rss_before_bytes": before})


def _run(mode: str, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_train, args=(mode, *args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def bench_streaming(quick: bool) -> dict:
    """A cache 4x the memory budget for latents (1 GiB against 256 MiB; --quick: 8 MiB against 2 MiB), trained from
    streamed and in memory, and streamed from a cache a quarter that size."""
    shape, per_shard, batch = (4, 32, 32), 1024, 32
    row_bytes = 4 * 32 * 32 * 4
    cache_bytes = 2**23 if quick else 2**30
    steps, repeats = (3, 1) if quick else (40, 2)
    images = cache_bytes // row_bytes
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        write_cache(big, images, shape, per_shard)
        write_cache(small, images // 4, shape, per_shard)
        for _ in range(repeats):  # in turn, so drift touches every side alike
            for mode in MODES:
                folder, count = (small, images // 4) if mode == "streamed_small_cache" else (big, images)
                results[mode].append(_run(mode, str(folder), count, shape, per_shard, steps, batch))

    def median(mode: str, key: str) -> float:
        return spread([r[key] for r in results[mode]])["median"]

    return {
        "cache_bytes": cache_bytes, "budget_bytes": cache_bytes // 4, "latent_shape": list(shape), "images": images,
        "steps": steps, "batch": batch, "repeats": repeats,
        "steps_per_second": {mode: spread([r["steps_per_second"] for r in results[mode]]) for mode in MODES},
        "peak_rss_bytes": {mode: median(mode, "peak_rss_bytes") for mode in MODES},
        "rss_before_bytes": {mode: median(mode, "rss_before_bytes") for mode in MODES},
        "ratio_streamed_vs_in_memory_speed": median("streamed", "steps_per_second") / median("in_memory", "steps_per_second"),
    }
