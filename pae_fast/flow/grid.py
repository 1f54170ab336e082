"""The sampling grid and the model calls a sampler makes, stated without ambiguity (docs/method.md §Sampling).

One convention for every sampler: ``sample.steps`` = K solver steps between ``K + 1`` grid points

    grid = shift(linspace(sample.t_start, sample.t_end, K + 1), sample.shift)

Model calls per image (a CFG pair is one batched call): K for Euler and Euler–Maruyama, 2K for Heun, K + 1 for
``sde_sbdm`` (its last step, ``sample.last_step``, at the unshifted ``t_end``). Published configs that count grid
*points* ("num_sampling_steps: 250" in PAE, "num_steps: 50" in RAE) are ``steps = points − 1``: 249 and 49.

    from pae_fast.flow.grid import plan_from_config
    plan = plan_from_config(cfg.sample, latent_shape)  # plan.grid, plan.nfe, plan.call_times(), plan.describe()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from pae_fast.flow.timesteps import dimension_shift, time_grid

__all__ = ["SAMPLER_NAMES", "LAST_STEPS", "SamplingPlan", "sampling_plan", "sample_shift", "plan_from_config"]

SAMPLER_NAMES: tuple[str, ...] = ("euler", "heun", "euler_maruyama", "sde_sbdm")
# sde_sbdm's last step (flow/samplers.py apply_last_step; docs/method.md § PAE no-guidance SDE); "mean" is what the
# authors' presets select
LastStep = Literal["mean", "euler", "tweedie"]
LAST_STEPS: tuple[str, ...] = get_args(LastStep)
_LAST_STEP_FORMULA = {"mean": "x + h·(2v − x/t)", "euler": "x + h·v", "tweedie": "x/t + ((1 − t)²/t)·score"}


@dataclass(frozen=True)
class SamplingPlan:
    """What a sampler does for one image.

    Attributes:
        sampler: sampler name.
        steps: K solver steps.
        shift: grid shift s (our convention, t = 1 data).
        t_start: first grid time before the shift.
        t_end: last grid time before the shift.
        grid: ``(K + 1,)`` float64 increasing shifted times.
        final_time: the time of ``sde_sbdm``'s last step (``t_end``, unshifted); None otherwise.
        last_step: ``sde_sbdm``'s last step (``"mean"``, ``"euler"`` or ``"tweedie"``); None otherwise.
    """

    sampler: str
    steps: int
    shift: float
    t_start: float
    t_end: float
    grid: Tensor
    final_time: float | None
    last_step: str | None = None

    def call_times(self) -> Tensor:
        """``(nfe,)`` float64: the time of each model call, in order."""
        left, right = self.grid[:-1], self.grid[1:]
        if self.sampler == "heun":
            return torch.stack([left, right], dim=1).reshape(-1)
        if self.sampler == "sde_sbdm":
            return torch.cat([left, torch.tensor([self.final_time], dtype=torch.float64)])
        return left

    @property
    def nfe(self) -> int:
        """Model calls per image (a CFG conditional/unconditional pair counts once: it is one batched call)."""
        return int(self.call_times().numel())

    def guided_calls(self, start: float, end: float = 1.0) -> int:
        """Calls whose time lies in the guidance interval ``[start, end]`` (CFG doubles their batch)."""
        t = self.call_times().float()  # the samplers hand the model float32 times
        return int(((t >= start) & (t <= end)).sum())

    def describe(self) -> str:
        """One line for ``--dry-run`` and benchmark tables."""
        g = self.grid
        head = (
            f"{self.sampler}: {self.nfe} model calls per image; grid shift(linspace({self.t_start:g}, {self.t_end:g}, "
            f"{self.steps + 1}), {self.shift:.6g}) = [{g[0]:.6g}, {g[1]:.6g}, ..., {g[-2]:.6g}, {g[-1]:.6g}], "
            f"{self.steps} steps"
        )
        if self.sampler == "sde_sbdm":
            head += (f", then the {self.last_step} last step {_LAST_STEP_FORMULA[self.last_step]} at "
                     f"t = {self.final_time:g}, h = {1 - self.final_time:.6g}")
        return head


def sampling_plan(
    sampler: str, steps: int, shift: float = 1.0, t_start: float = 0.0, t_end: float = 1.0, last_step: str = "mean"
) -> SamplingPlan:
    """The grid and call count of a sampler (module docstring).

    Args:
        sampler: one of :data:`SAMPLER_NAMES`.
        steps: K solver steps (>= 1).
        shift: s > 0.
        t_start: first grid time before the shift, in [0, 1) (``sde_sbdm``: > 0).
        t_end: last grid time before the shift, in (t_start, 1] (``sde_sbdm``: < 1).
        last_step: ``sde_sbdm``'s last step, one of :data:`LAST_STEPS` (ignored by the other samplers).

    Returns:
        the :class:`SamplingPlan`.
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"sample.sampler: unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_NAMES)}")
    if steps < 1:
        raise ValueError(f"sample.steps must be >= 1 (solver steps = grid points - 1), got {steps}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= sample.t_start < sample.t_end <= 1, got t_start={t_start}, t_end={t_end}")
    if sampler == "sde_sbdm" and not (t_start > 0.0 and t_end < 1.0):
        raise ValueError(
            f"sample.sampler=sde_sbdm needs sample.t_start > 0 and sample.t_end < 1 (its diffusion (1 - t)/t and "
            f"score are singular at the ends; PAE uses 1e-5 and 0.996), got t_start={t_start}, t_end={t_end}"
        )
    if sampler == "sde_sbdm" and last_step not in LAST_STEPS:
        raise ValueError(f"sample.last_step: unknown last step {last_step!r}; valid: {', '.join(LAST_STEPS)}")
    grid = time_grid(steps, shift, t_start=t_start, t_end=t_end, dtype=torch.float64)
    sbdm = sampler == "sde_sbdm"
    return SamplingPlan(sampler, steps, float(shift), float(t_start), float(t_end), grid, t_end if sbdm else None,
                        last_step if sbdm else None)


def sample_shift(sample_cfg: Any, latent_shape: Sequence[int] | None = None) -> float:
    """The grid shift of a :class:`~pae_fast.config.SampleConfig`: ``sample.shift``, or with
    ``sample.dimension_shift`` RAE's rule ``1/α``, ``α = sqrt(C·H·W / 4096)`` of the generator's latent shape
    (:func:`~pae_fast.flow.timesteps.dimension_shift`; docs/method.md § Flow matching).

    Raises:
        ValueError: ``sample.dimension_shift`` without a latent shape.
    """
    if not getattr(sample_cfg, "dimension_shift", False):
        return sample_cfg.shift
    if latent_shape is None:
        raise ValueError("sample.dimension_shift=true derives the shift from the latent shape, which is not known here")
    return dimension_shift(math.prod(latent_shape))


def plan_from_config(sample_cfg: Any, latent_shape: Sequence[int] | None = None) -> SamplingPlan:
    """:func:`sampling_plan` of a :class:`~pae_fast.config.SampleConfig` (``sampler``, ``steps``, ``shift`` or
    ``dimension_shift`` with ``latent_shape`` (C, H, W) (:func:`sample_shift`), ``t_start``, ``t_end``,
    ``last_step``)."""
    return sampling_plan(sample_cfg.sampler, sample_cfg.steps, sample_shift(sample_cfg, latent_shape),
                         sample_cfg.t_start, sample_cfg.t_end, sample_cfg.last_step)
