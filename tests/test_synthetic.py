"""Synthetic latent sets: known class means, within-class variance and spatial correlation."""

import pytest
import torch

from pae_fast.data.synthetic import SyntheticLatentSpec, smooth_field, synthetic_latents


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.5])
def test_smooth_field_keeps_unit_variance(sigma):
    x = smooth_field(torch.randn(400, 2, 16, 16, dtype=torch.float64), sigma)
    assert x.var().item() == pytest.approx(1.0, rel=0.05)


def test_smoothness_raises_neighbour_correlation():
    e = torch.randn(200, 1, 16, 16, dtype=torch.float64)

    def corr(x):
        return (x[..., :, 1:] * x[..., :, :-1]).mean().item()

    assert abs(corr(smooth_field(e, 0.0))) < 0.05
    assert corr(smooth_field(e, 2.0)) > 0.8


def test_balanced_set_with_known_moments():
    spec = SyntheticLatentSpec(num_classes=3, channels=4, size=8, noise_scale=0.5, seed=3)
    z, y = synthetic_latents(spec, per_class=300, seed=5)
    assert z.shape == (900, 4, 8, 8) and torch.bincount(y).tolist() == [300, 300, 300]
    for k in range(3):
        zk = z[y == k]
        torch.testing.assert_close(zk.mean(0), spec.class_means[k], atol=0.15, rtol=0)
        assert (zk - spec.class_means[k]).var().item() == pytest.approx(0.25, rel=0.1)
    z2, y2 = synthetic_latents(spec, per_class=300, seed=5)
    assert torch.equal(z, z2) and torch.equal(y, y2)


def test_bad_spec_is_an_error():
    with pytest.raises(ValueError, match="must be >= 1"):
        SyntheticLatentSpec(num_classes=0)
