"""The latent cache on disk: a folder of safetensors shards, each a run of consecutive images, read by rows.

    cache_dir/latents-<key>/images-00000000-00001024.safetensors   images [0, 1024)
                            images-00001024-00002048.safetensors   ...

Each shard holds one float32 tensor "latents" (rows, C, h, w) and in its metadata the cache's description (the
key's source, rcgdm/latents.py), its image range and the sha256 of its tensor; a shard that is missing, truncated,
altered or made for other settings is re-encoded alone, the others are kept. A shard is written whole (temporary file
and rename), so a run killed while encoding leaves only whole shards behind.

Why safetensors: it is already how models and the cache are stored, it needs no new package, and its layout is plain:
an 8-byte header length, a JSON header giving each tensor's byte range, then the raw little-endian data. So a row of
a checked shard is a fixed byte range, and `ShardedLatents` reads exactly the rows a batch needs with pread(2), through
the operating system's page cache, which keeps shards that fit in memory without counting them against the process.
A memory map would count every page a process ever touched in its resident memory, and mapping some 30 shards per
batch cost 8% of the training speed when measured (0.92x of the in-memory speed; pread: 1.01x, benchmarks/results.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rcgdm.files.atomic import atomic_path

HASH_ROWS = 256  # rows hashed at a time when a shard is checked: its memory stays that of a few batches
WHOLE_SHARD_SHARE = 8  # a read wanting at least 1/8 of a shard's rows reads the shard at once (one shard in memory)


def shard_path(folder: Path, rows: range) -> Path:
    return folder / f"images-{rows.start:08d}-{rows.stop:08d}.safetensors"


def shard_description(description: str, rows: range) -> str:
    return f"{description} images {rows.start}-{rows.stop}"


def write_shard(folder: Path, description: str, rows: range, latents: torch.Tensor) -> None:
    """Write the latents (len(rows), C, h, w) of images `rows` as one shard, whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    latents = latents.contiguous()
    metadata = {"spec": shard_description(description, rows), "sha256": hashlib.sha256(latents.numpy().tobytes()).hexdigest()}
    with atomic_path(shard_path(folder, rows)) as tmp:
        save_file({"latents": latents}, str(tmp), metadata=metadata)


def shard_problem(folder: Path, description: str, rows: range, row_shape: tuple[int, ...]) -> str | None:
    """Why the shard of images `rows` cannot be used (missing, unreadable, other settings, damaged, or rows of
    another shape than `row_shape`, (C, h, w)), or None. Read in slices of HASH_ROWS rows: checking a shard holds a
    few batches of it, never the whole cache."""
    path = shard_path(folder, rows)
    if not path.is_file() or path.is_symlink():  # a regular file of the cache's own, never a link or a device
        return "it is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("spec") != shard_description(description, rows):
                return "it was made for other settings"
            latents = f.get_slice("latents")
            if latents.get_shape() != [len(rows), *row_shape] or latents.get_dtype() != "F32" or set(f.keys()) != {"latents"}:
                return "its shape does not match"
            digest = hashlib.sha256()
            for start in range(0, len(rows), HASH_ROWS):
                digest.update(latents[start : start + HASH_ROWS].contiguous().numpy().tobytes())
    except Exception as err:  # truncated or foreign files fail in many ways
        return f"it cannot be read ({type(err).__name__})"
    return None if meta.get("sha256") == digest.hexdigest() else "its content does not match its checksum"


class ShardedLatents:
    """The cached latents of images 0..N-1, read from their shards (`ranges`: rcgdm.distributed.batches of the images)
    by rows: store[indices] -> float32 (len, C, h, w) on
    the CPU, in the order of `indices`. Holds no latents itself (see the module docstring); the shards must have been
    checked (shard_problem) by whoever made the store."""

    def __init__(self, folder: Path, ranges: list[range], shape: tuple[int, ...]):
        self.folder, self.ranges, self.row_shape = folder, ranges, tuple(shape)
        self.starts = torch.tensor([r.start for r in ranges])
        self.row_bytes = 4 * math.prod(self.row_shape)  # float32
        self.device = torch.device("cpu")
        if sys.byteorder != "little":  # safetensors stores little-endian; rows are read as raw bytes
            raise OSError("reading latent shards needs a little-endian machine")
        self.offsets: dict[int, int] = {}  # shard -> where its latents' bytes begin

    def __len__(self) -> int:
        return self.ranges[-1].stop if self.ranges else 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def _data_offset(self, shard: int, fd: int) -> int:
        """Where the latents of shard `shard` (open as `fd`) begin, from its safetensors header, checked against the
        store's row shape."""
        if shard not in self.offsets:
            length = int.from_bytes(os.pread(fd, 8, 0), "little")
            entry = json.loads(os.pread(fd, length, 8))["latents"]
            expected = [len(self.ranges[shard]), *self.row_shape]
            if entry["dtype"] != "F32" or entry["shape"] != expected:
                raise ValueError(f"{shard_path(self.folder, self.ranges[shard])} holds {entry['dtype']} {entry['shape']}, "
                                 f"expected F32 {expected}")
            self.offsets[shard] = 8 + length + entry["data_offsets"][0]
        return self.offsets[shard]

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long).cpu().flatten()
        out = torch.empty((len(indices), *self.row_shape), dtype=torch.float32)
        shards = torch.searchsorted(self.starts, indices, right=True) - 1
        for shard in shards.unique().tolist():
            rows = self.ranges[shard]
            wanted = (shards == shard).nonzero().flatten()
            fd = os.open(shard_path(self.folder, rows), os.O_RDONLY)
            try:
                start = self._data_offset(shard, fd)
                if len(wanted) * WHOLE_SHARD_SHARE >= len(rows):  # many of its rows: one read of the shard, then index
                    data = self._read(fd, start, len(rows)).view(len(rows), *self.row_shape)
                    out[wanted] = data[indices[wanted] - rows.start]
                    continue
                for k in wanted.tolist():
                    out[k] = self._read(fd, start + (int(indices[k]) - rows.start) * self.row_bytes, 1).view(self.row_shape)
            finally:
                os.close(fd)
        return out

    def _read(self, fd: int, offset: int, rows: int) -> torch.Tensor:
        data = os.pread(fd, rows * self.row_bytes, offset)
        if len(data) != rows * self.row_bytes:
            raise OSError(f"a latent shard in {self.folder} ended early (changed since it was checked?)")
        return torch.frombuffer(bytearray(data), dtype=torch.float32)

    def load(self) -> torch.Tensor:
        """Every latent (N, C, h, w), in memory."""
        return self[torch.arange(len(self))]


class LatentRows:
    """Rows `rows` of a latent store, indexed from 0 as a tensor would be: view[i] = store[rows[i]]."""

    def __init__(self, store: ShardedLatents, rows: torch.Tensor):
        self.store, self.rows = store, rows
        self.device = store.device

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.store.row_shape)

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return self.store[self.rows[torch.as_tensor(indices, dtype=torch.long).cpu()]]
