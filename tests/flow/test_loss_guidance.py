"""Flow-matching loss, the engine loss function, guidance and label schedules."""

import pytest
import torch
from torch import nn

from pae_fast.config import FlowConfig
from pae_fast.flow import (
    AutoGuidance,
    ClassifierFreeGuidance,
    FlowLoss,
    class_balanced_labels,
    conditional_velocity,
    flow_matching_loss,
    random_labels,
    shift_time,
)

# ------------------------------------------------------------------------------------------------ loss


def test_loss_values():
    v = torch.randn(4, 3, 5, 5)
    loss, terms = flow_matching_loss(v, v)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and set(terms) == {"mse", "cos"}
    loss, terms = flow_matching_loss(-v, v)  # opposite: mse = 4·E[v²], 1 - cos = 2
    assert terms["mse"].item() == pytest.approx(4 * v.pow(2).mean().item(), rel=1e-5)
    assert terms["cos"].item() == pytest.approx(2.0, abs=1e-5)
    loss, terms = flow_matching_loss(2 * v, v, cosine=False)  # same direction, MSE only
    assert set(terms) == {"mse"} and loss.item() == pytest.approx(v.pow(2).mean().item(), rel=1e-5)


def test_cosine_is_over_channels_per_position():
    # position a: v = (1, 0), v̂ = (1, 0) -> cos 1;  position b: v = (0, 1), v̂ = (2, 0) -> cos 0
    v = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, C=2, 1, 2)
    v_hat = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]]])
    _, terms = flow_matching_loss(v_hat, v)
    assert terms["cos"].item() == pytest.approx(0.5, abs=1e-6)  # a global cosine would give 1 - 1/sqrt(10)


def test_loss_gradient_and_fp32():
    v = torch.randn(2, 4, 3, 3)
    v_hat = torch.randn(2, 4, 3, 3, dtype=torch.float16, requires_grad=True)
    loss, _ = flow_matching_loss(v_hat, v)
    assert loss.dtype == torch.float32
    loss.backward()
    assert v_hat.grad is not None and torch.isfinite(v_hat.grad).all()
    with pytest.raises(ValueError, match="does not match"):
        flow_matching_loss(torch.randn(2, 4), torch.randn(2, 5))


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = None

    def forward(self, x, t, y):
        self.seen = (x, t, y)
        return x * self.w


def test_flow_loss_builds_the_path_and_calls_the_model():
    fl = FlowLoss.from_config(FlowConfig(), shift=0.5)
    assert fl.shift == 0.5 and fl.cosine and fl.time_sampling == "logit_normal"
    x1 = torch.randn(16, 4, 2, 2)
    t, xt, v = fl.sample_path(x1, generator=torch.Generator().manual_seed(0))
    assert t.shape == (16,) and ((t >= 0) & (t <= 1)).all()
    torch.testing.assert_close(xt, x1 - (1 - t.view(-1, 1, 1, 1)) * v)  # x_t = t·x1 + (1 - t)·x0 with v = x1 - x0
    model = _Recorder()
    y = torch.randint(0, 3, (16,))
    loss, terms = fl(model, (x1, y), step=0)
    x_seen, t_seen, y_seen = model.seen
    assert x_seen.shape == x1.shape and t_seen.shape == (16,) and torch.equal(y_seen, y)
    # a zero prediction: mse = E[v²] ≈ E[x1²] + 1 and 1 - cos(0, v) = 1
    assert terms["cos"].item() == pytest.approx(1.0)
    loss.backward()
    assert model.w.grad is not None
    with pytest.raises(TypeError, match=r"\(latents"):
        fl(model, x1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fl(model, (torch.randn(4, 3), y[:4]))


def test_flow_loss_time_distribution_uses_the_shift():
    fl = FlowLoss(time_sampling="uniform", shift=0.3)
    g = torch.Generator().manual_seed(0)
    t, _, _ = fl.sample_path(torch.zeros(20000, 1, 1, 1), generator=g)
    # median of shift(U(0,1), s) is shift(0.5, s)
    assert t.median().item() == pytest.approx(shift_time(0.5, 0.3), abs=0.01)


# ------------------------------------------------------------------------------------------------ guidance


class _Affine(nn.Module):
    """v = x·(1 + y) + t, unconditional label = null_class; counts forward calls and batch sizes."""

    null_class = 9

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return x * (1 + y.float()).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def test_cfg_formula_interval_and_batching():
    m = _Affine()
    x, y = torch.randn(3, 2, 2, 2), torch.tensor([0, 1, 2])
    cfg = ClassifierFreeGuidance(m, y, scale=2.5, interval_start=0.25)
    t = torch.full((3,), 0.5)
    v_c, v_u = m(x, t, y), m(x, t, torch.full_like(y, 9))
    m.batches.clear()
    torch.testing.assert_close(cfg(x, t), v_u + 2.5 * (v_c - v_u))
    assert m.batches == [6]  # one batch of 2B
    m.batches.clear()
    early = torch.full((3,), 0.1)  # before the interval: plain conditional, one pass of B
    torch.testing.assert_close(cfg(x, early), m(x, early, y)[:3])
    assert m.batches[0] == 3
    mixed = torch.tensor([0.1, 0.3, 0.9])
    out = cfg(x, mixed)
    vc, vu = m(x, mixed, y), m(x, mixed, torch.full_like(y, 9))
    torch.testing.assert_close(out[0], vc[0])
    torch.testing.assert_close(out[1:], (vu + 2.5 * (vc - vu))[1:])
    # scale 1 is the conditional model, one pass
    m.batches.clear()
    torch.testing.assert_close(ClassifierFreeGuidance(m, y, 1.0)(x, t), conditional_velocity(m, y)(x, t))
    assert m.batches == [3, 3]


def test_cfg_guides_every_channel():
    """v = v_u + w (v_c - v_u) on EVERY channel of a 37-channel latent whose channels are each guided differently
    (guiding only the first channels, as the original LightningDiT did, fails here)."""

    class PerChannel(nn.Module):
        null_class = 9

        def forward(self, x, t, y):
            C = x.shape[1]
            k = torch.arange(1, C + 1, dtype=x.dtype).view(1, C, 1, 1)  # channel c depends on the label by c + 1
            return x * (1 + k * y.float().view(-1, 1, 1, 1) / C) + t.view(-1, 1, 1, 1) * k

    m = PerChannel()
    x, y = torch.randn(2, 37, 2, 3), torch.tensor([1, 4])
    t = torch.full((2,), 0.6)
    out = ClassifierFreeGuidance(m, y, scale=3.0)(x, t)
    for c in range(37):
        xc, k = x[:, c], (c + 1) / 37
        v_c = xc * (1 + k * y.float().view(-1, 1, 1)) + 0.6 * (c + 1)
        v_u = xc * (1 + k * 9.0) + 0.6 * (c + 1)
        torch.testing.assert_close(out[:, c], v_u + 3.0 * (v_c - v_u), msg=f"channel {c}")
        assert float((v_c - v_u).abs().max()) > 0  # every channel really is guided


def test_cfg_errors():
    class NoNull(nn.Module):
        def forward(self, x, t, y):
            return x

    with pytest.raises(ValueError, match="null_class"):
        ClassifierFreeGuidance(NoNull(), torch.zeros(2, dtype=torch.long), 2.0)
    ClassifierFreeGuidance(NoNull(), torch.zeros(2, dtype=torch.long), 2.0, null_class=5)  # explicit is fine
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(_Affine(), torch.zeros(2, dtype=torch.long), 2.0, interval_start=0.8, interval_end=0.2)


def test_autoguidance():
    main, guide = _Affine(), _Affine()
    x, y, t = torch.randn(2, 1, 2, 2), torch.tensor([1, 3]), torch.full((2,), 0.4)
    vm = main(x, t, y)
    vg = x * 0.5 + t.view(-1, 1, 1, 1) * 2  # a different guide
    guide.forward = lambda x, t, y: x * 0.5 + t.view(-1, 1, 1, 1) * 2
    torch.testing.assert_close(AutoGuidance(main, guide, y, 1.42)(x, t), vg + 1.42 * (vm - vg))
    torch.testing.assert_close(AutoGuidance(main, guide, y, 1.0)(x, t), vm)
    torch.testing.assert_close(AutoGuidance(main, guide, y, 3.0, interval_start=0.5)(x, t), vm)


def test_label_schedules():
    y = class_balanced_labels(10, 50)
    assert y.shape == (500,) and y.dtype == torch.long
    assert torch.equal(torch.bincount(y), torch.full((10,), 50))
    assert torch.equal(y[:50], torch.zeros(50, dtype=torch.long))
    ys = class_balanced_labels(10, 50, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ys.sort().values, y) and not torch.equal(ys, y)
    r = random_labels(1000, 7, generator=torch.Generator().manual_seed(0))
    assert r.min() >= 0 and r.max() <= 6 and len(r.unique()) == 7
    with pytest.raises(ValueError):
        class_balanced_labels(0, 5)
