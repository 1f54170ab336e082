"""The flow-matching objective (docs/method.md § Flow matching) and the generator's training loss for the shared engine.

    L = MSE(v̂, v) + mean(1 − cos(v̂, v))        (PAE; RAE uses the MSE term only)

with ``v = x1 − x0`` the velocity of the linear path (t = 1 is data) and the cosine taken over channels at every
spatial position. Both terms are computed in fp32 whatever precision the model runs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pae_fast.flow.path import interpolate, velocity_target
from pae_fast.flow.timesteps import sample_time

__all__ = ["flow_matching_loss", "FlowLoss"]


def flow_matching_loss(v_hat: Tensor, v: Tensor, cosine: bool = True, eps: float = 1e-8) -> tuple[Tensor, dict]:
    """``MSE(v̂, v) [+ mean(1 − cos(v̂, v))]``.

    Args:
        v_hat: predicted velocity ``(B, C, H, W)`` (any ``(B, C, ...)``; cast to fp32).
        v: target velocity, same shape.
        cosine: add the cosine term (cosine over dim 1 = channels, per position, then averaged).
        eps: denominator floor of the cosine (a zero vector has cosine 0 with anything).

    Returns:
        (scalar loss, ``{"mse": ..., "cos": ...}`` detached terms; ``"cos"`` only when ``cosine``).
    """
    if v_hat.shape != v.shape:
        raise ValueError(f"model output shape {tuple(v_hat.shape)} does not match the target {tuple(v.shape)}")
    v_hat = v_hat.float()
    v = v.float()
    mse = F.mse_loss(v_hat, v)
    terms = {"mse": mse.detach()}
    loss = mse
    if cosine:
        if v.ndim < 2:
            raise ValueError(f"the cosine term needs a channel dimension (B, C, ...), got shape {tuple(v.shape)}")
        cos = 1 - F.cosine_similarity(v_hat, v, dim=1, eps=eps).mean()
        terms["cos"] = cos.detach()
        loss = loss + cos
    return loss, terms


@dataclass
class FlowLoss:
    """Flow-matching loss as an engine ``loss_fn(model, batch, step) -> (loss, terms)``.

    Each call draws ``t`` (logit-normal or uniform, then shifted) and ``x0 ~ N(0, I)`` per sample, builds
    ``x_t = t·x1 + (1 − t)·x0`` and regresses ``model(x_t, t, y)`` onto ``v = x1 − x0``. Label dropout (the null
    class for classifier-free guidance) is the model's job, as in DiT / LightningDiT.

    Attributes:
        time_sampling: ``"logit_normal"`` or ``"uniform"``.
        logit_mean: μ of the logit-normal.
        logit_std: σ of the logit-normal.
        shift: timestep shift s (already resolved: RAE α and the dimension rule are converted before).
        cosine: add the cosine term (PAE) or not (RAE).
    """

    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    cosine: bool = True

    @classmethod
    def from_config(cls, flow: Any, shift: float | None = None) -> FlowLoss:
        """Build from a :class:`pae_fast.config.FlowConfig`; ``shift`` overrides ``flow.shift`` when given."""
        return cls(
            time_sampling=flow.time_sampling,
            logit_mean=flow.logit_mean,
            logit_std=flow.logit_std,
            shift=flow.shift if shift is None else shift,
            cosine=flow.cosine_loss,
        )

    def sample_path(self, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Draw a point on the path for each sample.

        Args:
            x1: data latents ``(B, C, H, W)``.
            generator: optional RNG (the engine seeds the global one).

        Returns:
            ``t (B,)`` fp32, ``x_t`` and the target ``v``, both shaped like ``x1``.
        """
        t = sample_time(
            x1.shape[0],
            method=self.time_sampling,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            shift=self.shift,
            device=x1.device,
            generator=generator,
        )
        x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        return t, interpolate(x1, x0, t.to(x1.dtype)), velocity_target(x1, x0)

    def __call__(self, model: nn.Module, batch: Any, step: int = 0) -> tuple[Tensor, dict]:
        """One training loss; ``batch`` is ``(latents (B, C, H, W), labels (B,))`` on the training device."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "the generator loss expects batches of (latents (B, C, H, W), labels (B,)), "
                f"got {type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)}'}"
            )
        x1, y = batch
        if x1.ndim != 4:
            raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(x1.shape)}")
        x1 = x1.float()
        t, x_t, v = self.sample_path(x1)
        v_hat = model(x_t, t, y.long())
        return flow_matching_loss(v_hat, v, cosine=self.cosine)
