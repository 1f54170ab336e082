"""A naive transcription of the WHOLE tokenizer objective against the staged implementation.

Written from the equations of docs/method.md (§ PAE tokenizer steps 3-4, § Tokenizer losses, § GAN, § SSR, § MCR,
§ SCR, § Noise augmentation), in plain PyTorch, on PAE-tiny. It is compared, value AND gradients, with what the
training engine actually calls: :func:`~pae_fast.stages.tokenizer_task.tokenizer_loss_fn` on
:class:`~pae_fast.stages.tokenizer_task.TokenizerTrainModule` (one generator step) and
:func:`~pae_fast.stages.tokenizer_task.disc_unit_loss_fn` (one discriminator step).

Every term is on (L1, LPIPS, GAN with its adaptive weight, SSR, cascaded MCR, both SCR terms, noise augmentation,
DiffAug), the DAM fusion projection and final LayerNorm are non-zero / non-trivial, so the roles are never
symmetric: swapping real and fake, the adaptive weight's two gradients, the clean and the noise-augmented latent
of MCR, the MCR anchors, the order of the SFT fusion and the LayerNorm, the VFM tokens and the DAM output as the
prior's input... each changes the numbers compared here.

Black boxes (tested elsewhere against their own references): the frozen VFM, the DAM's transformer layers, the
attention layers, the ViT decoder, the discriminator network, DiffAug (drawn from the same global RNG in the same
order on both sides), the LPIPS network (a frozen stand-in here) and the Philox noise stream of the sphere kernel.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pae_fast.config import TokenizerConfig
from pae_fast.engine.task import Shared
from pae_fast.kernels.sphere_perturb import sphere_perturb_noise
from pae_fast.losses.diffaug import diff_augment
from pae_fast.losses.mcr import mcr_step_seed
from pae_fast.losses.total import TokenizerLoss
from pae_fast.models.refine import PriorProjector
from pae_fast.registry import create_tokenizer
from pae_fast.stages.tokenizer_task import TokenizerTrainModule, disc_unit_loss_fn, tokenizer_loss_fn

B, STEP, RUN_SEED, RANK = 2, 5, 3, 0
W = {"l1": 1.0, "lpips": 0.7, "gan": 0.5, "ssr": 0.3, "mcr": 0.4, "scr": 0.9}
TAU = 0.6  # noise augmentation scale
ANGLES = (42.5, 85.0)
POLICY = "color,translation,cutout"


class FeatureDistance(torch.nn.Module):
    """A frozen LPIPS-like perceptual distance: squared difference of random conv features, spatial mean, ``(B,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:  # the LPIPS features / features_distance split
        return [torch.tanh(self.conv(x))]

    def features_distance(self, x: torch.Tensor, anchor: list[torch.Tensor]) -> tuple[list, torch.Tensor]:
        f = self.features(x)
        return f, (f[0] - anchor[0].detach()).pow(2).sum(1).mean((1, 2))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.conv(x)) - torch.tanh(self.conv(y))).pow(2).sum(1).mean((1, 2))


@pytest.fixture(scope="module")
def setup(parts):
    torch.manual_seed(0)
    tok = create_tokenizer("PAE-tiny")
    with torch.no_grad():  # non-zero SFT fusion and a non-trivial final LayerNorm
        tok.dam.fusion_proj.weight.normal_(0, 0.05)
        tok.dam.fusion_proj.bias.normal_(0, 0.3)
        tok.dam.final_ln.weight.uniform_(0.5, 1.5)
        tok.dam.final_ln.bias.normal_(0, 0.2)
    cfg = dataclasses.replace(
        TokenizerConfig(), name="PAE-tiny", lpips_weights="stand-in", priors="refined",
        **{f"lambda_{k}": v for k, v in W.items()}, ssr=True, mcr=True, scr=True, scr_terms="both",
        mcr_cascade="cascaded", mcr_angles=ANGLES, mcr_mode="noise", noise_aug_tau=TAU, noise_aug_dist="uniform",
        gan_start_step=0, disc_start_step=0, disc_aug=POLICY, adaptive_weight_max=1e4,
    )  # fmt: skip
    lp = FeatureDistance()
    disc = parts.tiny_disc()
    projector = PriorProjector(tok.vfm_dim, tok.latent_shape[0], tok.vfm.num_heads).requires_grad_(False)
    with torch.no_grad():
        projector.conv.bias.normal_(0, 0.5)
    loss = TokenizerLoss(cfg, lpips=lp, discriminator=disc, kernel_backend="torch")
    shared = Shared(loss=loss, projector=projector, raw_projection=None, seed=RUN_SEED, recons=[],
                    has_disc=True, status={}, announced=True)
    model = TokenizerTrainModule(tok, shared).train()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(B, 3, tok.image_size, tok.image_size, generator=g)
    return tok, cfg, lp, disc, projector, shared, model, images


# ------------------------------------------------------------------------------------------------ the transcription
def ref_latent(tok, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """§ PAE tokenizer 1-4: returns (z (B, C, g, g), VFM tokens u (B, N, D))."""
    pixels = tok.vfm.preprocess(images)
    with torch.no_grad():
        u = tok.vfm.tokens(pixels)  # frozen VFM
    dam = tok.dam
    x = dam.patch_embed(pixels) + dam.pos_embed
    for layer in dam.layers:
        x = layer(x, u)
    gb = x @ dam.fusion_proj.weight.T + dam.fusion_proj.bias
    gamma, beta = gb[..., : u.shape[-1]], gb[..., u.shape[-1]:]
    s = u * (1 + gamma) + beta  # SFT, THEN the affine LayerNorm (eps 1e-5)
    mu = s.mean(-1, keepdim=True)
    var = (s - mu).pow(2).mean(-1, keepdim=True)
    h = (s - mu) / torch.sqrt(var + 1e-5) * dam.final_ln.weight + dam.final_ln.bias
    Bn, N, D = h.shape
    gside = math.isqrt(N)
    a = tok.projector.attn(h).transpose(1, 2).reshape(Bn, D, gside, gside)  # token n = row * g + col
    c = F.conv2d(a, tok.projector.conv.weight, tok.projector.conv.bias, padding=1)
    z = c / torch.sqrt(c.pow(2).mean(1, keepdim=True) + 1e-6)  # per-token RMS 1 over channels
    return z, u


def ref_sphere(z: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """§ MCR, mode noise: z' = ||z|| v / ||v||, v = z + tan(theta) rms(z) e, one e per token for both angles."""
    t = z.permute(0, 2, 3, 1)  # tokens (B, g, g, C), row-major over the grid
    e = sphere_perturb_noise(t.shape, seed)
    norm = t.norm(dim=-1, keepdim=True)
    out = []
    for deg in ANGLES:
        v = t + math.tan(math.radians(deg)) * norm / math.sqrt(t.shape[-1]) * e
        out.append((norm * v / v.norm(dim=-1, keepdim=True)).permute(0, 3, 1, 2))
    return out


def cos_gram(x: torch.Tensor) -> torch.Tensor:
    xn = x / x.norm(dim=-1, keepdim=True)
    return xn @ xn.transpose(1, 2)


def ref_generator_total(tok, lp, disc, projector, images: torch.Tensor) -> torch.Tensor:
    """L_G = l1 L1 + l_lpips LPIPS + l_gan lambda_adapt GAN_G + l_ssr SSR + l_mcr MCR + l_scr SCR."""
    z, u = ref_latent(tok, images)
    # noise augmentation (reconstruction pass only): sigma ~ U(0, tau) per sample, n ~ N(0, I)
    sigma = torch.rand(B) * TAU
    n = torch.randn(z.shape)
    x_r = tok.decode(z + sigma.view(B, 1, 1, 1) * n)
    rec = W["l1"] * (x_r - images).abs().mean() + W["lpips"] * lp(x_r, images).mean()
    # GAN generator term through a fixed discriminator (eval mode, heads not trained by L_G)
    disc.eval()
    disc.heads.requires_grad_(False)
    logits = disc(diff_augment(x_r, POLICY))
    disc.heads.requires_grad_(True)
    disc.train()
    gan = F.softplus(-logits).mean()
    wl = tok.last_decoder_layer.weight
    g_rec = torch.autograd.grad(rec, wl, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, wl, retain_graph=True)[0]
    lam = (g_rec.norm() / (g_gan.norm() + 1e-6)).clamp(0, 1e4).detach()
    # priors: P_t of the frozen VFM tokens, stop-gradient
    with torch.no_grad():
        T = projector(u)
    zt = z.flatten(2).transpose(1, 2)  # (B, N, C)
    ssr = (cos_gram(zt) - cos_gram(T)).pow(2).mean()
    # MCR (cascaded) from the CLEAN latent, anchors detached
    x_m, x_l = (tok.decode(p) for p in ref_sphere(z, mcr_step_seed(RUN_SEED, STEP, RANK)))

    def d(a, b):
        b = b.detach()
        return (a - b).abs().mean() + lp(a, b).mean()

    mcr = d(x_m, x_r) + d(x_l, x_m)
    scr = (1 - F.cosine_similarity(zt.mean(1), T.mean(1), dim=-1)).mean() + (
        1 - F.cosine_similarity(zt, T, dim=-1)).mean()
    return rec + W["gan"] * lam * gan + W["ssr"] * ssr + W["mcr"] * mcr + W["scr"] * scr


def ref_disc_loss(disc, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Hinge: 1/2 (mean relu(1 - D(aug x)) + mean relu(1 + D(aug sg(x_hat)))), real then fake."""
    real = disc(diff_augment(images, POLICY))
    fake = disc(diff_augment(recon.detach(), POLICY))
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


# ------------------------------------------------------------------------------------------------ the comparison
def _grads(params) -> list[torch.Tensor]:
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out


def _assert_grads_close(ref: list[torch.Tensor], got: list[torch.Tensor], names: list[str]) -> None:
    scale = max(float(r.abs().max()) for r in ref)
    assert scale > 0
    for n, r, g in zip(names, ref, got):
        torch.testing.assert_close(g, r, rtol=2e-4, atol=2e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_generator_and_discriminator_steps_match_the_naive_objective(setup):
    tok, cfg, lp, disc, projector, shared, model, images = setup
    names, params = zip(*[(n, p) for n, p in tok.named_parameters() if p.requires_grad])
    d_names, d_params = zip(*[(n, p) for n, p in disc.named_parameters() if p.requires_grad])
    disc_state = copy.deepcopy(disc.state_dict())  # spectral norm's power iteration writes buffers in train mode
    for p in params + d_params:
        p.grad = None

    # ---- generator step: what the engine calls
    torch.manual_seed(11)
    total, terms, = tokenizer_loss_fn(shared, RANK)(model, (images,), STEP)
    total.backward()
    got = _grads(params)
    on = {"l1", "lpips", "gan", "gan_weight", "ssr", "mcr_medium", "mcr_large", "scr_pooled", "scr_patch"}
    assert on <= set(terms)
    assert all(p.grad is None for p in d_params)  # the G loss writes no discriminator gradient
    # ---- the naive transcription, same global RNG stream
    torch.manual_seed(11)
    ref = ref_generator_total(tok, lp, disc, projector, images)
    ref.backward()
    want = _grads(params)
    assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    _assert_grads_close(want, got, list(names))
    # the DAM fusion and every trainable part receive gradient (nothing silently detached)
    assert all(float(g.abs().max()) > 0 for n, g in zip(names, want) if n.startswith(("dam.fusion", "projector",
                                                                                         "decoder.pred")))

    # ---- discriminator step on the reconstruction the generator pass left behind
    (recon,) = shared.recons
    disc.load_state_dict(disc_state)
    torch.manual_seed(12)
    d_loss, d_terms = disc_unit_loss_fn(shared)(disc, (images,), STEP)
    d_loss.backward()
    d_got = _grads(d_params)
    assert not shared.recons
    disc.load_state_dict(disc_state)
    torch.manual_seed(12)
    d_ref = ref_disc_loss(disc, images, recon)
    d_ref.backward()
    d_want = _grads(d_params)
    assert float(d_loss.detach()) == pytest.approx(float(d_ref.detach()), rel=1e-5)
    _assert_grads_close(d_want, d_got, list(d_names))
    assert set(d_terms) == {"logits_real", "logits_fake"}
    disc.load_state_dict(disc_state)


def test_the_roles_are_not_symmetric_here(setup):
    """The comparison above can fail: on these inputs each plausible role swap moves the value."""
    tok, cfg, lp, disc, projector, shared, model, images = setup
    torch.manual_seed(12)
    real = disc(diff_augment(images, POLICY)).detach()
    recon = tok(images).detach()
    fake = disc(diff_augment(recon, POLICY)).detach()
    hinge = lambda r, f: 0.5 * (F.relu(1 - r).mean() + F.relu(1 + f).mean())  # noqa: E731
    assert abs(float(hinge(real, fake) - hinge(fake, real))) > 1e-3
    with torch.no_grad():  # SFT before the LayerNorm differs from after it with these fusion weights
        pixels = tok.vfm.preprocess(images)
        u = tok.vfm.tokens(pixels)
        gamma, beta = tok.dam.fusion_proj(torch.randn(B, u.shape[1], u.shape[2])).chunk(2, -1)
        inside = tok.dam.final_ln(u * (1 + gamma) + beta)
        outside = tok.dam.final_ln(u) * (1 + gamma) + beta
    assert float((inside - outside).abs().max()) > 1e-2
