"""Latent cache: write/read round trip, flips as indices, stats, clear errors, atomic index."""

import json

import pytest
import torch

from pae_fast.data.latent_cache import INDEX_FILE, LatentCache, write_latent_cache


def test_round_trip_with_shards_and_flips(tmp_path):
    z = torch.randn(10, 4, 3, 5) * 2 + 1
    y = torch.arange(10) % 3
    write_latent_cache(tmp_path / "c", z, y, shard_size=4, metadata={"tokenizer": "test"})
    ds = LatentCache(tmp_path / "c", normalize=False, hflip=True)
    assert len(ds) == 20 and ds.channels == 4 and ds.size == (3, 5) and ds.num_classes == 3
    assert ds.metadata == {"tokenizer": "test"}
    for i in (0, 3, 4, 9):
        zi, yi = ds[i]
        assert torch.equal(zi, z[i]) and int(yi) == int(y[i])
        zf, _ = ds[10 + i]
        assert torch.equal(zf, z[i].flip(-1))
    zz, yy = ds.load_all()
    assert torch.equal(zz, z) and torch.equal(yy, y)
    with pytest.raises(IndexError):
        ds[20]


def test_normalisation_uses_stats(tmp_path):
    z = torch.randn(64, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1])[:, None, None] + 3
    write_latent_cache(tmp_path, z, torch.zeros(64, dtype=torch.long))
    ds = LatentCache(tmp_path, normalize=True, hflip=False)
    zn, _ = ds.load_all(normalize=True)
    torch.testing.assert_close(zn.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    # std = sqrt(var + 1e-5): the channel with std 0.1 comes out at 0.1 / sqrt(0.01 + 1e-5) ~ 0.9995
    torch.testing.assert_close(zn.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(ds.denormalize(ds[5][0][None])[0], z[5], atol=1e-5, rtol=1e-5)
    assert ds.stats.mode == "channel" and ds.stats.mean.shape == (3,) and ds.stats.count == 64


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        LatentCache(tmp_path)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        write_latent_cache(tmp_path, torch.randn(4, 2, 2, 2), torch.zeros(3))
    write_latent_cache(tmp_path, torch.randn(4, 2, 2, 2), torch.zeros(4, dtype=torch.long))
    idx = json.loads((tmp_path / INDEX_FILE).read_text())
    idx["num_items"] = 5
    (tmp_path / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="shards hold 4 items but num_items is 5"):
        LatentCache(tmp_path)
    (tmp_path / "shard-00000.safetensors").write_bytes(b"garbage")
    idx["num_items"] = 4
    (tmp_path / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="shard-00000.safetensors is damaged"):
        LatentCache(tmp_path)[0]


def test_default_latents_flip_mirrors_the_width_axis(tmp_path):
    """Without ``latents_flip`` the cache stores each latent mirrored left-right: entry (c, h, w) of the flipped latent
    is entry (c, h, W-1-w) of the latent (horizontal flip = last axis of (C, H, W); the H axis and channels stay)."""
    from pae_fast.io import load_safetensors

    z = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)  # square: an H flip has the same shape
    write_latent_cache(tmp_path / "c", z, torch.tensor([0, 1]), shard_size=8)
    (shard,) = sorted((tmp_path / "c").glob("shard-*.safetensors"))
    stored = load_safetensors(shard)[0]["latents_flip"]
    for n in range(2):
        for c in range(3):
            for h in range(4):
                for w in range(4):
                    assert float(stored[n, c, h, w]) == float(z[n, c, h, 3 - w]), (n, c, h, w)
