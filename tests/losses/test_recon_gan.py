"""L1 / LPIPS configuration, GAN losses, adaptive weight, DiffAug and the DINO discriminator."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from pae_fast.config import TokenizerConfig
from pae_fast.io import save_safetensors
from pae_fast.losses.diffaug import diff_augment, parse_policy
from pae_fast.losses.gan import adaptive_weight, disc_active, gan_active, hinge_d_loss, vanilla_g_loss
from pae_fast.losses.recon import LPIPSWeightsMissing, build_lpips, l1_loss, lpips_loss, lpips_status
from pae_fast.models.discriminator import create_discriminator
from pae_fast.weights import WeightsError


# ---------------------------------------------------------------------------------------------------------- recon
def test_l1_matches_naive():
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    naive = sum(abs(a - b) for a, b in zip(x.flatten().tolist(), y.flatten().tolist())) / x.numel()
    assert float(l1_loss(x, y)) == pytest.approx(naive, rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        l1_loss(x, y[:1])


def test_lpips_off_mode_and_missing_weight_errors(tmp_path):
    cfg = TokenizerConfig(lpips_weights="none")
    assert build_lpips(cfg) is None and lpips_status(cfg, None) == "off (tokenizer.lpips_weights: none)"
    cfg0 = TokenizerConfig(lambda_lpips=0.0)
    assert build_lpips(cfg0) is None and "lambda_lpips = 0" in lpips_status(cfg0, None)
    with pytest.raises(LPIPSWeightsMissing, match=r"tokenizer.lpips_weights is not set.*lpips_weights: none"):
        build_lpips(TokenizerConfig())
    gone = tmp_path / "vgg.pth"
    with pytest.raises(LPIPSWeightsMissing, match=r"not found: tokenizer.lpips_weights='.*vgg.pth'"):
        build_lpips(TokenizerConfig(lpips_weights=str(gone)))
    heads_only = tmp_path / "heads.safetensors"  # heads without the backbone: names what is missing
    save_safetensors({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
                      for k, c in enumerate((64, 128, 256, 512, 512))}, heads_only)  # fmt: skip
    with pytest.raises(LPIPSWeightsMissing, match=r"do not cover.*lpips_backbone_weights"):
        build_lpips(TokenizerConfig(lpips_weights=str(heads_only)))


def test_lpips_from_a_whole_state_dict_file_is_the_eval_module(tmp_path):
    from pae_fast.losses.lpips import LPIPS

    ref = LPIPS("vgg")
    f = tmp_path / "lpips.safetensors"
    save_safetensors(ref.state_dict(), f)
    lp = build_lpips(TokenizerConfig(lpips_weights=str(f)))
    assert isinstance(lp, LPIPS) and not any(p.requires_grad for p in lp.parameters())
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    d = lpips_loss(lp, x, y)
    assert float(d.detach()) == pytest.approx(float(ref(x, y).mean().detach()), rel=1e-5)
    d.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert "on (VGG-16 LPIPS" in lpips_status(TokenizerConfig(lpips_weights=str(f)), lp)


# ------------------------------------------------------------------------------------------------------------ GAN
def test_hinge_and_vanilla_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    naive_d = 0.5 * (sum(max(0, 1 - r) for r in real.tolist()) / 3 + sum(max(0, 1 + f) for f in fake.tolist()) / 3)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(naive_d)
    import math

    naive_g = sum(-math.log(1 / (1 + math.exp(-f))) for f in fake.tolist()) / 3
    assert float(vanilla_g_loss(fake)) == pytest.approx(naive_g, rel=1e-6)
    assert float(hinge_d_loss(torch.full((4,), 5.0), torch.full((4,), -5.0))) == 0.0  # confident: no loss


def test_adaptive_weight_value_and_clamp():
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = lin(x)
    rec = out.pow(2).mean()
    gan = 0.01 * out.sum()
    w = adaptive_weight(rec, gan, lin.weight, max_weight=1e4)
    g_rec = torch.autograd.grad(out.pow(2).mean(), lin.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(0.01 * out.sum(), lin.weight, retain_graph=True)[0]
    assert float(w) == pytest.approx(float(g_rec.norm() / (g_gan.norm() + 1e-6)), rel=1e-5)
    assert not w.requires_grad
    assert float(adaptive_weight(rec, 1e-12 * out.sum(), lin.weight, max_weight=7.0)) == 7.0  # clamped
    (rec + gan).backward()  # graphs were retained for the caller
    assert lin.weight.grad is not None


def test_start_steps():
    assert not gan_active(4, 0.5, 5) and gan_active(5, 0.5, 5) and not gan_active(9, 0.0, 5)
    assert not disc_active(2, 0.5, 3) and disc_active(3, 0.5, 3) and not disc_active(9, 0.0, 0)


# -------------------------------------------------------------------------------------------------------- DiffAug
def test_diffaug_shape_range_and_gradient():
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    for policy in ("color", "translation", "cutout", "color,translation,cutout", ""):
        y = diff_augment(x, policy, generator=g)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    y = diff_augment(x, "translation,cutout", generator=g)
    assert y.min() >= 0 and y.max() <= 1  # zero fill and masking stay in the input range
    c = diff_augment(x, "color", generator=g)
    assert c.min() >= -1.5 and c.max() <= 2.5  # brightness +-0.25 then saturation x2 and contrast x1.5 at most
    flat = torch.full((64, 3, 4, 4), 0.5)  # grey: only the brightness shift moves it
    shift = diff_augment(flat, "color", generator=g) - 0.5
    assert float(shift.abs().max()) <= 0.25 + 1e-6 and float(shift.abs().max()) > 0.2
    assert diff_augment(x, "", generator=g) is x
    (c.sum() + y.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaug_translation_and_cutout_are_what_they_claim():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(64, 1, 1, 1) + 1  # strictly positive, all distinct
    t = diff_augment(x, "translation", translation_ratio=0.25, generator=torch.Generator().manual_seed(0))
    for b in range(64):  # each output is an integer shift of the input with zero fill
        nz = t[b, 0] > 0
        rows, cols = nz.nonzero(as_tuple=True)
        dy = int(rows.min()) if rows.min() > 0 else -(8 - 1 - int(rows.max()))
        dx = int(cols.min()) if cols.min() > 0 else -(8 - 1 - int(cols.max()))
        assert abs(dy) <= 2 and abs(dx) <= 2
        assert torch.equal(t[b, 0], torch.roll(x[b, 0], (dy, dx), (0, 1)) * nz)
    c = diff_augment(x, "cutout", cutout_ratio=0.5, generator=torch.Generator().manual_seed(0))
    zeros = (c == 0).flatten(1).sum(1)
    assert zeros.max() == 16 and zeros.min() >= 4  # a 4x4 square, clipped at the border
    assert torch.equal(c[c != 0], x[c != 0])
    with pytest.raises(ValueError, match="unknown.*'blur'"):
        parse_policy("color,blur")


# -------------------------------------------------------------------------------------------------- discriminator
def test_discriminator_frozen_backbone_gets_no_grad_heads_do(parts):
    d = parts.tiny_disc()
    assert d.random_features and d.weights_file is None
    x = torch.rand(3, 3, 24, 24, requires_grad=True)  # resized to 32 inside
    logits = d(x)
    assert logits.shape == (3, 2 * 16)  # 2 heads x (32/8)^2 tokens
    logits.mean().backward()
    assert all(p.grad is None for p in d.backbone.parameters())
    assert all(p.grad is not None for p in d.trainable_parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable through the frozen backbone
    assert not d.train().backbone.training  # the backbone stays in eval mode
    assert any(isinstance(m, nn.BatchNorm1d) for m in d.heads.modules())
    k9 = [m for m in d.heads.modules() if isinstance(m, nn.Conv1d) and m.kernel_size == (9,)]
    assert len(k9) == 2 and all(hasattr(m, "parametrizations") for m in k9)  # spectral norm


def test_discriminator_weights_from_file_and_refusals(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer.disc_weights"):
        parts.tiny_disc(allow_random=False)
    src = parts.tiny_disc()
    f = tmp_path / "dino.safetensors"
    save_safetensors(src.backbone.state_dict(), f)
    d = parts.tiny_disc(weights=str(f), allow_random=False)
    assert not d.random_features and d.weights_file == str(f)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(d.backbone.state_dict()[k], v)
    bad = tmp_path / "bad.safetensors"
    save_safetensors({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(WeightsError, match="disc_weights"):
        parts.tiny_disc(weights=str(bad), allow_random=False)
    cfg = dataclasses.replace(TokenizerConfig(), disc_weights="random", disc_blocks=(1, 3), disc_input_size=32)
    d = create_discriminator(cfg, backbone_kwargs=parts.TINY_DISC["backbone_kwargs"])
    assert d.random_features and d.blocks == (1, 3)
    with pytest.raises(FileNotFoundError, match="needs local weights"):
        create_discriminator(dataclasses.replace(cfg, disc_weights=None),
                             backbone_kwargs=parts.TINY_DISC["backbone_kwargs"])  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        parts.tiny_disc(blocks=(1, 7))


@pytest.mark.slow
def test_default_discriminator_is_dino_s8_blocks_2_5_8_11():
    d = create_discriminator(dataclasses.replace(TokenizerConfig(), disc_weights="random"))
    assert d.blocks == (2, 5, 8, 11) and d.backbone.embed_dim == 384 and len(d.backbone.blocks) == 12
    with torch.no_grad():
        assert d(torch.rand(1, 3, 256, 256)).shape == (1, 4 * 28 * 28)
