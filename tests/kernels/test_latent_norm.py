"""latent_norm: the template op against its reference, forward and every gradient, fp32 and fp16, odd shapes."""

import pytest
import torch

from pae_fast.kernels import OPS, latent_norm, latent_norm_ref, use_backend
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["latent_norm"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("shape", [(1, 257, 1152), (2, 3, 2048), (257, 32)])
def test_model_widths_and_odd_rows(shape):
    x = torch.randn(*shape, requires_grad=True)
    assert_op_matches(latent_norm, latent_norm_ref, (x,), {}, atol=1e-5, rtol=1e-5, ref_dtype=torch.float64)


def test_output_tokens_have_unit_rms():
    z = latent_norm(torch.randn(4, 16, 32) * 7, backend="triton")
    rms = z.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-5, rtol=0)


def test_scope_switches_to_the_reference_exactly():
    x = torch.randn(2, 7, 33)
    with use_backend("torch"):
        assert torch.equal(latent_norm(x), latent_norm_ref(x))


def test_gradcheck_reference_float64():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    m = torch.randn(6, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: latent_norm_ref(a, 1e-6, b, c), (x, m, s))


def test_meta_device_forward_backward():
    x = torch.empty(2, 257, 32, device="meta", requires_grad=True)
    y = latent_norm(x, backend="triton")
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"mean must have shape \(32,\)"):
        latent_norm(torch.randn(2, 32), mean=torch.zeros(31))
