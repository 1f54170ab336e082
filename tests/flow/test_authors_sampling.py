"""Sampling exactly as the authors do: PAE's ODE grid, PAE's no-guidance SBDM SDE, RAE's time convention and grid.

The toys are Gaussian data ``x1 ~ N(mu, Sigma)``, where the flow's velocity is exact in closed form
(see tests/flow/test_samplers.py): ``v(x, t) = mu + (t·Sigma − (1 − t)·I)·S_t⁻¹·(x − t·mu)``,
``S_t = t²·Sigma + (1 − t)²·I``.
"""

from pathlib import Path

import pytest
import torch

from pae_fast.config import load_config
from pae_fast.flow import (
    AutoGuidance,
    ClassifierFreeGuidance,
    RAETimeConvention,
    convention_for,
    euler,
    plan_from_config,
    resolve_time_convention,
    sample,
    sampling_plan,
    shift_time,
    wrap_time_convention,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)


def _velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact velocity of the linear path (t = 1 data) for N(MU, SIGMA) data; ``x (B, 2)``, ``t (B,)``."""
    tt = t.to(torch.float64).view(-1, 1, 1)
    eye = torch.eye(2, dtype=torch.float64)
    s_t = tt**2 * SIGMA + (1 - tt) ** 2 * eye
    a = (tt * SIGMA - (1 - tt) * eye) @ torch.linalg.inv(s_t)
    return MU + (a @ (x - tt[:, :, 0] * MU).unsqueeze(-1)).squeeze(-1)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.batches = fn, 0, []

    def __call__(self, x, t, *rest):
        self.calls += 1
        self.batches.append(x.shape[0])
        return self.fn(x, t)


@pytest.mark.parametrize(
    "preset,start,guided", [("pae_lightningdit_xl1_80ep", 0.25, 135), ("pae_lightningdit_xl1_800ep", 0.3, None)]
)
def test_pae_preset_ode_grid_is_the_authors_and_makes_249_calls(preset, start, guided):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    plan = plan_from_config(cfg.sample)
    expected = shift_time(torch.linspace(0, 1, 250, dtype=torch.float64), 0.4)
    assert plan.grid.shape == (250,)
    torch.testing.assert_close(plan.grid, expected, atol=1e-6, rtol=0)
    assert plan.nfe == 249
    assert cfg.sample.cfg_interval_start == start
    # CFG doubles the batch of the calls whose start time is >= start: count them on a real CFG wrapper
    model = Counter(lambda x, t: _velocity(x, t))
    fn = ClassifierFreeGuidance(model, torch.zeros(4, dtype=torch.long), cfg.sample.cfg_scale, start, null_class=1000)
    x = torch.randn(4, 2, dtype=torch.float64)
    sample(
        fn,
        x,
        sampler=cfg.sample.sampler,
        steps=cfg.sample.steps,
        shift=cfg.sample.shift,
        t_start=cfg.sample.t_start,
        t_end=cfg.sample.t_end,
    )
    assert model.calls == 249
    n_guided = sum(b == 8 for b in model.batches)
    assert n_guided == plan.guided_calls(start) == int((expected[:-1].float() >= start).sum())
    if guided is not None:
        assert n_guided == guided  # the authors' 135 guided calls at 80 epochs


@pytest.mark.parametrize("preset", ["pae_lightningdit_xl1_80ep_sde", "pae_lightningdit_xl1_800ep_sde"])
def test_sde_presets_use_the_authors_grid(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert (cfg.sample.guidance, cfg.sample.sampler) == ("none", "sde_sbdm")
    plan = plan_from_config(cfg.sample)
    torch.testing.assert_close(plan.grid, shift_time(torch.linspace(1e-5, 0.996, 250, dtype=torch.float64), 0.4))
    assert plan.nfe == 250 and plan.final_time == 0.996


def test_sbdm_sde_reproduces_gaussian_data_in_250_calls():
    cfg = load_config(CONFIGS / "pae_lightningdit_xl1_80ep_sde.yaml")
    model = Counter(_velocity)
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(
        model,
        noise,
        sampler="sde_sbdm",
        steps=cfg.sample.steps,
        shift=cfg.sample.shift,
        t_start=cfg.sample.t_start,
        t_end=cfg.sample.t_end,
        generator=torch.Generator().manual_seed(1),
    )
    assert model.calls == 250
    mean_err = (x.mean(0) - MU).abs().max().item()
    cov_err = (torch.cov(x.T) - SIGMA).abs().max().item()
    assert mean_err < 0.03 and cov_err < 0.04, (mean_err, cov_err)


def test_sbdm_step_is_the_stated_update():
    """One EM step and the mean step, against the formulas written out."""
    x = torch.randn(3, 2, dtype=torch.float64)
    grid = torch.tensor([0.2, 0.5], dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = sample(_velocity, x, sampler="sde_sbdm", steps=1, t_start=0.2, t_end=0.5, generator=g1)
    t, dt = 0.2, 0.3
    v = _velocity(x, torch.full((3,), t))
    eps = torch.randn(x.shape, generator=g2, dtype=torch.float64)
    y = x + (2 * v - x / t) * dt + (2 * dt * (1 - t) / t) ** 0.5 * eps
    tm = 0.5
    score = (tm * _velocity(y, torch.full((3,), tm)) - y) / (1 - tm)
    torch.testing.assert_close(out, y / tm + (1 - tm) ** 2 / tm * score)
    assert grid[-1] == tm
    with pytest.raises(ValueError, match="t_start > 0"):
        sampling_plan("sde_sbdm", 10, 0.4, 0.0, 0.996)


# ------------------------------------------------------------------------------------------------------------------
# RAE's time convention: tau = 1 noise, x_tau = (1 - tau) x + tau eps, the network predicts u = eps - x
# ------------------------------------------------------------------------------------------------------------------


class RAEToyNet(torch.nn.Module):
    """Exact RAE-convention network for N(MU, SIGMA) data: ``u(x, tau) = E[eps − x | x_tau = x]`` (+ a label term)."""

    def forward(self, x: torch.Tensor, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = tau.to(torch.float64).view(-1, 1, 1)
        eye = torch.eye(2, dtype=torch.float64)
        c = (1 - tt) ** 2 * SIGMA + tt**2 * eye  # Cov(x_tau)
        b = (tt * eye - (1 - tt) * SIGMA) @ torch.linalg.inv(c)  # Cov(eps - x, x_tau) Cov(x_tau)^-1
        u = -MU + (b @ (x - (1 - tt[:, :, 0]) * MU).unsqueeze(-1)).squeeze(-1)
        return u + 0.01 * y.view(-1, 1).to(u.dtype)


def _rae_euler(net, x, y, alpha: float, num_steps: int = 50) -> torch.Tensor:
    """RAE's sampler written in RAE's time: Euler on shift_alpha(linspace(1, 1/1000, num_steps))."""
    tau = torch.linspace(1.0, 1.0 / 1000, num_steps, dtype=torch.float64)
    tau = alpha * tau / (1 + (alpha - 1) * tau)
    for t0, t1 in zip(tau[:-1], tau[1:]):
        x = x + (t1 - t0) * net(x, torch.full((x.shape[0],), float(t0), dtype=torch.float32), y)
    return x


def test_rae_wrapper_reproduces_raes_own_sampler():
    cfg = load_config(CONFIGS / "rae_ditdh_xl_released.yaml")
    assert convention_for(cfg.flow) == "rae"
    net = RAEToyNet()
    model = wrap_time_convention(net, convention_for(cfg.flow))
    assert isinstance(model, RAETimeConvention) and wrap_time_convention(model, "rae") is model
    plan = plan_from_config(cfg.sample)
    alpha = 6.928
    assert plan.nfe == 49 and plan.grid[-1].item() == pytest.approx(0.99311, abs=1e-5)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(64) % 3
    ours = euler(lambda x, t: model(x, t, y), x0, plan.grid)
    torch.testing.assert_close(ours, _rae_euler(net, x0, y, alpha), atol=2e-5, rtol=0)
    # the wrapped network is the velocity of our convention
    t = torch.full((64,), 0.3)
    torch.testing.assert_close(model(x0, t, 0 * y), _velocity(x0, t), atol=1e-6, rtol=0)
    # AutoGuidance with an RAE guide: the guided velocity is RAE's guided u, negated, in our time
    guide = RAEToyNet()
    ag = AutoGuidance(model, wrap_time_convention(guide, "rae"), y, 1.42)(x0, t)
    u = guide(x0, 1 - t, y) + 1.42 * (net(x0, 1 - t, y) - guide(x0, 1 - t, y))
    torch.testing.assert_close(ag, -u)


def test_time_convention_resolution():
    assert resolve_time_convention("pae") == "pae"
    assert resolve_time_convention("pae", {"time_convention": "rae"}) == "rae"  # metadata records the truth
    with pytest.raises(ValueError, match="records time_convention=pae"):
        resolve_time_convention("rae", {"time_convention": "pae"}, "ckpt.safetensors")
    with pytest.raises(ValueError, match="flow.time_convention"):
        resolve_time_convention("ddpm")
    with pytest.raises(ValueError, match="flow.time_convention"):
        wrap_time_convention(RAEToyNet(), "ddpm")


@pytest.mark.parametrize(
    "preset,line",
    [
        ("pae_lightningdit_xl1_80ep", "euler: 249 model calls per image; grid shift(linspace(0, 1, 250), 0.4)"),
        ("pae_lightningdit_xl1_800ep", "euler: 249 model calls per image; grid shift(linspace(0, 1, 250), 0.4)"),
        ("pae_lightningdit_xl1_80ep_sde", "sde_sbdm: 250 model calls per image; grid shift(linspace(1e-05, 0.996, 250)"),  # noqa: E501
        ("rae_ditdh_xl_released", "euler: 49 model calls per image; grid shift(linspace(0, 0.999, 50), 0.14434)"),
    ],
)
def test_sample_dry_run_shows_the_authors_grid(preset, line, capsys):
    from pae_fast.cli import main

    assert main(["sample", "--config", str(CONFIGS / f"{preset}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"# sampling plan: {line}" in out
    assert main(["sample", "--config", str(CONFIGS / f"{preset}.yaml"), "--sample.t_start", "2", "--dry-run"]) == 2
    assert "sample.t_start" in capsys.readouterr().err
