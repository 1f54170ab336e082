"""Diffusability metrics against known answers (docs/method.md § Diffusability metrics)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from pae_fast.eval.diagnostics import efficiency, erank, lpc, nmi, ssc, straightness
from pae_fast.eval.diffusability import (
    cds,
    cosine_distance_profile,
    gsq,
    lds,
    lnc,
    sec,
    standardize,
    viv,
    viv_profile,
    viv_spectra,
)
from pae_fast.eval.report import diffusability_metrics


def _class_gaussians(k: int, m: int, c: int, h: int, w: int, v: float, b: float, smooth: bool = False, seed: int = 0):
    """Class-conditional latents: mean sqrt(b) r_k (per channel, constant over space) + sqrt(v) noise.

    The class means have mean 0 and variance exactly b per channel over the (equal-sized) classes, so the
    population per-channel variance is v + b and after the estimator's standardisation the within-class variance
    per dimension is v / (v + b).
    """
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(k, c, generator=g)
    r = (r - r.mean(0)) / r.std(0, unbiased=False)
    labels = torch.arange(k).repeat_interleave(m)
    noise = torch.randn(k * m, c, h, w, generator=g)
    if smooth:  # spatially correlated noise of the same per-dimension variance
        kern = torch.tensor([1.0, 3.0, 4.0, 3.0, 1.0])
        kern = (kern[:, None] * kern[None]) / kern.sum() ** 2
        flat = torch.nn.functional.pad(noise.reshape(-1, 1, h, w), (2, 2, 2, 2), mode="circular")
        noise = torch.nn.functional.conv2d(flat, kern[None, None])
        noise = (noise / noise.std()).reshape(k * m, c, h, w)
    return math.sqrt(b) * r[labels][:, :, None, None] + math.sqrt(v) * noise, labels


def test_viv_isotropic_within_class_variance_is_half_pi_sqrt_v():
    v, b = 0.5, 1.5
    z, y = _class_gaussians(k=6, m=60, c=16, h=4, w=4, v=v, b=b)
    expected = math.pi / 2 * math.sqrt(v / (v + b))
    assert viv(z, y) == pytest.approx(expected, rel=0.05)
    # invariant to a per-channel affine map of the raw latents (step 1 standardises them)
    scale, shift = torch.rand(16)[None, :, None, None] + 0.5, torch.randn(16)[None, :, None, None]
    assert viv(z * scale + shift, y) == pytest.approx(viv(z, y), rel=1e-4)


def test_viv_is_lower_for_spatially_smooth_latents_of_the_same_variance():
    white, y = _class_gaussians(k=6, m=50, c=8, h=8, w=8, v=0.5, b=1.5)
    smooth, _ = _class_gaussians(k=6, m=50, c=8, h=8, w=8, v=0.5, b=1.5, smooth=True)
    # same within-class variance, different spectra: the Kronecker estimate sees the spatial correlation
    assert viv(smooth, y) < 0.8 * viv(white, y)
    assert viv(white, y) <= math.pi / 2


def test_viv_profile_integrates_to_viv_and_has_the_right_ends():
    z, y = _class_gaussians(k=4, m=40, c=8, h=4, w=4, v=0.3, b=1.0, smooth=False)
    spectra = viv_spectra(z, y)
    ts = np.linspace(0, 1, 4001)
    prof = spectra.profile(ts)
    assert np.trapezoid(prof, ts) == pytest.approx(spectra.viv(), rel=1e-4)
    assert prof[-1] == pytest.approx(1.0)  # at t = 1 (data) every direction with lam > 0 contributes 1
    assert prof[0] == pytest.approx(float(spectra.eigenvalues.mean()))  # at t = 0: the mean eigenvalue
    assert np.allclose(viv_profile(z, y, [0.0, 0.5, 1.0]), spectra.profile([0.0, 0.5, 1.0]))
    # eigenvalues sum to each class's total variance
    assert torch.allclose(spectra.eigenvalues.sum(1), spectra.total_variance)


def test_viv_handles_uneven_and_tiny_classes():
    z, y = _class_gaussians(k=3, m=30, c=4, h=4, w=4, v=0.5, b=1.0)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[(y == 1).nonzero()[5:]] = False  # class 1 keeps 5 latents
    z, y = z[keep], y[keep]
    z, y = torch.cat([z, z[:1]]), torch.cat([y, torch.tensor([7])])  # class 7 has one latent: left out
    with pytest.warns(UserWarning, match="fewer than 2"):
        spectra = viv_spectra(z, y, max_per_class=20)
    assert spectra.classes.tolist() == [0, 1, 2]
    assert torch.isfinite(spectra.eigenvalues).all()
    with pytest.raises(ValueError, match="labels must be"):
        viv(z, y[:-1])


def test_sec_of_white_noise_and_smooth_latents():
    white = torch.randn(64, 8, 16, 16)
    assert sec(white, rho=0.5) == pytest.approx(120 / 256, abs=0.01)  # ≈ 0.47: u + v > 15 on a 16x16 grid
    smooth, _ = _class_gaussians(k=2, m=32, c=8, h=16, w=16, v=1.0, b=0.0, smooth=True)
    assert sec(smooth) < 0.1
    with pytest.raises(ValueError, match="rho"):
        sec(white, rho=1.5)


def test_lnc_and_gsq_known_answers():
    z, y = _class_gaussians(k=5, m=20, c=8, h=4, w=4, v=0.01, b=1.0)  # well-separated classes
    assert lnc(z, y, k=5) == 1.0 and gsq(z, y) == 1.0
    noise = torch.randn(400, 8, 4, 4)
    labels = torch.arange(4).repeat(100)
    assert lnc(noise, labels, k=10) == pytest.approx(0.25, abs=0.06)
    assert gsq(noise, labels) == pytest.approx(0.25, abs=0.08)


def test_lds_cds_and_cosine_profile():
    white = torch.randn(32, 8, 16, 16)
    smooth, _ = _class_gaussians(k=2, m=16, c=8, h=16, w=16, v=1.0, b=0.0, smooth=True)
    d, cos = cosine_distance_profile(smooth)
    assert d.tolist() == list(range(31)) and cos[0] == pytest.approx(1.0)
    assert lds(smooth) > 0.3 > abs(lds(white))
    assert cds(smooth) > 0.02 > abs(cds(white))
    with pytest.raises(ValueError, match="distances >= 6"):
        lds(torch.randn(4, 8, 3, 3))


def test_ssc_recovers_segments_and_nmi_known_values():
    assert nmi([0, 0, 1, 1], [5, 5, 9, 9]) == pytest.approx(1.0)
    assert nmi([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 6, 16, 8, 8
    seg = torch.zeros(n, h, w, dtype=torch.long)
    seg[:, :, 4:] = 1
    seg[:, 5:, :4] = 2
    protos = torch.randn(n, 3, c, generator=g)  # one direction per segment and image
    tokens = protos.gather(1, seg.flatten(1)[:, :, None].expand(-1, -1, c)) + 0.1 * torch.randn(
        n, h * w, c, generator=g
    )
    z = tokens.transpose(1, 2).reshape(n, c, h, w)
    assert ssc(z, seg) > 0.95
    assert ssc(torch.randn(n, c, h, w, generator=g), seg) < 0.3
    big_masks = seg.repeat_interleave(4, 1).repeat_interleave(4, 2)  # image-resolution masks are reduced
    assert ssc(z, big_masks) == pytest.approx(ssc(z, seg))


def test_lpc_known_answers():
    z = torch.randn(6, 4, 4, 4)
    dist = lambda a, b: (a - b).abs().flatten(1).mean(1)
    const = lpc(lambda t: torch.zeros(t.shape[0], 3, 8, 8), z, dist)
    assert const["lpc"] == 0.0 and set(const["per_rho"]) == {0.1, 0.5, 1.0, 2.0}
    lin1 = lpc(lambda t: t[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2), z, dist)
    lin2 = lpc(lambda t: 2 * t[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2), z, dist)
    assert lin2["lpc"] == pytest.approx(2 * lin1["lpc"])  # a twice as sensitive decoder
    assert lin1["per_rho"][2.0] == pytest.approx(20 * lin1["per_rho"][0.1])  # linear decoder: change ∝ rho
    weights = np.array([10, 2, 1, 0.5]) / 13.5
    assert lin1["lpc"] == pytest.approx(sum(wt * lin1["per_rho"][r] for wt, r in zip(weights, (0.1, 0.5, 1.0, 2.0))))


def test_erank_known_answers():
    c = 8
    rank1 = torch.randn(5, 1, 1, 1) * torch.randn(5, c, 1, 1) * torch.randn(5, 1, 4, 4)
    assert erank(rank1) == pytest.approx(1 / c, rel=1e-4)
    assert erank(torch.randn(20, c, 16, 16)) > 0.85


def test_trajectory_straightness_and_efficiency():
    t = torch.linspace(0, 1, 11)[:, None, None]
    start, end = torch.randn(1, 5, 6), torch.randn(1, 5, 6)
    line = start + t * (end - start)  # (T=11, N=5, D=6)
    assert straightness(line) == pytest.approx(1.0) and efficiency(line) == pytest.approx(1.0)
    # a 90-degree zig-zag: successive steps orthogonal, path sqrt(2) longer than its chord
    zig = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 1.0], [2.0, 2.0]])[:, None]
    assert straightness(zig) == pytest.approx(0.0, abs=1e-12)
    assert efficiency(zig) == pytest.approx(math.sqrt(8) / 4)
    with pytest.raises(ValueError, match="T >= 2"):
        efficiency(torch.randn(1, 3, 4))


def test_suite_on_a_small_latent_cache(tmp_path):
    from pae_fast.data.latent_cache import LatentCache, write_latent_cache

    z, y = _class_gaussians(k=4, m=12, c=8, h=8, w=8, v=0.5, b=1.0)
    raw = z * 3 + 1  # the cache stores raw latents; the suite standardises
    write_latent_cache(tmp_path / "cache", raw, y, shard_size=20)
    latents, labels = LatentCache(tmp_path / "cache", normalize=False, hflip=False).load_all()
    m = diffusability_metrics(latents, labels, lnc_k=5, profile_ts=11)
    for key in ("viv", "lnc", "sec", "lds", "cds", "gsq", "erank"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["num_latents"] == 48 and m["num_classes"] == 4 and m["shape"] == [8, 8, 8]
    assert len(m["viv_profile"]["value"]) == 11 and len(m["dct_spectrum"]["energy"]) == 15
    assert sum(m["dct_spectrum"]["energy"]) == pytest.approx(1.0)
    assert m["viv"] == pytest.approx(viv(z, y), rel=1e-5)
    assert torch.allclose(standardize(raw), standardize(z), atol=1e-5)


@pytest.mark.slow
def test_metrics_on_a_50_per_class_1000_class_cache_run_in_minutes(tmp_path):
    """Benchmark-style: the paper's protocol size (50 latents x 1000 classes, 32x16x16) through the CLI path."""
    from pae_fast.data.latent_cache import write_latent_cache
    from pae_fast.eval.report import run_diffusability

    g = torch.Generator().manual_seed(0)
    k, m = 1000, 50
    labels = torch.arange(k).repeat_interleave(m)
    means = torch.randn(k, 32, 1, 1, generator=g)
    latents = torch.empty(k * m, 32, 16, 16)
    for i in range(0, k * m, 5000):
        latents[i : i + 5000] = means[labels[i : i + 5000]] + 0.7 * torch.randn(5000, 32, 16, 16, generator=g)
    write_latent_cache(tmp_path / "cache", latents, labels)
    del latents
    t0 = time.perf_counter()
    report = run_diffusability({"synthetic": tmp_path / "cache"}, tmp_path / "report")
    elapsed = time.perf_counter() - t0
    r = report["results"]["synthetic"]
    print(f"diffusability suite on 50k x 32x16x16 latents: {elapsed:.1f} s, viv={r['viv']:.4f}")
    assert r["num_classes"] == 1000 and r["num_latents"] == 50_000
    expected = math.pi / 2 * math.sqrt(0.49 / 1.49)
    assert r["viv"] == pytest.approx(expected, rel=0.05)
    assert elapsed < 600
