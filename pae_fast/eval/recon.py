"""Tokenizer metrics: PSNR, SSIM, LPIPS and rFID over a held-out image set.

- PSNR: ``10 log10(1 / MSE)`` per image (images in [0, 1]), averaged over images.
- SSIM (Wang et al., 2004) with an 11x11 Gaussian window, sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, population
  (co)variances, mean over the fully-covered ("valid") positions and channels; equal to scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
- LPIPS (Zhang et al., 2018): VGG-16 or AlexNet features (torchvision layer layout) at five ReLU stages,
  unit-normalised over channels, squared differences weighted by non-negative 1x1 "lin" layers, spatially averaged
  and summed. Weights come from local files: the official ``v0.1`` heads (``lin{k}.model.1.weight``) and a
  torchvision backbone state dict (``features.*``), or one pae_fast LPIPS state dict. Without files the weights are
  random (tests; the values are then only a distance-like function, not the perceptual metric).
- rFID: FID between Inception features of the originals and of the reconstructions (both quantised to uint8, as a
  saved image would be).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pae_fast.eval.inception import FIDInceptionV3, load_state_dict_file

__all__ = ["psnr", "ssim", "LPIPS", "create_lpips", "reconstruction_metrics"]


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"{what}: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, eps: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio per image.

    Args:
        x, y: ``(B, C, H, W)`` images in ``[0, data_range]``.
        eps: floor on the MSE (identical images give ``10 log10(range^2 / eps)``, i.e. 100 dB, not inf).
    Returns:
        ``(B,)`` in dB.
    """
    _check_pair(x, y, "psnr")
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
    _check_pair(x, y, "ssim")
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


# ----------------------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------------------

# Index of the ReLU ending each of the five stages in torchvision's ``features`` Sequential, and their widths.
_STAGES = {
    "vgg": ((3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    "alex": ((1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),  # relu1 .. relu5
}


def _backbone(net: str) -> nn.Sequential:
    import torchvision

    if net == "vgg":
        # only the convolutional part (the classifier of vgg16 is 120M parameters we never use)
        return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=False)
    return torchvision.models.alexnet(weights=None).features


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity.

    Args:
        net: ``"vgg"`` (VGG-16) or ``"alex"`` (AlexNet).
        weights: file with the linear heads (official ``lin{k}.model.1.weight`` keys) and/or a whole pae_fast
            LPIPS state dict (``net.*``, ``lins.*``).
        backbone_weights: torchvision ``vgg16`` / ``alexnet`` state dict (``features.*`` keys) for the backbone.

    Without any file the weights are random (heads non-negative). The module is frozen (eval, no grad on its
    parameters) but differentiable with respect to its inputs, so it also serves as a loss.
    """

    # Input scaling of the official implementation (inputs in [-1, 1]).
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(
        self,
        net: str = "vgg",
        weights: str | os.PathLike | None = None,
        backbone_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if net not in _STAGES:
            raise ValueError(f"LPIPS net must be one of {sorted(_STAGES)}, got {net!r}")
        self.net_name = net
        self.stage_ends, widths = _STAGES[net]
        self.net = _backbone(net)[: self.stage_ends[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        with torch.no_grad():
            for lin in self.lins:
                lin.weight.uniform_(0, 2 / lin.in_channels)  # random but non-negative, like trained heads
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        files = [f for f in (weights, backbone_weights) if f is not None]
        if files:
            self.load_files(*files)
        self.eval().requires_grad_(False)

    def load_files(self, *paths: str | os.PathLike) -> None:
        """Load official / torchvision / pae_fast weight files; together they must cover every parameter."""
        merged: dict[str, torch.Tensor] = {}
        for p in paths:
            for k, v in load_state_dict_file(p, "LPIPS weights").items():
                if m := re.fullmatch(r"lin(\d)\.model\.1\.weight", k):  # official v0.1 heads
                    merged[f"lins.{m.group(1)}.weight"] = v
                elif k.startswith("features."):  # torchvision backbone
                    idx = int(k.split(".")[1])
                    if idx <= self.stage_ends[-1]:
                        merged["net." + k[len("features.") :]] = v
                elif k.startswith(("net.", "lins.")):
                    merged[k] = v
        own = self.state_dict()
        missing = sorted(set(own) - set(merged))
        if missing:
            raise ValueError(
                f"LPIPS ({self.net_name}) weights from {', '.join(map(str, paths))} do not cover {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}: give the official heads file (eval.lpips_weights) and the "
                f"torchvision {'vgg16' if self.net_name == 'vgg' else 'alexnet'} backbone (eval.lpips_backbone_weights)"
            )
        for k, v in merged.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(f"LPIPS weights: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict({k: merged[k] for k in own})

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, ends = [], set(self.stage_ends)
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in ends:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image.

        Args:
            x, y: ``(B, 3, H, W)`` images in [0, 1].
        Returns:
            ``(B,)`` LPIPS distances (0 for identical images, symmetric).
        """
        _check_pair(x, y, "LPIPS")
        fx = self._features(((x * 2 - 1) - self.shift) / self.scale)
        fy = self._features(((y * 2 - 1) - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean((1, 2, 3))
        return total


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
        _check_pair(x, y, "tokenizer_fn output vs input")
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
