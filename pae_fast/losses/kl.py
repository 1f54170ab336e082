"""KL regulariser, the VAE-style alternative to the prior losses (Table 3a; docs/method.md § KL and diffusion-loss
regularisers).

The ``*-kl`` tokenizer variants predict a per-element log-variance beside the (RMS-normalised) mean ``mu``; training
decodes a reparameterised sample ``z = mu + exp(logvar / 2) * eps`` and adds ``lambda_kl * KL(N(mu, sigma^2) ||
N(0, I))``; ``encode`` keeps returning ``mu``.
"""

from __future__ import annotations

import torch

__all__ = ["reparameterize", "kl_loss"]


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (``mu``, ``logvar``: ``(B, C, H, W)``); differentiable in
    both."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over each sample's latent elements, batch mean (the latent-diffusion
    VAE's reduction [choice]), in fp32: ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)``.

    With the PAE latent's RMS-1 mean the ``mu^2`` part is the constant ``C * H * W`` per sample: the term acts on the
    variance only.
    """
    mu, logvar = mu.float(), logvar.float()
    per_elem = mu.square() + logvar.exp() - 1.0 - logvar
    return 0.5 * per_elem.flatten(1).sum(1).mean()
