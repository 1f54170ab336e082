"""The linear (rectified-flow) probability path and the conversions between its predictions (docs/method.md
§ Conventions, § Flow matching).

Convention used everywhere in pae_fast: **t = 1 is data, t = 0 is noise**::

    x_t = t · x1 + (1 − t) · x0,     x1 ~ data,  x0 ~ N(0, I)
    v   = d x_t / dt = x1 − x0        (the regression target of flow matching)

A velocity model predicts ``v̂(x_t, t) ≈ E[x1 − x0 | x_t]``. Because ``x_t`` is a known linear combination of
``x1`` and ``x0``, the same prediction also gives the posterior means of both end points and the score::

    E[x0 | x_t] = x_t − t · v̂
    E[x1 | x_t] = x_t + (1 − t) · v̂
    ∇ log p_t(x_t) = −E[x0 | x_t] / (1 − t) = (t · v̂ − x_t) / (1 − t)

The score follows from Tweedie's formula for ``x_t = t·x1 + σ_t·x0`` with ``σ_t = 1 − t``:
``∇ log p_t = −E[x0 | x_t] / σ_t``. It is the ``α_t = t, σ_t = 1 − t`` case of the velocity-to-score relation
``s = σ_t⁻¹ (α_t v − α̇_t x) / (α̇_t σ_t − α_t σ̇_t)`` in SiT (Ma et al., 2024, "Exploring Flow and
Diffusion-based Generative Models with Scalable Interpolant Transformers", §2).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "expand_time",
    "interpolate",
    "velocity_target",
    "x0_from_velocity",
    "x1_from_velocity",
    "score_from_velocity",
]


def expand_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample time to the shape of ``x``.

    Args:
        t: a scalar, a 0-dim tensor or a ``(B,)`` tensor.
        x: ``(B, ...)``.

    Returns:
        ``t`` viewed as ``(B, 1, ..., 1)`` (or a 0-dim tensor), in ``x``'s dtype and device.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"time must be a scalar or have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


def interpolate(x1: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = t·x1 + (1 − t)·x0``.

    Args:
        x1: data ``(B, C, H, W)`` (any ``(B, ...)``).
        x0: noise, same shape.
        t: ``(B,)`` or scalar in [0, 1]; t = 1 returns the data.
    """
    if x1.shape != x0.shape:
        raise ValueError(f"data and noise shapes differ: {tuple(x1.shape)} vs {tuple(x0.shape)}")
    tt = expand_time(t, x1)
    return tt * x1 + (1 - tt) * x0


def velocity_target(x1: Tensor, x0: Tensor) -> Tensor:
    """The flow-matching target ``v = x1 − x0`` (constant along each straight path)."""
    return x1 - x0


def x0_from_velocity(x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """Posterior mean of the noise end point, ``E[x0 | x_t] = x_t − t·v``."""
    return x - expand_time(t, x) * v


def x1_from_velocity(x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """Posterior mean of the data end point, ``E[x1 | x_t] = x_t + (1 − t)·v``."""
    return x + (1 - expand_time(t, x)) * v


def score_from_velocity(x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """Score of the marginal ``p_t``: ``∇ log p_t(x) = (t·v − x) / (1 − t)``; undefined at t = 1 (pure data)."""
    tt = expand_time(t, x)
    if bool((tt >= 1).any()):
        raise ValueError("the score of the linear path is undefined at t = 1 (the data end); use t < 1")
    return (tt * v - x) / (1 - tt)
