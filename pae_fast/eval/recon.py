"""Tokenizer metrics: PSNR, SSIM, LPIPS and rFID over a held-out image set.

- PSNR: ``10 log10(1 / MSE)`` per image (images in [0, 1]), averaged over images.
- SSIM (Wang et al., 2004) with an 11x11 Gaussian window, sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, population
  (co)variances, mean over the fully-covered ("valid") positions and channels; equal to scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
- LPIPS: :class:`pae_fast.losses.lpips.LPIPS` (it lives with the losses, which train with it; re-exported here),
  built from an :class:`~pae_fast.config.EvalConfig` by :func:`create_lpips`.
- rFID: FID between Inception features of the originals and of the reconstructions (both quantised to uint8, as a
  saved image would be).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pae_fast.eval.inception import FIDInceptionV3
from pae_fast.losses.lpips import LPIPS, check_pair

__all__ = ["psnr", "ssim", "LPIPS", "create_lpips", "reconstruction_metrics"]


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, eps: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio per image.

    Args:
        x, y: ``(B, C, H, W)`` images in ``[0, data_range]``.
        eps: floor on the MSE (identical images give ``10 log10(range^2 / eps)``, i.e. 100 dB, not inf).
    Returns:
        ``(B,)`` in dB.
    """
    check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1).clamp_min(eps)
    return (10 * torch.log10(data_range**2 / mse)).to(x.dtype if x.is_floating_point() else torch.float32)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype)  # (size, size), sums to 1


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity per image (Gaussian window; scikit-image's Gaussian-weighted SSIM).

    Args:
        x, y: ``(B, C, H, W)`` with ``H, W >= win_size``.
    Returns:
        ``(B,)`` mean SSIM over channels and valid positions.
    """
    check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    c = x.shape[1]
    w = _gaussian_window(win_size, sigma, dtype, x.device).expand(c, 1, win_size, win_size)
    filt = lambda t: F.conv2d(t, w, groups=c)  # "valid" positions only: where the window is fully inside
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def create_lpips(cfg: Any = None, allow_random: bool = False) -> LPIPS:
    """LPIPS from an :class:`~pae_fast.config.EvalConfig` (``lpips_net``, ``lpips_weights``,
    ``lpips_backbone_weights``).

    Raises a clear error when no weights are configured unless ``allow_random``.
    """
    net = getattr(cfg, "lpips_net", "vgg")
    weights = getattr(cfg, "lpips_weights", None)
    backbone = getattr(cfg, "lpips_backbone_weights", None)
    if weights is None and backbone is None and not allow_random:
        raise FileNotFoundError(
            "LPIPS needs local weights: set eval.lpips_weights (official v0.1 heads or a pae_fast LPIPS file) "
            "and eval.lpips_backbone_weights (torchvision backbone state dict)"
        )
    return LPIPS(net, weights, backbone)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_metrics(
    tokenizer_fn: Callable[[torch.Tensor], torch.Tensor],
    images_iterable: Iterable[Any],
    inception: FIDInceptionV3 | None = None,
    lpips: LPIPS | None = None,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
) -> dict[str, float]:
    """Reconstruction quality of a tokenizer over held-out images.

    Args:
        tokenizer_fn: ``(B, 3, H, W)`` images in [0, 1] -> reconstructions of the same shape (encode + decode).
        images_iterable: batches: ``(B, 3, H, W)`` tensors (float in [0, 1] or uint8) or tuples whose first item
            is one (e.g. a DataLoader of ``(images, labels)``).
        inception: gives ``rfid`` (needs >= 2 images).
        lpips: gives ``lpips``.
        max_images: stop after this many images.
    Returns:
        ``{"psnr", "ssim", ["lpips"], ["rfid"], "num_images"}`` (means over images).
    """
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    feats_real: list[np.ndarray] = []
    feats_fake: list[np.ndarray] = []
    n = 0
    for batch in images_iterable:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if max_images is not None:
            x = x[: max_images - n]
        if x.numel() == 0:
            break
        x = x.to(device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        y = tokenizer_fn(x).float().clamp(0, 1)
        check_pair(x, y, "tokenizer_fn output vs input")
        sums["psnr"] += float(psnr(x, y).sum())
        sums["ssim"] += float(ssim(x, y).sum())
        if lpips is not None:
            sums["lpips"] += float(lpips.to(device)(x, y).sum())
        if inception is not None:
            inc = inception.to(device)
            q = lambda t: (t * 255).round().to(torch.uint8)  # as saved images
            feats_real.append(inc(q(x))["pool"].double().cpu().numpy())
            feats_fake.append(inc(q(y))["pool"].double().cpu().numpy())
        n += x.shape[0]
        if max_images is not None and n >= max_images:
            break
    if n == 0:
        raise ValueError("reconstruction_metrics: the image iterable yielded no images")
    out = {"psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n, "num_images": n}
    if lpips is not None:
        out["lpips"] = sums["lpips"] / n
    if inception is not None:
        from pae_fast.eval.fid import frechet_distance_features

        if n < 2:
            raise ValueError("rFID needs at least 2 images")
        out["rfid"] = frechet_distance_features(np.concatenate(feats_fake), np.concatenate(feats_real))
    return out
