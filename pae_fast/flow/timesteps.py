"""Training-time sampling, the timestep shift and shifted sampling grids (docs/method.md § Conventions, § Flow
matching). t = 1 is data.

Shift (our convention)::

    shift_time(t, s) = s·t / (1 + (s − 1)·t)

It fixes 0 and 1, is increasing in t, and ``shift_time(shift_time(t, a), b) = shift_time(t, a·b)``, so 1/s undoes
s. ``s < 1`` moves times toward noise (t = 0), ``s > 1`` toward data. RAE's shift α (its t = 1 is noise) is
``s = 1/α`` here (config.py converts ``flow.rae_alpha`` at load). RAE's dimension-dependent rule
``α = sqrt(m / 4096)`` (m = tokens × channels of the latent) is :func:`dimension_shift`.

PAE's released sampling code applies this same formula with its ``0.4`` (docs/method.md §Sampling), so
``sample.shift: 0.4`` is the authors' value as is. Sampling grids: :mod:`pae_fast.flow.grid`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["shift_time", "dimension_shift", "sample_time", "time_grid"]


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """Apply the timestep shift ``t ← s·t / (1 + (s − 1)·t)``.

    Args:
        t: times in [0, 1] (tensor of any shape, or a float).
        shift: s > 0; 1 is the identity, s < 1 moves toward noise (t = 0).

    Returns:
        shifted times, same shape and type as ``t``.
    """
    if not shift > 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    # Same value as s·t / (1 + (s − 1)·t), written so that t = 0 and t = 1 map exactly to themselves.
    return t / (t + (1 - t) / shift)


def dimension_shift(num_elements: int, base: int = 4096) -> float:
    """RAE's dimension-dependent shift, in our convention: ``s = 1/α`` with ``α = sqrt(m / base)``.

    Args:
        num_elements: m = tokens × channels of one latent, i.e. ``C·H·W`` (8192 for PAE's 32×16×16,
            196608 for RAE's 768×16×16).
        base: the reference dimension (4096 in RAE).

    Returns:
        the shift s (< 1 when m > base: larger latents spend more training time near noise).
    """
    if num_elements <= 0 or base <= 0:
        raise ValueError(f"dimension_shift needs positive sizes, got m={num_elements}, base={base}")
    return 1.0 / math.sqrt(num_elements / base)


def sample_time(
    batch: int,
    *,
    method: Literal["logit_normal", "uniform"] = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw training times, then shift them.

    Logit-normal: ``t = sigmoid(μ + σ·n)``, n ~ N(0, 1) (μ > 0 favours data here, since t = 1 is data).
    Uniform: t ~ U(0, 1).

    Args:
        batch: number of times B.
        method: ``"logit_normal"`` or ``"uniform"``.
        logit_mean: μ of the logit-normal.
        logit_std: σ of the logit-normal (> 0).
        shift: timestep shift s applied after drawing.
        device: where to draw.
        generator: optional RNG.

    Returns:
        ``(B,)`` float32 times in [0, 1].
    """
    if method == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"flow.logit_std must be > 0, got {logit_std}")
        n = torch.randn(batch, device=device, generator=generator)
        t = torch.sigmoid(logit_mean + logit_std * n)
    elif method == "uniform":
        t = torch.rand(batch, device=device, generator=generator)
    else:
        raise ValueError(f"flow.time_sampling must be 'logit_normal' or 'uniform', got {method!r}")
    return shift_time(t, shift)


def time_grid(
    steps: int,
    shift: float = 1.0,
    *,
    t_start: float = 0.0,
    t_end: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """An increasing sampling grid from noise to data: ``shift_time(linspace(t_start, t_end, steps + 1), s)``.

    Args:
        steps: number of integration steps K (≥ 1).
        shift: s; < 1 puts more of the grid near noise, > 1 near data.
        t_start: first time (0 = pure noise).
        t_end: last time (1 = data).
        device: device of the grid.
        dtype: dtype of the grid.

    Returns:
        ``(K + 1,)`` increasing times.
    """
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}")
    grid = torch.linspace(t_start, t_end, steps + 1, device=device, dtype=torch.float64)
    return shift_time(grid, shift).to(dtype)
