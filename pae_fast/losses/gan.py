"""GAN terms of the tokenizer loss (docs/method.md §GAN).

- Discriminator: hinge ``L_D = 0.5 (mean relu(1 - D(aug(x))) + mean relu(1 + D(aug(x_hat))))``.
- Generator: non-saturating ("vanilla") ``L_G = mean softplus(-D(aug(x_hat)))  = -mean log sigmoid(D)``.
- Adaptive weight on the decoder's last layer weight W:
  ``lambda_adapt = ||dL_rec/dW|| / (||dL_gan/dW|| + 1e-6)``, clamped to ``[0, max]`` (1e4), detached.
- Start steps: the discriminator trains from ``disc_start_step``, the generator term is on from ``gan_start_step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hinge_d_loss", "vanilla_g_loss", "adaptive_weight", "gan_active", "disc_active"]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``0.5 (mean relu(1 - real) + mean relu(1 + fake))``.

    Args:
        logits_real, logits_fake: discriminator logits of any shapes (e.g. ``(B, heads * N)``).
    Returns:
        0-dim fp32 loss.
    """
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean softplus(-logits) = -mean log sigmoid(logits)``.

    Args:
        logits_fake: discriminator logits of reconstructions, any shape.
    Returns:
        0-dim fp32 loss.
    """
    return F.softplus(-logits_fake.float()).mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``||d rec / dW|| / (||d gan / dW|| + eps)``, clamped to ``[0, max_weight]``, detached.

    Both losses must depend on ``last_layer`` (the decoder's last ``nn.Linear`` weight). The graphs are kept
    (``retain_graph=True``) so the caller can backpropagate the total loss afterwards.

    Args:
        rec_loss: 0-dim reconstruction loss (L1 + lambda_lpips * LPIPS).
        gan_loss: 0-dim generator GAN loss.
        last_layer: the weight tensor W.
        max_weight: upper clamp (``tokenizer.adaptive_weight_max``).
    Returns:
        0-dim fp32 tensor without grad.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.float().norm() / (g_gan.float().norm() + eps)
    return w.clamp(0.0, float(max_weight)).detach()


def gan_active(step: int, lambda_gan: float, gan_start_step: int) -> bool:
    """The generator's GAN term is computed at ``step``."""
    return lambda_gan > 0 and step >= gan_start_step


def disc_active(step: int, lambda_gan: float, disc_start_step: int) -> bool:
    """The discriminator is updated at ``step``."""
    return lambda_gan > 0 and step >= disc_start_step
