"""Linear path, posterior conversions, time sampling, timestep shift and time grids."""

import math
from pathlib import Path

import pytest
import torch

from pae_fast.config import load_config
from pae_fast.flow import (
    dimension_shift,
    expand_time,
    interpolate,
    sample_time,
    score_from_velocity,
    shift_time,
    time_grid,
    velocity_target,
    x0_from_velocity,
    x1_from_velocity,
)


def test_path_endpoints_and_velocity():
    x1, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(interpolate(x1, x0, torch.ones(3)), x1)  # t = 1 is data
    torch.testing.assert_close(interpolate(x1, x0, torch.zeros(3)), x0)  # t = 0 is noise
    t = torch.tensor([0.1, 0.5, 0.9])
    h = 1e-3
    fd = (interpolate(x1, x0, t + h) - interpolate(x1, x0, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x1, x0), atol=1e-3, rtol=1e-3)


def test_posterior_conversions_recover_endpoints_from_the_true_velocity():
    # With the exact per-sample velocity v = x1 - x0, the "posterior means" are the end points themselves.
    x1, x0 = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    xt, v = interpolate(x1, x0, t), velocity_target(x1, x0)
    torch.testing.assert_close(x0_from_velocity(xt, t, v), x0)
    torch.testing.assert_close(x1_from_velocity(xt, t, v), x1)
    torch.testing.assert_close(score_from_velocity(xt, t, v), -x0 / (1 - t.view(-1, 1, 1, 1)))


def test_bad_time_shapes_and_score_at_data_raise():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        expand_time(torch.rand(3), x)
    with pytest.raises(ValueError, match="shapes differ"):
        interpolate(torch.randn(2, 3), torch.randn(2, 4), 0.5)
    with pytest.raises(ValueError, match="undefined at t = 1"):
        score_from_velocity(x, torch.ones(4), x)


def test_shift_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert shift_time(t, 1.0) is t
    for s in (0.3, 0.7, 2.5):
        st = shift_time(t, s)
        assert st[0] == 0 and st[-1] == 1
        assert (st[1:] > st[:-1]).all()  # increasing
        torch.testing.assert_close(shift_time(st, 1 / s), t)  # 1/s undoes s
        torch.testing.assert_close(shift_time(shift_time(t, s), 1.7), shift_time(t, 1.7 * s))
    inner = t[1:-1]
    assert (shift_time(inner, 0.5) < inner).all()  # s < 1 moves toward noise
    assert (shift_time(inner, 2.0) > inner).all()
    with pytest.raises(ValueError, match="> 0"):
        shift_time(t, 0.0)


def test_rae_alpha_is_the_mirrored_shift():
    # RAE's shift alpha acts on u = 1 - t (its t = 1 is noise); mirrored it is our shift 1/alpha
    # (docs/method.md § Conventions).
    t = torch.linspace(0, 1, 33, dtype=torch.float64)
    alpha = 6.93
    rae = 1 - shift_time(1 - t, alpha)
    torch.testing.assert_close(rae, shift_time(t, 1 / alpha))
    cfg = load_config(None, {"flow.rae_alpha": alpha})
    assert cfg.flow.shift == pytest.approx(1 / alpha) and cfg.flow.rae_alpha is None


def test_dimension_shift():
    assert dimension_shift(32 * 16 * 16) == pytest.approx(1 / math.sqrt(2))  # PAE: alpha ~ 1.41, s ~ 0.707
    assert dimension_shift(768 * 16 * 16) == pytest.approx(1 / math.sqrt(48))  # RAE: alpha = sqrt(48)
    assert dimension_shift(4096) == 1.0
    with pytest.raises(ValueError):
        dimension_shift(0)


@pytest.mark.parametrize("preset", ["rae_ditdh_xl", "rae_ditdh_xl_released"])
def test_rae_presets_compute_alpha_from_the_latent_shape(preset):
    """RAE's alpha = sqrt(C * H * W / 4096) of its 768 x 16 x 16 latent, computed where the shift is resolved (training
    from the data's shape, sampling from the generator's), never typed in the preset."""
    from pae_fast.config_io import read_preset
    from pae_fast.flow.grid import plan_from_config, sample_shift
    from pae_fast.stages.train_generator import resolve_train_shift

    configs = Path(__file__).resolve().parents[2] / "configs"
    raw = read_preset(configs / f"{preset}.yaml")
    assert "rae_alpha" not in raw["flow"] and "shift" not in raw["flow"] and "shift" not in raw["sample"]
    cfg = load_config(configs / f"{preset}.yaml")
    assert cfg.flow.dimension_shift and cfg.sample.dimension_shift
    alpha = (768 * 16 * 16 / 4096) ** 0.5  # the naive formula
    assert abs(alpha - 6.928203230275509) < 1e-15
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    assert shape == (768, 16, 16)
    assert resolve_train_shift(cfg.flow, shape) == pytest.approx(1 / alpha, rel=1e-15)
    assert sample_shift(cfg.sample, shape) == pytest.approx(1 / alpha, rel=1e-15)
    # another latent shape gives another shift: nothing is a constant
    assert sample_shift(cfg.sample, (32, 16, 16)) == pytest.approx(1 / 2**0.5, rel=1e-15)
    grid = plan_from_config(cfg.sample, shape).grid
    tau = 1 - torch.linspace(0, 0.999, 50, dtype=torch.float64)  # RAE's own time, shifted by alpha, mirrored
    torch.testing.assert_close(grid, 1 - alpha * tau / (1 + (alpha - 1) * tau), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="latent shape"):
        plan_from_config(cfg.sample)
    # a PAE preset keeps its typed shifts (the authors' 0.7 and 0.4)
    pae = load_config(configs / "pae_lightningdit_xl1_80ep.yaml")
    assert resolve_train_shift(pae.flow, (32, 16, 16)) == 0.7 and sample_shift(pae.sample, (32, 16, 16)) == 0.4


def test_logit_normal_and_uniform_time_sampling():
    g = torch.Generator().manual_seed(0)
    t = sample_time(20000, method="logit_normal", logit_mean=0.5, logit_std=0.8, generator=g)
    assert t.shape == (20000,) and t.dtype == torch.float32
    logit = torch.logit(t.double().clamp(1e-12, 1 - 1e-12))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(0.8, abs=0.03)
    u = sample_time(20000, method="uniform", generator=torch.Generator().manual_seed(1))
    assert u.min() >= 0 and u.max() <= 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    # the shift is applied to the same draws
    a = sample_time(64, generator=torch.Generator().manual_seed(3))
    b = sample_time(64, shift=0.7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(b, shift_time(a, 0.7))
    with pytest.raises(ValueError, match="time_sampling"):
        sample_time(4, method="beta")
    with pytest.raises(ValueError, match="logit_std"):
        sample_time(4, logit_std=0.0)


def test_time_grid():
    g = time_grid(10)
    assert g.shape == (11,) and g[0] == 0 and g[-1] == 1
    torch.testing.assert_close(g, torch.linspace(0, 1, 11))
    gs = time_grid(250, 0.4)
    d = gs.diff()
    assert (d > 0).all() and d[0] < d[-1]  # s < 1: finer steps near noise
    torch.testing.assert_close(gs, shift_time(torch.linspace(0, 1, 251, dtype=torch.float64), 0.4).float())
    part = time_grid(4, t_start=0.2, t_end=0.6)
    torch.testing.assert_close(part, torch.tensor([0.2, 0.3, 0.4, 0.5, 0.6]))
    with pytest.raises(ValueError, match=">= 1"):
        time_grid(0)
    with pytest.raises(ValueError, match="t_start"):
        time_grid(4, t_start=0.8, t_end=0.2)
