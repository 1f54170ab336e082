"""The comparison helpers fail loudly: an empty comparison or a case whose gradients reach nothing is a failure."""

import pytest
import torch

from pae_fast.kernels.tools.testing import CompareResult, assert_op_matches, compare_op


def _scale(x, backend=None):
    return x * 2


def test_matching_op_passes_and_compares_forward_and_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    res = compare_op(_scale, _scale, (x,), fused_kwargs={})
    assert res.ok
    assert [r.what for r in res.rows] == ["out[0]", "grad arg0"]


def test_empty_result_is_not_ok():
    res = CompareResult("nothing", [])
    assert not res.ok
    assert "nothing was compared" in res.report()


def test_no_output_tensors_fails():
    res = compare_op(lambda x, backend=None: None, lambda x: None, (torch.randn(3),), fused_kwargs={})
    assert not res.ok
    assert "neither side returned a tensor" in res.report()


def test_inputs_needing_grad_with_no_differentiable_output_fail():
    x = torch.randn(5, requires_grad=True)
    detached = lambda x, backend=None: x.detach() * 2  # noqa: E731
    res = compare_op(detached, detached, (x,), fused_kwargs={})
    assert not res.ok
    assert "no output carries a gradient" in res.report()
    with pytest.raises(AssertionError, match="nothing was compared"):
        assert_op_matches(detached, detached, (x,), fused_kwargs={})


def test_gradients_that_reach_no_input_fail():
    x, y = torch.randn(4, requires_grad=True), torch.randn(4)
    res = compare_op(lambda a, b, backend=None: b * 1.0 + 0 * a.detach(), lambda a, b: b * 1.0 + 0 * a.detach(),
                     (x, y.requires_grad_()), fused_kwargs={})  # fmt: skip
    assert res.ok  # y's gradient is compared
    only_x = lambda a, b, backend=None: (b * 2).requires_grad_()  # noqa: E731
    res = compare_op(only_x, only_x, (x, torch.randn(4)), fused_kwargs={})
    assert not res.ok and "every gradient is None" in res.report()


def test_no_grad_case_compares_only_outputs():
    res = compare_op(_scale, _scale, (torch.randn(3),), fused_kwargs={})
    assert res.ok and [r.what for r in res.rows] == ["out[0]"]


def test_atol_rms_scales_the_absolute_tolerance_by_the_reference_scale():
    """A sum over many rows (e.g. a GEMM weight gradient) of scale ~100 with a rounding error of 0.5 on a near-zero
    element: out of a fixed atol, within atol x RMS; tensors of RMS below 1 keep the plain atol."""
    ref = torch.full((64,), 100.0)
    ref[0] = 0.0
    got = ref.clone()
    got[0] = 0.5
    plain = compare_op(lambda: got, lambda: ref, (), atol=1e-2, rtol=1e-2, fused_kwargs={})
    scaled = compare_op(lambda: got, lambda: ref, (), atol=1e-2, rtol=1e-2, fused_kwargs={}, atol_rms=True)
    assert not plain.ok and scaled.ok
    small = torch.full((8,), 0.5)
    res = compare_op(lambda: small + 0.02, lambda: small, (), atol=1e-2, rtol=1e-2, fused_kwargs={}, atol_rms=True)
    assert not res.ok
