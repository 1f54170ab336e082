"""pae_fast.data.latent_stats: the one mean/std convention (std = sqrt(var + eps)), both modes, storage."""

import pytest
import torch

from pae_fast.data.latent_stats import DEFAULT_EPS, LatentStats, LatentStatsAccumulator, compute_latent_stats


def _latents(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 4.0, 0.5])[None, :, None, None]
    return torch.randn(n, 3, 4, 5, generator=g) * scale + torch.tensor([2.0, -1.0, 0.0])[None, :, None, None]


def test_channel_mode_matches_the_formula_and_round_trips():
    z = _latents()
    s = compute_latent_stats(z, "channel")
    x = z.double()
    mean = x.mean((0, 2, 3))
    std = (x.var((0, 2, 3), unbiased=False) + DEFAULT_EPS).sqrt()
    torch.testing.assert_close(s.mean, mean.float())
    torch.testing.assert_close(s.std, std.float())
    assert s.count == 64 and s.mean.dtype == torch.float32
    zn = s.normalize(z)
    torch.testing.assert_close(zn.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.denormalize(zn), z, atol=1e-5, rtol=1e-5)


def test_chw_mode_is_per_element():
    z = _latents()
    s = compute_latent_stats(z, "chw")
    assert s.mean.shape == (3, 4, 5)
    torch.testing.assert_close(s.mean, z.double().mean(0).float())
    torch.testing.assert_close(s.std, (z.double().var(0, unbiased=False) + DEFAULT_EPS).sqrt().float())
    torch.testing.assert_close(s.normalize(z).mean(0), torch.zeros(3, 4, 5), atol=1e-5, rtol=0)


def test_streaming_max_items_and_merge_agree_with_one_pass():
    z = _latents(50)
    one = compute_latent_stats(z, max_items=30)
    streamed = compute_latent_stats((z[i : i + 7] for i in range(0, 50, 7)), max_items=30)
    torch.testing.assert_close(one.mean, compute_latent_stats(z[:30]).mean)
    torch.testing.assert_close(streamed.std, one.std)
    a, b = LatentStatsAccumulator(), LatentStatsAccumulator()
    a.update(z[:20])
    b.update(z[20:])
    a.merge(b)
    torch.testing.assert_close(a.result().mean, compute_latent_stats(z).mean)
    assert a.result().count == 50


def test_metadata_and_file_round_trip(tmp_path):
    s = compute_latent_stats(_latents(), "channel")
    back = LatentStats.from_metadata(s.to_metadata())
    torch.testing.assert_close(back.mean, s.mean)
    assert back.mode == "channel" and back.count == s.count and back.eps == s.eps
    assert LatentStats.from_metadata({"step": "1"}) is None
    s.save(tmp_path / "stats.safetensors")
    loaded = LatentStats.load(tmp_path / "stats.safetensors")
    torch.testing.assert_close(loaded.std, s.std)
    with pytest.raises(ValueError, match="malformed"):
        LatentStats.from_metadata({"latent_mean": "[1, 2", "latent_std": "[1]"})


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"shard-3: latents hold NaN/Inf \(items \[1\]"):
        compute_latent_stats(torch.tensor([[[[0.0]]], [[[float("nan")]]]]), where="shard-3")
    with pytest.raises(ValueError, match="do not fit channel statistics"):
        compute_latent_stats(_latents()).normalize(torch.zeros(2, 4, 4, 5))
    with pytest.raises(ValueError, match="non-positive std"):
        LatentStats("channel", torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="mode 'pixel'"):
        LatentStatsAccumulator("pixel")
