"""Writing images: PNG files, image grids and latent-channel previews (samples, reconstructions, checkpoints)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pae_fast.io import atomic_path

__all__ = ["save_png", "save_image_grid", "latent_preview"]


def save_png(hwc_uint8: Any, path: str | os.PathLike) -> Path:
    """Write one ``(H, W, 3)`` uint8 array as a PNG, atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(hwc_uint8).save(tmp, format="PNG")
    return path


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> Path:
    """Save ``(N, 3, H, W)`` images in [0, 1] as one PNG grid (``nrow`` per row, default ≈ sqrt(N)), atomically."""
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.float().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    hwc = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return save_png(hwc, path)


def latent_preview(latents: Tensor, max_channels: int = 8, min_tile: int = 32) -> Tensor:
    """Grey tiles of latent channels for a quick look: one row per sample, one column per channel.

    Each channel is scaled by its 1st/99th percentile over the shown samples; tiles are upscaled (nearest) to at
    least ``min_tile`` pixels.

    Args:
        latents: ``(N, C, H, W)``.

    Returns:
        ``(N·min(C, max_channels), 3, h, w)`` images in [0, 1], sample-major: save them with
        ``save_image_grid(..., nrow=min(C, max_channels))`` for one row per sample.
    """
    if latents.ndim != 4:
        raise ValueError(f"expected latents (N, C, H, W), got shape {tuple(latents.shape)}")
    n, c, h, w = latents.shape
    k = min(c, max_channels)
    z = latents[:, :k].float()
    flat = z.transpose(0, 1).reshape(k, -1)
    lo = flat.quantile(0.01, dim=1).view(1, k, 1, 1)
    hi = flat.quantile(0.99, dim=1).view(1, k, 1, 1)
    z = ((z - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    scale = max(1, math.ceil(min_tile / min(h, w)))
    z = torch.nn.functional.interpolate(z, scale_factor=scale, mode="nearest")
    return z.reshape(n * k, 1, h * scale, w * scale).expand(-1, 3, -1, -1)
