"""lpips_relu_distance: an LPIPS stage's last ReLU fused with its distance to a detached anchor, against its
reference (``torch.relu`` then ``lpips_distance_ref``): both outputs and the input gradient through both, fp32 and
fp16, odd shapes and layouts, dead pixels, the last stage (nothing downstream of y)."""

import functools

import pytest
import torch

from pae_fast.kernels import OPS, lpips_distance_ref, lpips_relu_distance, lpips_relu_distance_ref, use_backend
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches, feature_maps, lin_head

OP = OPS["lpips_relu_distance"]


_pre = feature_maps  # pre-activations: either sign
_anchor = functools.partial(feature_maps, seed=1, relu_shift=0.05)  # a detached stage feature: non-negative
_head = functools.partial(lin_head, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("C", [3, 5, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_both_outputs_and_the_input_gradient_odd_shapes(C, channels_last):
    """H * W = 77, odd C, both layouts; upstream gradients on y (the next layer's) and on d (the loss's) at once."""
    x = _pre(3, C, 7, 11, channels_last, seed=C).requires_grad_(True)
    b = _anchor(3, C, 7, 11, channels_last, seed=C + 1)
    assert_op_matches(lpips_relu_distance, lpips_relu_distance_ref, (x, b, _head(C)), {}, atol=1e-5, rtol=1e-5,
                      ref_dtype=torch.float64)  # fmt: skip


def test_equals_relu_then_distance_with_both_gradients_added():
    """dx = [x > 0] (g_y + d lpips_distance / dy): the unfused trunk's two gradients of y, summed, through the ReLU."""
    x = _pre(2, 5, 7, 11, True).requires_grad_(True)
    b, w = _anchor(2, 5, 7, 11, True), _head(5)
    gy = torch.randn(2, 5, 7, 11)
    gd = torch.tensor([0.7, -1.3])
    y, d = lpips_relu_distance(x, b, w, backend="triton")
    torch.autograd.backward((y, d), (gy, gd))
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last) and d.dtype == torch.float32
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.relu(x2)
    torch.autograd.backward((y2, lpips_distance_ref(y2, b, w)), (gy, gd))
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-7)


def test_last_stage_without_downstream_and_dead_pixels():
    """Only d is used (the last stage): no g_y; a pixel with every channel negative gets a zero gradient (the reference
    gives 0 there too: the ReLU's backward masks the NaN of sqrt at 0)."""
    x = _pre(1, 5, 3, 3).requires_grad_(False)
    x[0, :, 1, 2] = -1.0
    x.requires_grad_(True)
    b, w = _anchor(1, 5, 3, 3), _head(5)
    lpips_relu_distance(x, b, w, backend="triton")[1].sum().backward()
    ref = torch.autograd.grad(lpips_relu_distance_ref(x, b, w)[1].sum(), x)[0]
    assert torch.isfinite(x.grad).all() and (x.grad[0, :, 1, 2] == 0).all()
    torch.testing.assert_close(x.grad, ref, rtol=1e-5, atol=1e-7)


def test_fp16_input():
    x = _pre(2, 64, 5, 3, True, torch.float16).requires_grad_(True)
    b = _anchor(2, 64, 5, 3, True, torch.float16)
    assert_op_matches(lpips_relu_distance, lpips_relu_distance_ref, (x, b, _head(64)), {}, atol=2e-3, rtol=2e-3)


def test_anchor_and_head_must_not_require_grad():
    x, b, w = _pre(2, 5, 3, 3), _anchor(2, 5, 3, 3), _head(5)
    with pytest.raises(ValueError, match="pass them detached"):
        lpips_relu_distance(x, b.clone().requires_grad_(True), w)
    with pytest.raises(ValueError, match="pass them detached"):
        lpips_relu_distance(x, b, w.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="share a dtype"):
        lpips_relu_distance(x, b.half(), w)


def test_scope_switches_to_the_reference_exactly():
    x, b, w = _pre(2, 5, 3, 7), _anchor(2, 5, 3, 7), _head(5)
    with use_backend("torch"):
        got = lpips_relu_distance(x, b, w)
    want = lpips_relu_distance_ref(x, b, w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_meta_device_forward_backward():
    x = torch.empty(2, 64, 9, 9, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y, d = lpips_relu_distance(x, torch.empty(2, 64, 9, 9, device="meta"), torch.empty(64, device="meta"),
                               backend="triton")  # fmt: skip
    assert y.shape == x.shape and d.shape == (2,) and d.dtype == torch.float32
    (y.sum() + d.sum()).backward()
    assert x.grad.shape == x.shape
