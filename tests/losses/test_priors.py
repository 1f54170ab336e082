"""SSR / MCR / SCR regularizers and RAE noise augmentation against naive transcriptions of their formulas."""

import math

import pytest
import torch

from pae_fast.kernels import use_backend
from pae_fast.kernels.sphere_perturb import sphere_perturb_noise
from pae_fast.losses.mcr import decode_concat, mcr_angles_for, mcr_losses, mcr_perturb, mcr_step_seed
from pae_fast.losses.noise_aug import noise_augment, sample_sigma
from pae_fast.losses.scr import scr_losses
from pae_fast.losses.ssr import latent_tokens, ssr_loss


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token angle in degrees between two (B, C, H, W) latents."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


# ------------------------------------------------------------------------------------------------------------ SSR
def _naive_ssr(z, t):
    B, C, H, W = z.shape
    total = 0.0
    for b in range(B):
        zt = [z[b, :, i // W, i % W] for i in range(H * W)]
        tt = [t[b, i] for i in range(H * W)]
        for i in range(H * W):
            for j in range(H * W):
                gz = float(zt[i] @ zt[j]) / float(zt[i].norm() * zt[j].norm())
                gt = float(tt[i] @ tt[j]) / float(tt[i].norm() * tt[j].norm())
                total += (gz - gt) ** 2
    return total / (B * (H * W) ** 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ssr_matches_naive_formula(backend):
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = torch.randn(2, 9, 6, dtype=torch.float64)
    got = ssr_loss(z.float(), t.float(), backend=backend)
    assert float(got) == pytest.approx(_naive_ssr(z, t), rel=1e-4)


def _naive_ssr_options(z, t, gram, reduction):
    """L_SSR for every (gram, reduction): Gram entries written out per pair of tokens; (B, C, H, W) latent."""
    B, C, H, W = z.shape
    N = H * W
    per_sample = []
    for b in range(B):
        zt = [z[b, :, i // W, i % W] for i in range(N)]
        tt = [t[b, i] for i in range(N)]
        if gram == "cosine":
            zt, tt = [x / x.norm() for x in zt], [x / x.norm() for x in tt]
        per_sample.append(sum((zt[i] @ zt[j] - tt[i] @ tt[j]) ** 2 for i in range(N) for j in range(N)))
    frob = sum(per_sample) / B  # ||G_z - G_T||_F^2, mean over the batch
    return frob / {"mean": N * N, "row_mean": N, "sum": 1}[reduction]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gram, reduction", [("cosine", "mean"), ("cosine", "row_mean"), ("raw", "mean"),
                                             ("raw", "row_mean"), ("raw", "sum"), ("cosine", "sum")])
def test_ssr_options_match_naive_formula_value_and_gradient(backend, gram, reduction):
    g = torch.Generator().manual_seed(11)
    z0 = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64) * (torch.rand(2, 1, 2, 3, generator=g) + 0.5)
    t = torch.randn(2, 6, 5, generator=g, dtype=torch.float64) * 1.7  # target tokens of norm ~4, latent ~2
    z_ref = z0.clone().requires_grad_()
    want = _naive_ssr_options(z_ref, t, gram, reduction)
    (g_want,) = torch.autograd.grad(want, z_ref)
    z = z0.float().requires_grad_()
    got = ssr_loss(z, t.float(), backend=backend, gram=gram, reduction=reduction)
    (g_got,) = torch.autograd.grad(got, z)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-5 * float(g_want.abs().max()))
    other = _naive_ssr_options(z0, t, "raw" if gram == "cosine" else "cosine", reduction)
    assert abs(float(other) / float(want) - 1) > 0.05  # the inputs tell raw from cosine


def test_ssr_scale_factors_at_paper_size(parts):
    """docs/method.md § SSR: with unit-RMS 32-channel tokens on both sides (the latent and P_t(H) are per-token RMS
    normalised) on a 16x16 grid, raw Grams are exactly C x the cosine ones, so the literal sum is C^2 N^2 = 2^26
    (6.7e7) times the default (cosine, mean) and the per-row mean C^2 N = 2^18 (2.6e5) times it."""
    g = torch.Generator().manual_seed(0)
    z = parts.rms1(2, 16, 16, 32, dtype=torch.float64, generator=g).permute(0, 3, 1, 2)
    t = parts.rms1(2, 256, 32, dtype=torch.float64, generator=g)
    base = ssr_loss(z, t, backend="torch")
    ratio = {(gr, r): float(ssr_loss(z, t, backend="torch", gram=gr, reduction=r) / base)
             for gr in ("cosine", "raw") for r in ("mean", "row_mean", "sum")}  # fmt: skip
    assert ratio["raw", "sum"] == pytest.approx(32**2 * 256**2, rel=1e-9) == pytest.approx(6.7e7, rel=0.002)
    assert ratio["raw", "row_mean"] == pytest.approx(32**2 * 256, rel=1e-9) == pytest.approx(2.62e5, rel=0.002)
    assert ratio["raw", "mean"] == pytest.approx(32**2, rel=1e-9)
    assert ratio["cosine", "sum"] == pytest.approx(256**2, rel=1e-12)
    assert ratio["cosine", "row_mean"] == pytest.approx(256, rel=1e-12)


def test_ssr_refuses_an_unknown_gram():
    with pytest.raises(ValueError, match="tokenizer.ssr_gram"):
        ssr_loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 3), gram="dot")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ssr_is_zero_when_grams_agree_and_target_gets_no_grad(backend):
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    q = torch.linalg.qr(torch.randn(12, 8, dtype=torch.float64))[0].float()  # (12, 8) orthonormal columns
    scale = torch.rand(2, 16, 1) + 0.5
    target = (latent_tokens(z.detach()) @ q.T * scale).requires_grad_(True)  # same cosine Gram, width 12
    loss = ssr_loss(z, target, backend=backend)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10)
    (loss + ssr_loss(z, torch.randn(2, 16, 12), backend=backend)).backward()
    assert target.grad is None  # stop-gradient target
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="share"):
        ssr_loss(z, torch.randn(2, 9, 12))


# ------------------------------------------------------------------------------------------------------------ MCR
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mcr_geodesic_angles_exact_and_noise_mode_within_tolerance(parts, backend):
    z = parts.rms1(4, 8, 8, 32).permute(0, 3, 1, 2)  # (B, C=32, 8, 8), token RMS 1
    zm, zl = mcr_perturb(z, (42.5, 85.0), seed=3, mode="geodesic", backend=backend)
    assert zm.shape == z.shape
    torch.testing.assert_close(_angle(z, zm), torch.full((4, 8, 8), 42.5, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(_angle(z, zl), torch.full((4, 8, 8), 85.0, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(zl.norm(dim=1), z.norm(dim=1), rtol=1e-5, atol=1e-5)  # stays on the sphere
    # 4096 tokens: the mean angle is known to ~0.2 deg; z from its own generator, so the test does not depend on the
    # global RNG state left by earlier tests (with it, |mean - theta| ranged 0.1-0.7 deg over 40 seeds)
    z = parts.rms1(4, 32, 32, 32, generator=torch.Generator().manual_seed(0)).permute(0, 3, 1, 2)
    nm, nl = mcr_perturb(z, (42.5, 85.0), seed=3, mode="noise", backend=backend)
    # noise rule, C = 32: theta on average. Stated tolerance: mean angle within 1 deg of theta, per-token spread
    # (std) below 7 deg (medium) / 12 deg (large); measured 42.1 +- 5.9 and 85.1 +- 10.2.
    for out, th, spread in ((nm, 42.5, 7.0), (nl, 85.0, 12.0)):
        a = _angle(z, out)
        assert abs(float(a.mean()) - th) < 1.0 and float(a.std()) < spread


def test_mcr_medium_and_large_share_one_noise_draw(parts):
    z = parts.rms1(2, 4, 4, 32).permute(0, 3, 1, 2)
    seed = 11
    zm, zl = mcr_perturb(z, (42.5, 85.0), seed=seed, mode="noise", backend="torch")
    e = sphere_perturb_noise((2, 4, 4, 32), seed).permute(0, 3, 1, 2).double()
    for out in (zm, zl):  # both lie in span(z_i, e_i) of the SAME e: residual of the projection is ~0
        basis = torch.stack([z.double(), e], dim=-1).permute(0, 2, 3, 1, 4)  # (B, H, W, C, 2)
        y = out.double().permute(0, 2, 3, 1).unsqueeze(-1)
        coef = torch.linalg.lstsq(basis, y).solution
        assert float((basis @ coef - y).abs().max()) < 1e-4
    # one call with both angles == the single-angle calls with the same seed
    (m_only,) = mcr_perturb(z, (42.5,), seed=seed, backend="torch")
    torch.testing.assert_close(m_only, zm)
    # another seed: another draw
    zm2, _ = mcr_perturb(z, (42.5, 85.0), seed=seed + 1, backend="torch")
    assert not torch.allclose(zm, zm2)


def test_mcr_cascade_stop_gradients_and_values(parts):
    lp = parts.CountingLPIPS()
    xr = torch.rand(2, 3, 8, 8, requires_grad=True)
    xm = torch.rand(2, 3, 8, 8, requires_grad=True)
    xl = torch.rand(2, 3, 8, 8, requires_grad=True)
    t = mcr_losses(xr, [xm, xl], "cascaded", lp)
    naive_m = (xm - xr).abs().mean() + (xm - xr).pow(2).flatten(1).mean(1).sqrt().mean()
    naive_l = (xl - xm).abs().mean() + (xl - xm).pow(2).flatten(1).mean(1).sqrt().mean()
    assert float(t["mcr_medium"].detach()) == pytest.approx(float(naive_m.detach()), rel=1e-6)
    assert float(t["mcr_large"].detach()) == pytest.approx(float(naive_l.detach()), rel=1e-6)
    (t["mcr_medium"] + t["mcr_large"]).backward()
    assert xr.grad is None  # sg(recon): the anchor gets nothing
    # sg(x_m) in the large term: x_m's gradient is exactly that of the medium term alone
    gm = torch.autograd.grad(mcr_losses(xr, [xm, xl], "cascaded", lp)["mcr_medium"], xm)[0]
    torch.testing.assert_close(xm.grad, gm)
    assert xl.grad is not None and xl.grad.abs().sum() > 0
    large = mcr_losses(xr, [xl], "large", None)  # large-only: pulled to the anchor, L1 only without LPIPS
    assert set(large) == {"mcr_large"}
    assert float(large["mcr_large"].detach()) == pytest.approx(float((xl - xr).abs().mean().detach()), rel=1e-6)
    assert mcr_angles_for((42.5, 85.0), "medium") == (42.5,) and mcr_angles_for((42.5, 85.0), "large") == (85.0,)
    with pytest.raises(ValueError, match="needs 2"):
        mcr_losses(xr, [xm], "cascaded")


def test_mcr_step_seed_differs_per_step_and_rank_and_is_reproducible(parts):
    seeds = {mcr_step_seed(0, step, rank) for step in range(200) for rank in range(8)}
    assert len(seeds) == 1600 and all(-(2**63) <= s < 2**63 for s in seeds)
    assert mcr_step_seed(5, 17, 3) == mcr_step_seed(5, 17, 3) != mcr_step_seed(6, 17, 3)
    z = parts.rms1(1, 2, 2, 8).permute(0, 3, 1, 2)
    mcr_perturb(z, (42.5,), seed=mcr_step_seed(1, 2**32 - 1, 2**32 - 1), backend="torch")  # a valid kernel seed
    with pytest.raises(ValueError, match="2\\*\\*32"):
        mcr_step_seed(0, 2**32, 0)


@pytest.mark.parametrize("world", [1, 64, 1000])
def test_mcr_noise_streams_never_repeat_at_any_world_size(world):
    """Every (step, rank) of a run draws its own MCR noise, however many ranks (a ``step * 64 + rank`` style formula
    repeats streams from 64 ranks on), and the same (step, rank) draws the same noise again (resume)."""
    steps = range(0, 40_000 // world + 2)
    seeds = [mcr_step_seed(123, s, r) for s in steps for r in range(world)]
    assert len(set(seeds)) == len(seeds)
    # near the ends of the range too, and across steps that a linear mix could alias
    far = {mcr_step_seed(123, s, r) for s in (2**31, 2**32 - 1) for r in {0, world - 1}}
    assert len(far | set(seeds)) == len(far) + len(seeds)
    assert mcr_step_seed(123, 7, world - 1) == mcr_step_seed(123, 7, world - 1)


def test_the_stage_seeds_mcr_with_mcr_step_seed(parts, monkeypatch):
    """The training stage draws the MCR noise of (step, rank) from mcr_step_seed(run seed, step, rank)."""
    from pae_fast.engine.task import Shared
    from pae_fast.stages.tokenizer_task import tokenizer_loss_fn

    seen = []

    class Model(torch.nn.Module):
        def forward(self, images, step, seed, grad_shares=False):
            seen.append(seed)
            return images.sum(), {}, images

    shared = Shared(seed=9, has_disc=False, announced=True, status={}, recons=[])
    for rank in (0, 70):
        tokenizer_loss_fn(shared, rank)(Model(), (torch.zeros(1, 3, 2, 2),), 3)
    assert seen == [mcr_step_seed(9, 3, 0), mcr_step_seed(9, 3, 70)]


def test_decode_concat_runs_one_pass_and_splits(parts):
    dec = parts.TinyDecoder(channels=8)
    zs = [torch.randn(2, 8, 2, 2) for _ in range(3)]
    outs = decode_concat(dec, zs)
    assert dec.calls == [6] and [o.shape for o in outs] == [(2, 3, 8, 8)] * 3
    for z, o in zip(zs, outs):  # no batch coupling in the decoder: identical to separate passes
        torch.testing.assert_close(o, dec(z))


# ------------------------------------------------------------------------------------------------------------ SCR
def test_scr_matches_naive_and_switches():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 9, 4, requires_grad=True)
    out = scr_losses(z, t, "both")
    zt = z.detach().flatten(2).transpose(1, 2)
    cos = lambda a, b: float(a @ b) / float(a.norm() * b.norm())  # noqa: E731
    pooled = sum(1 - cos(zt[b].mean(0), t[b].detach().mean(0)) for b in range(2)) / 2
    patch = sum(1 - cos(zt[b, i], t[b, i].detach()) for b in range(2) for i in range(9)) / 18
    assert float(out["scr_pooled"].detach()) == pytest.approx(pooled, rel=1e-5)
    assert float(out["scr_patch"].detach()) == pytest.approx(patch, rel=1e-5)
    sum(out.values()).backward()
    assert t.grad is None and z.grad is not None
    assert set(scr_losses(z, t, "pooled")) == {"scr_pooled"} and set(scr_losses(z, t, "patch")) == {"scr_patch"}
    aligned = scr_losses(z.detach(), 3 * latent_tokens(z.detach()), "both")  # same directions: zero
    assert all(abs(float(v)) < 1e-6 for v in aligned.values())


# ------------------------------------------------------------------------------------------------- noise augmentation
@pytest.mark.parametrize("dist", ["uniform", "half_normal"])
def test_noise_aug_sigma_laws(dist):
    tau = 0.8
    s = sample_sigma(200_000, tau, dist, torch.Generator().manual_seed(0)).double()
    assert s.min() >= 0
    if dist == "uniform":  # U(0, tau): mean tau/2, var tau^2/12, max < tau
        assert s.max() <= tau
        assert float(s.mean()) == pytest.approx(tau / 2, rel=0.01)
        assert float(s.var()) == pytest.approx(tau**2 / 12, rel=0.02)
    else:  # |N(0, tau^2)|: mean tau sqrt(2/pi), E[s^2] = tau^2
        assert float(s.mean()) == pytest.approx(tau * math.sqrt(2 / math.pi), rel=0.01)
        assert float(s.pow(2).mean()) == pytest.approx(tau**2, rel=0.01)
    z = torch.zeros(4000, 2, 4, 4)
    y = noise_augment(z, tau, dist, torch.Generator().manual_seed(1))
    per_sample_std = y.flatten(1).std(1)  # one sigma per sample: within-sample std ~ sigma, spread across samples
    assert float(per_sample_std.std()) > 0.1
    assert float(y.flatten(1).pow(2).mean(1).mean()) == pytest.approx(
        tau**2 / 3 if dist == "uniform" else tau**2, rel=0.05
    )  # E[sigma^2]


def test_noise_aug_off_and_gradient():
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    assert noise_augment(z, 0.0) is z
    noise_augment(z, 0.5, "uniform").sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    with pytest.raises(ValueError, match="unknown distribution"):
        sample_sigma(2, 0.5, "gauss")


def test_kernel_backends_agree_inside_the_regularizers(parts):
    z = parts.rms1(2, 4, 4, 16).permute(0, 3, 1, 2).contiguous()
    t = torch.randn(2, 16, 24)
    with use_backend("torch"):
        ref = (ssr_loss(z, t), *mcr_perturb(z, (42.5, 85.0), seed=5))
    got = (ssr_loss(z, t, backend="triton"), *mcr_perturb(z, (42.5, 85.0), seed=5, backend="triton"))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
