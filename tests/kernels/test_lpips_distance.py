"""lpips_distance: the fused LPIPS stage distance against its reference and a written-out formula, forward and both
gradients, fp32 and fp16, odd channel counts and prime pixel counts, contiguous, channels-last and strided inputs."""

import functools

import pytest
import torch

from pae_fast.kernels import OPS, lpips_distance, lpips_distance_ref, use_backend
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches, feature_maps, lin_head

OP = OPS["lpips_distance"]


_feats = functools.partial(feature_maps, relu_shift=0.05)  # LPIPS features: non-negative, no all-zero pixel
_head = lin_head


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("C", [3, 5, 64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_both_grads_odd_shapes(C, channels_last, dtype):
    """H * W = 77 (7 x 11, prime factors only), odd C, both layouts; the reference in fp64."""
    a = _feats(3, C, 7, 11, channels_last, dtype, seed=C).requires_grad_(True)
    b = _feats(3, C, 7, 11, channels_last, dtype, seed=C + 1).requires_grad_(True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_op_matches(lpips_distance, lpips_distance_ref, (a, b, _head(C)), {}, atol=tol, rtol=tol,
                      ref_dtype=torch.float64)  # fmt: skip


def test_output_is_fp32_and_grads_keep_dtype_and_layout():
    a = _feats(2, 5, 7, 11, True, torch.float16).requires_grad_(True)
    b = _feats(2, 5, 7, 11, False, torch.float16, seed=3).requires_grad_(True)
    d = lpips_distance(a, b, _head(5), backend="triton")
    assert d.dtype == torch.float32 and d.shape == (2,)
    d.sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float16
    assert a.grad.is_contiguous(memory_format=torch.channels_last) and b.grad.is_contiguous()


def test_reference_is_the_formula():
    """d[n] = mean_{h,w} sum_c w_c (a_c / (||a|| + 1e-10) - b_c / (||b|| + 1e-10))^2, pixel by pixel in Python."""
    a, b, w = _feats(2, 3, 2, 3).double(), _feats(2, 3, 2, 3, seed=5).double(), _head(3).double()
    d = lpips_distance_ref(a, b, w)
    for n in range(2):
        total = 0.0
        for h in range(2):
            for x in range(3):
                na = sum(float(a[n, c, h, x]) ** 2 for c in range(3)) ** 0.5 + 1e-10
                nb = sum(float(b[n, c, h, x]) ** 2 for c in range(3)) ** 0.5 + 1e-10
                total += sum(float(w[c]) * (float(a[n, c, h, x]) / na - float(b[n, c, h, x]) / nb) ** 2
                             for c in range(3))  # fmt: skip
        assert float(d[n]) == pytest.approx(total / 6, rel=1e-12)


def test_swapping_a_and_b_keeps_d_but_changes_the_grads():
    """d is symmetric in (a, b); da and db are not each other's negatives' swap unless w is constant: the kernel must
    route each gradient to its own input."""
    a0, b0, w = _feats(2, 5, 7, 11), _feats(2, 5, 7, 11, seed=9) * 3, _head(5)
    assert w.std() > 0.1 * w.mean()

    def grads(x, y):
        x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        d = lpips_distance(x, y, w, backend="triton")
        (d * torch.tensor([1.0, -2.0])).sum().backward()
        return d.detach(), x.grad, y.grad

    d1, ga1, gb1 = grads(a0, b0)
    d2, ga2, gb2 = grads(b0, a0)
    torch.testing.assert_close(d1, d2, rtol=1e-6, atol=0)
    torch.testing.assert_close(ga1, gb2, rtol=1e-5, atol=1e-7)  # the gradient follows its tensor
    assert (ga1 - gb1).abs().max() > 1e-3  # and the two inputs get different gradients
    _, ga_ref, gb_ref = (lambda x, y: (None, *torch.autograd.grad(
        (lpips_distance_ref(x, y, w) * torch.tensor([1.0, -2.0])).sum(), (x, y))))(
        a0.clone().requires_grad_(True), b0.clone().requires_grad_(True))  # fmt: skip
    torch.testing.assert_close(ga1, ga_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb1, gb_ref, rtol=1e-5, atol=1e-7)


def test_one_side_only_gets_its_gradient():
    a = _feats(2, 64, 7, 11, True).requires_grad_(True)
    b = _feats(2, 64, 7, 11, True, seed=4)  # an anchor (detached)
    lpips_distance(a, b, _head(64), backend="triton").sum().backward()
    ref = torch.autograd.grad(lpips_distance_ref(a, b, _head(64)).sum(), a)[0]
    torch.testing.assert_close(a.grad, ref, rtol=1e-5, atol=1e-7)
    assert b.grad is None


def test_all_zero_pixel_gives_the_finite_limit():
    """A ReLU feature vector of all zeros: the reference's autograd gives NaN there (sqrt at 0), the kernel the limit
    u / eps; elsewhere both agree."""
    a = _feats(1, 5, 3, 3).requires_grad_(False)
    a[0, :, 1, 2] = 0
    a.requires_grad_(True)
    b = _feats(1, 5, 3, 3, seed=2)
    w = _head(5)
    lpips_distance(a, b, w, backend="triton").sum().backward()
    assert torch.isfinite(a.grad).all()
    bn = b[0, :, 1, 2] / (b[0, :, 1, 2].norm() + 1e-10)
    expect = 2 * w * (0 - bn) / 9 / 1e-10  # u / eps, u = 2 w (0 - b̂) g / (H W)
    torch.testing.assert_close(a.grad[0, :, 1, 2], expect, rtol=1e-5, atol=0)
    ref = torch.autograd.grad(lpips_distance_ref(a, b, w).sum(), a)[0]
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.isnan(ref[0, :, 1, 2]).all()
    torch.testing.assert_close(a.grad[0][:, keep], ref[0][:, keep], rtol=1e-5, atol=1e-7)


def test_frozen_head_and_bad_inputs_are_refused():
    a, w = _feats(2, 5, 3, 3), _head(5)
    with pytest.raises(ValueError, match="frozen LPIPS lin weights"):
        lpips_distance(a, a, w.clone().requires_grad_(True))
    with torch.no_grad():  # no gradient is asked for: a head that requires grad is fine
        lpips_distance(a, a, w.clone().requires_grad_(True))
    with pytest.raises(ValueError, match=r"w must be \(C,\) = \(5,\)"):
        lpips_distance(a, a, _head(4))
    with pytest.raises(ValueError, match="one shape"):
        lpips_distance(a, a[:, :, :2], w)
    with pytest.raises(ValueError, match="share a dtype"):
        lpips_distance(a, a.half(), w)


def test_scope_switches_to_the_reference_exactly():
    a, b, w = _feats(2, 5, 3, 7), _feats(2, 5, 3, 7, seed=3), _head(5)
    with use_backend("torch"):
        assert torch.equal(lpips_distance(a, b, w), lpips_distance_ref(a, b, w))


def test_gradcheck_reference_float64():
    a = _feats(1, 3, 2, 3).double().requires_grad_(True)
    b = _feats(1, 3, 2, 3, seed=7).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: lpips_distance_ref(x, y, _head(3).double()), (a, b))


def test_meta_device_forward_backward():
    a = torch.empty(2, 64, 9, 9, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.empty(2, 64, 9, 9, device="meta", dtype=torch.float32)
    d = lpips_distance(a, b, torch.empty(64, device="meta"), backend="triton")
    assert d.shape == (2,) and d.dtype == torch.float32 and d.device.type == "meta"
    d.sum().backward()
    assert a.grad.shape == a.shape
