"""Fused ops hand GEMMs their autocast dtype: under autocast an fp32 residual stream gives a half-precision modulated
norm (no cast op after it), the residual stays fp32, half incoming gradients are accepted, and the fake (meta / fake
tensor) implementations report the same dtypes."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pae_fast import kernels
from pae_fast.kernels import OPS, adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref
from pae_fast.kernels._dispatch import counting_only, gemm_input_dtype
from pae_fast.kernels.tools.testing import assert_op_matches


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 9, 40, generator=g) * 2).requires_grad_()
    y = torch.randn(2, 9, 40, generator=g).half().requires_grad_()
    mods = [(torch.randn(2, 40, generator=g) * 0.5).half().requires_grad_() for _ in range(3)]
    w = (torch.randn(40, generator=g) * 0.1 + 1).requires_grad_()
    return x, y, mods, w


def test_gemm_input_dtype_follows_autocast():
    x = torch.zeros(2, 3)
    assert gemm_input_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_input_dtype(x) == torch.bfloat16
        assert gemm_input_dtype(x, torch.float16) == torch.float16
    assert gemm_input_dtype(torch.zeros(2, device="meta")) == torch.float32


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
def test_under_autocast_outputs_half_and_grads_match_reference(op):
    x, y, (gate, shift, scale), w = _inputs()
    with torch.autocast("cpu", dtype=torch.float16):
        if op == "adaln_modulate":
            h = adaln_modulate(x, shift, scale, weight=w, backend="triton")
            h_ref = adaln_modulate_ref(x, shift, scale, weight=w)
            r = None
        else:
            r, h = gated_residual_adaln(x, y, gate, shift, scale, weight=w, backend="triton")
            r_ref, h_ref = gated_residual_adaln_ref(x, y, gate, shift, scale, weight=w)
            assert r.dtype == r_ref.dtype == torch.float32
    assert h.dtype == h_ref.dtype == torch.float16
    torch.testing.assert_close(h, h_ref, atol=2e-3, rtol=2e-3)
    # half incoming gradient for h; the fp32 residual's gradient stays fp32
    loss = (h * torch.linspace(-1, 1, 40, dtype=torch.float16)).sum() + (r.sum() if r is not None else 0)
    loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32 and scale.grad.dtype == torch.float16


@pytest.mark.parametrize("name", ["adaln_modulate", "gated_residual_adaln"])
def test_mixed_case_matches_fp64_reference(name):
    """The op table's "fp32 x -> half" case (validate runs it too), forward and every gradient."""
    spec = OPS[name]
    atol, rtol = spec.tolerances[torch.float16]
    cases = [c for c in spec.cases("small", torch.device("cpu"), torch.float16) if c[0].startswith("fp32 x")]
    assert len(cases) == 1
    label, args, kwargs = cases[0]
    assert args[0].dtype == torch.float32 and kwargs["out_dtype"] == torch.float16
    res = assert_op_matches(spec.fn, spec.ref, args, kwargs, atol=atol, rtol=rtol, name=label, ref_dtype=torch.float64)
    assert any(r.what.startswith("grad") for r in res.rows)


@pytest.mark.parametrize("name", ["adaln_modulate", "gated_residual_adaln"])
def test_fake_implementations_report_autocast_dtypes(name):
    """Under FakeTensorMode (what torch.compile traces and the roofline counts) with bf16 autocast."""
    spec = OPS[name]
    with FakeTensorMode(allow_non_fake_inputs=True), counting_only():
        x = torch.empty(2, 16, 64, requires_grad=True)
        mods = [torch.empty(2, 64, requires_grad=True) for _ in range(3)]
        w = torch.empty(64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), kernels.use_backend("triton"):
            if name == "adaln_modulate":
                outs = [spec.fn(x, mods[1], mods[2], weight=w)]
            else:
                y = torch.empty(2, 16, 64, dtype=torch.bfloat16, requires_grad=True)
                outs = list(spec.fn(x, y, *mods, weight=w))
        assert outs[-1].dtype == torch.bfloat16
        assert all(o.dtype == torch.float32 for o in outs[:-1])  # the residual stream
        sum(o.float().sum() for o in outs).backward()
        assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
