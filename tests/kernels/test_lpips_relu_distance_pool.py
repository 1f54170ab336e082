"""lpips_relu_distance_pool: an LPIPS stage's last ReLU, its distance to a detached anchor and the next 2x2 max-pool in
one op, against its reference (``lpips_relu_distance_ref`` then ``maxpool2x2_ref``) and against the two fused ops it
replaces: all three outputs and the input gradient through each, odd shapes (partial windows), ties, both layouts,
fp32 and fp16."""

import functools

import pytest
import torch

from pae_fast.kernels import (
    OPS,
    lpips_relu_distance,
    lpips_relu_distance_pool,
    lpips_relu_distance_pool_ref,
    maxpool2x2,
    maxpool2x2_ref,
)
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches, feature_maps, lin_head

OP = OPS["lpips_relu_distance_pool"]


_pre = feature_maps  # pre-activations: either sign
_anchor = functools.partial(feature_maps, seed=1, relu_shift=0.05)  # a detached stage feature: non-negative
_head = functools.partial(lin_head, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("C", [3, 5, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_three_outputs_and_the_input_gradient_odd_shapes(C, channels_last):
    """H, W = 7, 9: the last row and column get ReLU, distance and gradient but no pool; upstream gradients on y, d
    and p at once (fp64 reference)."""
    x = _pre(2, C, 7, 9, channels_last, seed=C).requires_grad_(True)
    b = _anchor(2, C, 7, 9, channels_last, seed=C + 1)
    assert_op_matches(lpips_relu_distance_pool, lpips_relu_distance_pool_ref, (x, b, _head(C)), {}, atol=1e-5,
                      rtol=1e-5, ref_dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_the_two_fused_ops_it_replaces(channels_last):
    """As the trunk uses it (p feeds the next layer, d the loss, y nothing with grad): outputs bit-equal to
    ``lpips_relu_distance`` then ``maxpool2x2``, the input gradient equal up to summation order. Pre-activations in
    {-1, 1, 2} make ties among positive values in most windows: a gradient routed to the wrong element would differ
    by O(1)."""
    g = torch.Generator().manual_seed(5)
    x = torch.tensor([-1.0, 1.0, 2.0])[torch.randint(0, 3, (2, 5, 7, 9), generator=g)]
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    b, w = _anchor(2, 5, 7, 9, channels_last), _head(5)
    gp, gd = torch.randn(2, 5, 3, 4, generator=g), torch.tensor([0.7, -1.3])
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, d1, p1 = lpips_relu_distance_pool(x1, b, w, backend="triton")
    torch.autograd.backward((d1, p1), (gd, gp))
    y2, d2 = lpips_relu_distance(x2, b, w, backend="triton")
    p2 = maxpool2x2(y2, backend="triton")
    torch.autograd.backward((d2, p2), (gd, gp))
    assert torch.equal(y1, y2) and torch.equal(p1, p2) and torch.equal(p1, maxpool2x2_ref(y2))
    assert p1.is_contiguous(memory_format=torch.channels_last) == channels_last and y1.stride() == x.stride()
    torch.testing.assert_close(d1, d2, rtol=1e-6, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)
    assert x1.grad[:, :, 6, :].abs().sum() > 0  # the unpooled last row still gets the distance's gradient


def test_fp16_input():
    x = _pre(2, 64, 5, 6, True, torch.float16).requires_grad_(True)
    b = _anchor(2, 64, 5, 6, True, torch.float16)
    assert_op_matches(lpips_relu_distance_pool, lpips_relu_distance_pool_ref, (x, b, _head(64)), {}, atol=2e-3,
                      rtol=2e-3)  # fmt: skip


def test_only_the_distance_or_only_the_pool_used():
    """Unused outputs give no gradient (``g_p`` / ``g_d`` absent): each path alone matches the reference."""
    b, w = _anchor(2, 5, 4, 6), _head(5)
    for pick in (1, 2):
        xa = _pre(2, 5, 4, 6, seed=7).requires_grad_(True)
        xb = xa.detach().clone().requires_grad_(True)
        lpips_relu_distance_pool(xa, b, w, backend="triton")[pick].sum().backward()
        lpips_relu_distance_pool_ref(xb, b, w)[pick].sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)


def test_bad_input():
    x, b, w = _pre(2, 5, 1, 4), _anchor(2, 5, 1, 4), _head(5)
    with pytest.raises(ValueError, match="H and W must be >= 2"):
        lpips_relu_distance_pool(x, b, w)
    with pytest.raises(ValueError, match="lpips_relu_distance_pool: the anchor b .* pass them detached"):
        lpips_relu_distance_pool(_pre(2, 5, 4, 4), _anchor(2, 5, 4, 4).requires_grad_(True), w)


def test_meta_device_forward_backward():
    x = torch.empty(2, 64, 9, 8, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.empty(2, 64, 9, 8, device="meta").contiguous(memory_format=torch.channels_last)
    y, d, p = lpips_relu_distance_pool(x, b, torch.empty(64, device="meta"), backend="triton")
    assert y.shape == x.shape and d.shape == (2,) and p.shape == (2, 64, 4, 4)
    assert p.is_contiguous(memory_format=torch.channels_last) and d.dtype == torch.float32
    (d.sum() + p.sum()).backward()
    assert x.grad.shape == x.shape
