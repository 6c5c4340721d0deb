"""The sharded latent cache (rcgdm/latents.py, rcgdm/latent_shards.py): streaming gives the in-memory batches and
weights bit for bit, rows are read across shard boundaries in any order, and an earlier version's one-file cache is
read into shards or, damaged, encoded afresh, each said in one line."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import latent_labels, run_script, weights
from safetensors import safe_open
from safetensors.torch import save_file

from rcgdm.distributed import batches
from rcgdm.latent_shards import LatentRows, ShardedLatents, write_shard


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    return latent_labels(tmp_path_factory.mktemp("labels") / "labels.npy", 96)


def train(tmp_path, labels, name: str, **overrides) -> dict:
    config = {"model": "tiny-random", "data": "synthetic", "num_data": 96, "num_epochs": 2, "batch_size": 16,
              "image_size": 64, "val_fraction": 0.25, "labels_path": labels, "cache_dir": tmp_path / "cache",
              "encode_batch_size": 8, "latents_per_shard": 20, "out_path": tmp_path / name / "convnet.pth", **overrides}
    assert run_script("train.py", *[f"--{k}={v}" for k, v in config.items()]) == 0
    return json.loads((tmp_path / name / "convnet.train_summary.json").read_text())


def test_rows_are_read_from_their_shards_in_any_order(tmp_path):
    latents = torch.randn(50, 4, 3, 3)
    for rows in batches(50, 16):
        write_shard(tmp_path, "spec", rows, latents[rows.start : rows.stop])
    store = ShardedLatents(tmp_path, batches(50, 16), (4, 3, 3))
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert store.shape == (50, 4, 3, 3) and torch.equal(store[order], latents[order]) and torch.equal(store.load(), latents)
    view = LatentRows(store, order[:20])
    assert view.shape == (20, 4, 3, 3) and torch.equal(view[torch.tensor([19, 0, 7, 7])], latents[order[[19, 0, 7, 7]]])


def test_streaming_from_the_shards_trains_the_in_memory_weights_bit_for_bit(tmp_path, labels, capsys):
    """Two epochs: the same batches (the same metrics, epoch by epoch) and the same weights."""
    in_memory = train(tmp_path, labels, "memory")
    capsys.readouterr()
    streamed = train(tmp_path, labels, "streamed", latents_in_memory_gb=0)
    assert streamed["images_encoded"] == 0  # the same cache: 4 shards of 24 images (20 rounded up to whole batches)
    assert "read from 4 shards batch by batch" in capsys.readouterr().out
    history = [(tmp_path / name / "convnet.metrics.jsonl").read_text().splitlines() for name in ("memory", "streamed")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines] for lines in history]
    assert strip[0] == strip[1] and len(strip[0]) == 2
    a, b = weights(tmp_path / "memory" / "convnet.pth"), weights(tmp_path / "streamed" / "convnet.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert in_memory["images_encoded"] == 96


def test_an_earlier_single_file_cache_is_read_into_shards_or_encoded_afresh(tmp_path, labels, capsys):
    first = train(tmp_path, labels, "first")
    (folder,) = (tmp_path / "cache").glob("latents-*")
    store = ShardedLatents(folder, batches(96, 24), (4, 8, 8))
    latents = store.load()
    with safe_open(str(next(folder.iterdir())), framework="pt") as f:
        description = f.metadata()["spec"].rsplit(" images ", 1)[0]  # the cache's, less the shard's image range
    old = folder.with_name(folder.name + ".safetensors")  # where the earlier version kept them, in one file
    checksum = hashlib.sha256(latents.numpy().tobytes()).hexdigest()

    def write_old(tensor: torch.Tensor) -> None:
        save_file({"latents": tensor.contiguous()}, str(old), metadata={"spec": description, "sha256": checksum})

    for name, tensor, encoded, said in (("read", latents, 0, "read: split into 4 shards"),
                                        ("damaged", latents + 1, 96, "is unusable: encoding shards afresh")):
        for shard in folder.iterdir():
            shard.unlink()
        write_old(tensor)
        capsys.readouterr()
        summary = train(tmp_path, labels, name)
        assert summary["images_encoded"] == encoded and not old.exists()
        assert f"latent cache {old} (one file, from an earlier version) {said}" in capsys.readouterr().out
        assert torch.equal(store.load(), latents)  # the shards hold the one-go latents either way
    assert first["images_encoded"] == 96


def test_a_shard_whose_rows_have_another_shape_is_encoded_again(tmp_path, labels, capsys):
    """A shard whose header claims the cache's settings and a matching checksum, but rows of another shape (another
    image size's, say): encoded again, never a cache hit that fails later in training."""
    train(tmp_path, labels, "first")
    (folder,) = (tmp_path / "cache").glob("latents-*")
    shard = sorted(folder.iterdir())[0]
    with safe_open(str(shard), framework="pt") as f:
        spec, latents = f.metadata()["spec"], f.get_tensor("latents")
    other = latents.reshape(len(latents), 4, 4, 16).contiguous()  # the same numbers, rows of another shape
    checksum = hashlib.sha256(other.numpy().tobytes()).hexdigest()
    save_file({"latents": other}, str(shard), metadata={"spec": spec, "sha256": checksum})
    capsys.readouterr()
    assert train(tmp_path, labels, "second")["images_encoded"] == len(latents)
    assert f"latent shard {shard} is unusable (its shape does not match): encoding it again" in capsys.readouterr().out
