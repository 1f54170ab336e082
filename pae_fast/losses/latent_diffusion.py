"""Diffusion-loss regulariser, the second alternative to the prior losses (Table 3a; docs/method.md § KL and
diffusion-loss regularisers).

A small denoiser ``v_phi`` learns flow matching on the latents (the project's convention: t = 1 data, t = 0 noise):

    x_t = t * z + (1 - t) * eps,   v = z - eps,   L_diff(z) = mean (v_phi(x_t, t) - v)^2,   t ~ U(0, 1), eps ~ N(0, I)

The tokenizer's loss adds ``lambda_diffusion * L_diff(z)`` with the denoiser held fixed (its parameters get no
gradient there), so the encoder is pulled toward latents the denoiser finds easy; the denoiser itself trains as its
own engine unit on ``sg(z)`` of the same micro-batches (:func:`denoiser_unit_loss_fn`), like the GAN's
discriminator [choice: the paper's row names the regulariser, not its form].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["LatentDenoiser", "flow_matching_loss", "fixed_parameters", "denoiser_unit_loss_fn"]


class LatentDenoiser(nn.Module):
    """``(x_t (B, C, H, W), t (B,))`` -> velocity ``(B, C, H, W)``: three 3x3 convolutions (C + 1 -> hidden -> hidden
    -> C) with SiLU, t broadcast as an extra input channel [choice]."""

    def __init__(self, channels: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        return self.net(torch.cat([x, tt], dim=1))


def flow_matching_loss(denoiser: nn.Module, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mean (v_phi(t z + (1 - t) eps, t) - (z - eps))^2`` with one ``t ~ U(0, 1)`` per sample (fp32 result);
    differentiable in ``z`` and in the denoiser's parameters. ``z`` is cast to the denoiser's parameter dtype (the
    engine's bf16 compute weights)."""
    z = z.to(next(denoiser.parameters()).dtype)
    t = torch.rand(z.shape[0], generator=generator, device=z.device, dtype=z.dtype)
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    tb = t.view(-1, 1, 1, 1)
    pred = denoiser(tb * z + (1 - tb) * eps, t)
    return (pred.float() - (z - eps).float()).square().mean()


@contextlib.contextmanager
def fixed_parameters(module: nn.Module) -> Iterator[None]:
    """``module`` as a fixed function: its parameters do not require grad inside the block (restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def denoiser_unit_loss_fn(shared: Any):
    """The engine's ``loss_fn`` of the denoiser unit: flow matching on the detached latents the generator pass of the
    same micro-batch left in ``shared.latents`` (a list, first in first out)."""

    def loss_fn(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ARG001
        z = shared.latents.pop(0)
        return flow_matching_loss(model, z), {}

    return loss_fn
