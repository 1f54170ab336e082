"""ODE and SDE samplers for the linear path (t = 0 noise → t = 1 data), with optional trajectory recording.

A sampler integrates a *velocity function* ``fn(x (B, ...), t (B,)) -> v`` (a model with its labels and
guidance bound, see :mod:`pae_fast.flow.guidance`) over an increasing time grid
(:func:`pae_fast.flow.grid.sampling_plan`).

- **Euler** (1 NFE / step) and **Heun** (2 NFE / step, second order) solve the probability-flow ODE
  ``dx = v(x, t) dt``.
- **Euler–Maruyama** solves the reverse-time SDE family that has the same marginals ``p_t`` as the ODE
  (Song et al., ICLR 2021, "Score-Based Generative Modeling through SDEs": adding ``½g²∇log p_t`` to the drift and
  ``g dW`` noise leaves the Fokker–Planck equation unchanged)::

      dx = [v(x, t) + ½ g(t)² ∇log p_t(x)] dt + g(t) dW,   g(t)² = 2η(1 − t)

  with the score from the velocity, ``∇log p_t = (t·v − x)/(1 − t)`` (:func:`score_from_velocity`). This is SiT's
  SDE sampler with diffusion coefficient ``w_t = η·σ_t = η(1 − t)`` (Ma et al., 2024, §2), the sampler
  LightningDiT uses without guidance. The ``(1 − t)`` cancels, so the drift is finite at t = 1:
  ``v + η(t·v − x)``. The last step is taken without noise (SiT's "Mean" last step); η = 0 is Euler.
  Our own choice of SDE, kept because it is finite on all of [0, 1]; it is *not* the authors' sampler.
- **SBDM SDE** (:func:`sde_sbdm`, ``sampler: "sde_sbdm"``) is the SDE PAE's released code uses for its
  no-guidance numbers (docs/method.md § PAE no-guidance SDE): diffusion ``D(t) = (1 − t)/t`` (SiT's "SBDM" form,
  norm 1), drift ``f = v + D·score = 2v − x/t``, Euler–Maruyama steps ``x ← x + f·dt + sqrt(2·D·dt)·ε`` on every
  interval of the grid, then one noise-free last step of size ``h = 1 − T`` at the *unshifted* end time ``T``
  (0.996 in PAE's runs), one of SiT's three (:func:`apply_last_step`): ``"mean"`` ``x + h·f(x, T)`` (the authors'
  presets), ``"euler"`` ``x + h·v(x, T)`` or ``"tweedie"`` ``x/T + ((1 − T)²/T)·score(x, T)``. The grid must
  avoid t = 0 and t = 1 (PAE: ``shift(linspace(1e-5, 0.996, 250))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from pae_fast.flow.grid import LAST_STEPS, LastStep, sampling_plan
from pae_fast.flow.path import score_from_velocity

__all__ = [
    "VelocityFn", "Trajectory", "euler", "heun", "euler_maruyama", "sde_sbdm", "sbdm_drift", "apply_last_step",
    "sample", "SAMPLERS",
]

# fn(x (B, ...), t (B,) float32) -> v (B, ...)
VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Trajectory:
    """The states and velocities visited by a sampler (for straightness / efficiency metrics).

    After a run over a K-step grid: ``times`` holds the K + 1 grid times, ``states`` the K + 1 states (first = the
    noise, last = the sample) and ``velocities`` the K steps' effective velocities ``(x_{k+1} − x_k) / h_k``
    (for Euler the model's velocity, for Heun the averaged slope, for Euler–Maruyama the drift).

    Attributes:
        device: where recorded tensors are stored (CPU by default, to keep accelerator memory free).
    """

    device: torch.device | str | None = "cpu"
    times: list[float] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)
    velocities: list[Tensor] = field(default_factory=list)

    def _keep(self, x: Tensor) -> Tensor:
        return x.detach().to(self.device, copy=True) if self.device is not None else x.detach().clone()

    def add_state(self, t: float, x: Tensor) -> None:
        self.times.append(float(t))
        self.states.append(self._keep(x))

    def add_velocity(self, v: Tensor) -> None:
        self.velocities.append(self._keep(v))

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``times (K + 1,)``, ``states (K + 1, B, ...)`` and ``velocities (K, B, ...)``."""
        if not self.states:
            raise ValueError("the trajectory is empty: pass it to a sampler first")
        return torch.tensor(self.times, dtype=torch.float64), torch.stack(self.states), torch.stack(self.velocities)


def _times(grid: Tensor) -> list[float]:
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"the time grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}")
    ts = grid.double().tolist()
    if any(b <= a for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError("the time grid must be strictly increasing (t = 0 noise -> t = 1 data)")
    return ts


def _tvec(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


def _steps(ts: list[float], progress: bool, desc: str):
    pairs = list(zip(ts[:-1], ts[1:]))
    from pae_fast.progress import is_terminal

    if progress and is_terminal():  # inner steps: a transient bar on a terminal, nothing in log files
        from tqdm import tqdm

        return tqdm(pairs, desc=desc, leave=False)
    return pairs


# one solver step: (x at t0, t0, t1, step index k) -> (x at t1, the step's effective velocity (x1 - x0) / h)
_Step = Callable[[Tensor, float, float, int], tuple[Tensor, Tensor]]


def _integrate(step: _Step, x: Tensor, ts: list[float], trajectory: Trajectory | None, progress: bool,
               desc: str) -> Tensor:
    """Run ``step`` over consecutive grid times ``ts``, recording each state and velocity in ``trajectory``."""
    if trajectory is not None:
        trajectory.add_state(ts[0], x)
    for k, (t0, t1) in enumerate(_steps(ts, progress, desc)):
        x, v = step(x, t0, t1, k)
        if trajectory is not None:
            trajectory.add_velocity(v)
            trajectory.add_state(t1, x)
    return x


@torch.no_grad()
def euler(
    fn: VelocityFn, x: Tensor, grid: Tensor, *, trajectory: Trajectory | None = None, progress: bool = False
) -> Tensor:
    """Explicit Euler for ``dx = v dt``: ``x ← x + h·v(x, t)``.

    Args:
        fn: velocity function.
        x: the noise at ``grid[0]``, ``(B, C, H, W)``.
        grid: increasing times ``(K + 1,)``.
        trajectory: optional recorder.
        progress: show a step progress bar.

    Returns:
        the state at ``grid[-1]``, shaped like ``x``.
    """

    def step(x: Tensor, t0: float, t1: float, k: int) -> tuple[Tensor, Tensor]:
        v = fn(x, _tvec(t0, x))
        return x + (t1 - t0) * v, v

    return _integrate(step, x, _times(grid), trajectory, progress, "euler")


@torch.no_grad()
def heun(
    fn: VelocityFn, x: Tensor, grid: Tensor, *, trajectory: Trajectory | None = None, progress: bool = False
) -> Tensor:
    """Heun's method (explicit trapezoid, 2 NFE / step): ``x ← x + h·(v(x, t) + v(x + h·v, t + h)) / 2``.

    Args and returns as :func:`euler`.
    """

    def step(x: Tensor, t0: float, t1: float, k: int) -> tuple[Tensor, Tensor]:
        h = t1 - t0
        v0 = fn(x, _tvec(t0, x))
        v1 = fn(x + h * v0, _tvec(t1, x))
        slope = 0.5 * (v0 + v1)
        return x + h * slope, slope

    return _integrate(step, x, _times(grid), trajectory, progress, "heun")


@torch.no_grad()
def euler_maruyama(
    fn: VelocityFn,
    x: Tensor,
    grid: Tensor,
    *,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
    trajectory: Trajectory | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler–Maruyama for ``dx = [v + η(t·v − x)] dt + sqrt(2η(1 − t)) dW`` (module docstring).

    Args:
        fn, x, grid, progress: as :func:`euler`.
        noise_scale: η ≥ 0 (SiT's ``diffusion_norm``; 0 gives the Euler ODE).
        generator: RNG for the Brownian increments.
        trajectory: optional recorder (velocities = drifts).

    Returns:
        the sample at ``grid[-1]``; the last step adds no noise.
    """
    if noise_scale < 0:
        raise ValueError(f"the SDE noise scale must be >= 0, got {noise_scale}")
    ts = _times(grid)
    last = len(ts) - 2

    def step(x: Tensor, t0: float, t1: float, k: int) -> tuple[Tensor, Tensor]:
        h = t1 - t0
        v = fn(x, _tvec(t0, x))
        # ½g²·score = η(1 − t)·(t·v − x)/(1 − t) = η(t·v − x): finite everywhere on [0, 1].
        drift = v + noise_scale * (t0 * v - x)
        x = x + h * drift
        if k < last and noise_scale > 0:
            dw = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = x + math.sqrt(2.0 * noise_scale * (1.0 - t0) * h) * dw
        return x, drift

    return _integrate(step, x, ts, trajectory, progress, "euler-maruyama")


def sbdm_drift(x: Tensor, t: float, v: Tensor) -> Tensor:
    """Drift of the SBDM reverse SDE on the linear path: ``f = v + D·score = 2v − x/t``.

    ``D(t) = (1 − t)/t`` and ``score = (t·v − x)/(1 − t)`` (:func:`~pae_fast.flow.path.score_from_velocity`):
    ``v + (t·v − x)/t = 2v − x/t`` (docs/method.md § PAE no-guidance SDE).
    """
    return 2.0 * v - x / t


def apply_last_step(x: Tensor, v: Tensor, t: float, kind: LastStep = "mean") -> Tensor:
    """The noise-free last step of :func:`sde_sbdm` from time ``t`` over ``h = 1 − t`` (SiT's ``last_step``).

    Args:
        x: the state at ``t``, ``(B, ...)``.
        v: the model's velocity ``v(x, t)``, same shape.
        t: the step's time, in (0, 1) (PAE: the unshifted end of the grid, 0.996; h = 0.004).
        kind: ``"mean"``: ``x + h·f(x, t)`` with ``f = 2v − x/t`` the reverse-SDE drift (:func:`sbdm_drift`; the
            authors' presets); ``"euler"``: ``x + h·v``, the ODE velocity; ``"tweedie"``: the posterior mean
            ``x/α_t + (σ_t²/α_t)·score`` with ``α_t = t``, ``σ_t = 1 − t`` (algebraically ``x + h·v`` again on this
            path, computed through the score as SiT does).

    Returns:
        the sample, shaped like ``x``.
    """
    if not 0.0 < t < 1.0:
        raise ValueError(f"the last step needs a time in (0, 1), got {t}")
    h = 1.0 - t
    if kind == "mean":
        return x + h * sbdm_drift(x, t, v)
    if kind == "euler":
        return x + h * v
    if kind == "tweedie":
        return x / t + (h**2 / t) * score_from_velocity(x, t, v)
    raise ValueError(f"sample.last_step: unknown last step {kind!r}; valid: {', '.join(LAST_STEPS)}")


@torch.no_grad()
def sde_sbdm(
    fn: VelocityFn,
    x: Tensor,
    grid: Tensor,
    *,
    final_time: float,
    last: LastStep = "mean",
    generator: torch.Generator | None = None,
    trajectory: Trajectory | None = None,
    progress: bool = False,
) -> Tensor:
    """PAE's no-guidance SDE: Euler–Maruyama with ``D(t) = (1 − t)/t``, then a noise-free last step (module docstring).

    Each interval ``[t, t + dt]`` of ``grid``: ``x ← x + (2v − x/t)·dt + sqrt(2·dt·(1 − t)/t)·ε`` (noise on every
    interval, the last included); then :func:`apply_last_step` ``last`` at ``T = final_time`` with ``h = 1 − T`` (the
    authors' ``Mean``: ``x ← x + h·(2v − x/T)``). Model calls: ``len(grid) − 1`` steps + 1.

    Args:
        fn, x, progress: as :func:`euler`.
        grid: increasing times ``(K + 1,)`` inside (0, 1).
        final_time: T of the last step, in (0, 1) (PAE: the unshifted end of the grid, 0.996).
        last: ``"mean"`` (the authors'), ``"euler"`` or ``"tweedie"`` (:func:`apply_last_step`).
        generator: RNG for the Brownian increments.
        trajectory: optional recorder (velocities = drifts; the last step's velocity ``v(x, T)`` and its result,
            recorded at t = 1).

    Returns:
        the sample.
    """
    ts = _times(grid)
    if not (ts[0] > 0.0 and ts[-1] < 1.0 and 0.0 < final_time < 1.0):
        raise ValueError(
            f"sde_sbdm needs grid times and final_time inside (0, 1) (D(t) = (1 - t)/t is singular at 0, the score "
            f"at 1), got grid [{ts[0]}, {ts[-1]}], final_time {final_time}; set sample.t_start > 0, sample.t_end < 1"
        )
    if last not in LAST_STEPS:
        raise ValueError(f"sample.last_step: unknown last step {last!r}; valid: {', '.join(LAST_STEPS)}")

    def step(x: Tensor, t0: float, t1: float, k: int) -> tuple[Tensor, Tensor]:
        h = t1 - t0
        drift = sbdm_drift(x, t0, fn(x, _tvec(t0, x)))
        dw = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x + h * drift + math.sqrt(2.0 * h * (1.0 - t0) / t0) * dw, drift

    x = _integrate(step, x, ts, trajectory, progress, "sde-sbdm")
    v = fn(x, _tvec(final_time, x))
    x = apply_last_step(x, v, final_time, last)
    if trajectory is not None:
        trajectory.add_velocity(v)
        trajectory.add_state(1.0, x)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "euler_maruyama": euler_maruyama,
    "sde_sbdm": sde_sbdm,
}


def sample(
    fn: VelocityFn,
    noise: Tensor,
    *,
    sampler: Literal["euler", "heun", "euler_maruyama", "sde_sbdm"] = "euler",
    steps: int = 249,
    shift: float = 1.0,
    t_start: float = 0.0,
    t_end: float = 1.0,
    noise_scale: float = 1.0,
    last_step: LastStep = "mean",
    generator: torch.Generator | None = None,
    trajectory: Trajectory | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrate from noise to data on the grid ``shift(linspace(t_start, t_end, steps + 1))``.

    The grid is :func:`pae_fast.flow.grid.sampling_plan`'s (which also counts the model calls): ``steps`` solver
    steps between ``steps + 1`` points. The authors' "250 sampling steps" are 250 points, i.e. ``steps=249``.

    Args:
        fn: velocity function ``fn(x, t) -> v``.
        noise: ``x0 ~ N(0, I)``, ``(B, C, H, W)``.
        sampler: ``"euler"``, ``"heun"``, ``"euler_maruyama"`` or ``"sde_sbdm"``.
        steps: number of solver steps K (model calls: K; 2K for Heun; K + 1 for sde_sbdm).
        shift: grid shift s (our convention; s < 1 spends more steps near noise).
        t_start: first grid time before the shift (0 = pure noise; sde_sbdm needs > 0).
        t_end: last grid time before the shift (1 = data; sde_sbdm needs < 1 and takes its final step there).
        noise_scale: η of ``euler_maruyama`` (unused by the other samplers).
        last_step: the last step of ``sde_sbdm`` (:func:`apply_last_step`; unused by the other samplers).
        generator: RNG of the SDE noise.
        trajectory: optional recorder.
        progress: show a step progress bar.

    Returns:
        samples ``(B, C, H, W)``.
    """
    plan = sampling_plan(sampler, steps, shift, t_start, t_end, last_step)
    grid = plan.grid  # CPU float64: the samplers read it as Python floats
    if sampler == "sde_sbdm":
        return sde_sbdm(fn, noise, grid, final_time=plan.final_time, last=last_step, generator=generator,
                        trajectory=trajectory, progress=progress)
    if sampler == "euler_maruyama":
        return euler_maruyama(
            fn, noise, grid, noise_scale=noise_scale, generator=generator, trajectory=trajectory, progress=progress
        )
    return SAMPLERS[sampler](fn, noise, grid, trajectory=trajectory, progress=progress)
