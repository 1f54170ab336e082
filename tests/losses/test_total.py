"""TokenizerLoss: the weighted sum, every switch removing its term AND its work, gradients, discriminator step."""

import dataclasses

import pytest
import torch

import pae_fast.kernels as kernels
from pae_fast.kernels.tools.traffic import TrafficCounter
from pae_fast.losses.refine import build_prior_targets
from pae_fast.losses.total import PriorTargets, TokenizerLoss
from pae_fast.models.refine import PriorProjector

B, C, G = 2, 8, 2  # batch, latent channels, latent grid (images 8x8 with the tiny decoder's patch 4)
ALL = {"l1", "lpips", "gan", "gan_weight", "ssr", "mcr", "mcr_medium", "mcr_large", "scr", "scr_pooled", "scr_patch"}


def _setup(parts, **cfg_kw):
    cfg = parts.tok_cfg(**{"lambda_gan": 0.5, "disc_aug": "color,translation,cutout", **cfg_kw})
    lp = parts.CountingLPIPS() if cfg.lpips_weights != "none" else None
    disc = parts.tiny_disc() if cfg.lambda_gan > 0 else None
    loss = TokenizerLoss(cfg, lpips=lp, discriminator=disc, kernel_backend="torch")
    dec = parts.TinyDecoder(channels=C)
    z = parts.rms1(B, G, G, C).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    images = torch.rand(B, 3, 4 * G, 4 * G)
    targets = PriorTargets(structure=torch.randn(B, G * G, 12), semantic=torch.randn(B, G * G, C))
    return cfg, loss, lp, disc, dec, z, images, targets


def _run(loss, dec, z, images, targets, step=10):
    return loss.generator_loss(images, z, dec, step, seed=7, last_layer=dec.last.weight, targets=targets)


def test_all_terms_and_the_weighted_total(parts):
    cfg, loss, lp, disc, dec, z, images, targets = _setup(parts, lpips_weights="counting")
    out = _run(loss, dec, z, images, targets)
    assert set(out.terms) == ALL
    assert dec.calls == [3 * B]  # recon + medium + large in ONE decoder pass
    # LPIPS features once per image batch (docs/method.md § LPIPS fast path): the real images without grad, then the
    # reconstruction and both MCR reconstructions with grad: 4 batches, not the 6 of three separate pairs
    assert lp.passes == [(B, False), (B, True), (B, True), (B, True)]
    t = out.terms
    assert float(t["mcr"]) == pytest.approx(float(t["mcr_medium"] + t["mcr_large"]), rel=1e-6)
    assert float(t["scr"]) == pytest.approx(float(t["scr_pooled"] + t["scr_patch"]), rel=1e-6)
    expect = (cfg.lambda_l1 * t["l1"] + cfg.lambda_lpips * t["lpips"] + cfg.lambda_gan * t["gan_weight"] * t["gan"]
              + cfg.lambda_ssr * t["ssr"] + cfg.lambda_mcr * t["mcr"] + cfg.lambda_scr * t["scr"])  # fmt: skip
    assert float(out.total.detach()) == pytest.approx(float(expect), rel=1e-5)
    assert 0 < float(t["gan_weight"]) <= cfg.adaptive_weight_max
    assert all(not v.requires_grad for v in t.values()) and out.recon.shape == images.shape


@pytest.mark.parametrize(
    "kw, gone, decode_batch, lpips_images",  # lpips_images: images through the LPIPS trunk (real + every decoded)
    [
        ({"ssr": False}, {"ssr"}, 3 * B, 4 * B),
        ({"lambda_ssr": 0.0}, {"ssr"}, 3 * B, 4 * B),
        ({"mcr": False}, {"mcr", "mcr_medium", "mcr_large"}, B, 2 * B),
        ({"mcr_cascade": "medium"}, {"mcr_large"}, 2 * B, 3 * B),
        ({"mcr_cascade": "large"}, {"mcr_medium"}, 2 * B, 3 * B),
        ({"scr": False}, {"scr", "scr_pooled", "scr_patch"}, 3 * B, 4 * B),
        ({"scr_terms": "pooled"}, {"scr_patch"}, 3 * B, 4 * B),
        ({"scr_terms": "patch"}, {"scr_pooled"}, 3 * B, 4 * B),
        ({"lambda_gan": 0.0}, {"gan", "gan_weight"}, 3 * B, 4 * B),
        ({"gan_start_step": 11}, {"gan", "gan_weight"}, 3 * B, 4 * B),
        ({"lpips_weights": "none"}, {"lpips"}, 3 * B, 0),
    ],
)
def test_each_switch_removes_its_term_and_its_work(parts, monkeypatch, kw, gone, decode_batch, lpips_images):
    kw = {"lpips_weights": "counting", **kw}
    cfg, loss, lp, disc, dec, z, images, targets = _setup(parts, **kw)
    calls = {"gram": 0, "sphere": 0, "disc": 0}
    for name, key in (("gram_loss", "gram"), ("sphere_perturb", "sphere")):
        orig = getattr(kernels, name)

        def counted(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(kernels, name, counted)
    if disc is not None:
        disc.register_forward_hook(lambda *a: calls.__setitem__("disc", calls["disc"] + 1))
    out = _run(loss, dec, z, images, targets)
    assert set(out.terms) == ALL - gone
    assert dec.calls == [decode_batch]
    assert (lp.images if lp is not None else 0) == lpips_images
    assert calls["gram"] == (0 if "ssr" in gone else 1)
    assert calls["sphere"] == (0 if "mcr" in gone else 1)
    assert calls["disc"] == (0 if "gan" in gone else 1)
    assert loss.status()["mcr" if "mcr" in gone else "l1"].startswith("off" if "mcr" in gone else "on")


@pytest.mark.parametrize("switch, op", [("ssr", "pae_fast::gram_loss"), ("mcr", "pae_fast::sphere_perturb")])
def test_switch_off_removes_the_fused_op_and_its_traffic(parts, switch, op):
    """On the meta device with the fused kernels: an off regularizer's op is absent and the step moves fewer bytes."""

    def traffic(on: bool):
        cfg = parts.tok_cfg(**{switch: on})
        loss = TokenizerLoss(cfg, kernel_backend="triton")
        dec = parts.TinyDecoder(channels=32).to("meta")
        z = torch.randn(4, 32, 4, 4, device="meta", requires_grad=True)
        targets = PriorTargets(torch.randn(4, 16, 64, device="meta"), torch.randn(4, 16, 32, device="meta"))
        with TrafficCounter() as tc:
            out = loss.generator_loss(torch.rand(4, 3, 16, 16, device="meta"), z, dec, 0, seed=1, targets=targets)
            out.total.backward()
        s = tc.summary()
        return {r["op"] for r in s["rows"]}, sum(r["read_bytes"] + r["written_bytes"] for r in s["rows"])

    ops_on, bytes_on = traffic(True)
    ops_off, bytes_off = traffic(False)
    assert any(o.startswith(op) for o in ops_on) and not any(o.startswith(op) for o in ops_off)
    assert bytes_off < bytes_on


def test_no_gradient_reaches_vfm_tokens_targets_or_discriminator(parts):
    cfg, loss, lp, disc, dec, z, images, _ = _setup(parts)
    vfm = torch.randn(B, G * G, 16, requires_grad=True)
    proj = PriorProjector(16, C, num_heads=2)
    targets = build_prior_targets(vfm, cfg, projector=proj)
    assert not targets.structure.requires_grad and not targets.semantic.requires_grad
    u_before = [b.clone() for n, b in disc.named_buffers() if n.endswith("_u")]
    out = _run(loss, dec, z, images, targets)
    out.total.backward()
    assert vfm.grad is None and all(p.grad is None for p in proj.parameters())
    assert z.grad is not None and z.grad.abs().sum() > 0 and dec.last.weight.grad is not None
    assert all(p.grad is None for p in disc.parameters())  # the G loss writes no discriminator gradient
    u_after = [b for n, b in disc.named_buffers() if n.endswith("_u")]
    assert u_before and all(torch.equal(a, b) for a, b in zip(u_before, u_after))  # no power iteration in G pass
    assert disc.training and all(p.requires_grad for p in disc.heads.parameters())  # restored


def test_discriminator_loss_and_start_step(parts):
    cfg, loss, lp, disc, dec, z, images, targets = _setup(parts, disc_start_step=5)
    out = _run(loss, dec, z, images, targets, step=4)
    assert loss.discriminator_loss(images, out.recon, step=4) is None
    d = loss.discriminator_loss(images, out.recon, step=5)
    assert set(d) == {"disc", "logits_real", "logits_fake"} and d["disc"].requires_grad
    d["disc"].backward()
    assert all(p.grad is not None for p in disc.trainable_parameters())
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert z.grad is None and dec.last.weight.grad is None  # recon was detached
    no_gan = TokenizerLoss(parts.tok_cfg(), kernel_backend="torch")
    assert no_gan.discriminator_loss(images, out.recon, step=100) is None


def test_noise_augmentation_changes_the_decoded_latent(parts):
    _, loss, _, _, dec, z, images, targets = _setup(parts, noise_aug_tau=0.8, lambda_gan=0.0, mcr=False)
    out = _run(loss, dec, z, images, targets)
    assert not torch.allclose(out.recon, dec(z))
    _, loss0, _, _, dec0, z0, _, _ = _setup(parts, lambda_gan=0.0, mcr=False)
    dec0.load_state_dict(dec.state_dict())
    torch.testing.assert_close(_run(loss0, dec0, z, images, targets).recon, dec0(z))


def test_clear_errors(parts):
    cfg = parts.tok_cfg(lambda_gan=0.5)
    with pytest.raises(ValueError, match="needs a discriminator"):
        TokenizerLoss(cfg)
    _, loss, _, _, dec, z, images, _ = _setup(parts)
    with pytest.raises(ValueError, match="no PriorTargets"):
        loss.generator_loss(images, z, dec, 0)
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(images, z, dec, 0, targets=PriorTargets(torch.randn(B, 4, 3), torch.randn(B, 4, C)))
    off = parts.tok_cfg(lambda_l1=0.0, ssr=False, mcr=False, scr=False)
    with pytest.raises(ValueError, match="every term is off"):
        TokenizerLoss(off).generator_loss(images, z, dec, 0)
    cfg = dataclasses.replace(parts.tok_cfg(), mcr_angles=(42.5,))
    with pytest.raises(ValueError, match="mcr_angles"):
        TokenizerLoss(cfg)


def test_a_tiny_autoencoder_learns_under_the_full_objective(parts):
    """Every term on (D from step 10, GAN from step 15): reconstruction and the priors improve, all finite.

    At this toy size (4 tokens of 8 channels, one colour per token) an 85 deg perturbation is a different colour, so
    the paper's lambda_mcr = 0.5 outweighs reconstruction (measured: L1 stalls for some seeds); 0.05 here.
    """
    torch.manual_seed(0)
    cfg = parts.tok_cfg(lpips_weights="counting", lambda_gan=0.5, gan_start_step=15, disc_start_step=10,
                        lambda_mcr=0.05)  # fmt: skip
    dec = parts.TinyDecoder(channels=C, hidden=64)
    enc = torch.nn.Conv2d(3, C, 4, stride=4)  # (B, 3, 8, 8) -> (B, C, 2, 2)
    vfm_proj = PriorProjector(16, C, num_heads=2).requires_grad_(False)
    colours = torch.rand(4, 3, G, G)
    images = colours.repeat_interleave(4, 2).repeat_interleave(4, 3)  # one colour per 4x4 patch
    vfm = torch.tanh(colours.flatten(2).transpose(1, 2) @ torch.randn(3, 16))  # a "frozen VFM" of these images
    disc = parts.tiny_disc()
    loss = TokenizerLoss(cfg, lpips=parts.CountingLPIPS(), discriminator=disc, kernel_backend="torch")
    opt_g = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    opt_d = torch.optim.Adam(disc.trainable_parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    hist = []
    for step in range(60):
        z = enc(images)
        z = z / z.pow(2).mean(1, keepdim=True).add(1e-6).sqrt()  # per-token RMS 1, as the PAE projector
        targets = build_prior_targets(vfm, cfg, projector=vfm_proj)
        out = loss.generator_loss(images, z, dec, step, seed=step, last_layer=dec.last.weight, targets=targets,
                                  generator=gen)  # fmt: skip
        opt_g.zero_grad(set_to_none=True)
        out.total.backward()
        opt_g.step()
        d = loss.discriminator_loss(images, out.recon, step, generator=gen)
        assert (d is None) == (step < 10) and ("gan" in out.terms) == (step >= 15)
        if d is not None:
            opt_d.zero_grad(set_to_none=True)
            d["disc"].backward()
            opt_d.step()
        assert torch.isfinite(out.total) and all(torch.isfinite(v) for v in out.terms.values())
        hist.append({k: float(v) for k, v in out.terms.items()})
    first, last = hist[0], hist[-1]
    assert last["l1"] < 0.5 * first["l1"] and last["scr"] < 0.5 * first["scr"]


def test_bf16_autocast_step_is_finite_and_fp32(parts):
    """Under bf16 autocast (the training precision) every term comes out fp32 and finite, gradients included."""
    cfg, loss, lp, disc, dec, z, images, targets = _setup(parts, lpips_weights="counting")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = (z * 1.0).to(torch.bfloat16)
        out = _run(loss, dec, zb, images, targets)
        d = loss.discriminator_loss(images, out.recon, step=10)
    assert out.total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in out.terms.values())
    (out.total + d["disc"]).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(dec.last.weight.grad).all()


def test_from_config_builds_from_files_and_reports_random_features(parts):
    from pae_fast.losses.recon import LPIPSWeightsMissing

    cfg = parts.tok_cfg(lambda_gan=0.5, disc_weights="random", disc_blocks=(1, 3), disc_input_size=32)
    loss = TokenizerLoss.from_config(cfg, device="cpu", backbone_kwargs=parts.TINY_DISC["backbone_kwargs"])
    st = loss.status()
    assert "RANDOM frozen features" in st["gan"] and st["lpips"].startswith("off")
    assert set(st) == {"l1", "lpips", "gan", "ssr", "mcr", "scr", "noise_aug"} and st["noise_aug"] == "off"
    assert TokenizerLoss.from_config(parts.tok_cfg()).discriminator is None
    with pytest.raises(LPIPSWeightsMissing, match="tokenizer.lpips_weights"):
        TokenizerLoss.from_config(dataclasses.replace(parts.tok_cfg(), lpips_weights=None))
    with pytest.raises(FileNotFoundError, match="disc_weights"):
        TokenizerLoss.from_config(dataclasses.replace(cfg, disc_weights=None),
                                  backbone_kwargs=parts.TINY_DISC["backbone_kwargs"])  # fmt: skip
