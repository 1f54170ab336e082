"""swiglu: fused silu(a) * b (separate and packed) against its reference, forward and every gradient."""

import pytest
import torch

from pae_fast.kernels import OPS, swiglu, swiglu_ref, use_backend
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["swiglu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("width", [3072, 2048, 1])
def test_model_and_odd_widths(packed, width):
    # 3072 = int(2/3 * 4 * 1152): LightningDiT-XL's SwiGLU hidden width; 257 rows is not a multiple of any block
    rows = 257 if width < 2048 else 3
    if packed:
        args = (torch.randn(rows, 2 * width, requires_grad=True),)
    else:
        args = (torch.randn(1, rows, width, requires_grad=True), torch.randn(1, rows, width, requires_grad=True))
    assert_op_matches(swiglu, swiglu_ref, args, {}, atol=1e-5, rtol=1e-5, ref_dtype=torch.float64)


def test_packed_equals_split_halves():
    x = torch.randn(4, 9, 2 * 37)
    a, b = x.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(x, backend="triton"), swiglu(a.contiguous(), b.contiguous(), backend="triton"))
    torch.testing.assert_close(swiglu_ref(x), torch.nn.functional.silu(a) * b)


@pytest.mark.parametrize("which", ["a", "b"])
def test_gradient_to_a_subset_of_inputs(which):
    a = torch.randn(3, 5, 40, requires_grad=which == "a")
    b = torch.randn(3, 5, 40, requires_grad=which == "b")
    assert_op_matches(swiglu, swiglu_ref, (a, b), {}, atol=1e-5, rtol=1e-5, ref_dtype=torch.float64)
    y = swiglu(a, b, backend="triton")
    y.sum().backward()
    assert (a.grad is not None) == (which == "a") and (b.grad is not None) == (which == "b")


def test_packed_input_is_a_view_of_a_fused_projection():
    # the slice of a wider tensor (rows strided), as when the projection output carries extra columns
    w = torch.randn(2, 11, 2 * 24 + 5, requires_grad=True)
    assert_op_matches(lambda x, **kw: swiglu(x[..., 5:], **kw), lambda x: swiglu_ref(x[..., 5:]), (w,), {},
                      atol=1e-5, rtol=1e-5, ref_dtype=torch.float64)  # fmt: skip


def test_scope_switches_to_the_reference_exactly():
    x = torch.randn(2, 7, 66)
    with use_backend("torch"):
        assert torch.equal(swiglu(x), swiglu_ref(x))


def test_gradcheck_reference_float64():
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_ref, (a, b))


@pytest.mark.parametrize("packed", [True, False])
def test_meta_device_forward_backward(packed):
    a = torch.empty(2, 257, 2 * 3072 if packed else 3072, device="meta", dtype=torch.float16, requires_grad=True)
    b = None if packed else torch.empty(2, 257, 3072, device="meta", dtype=torch.float16, requires_grad=True)
    y = swiglu(a, b, backend="triton")
    assert y.shape == (2, 257, 3072) and y.dtype == torch.float16 and y.device.type == "meta"
    y.sum().backward()
    assert a.grad.shape == a.shape and (b is None or b.grad.shape == b.shape)


def test_min_bytes_counts_each_tensor_once():
    x = torch.empty(4, 2 * 8)  # 64 floats in, 32 out
    assert OP.min_bytes((x,), {}, False) == (64 + 32) * 4
    assert OP.min_bytes((x,), {}, True) == (64 + 32) * 4 + (32 + 64 + 64) * 4


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"even last dim"):
        swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"same shape"):
        swiglu(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"share dtype"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))


def test_bias_is_folded_in_and_its_gradient_summed_by_the_kernel():
    """swiglu(x, bias=b) == swiglu(x + b): the Linear's bias taken out of the GEMM; its gradient comes from the
    backward kernel's partial column sums (several row blocks per program, two programs under the interpreter)."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 2 * 48, requires_grad=True)
    bias = torch.randn(96, requires_grad=True)
    y = swiglu(x, bias=bias, backend="triton")
    torch.testing.assert_close(y, swiglu_ref(x + bias), atol=1e-6, rtol=1e-6)
    g = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, bias), g)
    rx, rb = torch.autograd.grad(swiglu_ref(x + bias), (x, bias), g)
    torch.testing.assert_close(dx, rx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(db, rb, atol=1e-5, rtol=1e-5)
    # only the bias needs a gradient
    (db2,) = torch.autograd.grad(swiglu(x.detach(), bias=bias, backend="triton"), (bias,), g)
    torch.testing.assert_close(db2, rb, atol=1e-5, rtol=1e-5)


def test_bias_errors_and_meta():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        swiglu(x, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="with b given"):
        swiglu(x, x, bias=torch.zeros(8))
    xm = torch.empty(4, 16, 2 * 24, device="meta", requires_grad=True)
    bm = torch.empty(48, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = swiglu(xm, bias=bm, backend="triton")
    assert y.shape == (4, 16, 24)
    y.sum().backward()
    assert xm.grad.shape == xm.shape and bm.grad.shape == bm.shape and bm.grad.dtype == torch.bfloat16
