"""Samplers against the closed-form flow of Gaussian data.

For data ``x1 ~ N(mu, Sigma)`` and independent noise ``x0 ~ N(0, I)`` on the linear path (t = 1 data),
``x_t ~ N(t·mu, S_t)`` with ``S_t = t²·Sigma + (1 − t)²·I``, and ``(x1 − x0, x_t)`` are jointly Gaussian with
``Cov(x1 − x0, x_t) = t·Sigma − (1 − t)·I``. Hence the marginal velocity is affine:

    v(x, t) = E[x1 − x0 | x_t = x] = mu + (t·Sigma − (1 − t)·I) · S_t⁻¹ · (x − t·mu).

All matrices are functions of Sigma and commute, so the ODE ``dx = v dt`` is solved by
``x(t) = t·mu + S_t^{1/2}·x0`` (differentiate: ``½·S_t^{-1/2}·Ṡ_t·x0 = (t·Sigma − (1 − t)·I)·S_t⁻¹·(x − t·mu)``):
the exact ODE map sends noise ``x0`` to ``mu + Sigma^{1/2}·x0``. The score is ``−S_t⁻¹·(x − t·mu)``.
"""

import pytest
import torch

from pae_fast.flow import (
    Trajectory,
    euler,
    euler_maruyama,
    heun,
    sample,
    score_from_velocity,
    time_grid,
    x1_from_velocity,
)


class GaussianFlow:
    """Exact velocity field of the linear path for N(mu, Sigma) data, Sigma = Q·diag(lam)·Qᵀ, in float64."""

    def __init__(self, mu: torch.Tensor, lam: torch.Tensor, q: torch.Tensor):
        self.mu, self.lam, self.q = mu, lam, q
        self.sigma = q @ torch.diag(lam) @ q.T

    @classmethod
    def random(cls, dim: int = 3, seed: int = 0) -> "GaussianFlow":
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        lam = torch.linspace(0.25, 2.0, dim, dtype=torch.float64)
        mu = torch.randn(dim, generator=g, dtype=torch.float64) * 1.5
        return cls(mu, lam, q)

    def _eig_apply(self, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return ((x @ self.q) * coef) @ self.q.T

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).view(-1, 1)
        a = (tt * self.lam - (1 - tt)) / (tt**2 * self.lam + (1 - tt) ** 2)  # (B, D) eigen-coefficients
        return self.mu + self._eig_apply(x - tt * self.mu, a)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).view(-1, 1)
        return -self._eig_apply(x - tt * self.mu, 1 / (tt**2 * self.lam + (1 - tt) ** 2))

    def posterior_x1(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).view(-1, 1)
        return self.mu + self._eig_apply(x - tt * self.mu, tt * self.lam / (tt**2 * self.lam + (1 - tt) ** 2))

    def ode_map(self, x0: torch.Tensor) -> torch.Tensor:
        return self.mu + self._eig_apply(x0, self.lam.sqrt())


def _noise(n: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _moments_close(x: torch.Tensor, flow: GaussianFlow, tol: float) -> None:
    mean_err = (x.mean(0) - flow.mu).abs().max().item()
    cov_err = (torch.cov(x.T) - flow.sigma).abs().max().item()
    assert mean_err < tol and cov_err < tol, f"mean error {mean_err:.4f}, covariance error {cov_err:.4f} (tol {tol})"


def test_closed_form_velocity_score_and_posterior_agree():
    flow = GaussianFlow.random()
    x, t = _noise(64, 3), torch.rand(64, dtype=torch.float64) * 0.98
    v = flow.velocity(x, t)
    torch.testing.assert_close(score_from_velocity(x, t, v), flow.score(x, t))
    torch.testing.assert_close(x1_from_velocity(x, t, v), flow.posterior_x1(x, t))
    # E[v(x_t, t)] = mu for x_t drawn from the path
    x1 = flow.ode_map(_noise(20000, 3, seed=2))
    x0 = _noise(20000, 3, seed=3)
    tt = torch.full((20000,), 0.37, dtype=torch.float64)
    vt = flow.velocity(0.37 * x1 + 0.63 * x0, tt)
    assert (vt.mean(0) - flow.mu).abs().max() < 0.05


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_transports_noise_to_the_data_moments(method):
    flow = GaussianFlow.random()
    x0 = _noise(20000, 3)
    x = sample(flow.velocity, x0, sampler=method, steps=100, shift=0.6)
    _moments_close(x, flow, tol=0.06)
    # per sample, the solution is the exact ODE map (Euler is first order: looser)
    rms = (x - flow.ode_map(x0)).pow(2).mean().sqrt().item()
    assert rms < (0.03 if method == "euler" else 1e-3), rms


def test_heun_beats_euler_and_both_converge_at_their_order():
    flow = GaussianFlow.random(dim=4, seed=5)
    x0 = _noise(512, 4)
    exact = flow.ode_map(x0)

    def err(fn, steps):
        return (fn(flow.velocity, x0, time_grid(steps, dtype=torch.float64)) - exact).pow(2).mean().sqrt().item()

    for steps in (5, 10, 20):
        assert err(heun, steps) < 0.25 * err(euler, steps)
    assert 1.6 < err(euler, 20) / err(euler, 40) < 2.5  # first order
    assert 3.0 < err(heun, 20) / err(heun, 40) < 5.0  # second order


def test_euler_maruyama_reaches_the_data_moments():
    flow = GaussianFlow.random(seed=7)
    x0 = _noise(20000, 3, seed=4)
    g = torch.Generator().manual_seed(11)
    x = euler_maruyama(flow.velocity, x0, time_grid(300, dtype=torch.float64), noise_scale=1.0, generator=g)
    _moments_close(x, flow, tol=0.08)
    assert (x - flow.ode_map(x0)).abs().mean() > 0.1  # it is stochastic, not the ODE map
    # eta = 0 is exactly the Euler ODE
    grid = time_grid(20, dtype=torch.float64)
    torch.testing.assert_close(euler_maruyama(flow.velocity, x0, grid, noise_scale=0.0), euler(flow.velocity, x0, grid))
    with pytest.raises(ValueError, match="noise scale"):
        euler_maruyama(flow.velocity, x0, grid, noise_scale=-1.0)


def test_trajectory_recording():
    flow = GaussianFlow.random()
    x0 = _noise(8, 3)
    grid = time_grid(6, 0.5, dtype=torch.float64)
    for fn in (euler, heun, euler_maruyama):
        traj = Trajectory()
        out = fn(flow.velocity, x0, grid, trajectory=traj)
        times, states, vels = traj.stacked()
        assert states.shape == (7, 8, 3) and vels.shape == (6, 8, 3) and times.shape == (7,)
        torch.testing.assert_close(times, grid)
        torch.testing.assert_close(states[0], x0)
        torch.testing.assert_close(states[-1], out)
        h = grid.diff().view(-1, 1, 1)
        if fn is not euler_maruyama:  # the SDE's increments also hold noise
            torch.testing.assert_close(states[1:] - states[:-1], h * vels)
    with pytest.raises(ValueError, match="empty"):
        Trajectory().stacked()


def test_nfe_and_grid_validation():
    calls = []

    def fn(x, t):
        calls.append(t.clone())
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        return torch.zeros_like(x)

    x = torch.randn(2, 3)
    sample(fn, x, sampler="euler", steps=7)
    assert len(calls) == 7 and calls[0][0] == 0
    calls.clear()
    sample(fn, x, sampler="heun", steps=7)
    assert len(calls) == 14 and calls[-1][0] == 1
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(fn, x, sampler="rk4", steps=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        euler(fn, x, torch.tensor([0.0, 0.5, 0.5, 1.0]))
