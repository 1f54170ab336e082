"""Synthetic class-conditional latent sets: the embedded default data of the demo and of many tests.

Each class k is a Gaussian in latent space, ``z = mu_k + noise``, with a class mean ``mu_k`` that is a smooth random
field (low spatial frequencies, like the mean latent of an image class) and within-class noise whose
spatial correlation length is configurable (``smoothness = 0``: white noise). Because the distribution is known, a
generator trained on it can be checked against the truth (per-class Fréchet distance), and diffusability metrics can be
compared with their closed forms.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SyntheticLatentSpec", "smooth_field", "synthetic_latents"]


def _gaussian_kernel_1d(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth_field(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``noise (N, C, H, W)`` with a circular Gaussian of width ``sigma`` (pixels) and restore unit variance.

    Circular padding keeps the field stationary, so every position has the same variance.
    """
    if sigma <= 0:
        return noise
    H, W = noise.shape[-2:]
    radius = min(int(math.ceil(3 * sigma)), (min(H, W) - 1) // 2)
    k = _gaussian_kernel_1d(sigma, radius).to(noise)
    C = noise.shape[1]
    x = torch.nn.functional.pad(noise, (radius, radius, radius, radius), mode="circular")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    # each output is a weighted sum of iid unit normals: its variance is the squared 2-D kernel norm
    var = float((k**2).sum()) ** 2
    return x / math.sqrt(var)


class SyntheticLatentSpec:
    """Parameters of a synthetic latent set.

    Args:
        num_classes: number of classes.
        channels, size: latent shape ``(C, size, size)``.
        mean_scale: standard deviation of the class means (separation of the classes).
        noise_scale: within-class standard deviation per element.
        mean_smoothness, noise_smoothness: Gaussian blur widths (latent pixels) of the class means and of the noise.
        seed: generator seed for the class means.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 8,
        size: int = 8,
        mean_scale: float = 1.0,
        noise_scale: float = 0.5,
        mean_smoothness: float = 2.0,
        noise_smoothness: float = 1.0,
        seed: int = 0,
    ) -> None:
        if num_classes < 1 or channels < 1 or size < 1:
            raise ValueError(f"num_classes, channels, size must be >= 1, got {num_classes}, {channels}, {size}")
        self.num_classes, self.channels, self.size = num_classes, channels, size
        self.mean_scale, self.noise_scale = mean_scale, noise_scale
        self.mean_smoothness, self.noise_smoothness = mean_smoothness, noise_smoothness
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        raw = torch.randn(num_classes, channels, size, size, generator=g, dtype=torch.float64)
        self.class_means = (smooth_field(raw, mean_smoothness) * mean_scale).float()  # (K, C, H, W)

    def sample(self, labels: torch.Tensor, seed: int = 1) -> torch.Tensor:
        """Latents ``(N, C, H, W)`` for the given labels ``(N,)``."""
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(labels.shape[0], self.channels, self.size, self.size, generator=g, dtype=torch.float64)
        noise = smooth_field(e, self.noise_smoothness).float() * self.noise_scale
        return self.class_means[labels] + noise


def synthetic_latents(spec: SyntheticLatentSpec, per_class: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced set: ``latents (K*per_class, C, H, W)``, ``labels (K*per_class,)`` (shuffled)."""
    labels = torch.arange(spec.num_classes).repeat_interleave(per_class)
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed + 7919))
    labels = labels[perm]
    return spec.sample(labels, seed=seed), labels
