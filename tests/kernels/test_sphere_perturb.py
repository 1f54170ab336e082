"""sphere_perturb (MCR): the fused Philox kernels against the reference, and the geometry the loss relies on."""

import importlib
import math

import numpy as np
import pytest
import torch

from pae_fast.kernels import OPS, sphere_perturb, sphere_perturb_ref, use_backend
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["sphere_perturb"]
# the package exports the function under the module's name: fetch the module itself
sp_module = importlib.import_module("pae_fast.kernels.sphere_perturb")
ANGLES = (42.5, 85.0)


def _rms1(*shape, dtype=torch.float32):
    """RMS-normalised latent tokens, as the PAE projector emits them."""
    z = torch.randn(*shape, dtype=torch.float64)
    return (z / z.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype)


def _angles_deg(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z, y = z.double(), y.double()
    cos = (z * y).sum(-1) / (z.norm(dim=-1) * y.norm(dim=-1))
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_table_cases_match_reference(dtype):
    """(2,257,32) and (3,5,33) in both modes, non-contiguous, a tensor seed with three angles: outputs + grad z."""
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("mode", ["noise", "geodesic"])
def test_odd_width_rows_and_partial_use_of_outputs(mode):
    """C = 33, 257 tokens; gradient through only the large-angle output (the other gets a zero upstream grad)."""
    z = torch.randn(1, 257, 33, requires_grad=True)
    fused = lambda x, backend: sphere_perturb(x, seed=11, mode=mode, backend=backend)[1]  # noqa: E731
    ref = lambda x: sphere_perturb_ref(x, seed=11, mode=mode)[1]  # noqa: E731
    assert_op_matches(fused, ref, (z,), {}, ref_dtype=torch.float64)


def test_more_angles_than_one_launch():
    """Six angles: two kernel launches regenerate the same noise; outputs and the summed gradient match."""
    z = torch.randn(3, 7, 32, requires_grad=True)
    angles = (5.0, 20.0, 42.5, 60.0, 85.0, 89.0)
    for mode in ("noise", "geodesic"):
        assert_op_matches(sphere_perturb, sphere_perturb_ref, (z,), {"angles_deg": angles, "mode": mode, "seed": 2},
                          ref_dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("C", [32, 33])
def test_geodesic_angles_are_exact(C):
    z = _rms1(2, 257, C)
    outs = sphere_perturb(z, ANGLES, seed=1, mode="geodesic", backend="triton")
    for theta, y in zip(ANGLES, outs):
        err = (_angles_deg(z, y) - theta).abs().max().item()
        assert err < 0.05, f"theta={theta}: max angle error {err:.4f} deg"


@pytest.mark.parametrize("C", [32, 33])
def test_noise_mode_mean_angle(C):
    """The noise rule gives theta on average. Tolerance, derived: with e = (g along z, rest orthogonal), the angle is
    atan2(tan(theta) |e_perp| / sqrt(C), 1 + tan(theta) g / sqrt(C)), g ~ N(0, 1), |e_perp|^2 ~ chi2(C - 1). For
    C = 32 its mean is 42.02 / 84.97 deg (bias -0.48 / -0.03) and its per-token sd 5.9 / 10.2 deg, so the mean of
    4096 tokens has standard error 0.09 / 0.16 deg: |mean - theta| <= bias + 4 SE < 0.85 deg; we test 1 deg, and
    the tighter |mean - E[angle]| < 4 SE against that distribution (sampled here with numpy)."""
    z = _rms1(4096, C)
    outs = sphere_perturb(z, ANGLES, seed=123, mode="noise", backend="triton")
    rng = np.random.default_rng(0)
    g, p = rng.standard_normal(400_000), np.sqrt(rng.chisquare(C - 1, 400_000))
    for theta, y in zip(ANGLES, outs):
        phi = _angles_deg(z, y)
        t = math.tan(math.radians(theta))
        expected = np.degrees(np.arctan2(t * p / math.sqrt(C), 1 + t * g / math.sqrt(C))).mean()
        mean, se = phi.mean().item(), phi.std().item() / math.sqrt(phi.numel())
        assert abs(mean - theta) < 1.0, f"theta={theta}: mean angle {mean:.3f}"
        assert abs(mean - expected) < 4 * se, f"theta={theta}: mean {mean:.3f} vs expected {expected:.3f} (se {se:.3f})"
        assert 0.7 * (5.9 if theta < 60 else 10.2) < phi.std().item() < 1.3 * (5.9 if theta < 60 else 10.2)


@pytest.mark.parametrize("mode", ["noise", "geodesic"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_norm_preserved_and_outputs_coplanar_with_z_and_the_noise(mode, dtype, rtol):
    z = (torch.randn(2, 257, 32) * torch.rand(2, 257, 1) * 3).to(dtype)  # various token norms
    outs = sphere_perturb(z, ANGLES, seed=9, mode=mode, backend="triton")
    zn = z.double().norm(dim=-1)
    for y in outs:
        assert y.dtype == dtype and y.shape == z.shape
        torch.testing.assert_close(y.double().norm(dim=-1), zn, rtol=rtol, atol=0)
    if dtype == torch.float32:  # rank of [z_i, out1_i, out2_i] is 2, and the plane contains the noise e_i
        e = sp_module.sphere_perturb_noise(z.shape, 9).double()
        unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
        s = torch.linalg.svdvals(torch.stack([unit(z.double()), unit(outs[0].double()), unit(outs[1].double())], -2))
        assert (s[..., 2] / s[..., 0]).max() < 1e-5 and (s[..., 1] / s[..., 0]).min() > 0.05
        s4 = torch.linalg.svdvals(torch.stack([unit(z.double()), unit(e), unit(outs[0].double()),
                                               unit(outs[1].double())], -2))  # fmt: skip
        assert (s4[..., 2] / s4[..., 0]).max() < 1e-5


def test_seed_determinism_and_streams():
    z = torch.randn(3, 17, 32)
    a = sphere_perturb(z, seed=7, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, sphere_perturb(z, seed=7, backend="triton")))
    assert all((x - y).abs().max() > 0.1 for x, y in zip(a, sphere_perturb(z, seed=8, backend="triton")))
    # a 0-dim tensor seed draws the same stream as the int; the key's high 32 bits count
    assert all(torch.equal(x, y) for x, y in zip(a, sphere_perturb(z, seed=torch.tensor(7), backend="triton")))
    big = 2**40 + 7
    b = sphere_perturb(z, seed=big, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(b, sphere_perturb(z, seed=torch.tensor(big), backend="triton")))
    assert (b[0] - a[0]).abs().max() > 0.1
    # the noise of token r, channel c is tl.randn(seed, r * C + c): independent of leading dims and of the count
    e = sp_module.sphere_perturb_noise((6, 32), 5)
    torch.testing.assert_close(sp_module.sphere_perturb_noise((2, 3, 32), 5), e.view(2, 3, 32), rtol=0, atol=0)
    torch.testing.assert_close(sp_module.sphere_perturb_noise((4, 32), 5), e[:4], rtol=0, atol=0)


def test_torch_philox_emulation_matches_triton_stream():
    """The reference's fallback noise (no Triton) is Triton's Philox stream up to float32 rounding of log/cos."""
    for seed in (0, 5, 2**33 + 3):
        e_kernel = sp_module.sphere_perturb_noise((512, 33), seed)
        e_torch = sp_module._philox_randn_torch(torch.arange(512 * 33), seed).view(512, 33)
        torch.testing.assert_close(e_torch, e_kernel, rtol=0, atol=2e-6)
    assert abs(e_kernel.mean().item()) < 0.02 and abs(e_kernel.std().item() - 1) < 0.02


def test_reference_without_triton_matches_the_kernel(monkeypatch):
    z = torch.randn(2, 9, 33)
    fused = sphere_perturb(z, seed=4, backend="triton")
    monkeypatch.setattr(sp_module, "triton_unavailable_reason", lambda device=None: "no triton here")
    for x, y in zip(fused, sphere_perturb_ref(z, seed=4)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["noise", "geodesic"])
def test_reference_gradcheck_float64_with_fixed_noise(mode):
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: sphere_perturb_ref(x, ANGLES, mode=mode, noise=e), (z,))


def test_scope_switches_to_the_reference_exactly():
    z = torch.randn(2, 7, 33)
    with use_backend("torch"):
        for mode in ("noise", "geodesic"):
            got, ref = sphere_perturb(z, seed=3, mode=mode), sphere_perturb_ref(z, seed=3, mode=mode)
            assert all(torch.equal(x, y) for x, y in zip(got, ref))


def test_meta_device_forward_backward():
    z = torch.empty(2, 257, 32, device="meta", requires_grad=True)
    for mode in ("noise", "geodesic"):
        outs = sphere_perturb(z, ANGLES, seed=torch.tensor(3, device="meta"), mode=mode, backend="triton")
        assert len(outs) == 2 and all(o.shape == z.shape and o.device.type == "meta" for o in outs)
        (outs[0] * outs[1]).sum().backward()
        assert z.grad.shape == z.shape


def test_bad_arguments_have_clear_errors():
    z = torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown mode 'sphere'"):
        sphere_perturb(z, mode="sphere")
    with pytest.raises(ValueError, match=r"angle 90.0 deg out of range for mode='noise'; expected \[0, 90\)"):
        sphere_perturb(z, (42.5, 90.0))
    with pytest.raises(ValueError, match="angle -1.0 deg out of range for mode='geodesic'"):
        sphere_perturb(z, (-1.0,), mode="geodesic")
    with pytest.raises(ValueError, match="non-empty sequence of degrees"):
        sphere_perturb(z, ())
    with pytest.raises(TypeError, match="seed must be an int or a 0-dim integer tensor"):
        sphere_perturb(z, seed=1.5)
    with pytest.raises(ValueError, match="does not fit in 64 signed bits"):
        sphere_perturb(z, seed=2**64)
    with pytest.raises(ValueError, match="0-dim integer tensor"):
        sphere_perturb(z, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"C >= 2 channels, got \(4, 1\)"):
        sphere_perturb(torch.randn(4, 1))
