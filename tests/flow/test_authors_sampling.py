"""Sampling exactly as the authors do: PAE's ODE grid, PAE's no-guidance SBDM SDE, RAE's time convention and grid.

The toys are Gaussian data ``x1 ~ N(mu, Sigma)``, where the flow's velocity is exact in closed form
(see tests/flow/test_samplers.py): ``v(x, t) = mu + (t·Sigma − (1 − t)·I)·S_t⁻¹·(x − t·mu)``,
``S_t = t²·Sigma + (1 − t)²·I``.
"""

import math
from pathlib import Path

import pytest
import torch

from pae_fast.config import load_config
from pae_fast.flow import (
    AutoGuidance,
    ClassifierFreeGuidance,
    RAETimeConvention,
    apply_last_step,
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
    assert plan.nfe == 250 and plan.final_time == 0.996 and plan.last_step == "mean"


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
        last_step=cfg.sample.last_step,
        generator=torch.Generator().manual_seed(1),
    )
    assert model.calls == 250
    mean_err = (x.mean(0) - MU).abs().max().item()
    cov_err = (torch.cov(x.T) - SIGMA).abs().max().item()
    assert mean_err < 0.03 and cov_err < 0.04, (mean_err, cov_err)


def _naive_last_step(kind: str, x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """SiT's / PAE's ``transport.py`` ``__get_last_step`` written out for our path (alpha_t = t, sigma_t = 1 - t):
    step size h = 1 - t; ``Mean``: x + h * (drift + diffusion * score), the SBDM diffusion (1 - t)/t; ``Euler``:
    x + h * drift with the ODE drift v; ``Tweedie``: x / alpha + sigma^2 / alpha * score."""
    h = 1 - t
    score = (t * v - x) / (1 - t)
    if kind == "mean":
        return x + h * (v + (1 - t) / t * score)
    if kind == "euler":
        return x + h * v
    assert kind == "tweedie"
    return x / t + (1 - t) ** 2 / t * score


@pytest.mark.parametrize("kind", ["mean", "euler", "tweedie"])
def test_sbdm_steps_are_the_stated_updates(kind):
    """One EM step, then each last step, against the formulas written out (v and x differ, so swapping fails)."""
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 + 3
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    model = Counter(_velocity)
    out = sample(model, x, sampler="sde_sbdm", steps=1, t_start=0.2, t_end=0.5, last_step=kind, generator=g1)
    assert model.calls == 2  # one step + the last step
    t, dt = 0.2, 0.3
    v = _velocity(x, torch.full((3,), t))
    eps = torch.randn(x.shape, generator=g2, dtype=torch.float64)
    y = x + (2 * v - x / t) * dt + (2 * dt * (1 - t) / t) ** 0.5 * eps
    tm = 0.5
    vm = _velocity(y, torch.full((3,), tm))
    assert (vm - y).abs().min() > 0.1  # the velocity is not the state: a step using one for the other fails
    torch.testing.assert_close(out, _naive_last_step(kind, y, vm, tm), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="t_start > 0"):
        sampling_plan("sde_sbdm", 10, 0.4, 0.0, 0.996)


def test_last_step_formulas_at_the_authors_time():
    """At T = 0.996 (h = 0.004): Mean = x + h (2v - x/T); Euler and Tweedie agree (x + h v on this path) and differ
    from Mean by h (v - x/T); an unknown name is refused."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 8, dtype=torch.float64, generator=g), torch.randn(4, 8, dtype=torch.float64, generator=g)
    t = 0.996
    got = {k: apply_last_step(x, v, t, k) for k in ("mean", "euler", "tweedie")}
    for k, y in got.items():
        torch.testing.assert_close(y, _naive_last_step(k, x, v, t), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got["mean"], x + 0.004 * (2 * v - x / 0.996), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got["euler"], got["tweedie"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["mean"] - got["euler"], 0.004 * (v - x / t), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="sample.last_step"):
        apply_last_step(x, v, t, "posterior")
    with pytest.raises(ValueError, match="sample.last_step"):
        sampling_plan("sde_sbdm", 10, 0.4, 1e-5, 0.996, "Mean")


@pytest.mark.parametrize("preset", ["pae_lightningdit_xl1_80ep_sde", "pae_lightningdit_xl1_800ep_sde"])
def test_sde_presets_end_with_the_authors_mean_step_in_250_calls(preset):
    """The whole preset sampler = 249 EM steps + Mean, replayed by hand with the same noise."""
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert cfg.sample.last_step == "mean"
    x0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = Counter(_velocity)
    sc = cfg.sample
    out = sample(model, x0, sampler=sc.sampler, steps=sc.steps, shift=sc.shift, t_start=sc.t_start, t_end=sc.t_end,
                 last_step=sc.last_step, generator=torch.Generator().manual_seed(9))
    assert model.calls == 250
    grid = shift_time(torch.linspace(1e-5, 0.996, 250, dtype=torch.float64), 0.4).tolist()
    g, x = torch.Generator().manual_seed(9), x0
    for t0, t1 in zip(grid[:-1], grid[1:]):
        v = _velocity(x, torch.full((5,), t0))
        x = x + (2 * v - x / t0) * (t1 - t0) + (2 * (t1 - t0) * (1 - t0) / t0) ** 0.5 * torch.randn(
            x.shape, generator=g, dtype=torch.float64)
    ref = _naive_last_step("mean", x, _velocity(x, torch.full((5,), 0.996)), 0.996)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    other = sample(_velocity, x0, sampler=sc.sampler, steps=sc.steps, shift=sc.shift, t_start=sc.t_start,
                   t_end=sc.t_end, last_step="tweedie", generator=torch.Generator().manual_seed(9))
    assert (other - out).abs().max() > 1e-6  # the last step alone moves the sample, far beyond the replay error


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
    plan = plan_from_config(cfg.sample, (768, 16, 16))
    alpha = math.sqrt(768 * 16 * 16 / 4096)  # RAE: sqrt(C * H * W / 4096) of its latent
    assert plan.nfe == 49 and plan.grid[-1].item() == pytest.approx(0.99311, abs=1e-5)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(64) % 3
    ours = euler(lambda x, t: model(x, t, y), x0, plan.grid)
    torch.testing.assert_close(ours, _rae_euler(net, x0, y, alpha), atol=1e-6, rtol=0)
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
        ("pae_lightningdit_xl1_800ep_sde", "249 steps, then the mean last step x + h·(2v − x/t) at t = 0.996, h = 0.004"),  # noqa: E501
        ("rae_ditdh_xl_released", "euler: 49 model calls per image; grid shift(linspace(0, 0.999, 50), 0.144338)"),
    ],
)
def test_sample_dry_run_shows_the_authors_grid(preset, line, capsys):
    from pae_fast.cli import main

    assert main(["sample", "--config", str(CONFIGS / f"{preset}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan_line = next(x for x in out.splitlines() if x.startswith("# sampling plan: "))
    assert line in plan_line
    assert main(["sample", "--config", str(CONFIGS / f"{preset}.yaml"), "--sample.t_start", "2", "--dry-run"]) == 2
    assert "sample.t_start" in capsys.readouterr().err


class _ToyGenerator(torch.nn.Module):
    """A generator-shaped velocity ``v(x, t, y)`` whose value differs from ``x`` (float32, as sampling runs)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * x - 1.0 + 0.3 * t.view(-1, 1, 1, 1) + 0.01 * y.view(-1, 1, 1, 1).float()


@pytest.mark.parametrize("overrides", [
    {"sample.sampler": "sde_sbdm", "sample.t_start": 1e-5, "sample.t_end": 0.996, "sample.last_step": "euler"},
    {"sample.sampler": "sde_sbdm", "sample.t_start": 1e-5, "sample.t_end": 0.996},
    {"sample.dimension_shift": True},
])
def test_sample_stage_uses_the_configured_last_step_and_shift(overrides):
    """``generate_latents`` (the ``sample`` command) integrates with sample.last_step and the resolved shift."""
    from pae_fast.stages.sample import generate_latents, initial_noise

    base = {"sample.steps": 6, "sample.guidance": "none", "sample.batch_size": 4, "sample.seed": 3}
    sc = load_config(None, {**base, **overrides}).sample
    shape = (3, 2, 2)
    labels = torch.arange(4) % 2
    got = generate_latents(_ToyGenerator(), labels, shape, sc, progress=False)
    net = _ToyGenerator()
    ref = sample(lambda x, t: net(x, t, labels), initial_noise(3, range(4), shape), sampler=sc.sampler, steps=6,
                 shift=1 / math.sqrt(12 / 4096) if sc.dimension_shift else sc.shift, t_start=sc.t_start,
                 t_end=sc.t_end, last_step=overrides.get("sample.last_step", "mean"),
                 generator=torch.Generator().manual_seed(3 + 1))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
