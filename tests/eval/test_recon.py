"""Tokenizer metrics: PSNR, SSIM (against scikit-image), LPIPS properties and weight loading, rFID."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.metrics import structural_similarity

from pae_fast.eval.inception import FIDInceptionV3
from pae_fast.eval.recon import create_lpips, psnr, reconstruction_metrics, ssim
from pae_fast.losses.lpips import LPIPS


@pytest.fixture(scope="module")
def lpips_vgg() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS("vgg")


def test_psnr_known_value():
    x = torch.rand(3, 3, 16, 16) * 0.8
    assert torch.allclose(psnr(x, x + 0.1), torch.full((3,), 20.0), atol=1e-4)  # MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(x, x), torch.full((3,), 100.0))  # MSE floored at 1e-10
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, x[:, :, :8])


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 32, 40))
    y = np.clip(x + rng.normal(scale=0.15, size=x.shape), 0, 1)
    ours = ssim(torch.from_numpy(x), torch.from_numpy(y))
    for i in range(2):
        ref = structural_similarity(
            x[i], y[i], channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-7)
    assert torch.allclose(ssim(torch.from_numpy(x), torch.from_numpy(x)), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_properties_with_random_weights(net, lpips_vgg):
    model = lpips_vgg if net == "vgg" else LPIPS("alex")
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-7)  # LPIPS(x, x) = 0
    assert torch.allclose(model(x, y), model(y, x))  # symmetric
    d_small = model(x, (x + 0.02 * torch.randn_like(x)).clamp(0, 1))
    assert (d_small > 0).all() and (model(x, y) > d_small).all()
    assert not any(p.requires_grad for p in model.parameters())
    z = x.clone().requires_grad_(True)  # differentiable in its inputs: usable as a loss
    model(z, y).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_lpips_loads_official_heads_and_torchvision_backbone(tmp_path, lpips_vgg):
    heads = {f"lin{k}.model.1.weight": lin.weight.clone() for k, lin in enumerate(lpips_vgg.lins)}
    backbone = {f"features.{k[len('net.') :]}": v for k, v in lpips_vgg.state_dict().items() if k.startswith("net.")}
    save_file(heads, str(tmp_path / "vgg_heads.safetensors"))
    torch.save(backbone, tmp_path / "vgg16.pth")
    loaded = LPIPS("vgg", tmp_path / "vgg_heads.safetensors", tmp_path / "vgg16.pth")
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert torch.allclose(loaded(x, y), lpips_vgg(x, y))
    with pytest.raises(ValueError, match="do not cover"):
        LPIPS("vgg", tmp_path / "vgg_heads.safetensors")  # heads without a backbone
    with pytest.raises(FileNotFoundError, match="eval.lpips_weights"):
        create_lpips(None)


def test_reconstruction_metrics_identity_and_noisy_tokenizer(lpips_vgg):
    torch.manual_seed(0)
    inception = FIDInceptionV3(input_size=75).eval()
    base = torch.rand(16, 3, 1, 1)
    images = (base + 0.2 * torch.rand(16, 3, 32, 32)).clamp(0, 1)
    batches = [(images[:8], torch.zeros(8)), (images[8:], torch.zeros(8))]  # DataLoader-style (images, labels)
    ident = reconstruction_metrics(lambda x: x, batches, inception=inception, lpips=lpips_vgg)
    assert ident["num_images"] == 16
    assert ident["psnr"] == pytest.approx(100.0) and ident["ssim"] == pytest.approx(1.0)
    assert ident["lpips"] == pytest.approx(0.0, abs=1e-6) and ident["rfid"] == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(1)
    noisy = reconstruction_metrics(
        lambda x: x + 0.1 * torch.randn(x.shape, generator=gen), batches, inception=inception, lpips=lpips_vgg
    )
    assert 15 < noisy["psnr"] < 25 and noisy["ssim"] < 0.9 and noisy["lpips"] > 0 and noisy["rfid"] > 0
    capped = reconstruction_metrics(lambda x: x, iter([images]), max_images=5)
    assert capped["num_images"] == 5 and "rfid" not in capped and "lpips" not in capped
