"""Refined priors: structural target, P_t / Q_t, the stage-0 loss (it learns), and the tokenizer's prior targets."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pae_fast.config import RefineConfig
from pae_fast.losses.refine import RawProjection, build_prior_targets, refine_loss, refine_step_loss
from pae_fast.models.refine import (
    UPSAMPLERS,
    PriorProjector,
    RefinedPriors,
    gaussian_lowpass,
    register_upsampler,
    structural_target,
)

TINY = RefineConfig(reconstructor_depth=4, reconstructor_hidden=32, projector_heads=2,
                    reconstructor_heads=2)  # fmt: skip


def _naive_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Direct 2-D Gaussian convolution with reflect padding (non-separable), one channel at a time."""
    r = min(max(1, math.ceil(3 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k2 = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma**2))
    k2 = (k2 / k2.sum()).to(x.dtype)
    xp = F.pad(x, (r, r, r, r), mode="reflect")
    return torch.cat([F.conv2d(xp[:, c : c + 1], k2[None, None]) for c in range(x.shape[1])], dim=1)


def test_gaussian_lowpass_matches_direct_convolution():
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(gaussian_lowpass(x, 1.3), _naive_blur(x, 1.3))
    assert gaussian_lowpass(x, 0.0) is x
    c = torch.full((1, 2, 9, 9), 3.0)
    torch.testing.assert_close(gaussian_lowpass(c, 2.0), c)  # kernel sums to 1


def test_structural_target_matches_its_recipe_and_low_passes():
    B, g, D, img, n = 2, 4, 6, 16, 4
    h = torch.randn(B, g * g, D, dtype=torch.float64)
    got = structural_target(h, img, n, lowpass_strength=0.4)
    x = F.interpolate(h.transpose(1, 2).reshape(B, D, g, g).float(), size=(img, img), mode="bilinear")
    want = F.adaptive_avg_pool2d(_naive_blur(x, 0.4 * img / n), n).flatten(2).transpose(1, 2)
    assert got.shape == (B, n * n, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    checker = ((torch.arange(g)[:, None] + torch.arange(g)[None, :]) % 2 * 2 - 1).float()  # highest frequency
    hc = checker.reshape(1, g * g, 1).expand(1, g * g, D).contiguous()
    weak = structural_target(hc, img, n, lowpass_strength=0.0).var()
    strong = structural_target(hc, img, n, lowpass_strength=0.4).var()
    assert strong < 0.5 * weak
    chunked = structural_target(h, img, n, 0.4, channel_chunk=2)  # linear per channel: chunking changes nothing
    torch.testing.assert_close(chunked, got)


def test_upsampler_registry_and_anyup_error():
    h = torch.randn(1, 16, 4)
    with pytest.raises(RuntimeError, match=r"anyup.*needs the AnyUp upsampler module and its weights"):
        structural_target(h, 16, 4, upsampler="anyup")
    with pytest.raises(ValueError, match="unknown 'lanczos'"):
        structural_target(h, 16, 4, upsampler="lanczos")
    saved = dict(UPSAMPLERS)
    try:
        register_upsampler("nearest", lambda x, size: F.interpolate(x, size=size, mode="nearest"))
        out = structural_target(h, 16, 4, lowpass_strength=0.0, upsampler="nearest")
        torch.testing.assert_close(out, h)  # nearest up, then area down on the same grid: identity
    finally:
        UPSAMPLERS.clear()
        UPSAMPLERS.update(saved)


def _naive_projector(proj, h: torch.Tensor, heads: int, grid: int) -> torch.Tensor:
    """P_t written out (docs/method.md § PAE tokenizer, step 4): attention WITHOUT qkv bias, applied directly, then
    the tokens as a map, 3x3 conv, per-token RMS normalisation ``z / sqrt(mean z^2 + 1e-6)``."""
    B, N, D = h.shape
    q, k, v = (h @ proj.attn.qkv.weight.T).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5, dim=-1) @ v  # (B, heads, N, hd)
    x = a.transpose(1, 2).reshape(B, N, D) @ proj.attn.proj.weight.T + proj.attn.proj.bias
    z = F.conv2d(x.transpose(1, 2).reshape(B, D, grid, grid), proj.conv.weight, proj.conv.bias, padding=1)
    z = z.flatten(2).transpose(1, 2)
    return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_projector_rms_and_refine_loss_matches_naive_formula():
    pri = RefinedPriors.from_config(TINY, dim=16, grid=4, latent_dim=8)
    assert len(pri.reconstructor.blocks) == 4 and pri.reconstructor.embed.out_features == 32
    h = torch.randn(3, 16, 16)
    p, q = pri(h)
    assert p.shape == (3, 16, 8) and q.shape == (3, 16, 16)
    torch.testing.assert_close(p, _naive_projector(pri.projector, h, heads=2, grid=4), rtol=1e-5, atol=1e-5)
    s = torch.randn(3, 16, 16)
    out = refine_loss(pri, h, s, lambda_rep=0.7, lambda_gram=1.3, backend="torch")
    rep = (q - h).pow(2).mean()
    cg = lambda x: F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)  # noqa: E731
    gram = (cg(p) - cg(s)).pow(2).mean()
    assert float(out["rep"]) == pytest.approx(float(rep.detach()), rel=1e-5)
    assert float(out["gram"]) == pytest.approx(float(gram.detach()), rel=1e-5)
    assert float(out["total"].detach()) == pytest.approx(float((0.7 * rep + 1.3 * gram).detach()), rel=1e-5)
    assert set(refine_loss(pri, h, None, 1.0, 0.0)) == {"rep", "total"}  # a zero weight skips the term
    assert set(refine_step_loss(pri, h, dataclasses.replace(TINY, lambda_rep=0.0), 16)) == {"gram", "total"}
    with pytest.raises(ValueError, match="structural target"):
        refine_loss(pri, h, None, 1.0, 1.0)
    with pytest.raises(ValueError, match="both 0"):
        refine_loss(pri, h, s, 0.0, 0.0)


def test_refine_training_decreases_both_terms_and_never_touches_the_vfm():
    torch.manual_seed(0)
    pri = RefinedPriors.from_config(TINY, dim=16, grid=4, latent_dim=8)
    h = torch.randn(8, 16, 16, requires_grad=True)  # "frozen VFM tokens" that would accept a gradient
    cfg = dataclasses.replace(TINY, lambda_rep=1.0, lambda_gram=1.0)
    opt = torch.optim.Adam(pri.parameters(), lr=3e-3)
    first = None
    for _ in range(80):  # Q_t starts with the decompressor's attention: rep falls ~25 % by step 40, ~50 % by 80
        out = refine_step_loss(pri, h, cfg, image_size=16, backend="torch")
        first = first or {k: float(v) for k, v in out.items() if k != "total"}
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    assert h.grad is None  # input detached
    assert float(out["rep"]) < 0.7 * first["rep"] and float(out["gram"]) < 0.7 * first["gram"]


def test_raw_projection_pca_and_random():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16))[0]
    scales = torch.tensor([8.0, 6.0, 4.0] + [0.1] * 13)
    x = (torch.randn(2000, 16) * scales) @ basis.T + 3.0  # top 3 directions: basis[:, :3]
    pca = RawProjection(16, 3, "pca")
    with pytest.raises(RuntimeError, match="not fitted"):
        pca(x[None])
    pca.fit(x)
    torch.testing.assert_close(pca.weight.T @ pca.weight, torch.eye(3), atol=1e-5, rtol=0)
    cosines = torch.linalg.svdvals(pca.weight.T @ basis[:, :3])  # cosines of the principal angles
    assert float(cosines.min()) > 0.99  # the same 3-d subspace
    y = pca(x[None])
    assert y.shape == (1, 2000, 3) and float(y.mean(1).abs().max()) < 1e-3  # centred
    rnd = RawProjection(16, 4, "random", seed=3)
    torch.testing.assert_close(rnd.weight.T @ rnd.weight, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(RawProjection(16, 4, "random", seed=3).weight, rnd.weight)
    with pytest.raises(ValueError, match="raw_prior_projection"):
        RawProjection(16, 4, "ica")


def test_build_prior_targets_modes(parts):
    h = torch.randn(2, 16, 24, requires_grad=True)
    proj = PriorProjector(24, 8, num_heads=2)
    t = build_prior_targets(h, parts.tok_cfg(priors="refined"), projector=proj)
    torch.testing.assert_close(t.structure, proj(h).detach())
    assert t.semantic is t.structure and not t.structure.requires_grad
    raw = RawProjection(24, 8, "random")
    t = build_prior_targets(h, parts.tok_cfg(priors="raw"), raw_projection=raw)
    torch.testing.assert_close(t.structure, h.detach())  # raw structure: the VFM tokens themselves
    assert t.semantic.shape == (2, 16, 8) and not t.semantic.requires_grad
    t = build_prior_targets(h, parts.tok_cfg(priors="raw", scr=False))
    assert t.semantic is None and t.structure is not None
    t = build_prior_targets(h, parts.tok_cfg(ssr=False, scr=False))
    assert t.structure is None and t.semantic is None
    with pytest.raises(ValueError, match="refined projector"):
        build_prior_targets(h, parts.tok_cfg())
    with pytest.raises(ValueError, match="RawProjection"):
        build_prior_targets(h, parts.tok_cfg(priors="raw"))


def test_paper_size_refined_priors_on_meta():
    """PAE-DINOv2-L sizes (D = 1024, 16 x 16 tokens, Q_t 4 x 1024) build and run on the meta device."""
    with torch.device("meta"):
        pri = RefinedPriors.from_config(RefineConfig(), dim=1024, grid=16)
        p, q = pri(torch.randn(2, 256, 1024))
    assert p.shape == (2, 256, 32) and q.shape == (2, 256, 1024)
    n_dec = sum(t.numel() for t in pri.reconstructor.decompressor.parameters())
    n_q = sum(t.numel() for t in pri.reconstructor.parameters()) - n_dec
    assert 4 * 12 * 1024**2 < n_q < 4 * 13 * 1024**2  # four 1024-wide ViT blocks (+ in/out projections)
    assert n_dec == 32 * 1024 * 9 + 1024 + 4 * 1024**2 + 1024  # the tokenizer's decompressor: conv, attn (no qkv bias)
