"""RAE noise-augmented decoding: the decoder is trained on ``z + sigma * n`` (docs/method.md §Noise augmentation).

``n ~ N(0, I)`` and one ``sigma`` per sample: ``sigma ~ U(0, tau)`` (RAE's code, ``dist="uniform"``) or
``sigma ~ |N(0, tau^2)|`` (RAE's paper, ``dist="half_normal"``). ``tau = 0`` turns it off (the input is returned).
"""

from __future__ import annotations

import torch

__all__ = ["DISTRIBUTIONS", "sample_sigma", "noise_augment"]

DISTRIBUTIONS = ("uniform", "half_normal")


def sample_sigma(
    batch: int, tau: float, dist: str = "uniform", generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """One noise level per sample.

    Args:
        batch: number of samples B.
        tau: scale (``U(0, tau)`` or ``|N(0, tau^2)|``), >= 0.
        dist: ``"uniform"`` or ``"half_normal"``.
    Returns:
        ``(B,)`` fp32.
    """
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"noise augmentation: unknown distribution {dist!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if tau < 0:
        raise ValueError(f"noise augmentation: tau must be >= 0, got {tau}")
    if dist == "uniform":
        return torch.rand(batch, generator=generator, device=device) * tau
    return torch.randn(batch, generator=generator, device=device).abs() * tau


def noise_augment(
    z: torch.Tensor, tau: float, dist: str = "uniform", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``z + sigma * n`` with a per-sample sigma (see :func:`sample_sigma`); ``tau == 0`` returns ``z`` itself.

    Args:
        z: ``(B, ...)`` latents.
    Returns:
        the augmented latents, same shape and dtype; the gradient w.r.t. ``z`` is the identity.
    """
    if tau == 0:
        return z
    sigma = sample_sigma(z.shape[0], tau, dist, generator, z.device).to(z.dtype)
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return z + sigma.view(-1, *([1] * (z.dim() - 1))) * noise
