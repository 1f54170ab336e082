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
    assert torch.autograd.gradcheck(lambda a: latent_norm_ref(a, 1e-6), (x,))


def test_reference_is_the_formula():
    """y_i = x_i / sqrt(mean_c x_i,c^2 + eps), token by token, written out."""
    x = torch.randn(4, 5, dtype=torch.float64)
    y = latent_norm_ref(x, 1e-3)
    for i in range(4):
        ms = sum(float(v) ** 2 for v in x[i]) / 5
        for c in range(5):
            assert float(y[i, c]) == pytest.approx(float(x[i, c]) / (ms + 1e-3) ** 0.5, rel=1e-12)


def test_meta_device_forward_backward():
    x = torch.empty(2, 257, 32, device="meta", requires_grad=True)
    y = latent_norm(x, backend="triton")
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape
