"""Table 3a's regularisers in place of the priors: KL and the diffusion loss (docs/method.md § KL and
diffusion-loss regularisers), against naive formulas, and how the tokenizer loss uses them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pae_fast.engine.task import Shared
from pae_fast.losses.kl import kl_loss, reparameterize
from pae_fast.losses.latent_diffusion import LatentDenoiser, denoiser_unit_loss_fn, flow_matching_loss
from pae_fast.losses.total import TokenizerLoss

B, C, G = 2, 8, 2


def test_kl_against_the_closed_form_per_element():
    torch.manual_seed(0)
    mu, logvar = torch.randn(B, C, G, G), torch.randn(B, C, G, G)
    total = 0.0
    for b in range(B):
        for m, lv in zip(mu[b].flatten().tolist(), logvar[b].flatten().tolist()):
            total += 0.5 * (m * m + math.exp(lv) - 1.0 - lv)
    assert kl_loss(mu, logvar).item() == pytest.approx(total / B, rel=1e-5)
    assert kl_loss(logvar, mu).item() != pytest.approx(total / B, rel=1e-3)  # the roles matter
    assert kl_loss(torch.zeros(B, C, G, G), torch.zeros(B, C, G, G)).item() == 0.0  # N(0, I) itself


def test_reparameterize_draws_the_named_noise_and_is_differentiable():
    mu = torch.randn(B, C, G, G, requires_grad=True)
    logvar = torch.randn(B, C, G, G, requires_grad=True)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(3))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


class Affine(nn.Module):
    """A denoiser with a closed form: ``a * x + b * t``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(-0.3))

    def forward(self, x, t):
        return self.a * x + self.b * t.view(-1, 1, 1, 1)


def test_flow_matching_loss_against_a_naive_loop():
    torch.manual_seed(0)
    z = torch.randn(B, C, G, G)
    den = Affine()
    got = flow_matching_loss(den, z, torch.Generator().manual_seed(5)).item()
    g = torch.Generator().manual_seed(5)
    t = torch.rand(B, generator=g)
    eps = torch.randn(z.shape, generator=g)
    total, n = 0.0, 0
    for b in range(B):
        tb = t[b].item()
        for zi, ei in zip(z[b].flatten().tolist(), eps[b].flatten().tolist()):
            xt = tb * zi + (1 - tb) * ei  # t = 1 is data
            total += (0.7 * xt - 0.3 * tb - (zi - ei)) ** 2
            n += 1
    assert got == pytest.approx(total / n, rel=1e-5)


def test_latent_denoiser_shapes():
    den = LatentDenoiser(C, hidden=16)
    assert den(torch.randn(B, C, G, G), torch.rand(B)).shape == (B, C, G, G)


def _loss(parts, **kw):
    cfg = parts.tok_cfg(ssr=False, mcr=False, scr=False, **kw)
    den = LatentDenoiser(C, hidden=16) if cfg.lambda_diffusion > 0 else None
    return TokenizerLoss(cfg, latent_denoiser=den, kernel_backend="torch")


def test_kl_term_decodes_a_sample_and_adds_its_weighted_kl(parts):
    torch.manual_seed(0)
    dec = parts.TinyDecoder(channels=C)
    images = torch.rand(B, 3, 4 * G, 4 * G)
    z = parts.rms1(B, G, G, C).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    logvar = torch.full_like(z, -1.0, requires_grad=True)
    loss = _loss(parts, lambda_kl=0.01)
    out = loss.generator_loss(images, z, dec, 0, logvar=logvar, generator=torch.Generator().manual_seed(2))
    assert set(out.terms) == {"l1", "kl"}
    sample = reparameterize(z, logvar, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.recon, dec(sample))  # the decoder saw the sample, not mu
    assert out.total.item() == pytest.approx(out.terms["l1"].item() + 0.01 * kl_loss(z, logvar).item(), rel=1e-6)
    out.total.backward()
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lambda_kl"):
        loss.generator_loss(images, z, dec, 0)
    off = _loss(parts).generator_loss(images, z, dec, 0)
    assert "kl" not in off.terms and "diffusion" not in off.terms


def test_diffusion_term_pulls_the_latent_not_the_denoiser_and_the_unit_trains_it(parts):
    torch.manual_seed(0)
    dec = parts.TinyDecoder(channels=C)
    images = torch.rand(B, 3, 4 * G, 4 * G)
    z = parts.rms1(B, G, G, C).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    loss = _loss(parts, lambda_diffusion=0.5)
    den = loss.latent_denoiser
    out = loss.generator_loss(images, z, dec, 0, generator=torch.Generator().manual_seed(4))
    expect = flow_matching_loss(den, z, torch.Generator().manual_seed(4)).item()
    assert out.terms["diffusion"].item() == pytest.approx(expect, rel=1e-6)
    assert out.total.item() == pytest.approx(out.terms["l1"].item() + 0.5 * expect, rel=1e-6)
    out.total.backward()
    assert z.grad.abs().sum() > 0
    assert all(p.grad is None for p in den.parameters()) and all(p.requires_grad for p in den.parameters())
    shared = Shared(latents=[z.detach()])
    unit_loss, _ = denoiser_unit_loss_fn(shared)(den, (images,), 0)
    unit_loss.backward()
    assert shared.latents == [] and all(p.grad is not None for p in den.parameters())


def test_from_config_builds_the_denoiser_only_when_weighted(parts):
    assert TokenizerLoss.from_config(parts.tok_cfg()).latent_denoiser is None
    built = TokenizerLoss.from_config(parts.tok_cfg(lambda_diffusion=0.1, diffusion_hidden=12), latent_channels=C)
    assert built.latent_denoiser.net[0].out_channels == 12 and built.latent_denoiser.net[-1].out_channels == C
    with pytest.raises(ValueError, match="latent_channels"):
        TokenizerLoss.from_config(parts.tok_cfg(lambda_diffusion=0.1))
    assert built.status()["diffusion"].startswith("on") and "kl" not in built.status()
    assert not {"kl", "diffusion"} & set(TokenizerLoss.from_config(parts.tok_cfg()).status())
