"""attention: the backend registry (sdpa / flash_attn / xformers / math), its name mapping and SDPA vs the reference."""

import importlib.util

import pytest
import torch

from pae_fast.kernels import OPS, BackendUnavailable, attention, attention_ref, use_attention_backend, use_backend
from pae_fast.kernels.attention import DEFAULT_SDPA_ORDER, attention_backend_reasons, resolve_attention_backend
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["attention"]
_MOD = importlib.import_module("pae_fast.kernels.attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_matches_math_on_cases(dtype):
    assert_cases_match(OP, dtype, fused_kwargs={"backend": "sdpa"})


@pytest.mark.parametrize("hd", [72, 128])
def test_sdpa_vs_math_head_dims(hd):
    q, k, v = (torch.randn(2, 3, 33, hd, requires_grad=True) for _ in range(3))
    assert_op_matches(attention, attention_ref, (q, k, v), {}, atol=2e-5, rtol=2e-5, ref_dtype=torch.float64,
                      fused_kwargs={"backend": "sdpa"})  # fmt: skip


def test_math_reference_is_softmax_attention():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 3)
    w = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / 8**0.5, dim=-1)
    torch.testing.assert_close(attention_ref(q, k, v), torch.einsum("bhqk,bhkd->bhqd", w, v))
    assert attention(q, k, v, backend="math").shape == (1, 2, 5, 3)


def test_generic_names_map_to_attention_backends():
    q = torch.randn(1, 1, 2, 8)
    assert resolve_attention_backend("torch", q) == ("math", ())
    assert resolve_attention_backend("auto", q) == ("sdpa", DEFAULT_SDPA_ORDER)
    assert resolve_attention_backend("triton", q) == ("sdpa", ("flash",))
    assert resolve_attention_backend("sdpa:cudnn, efficient", q) == ("sdpa", ("cudnn", "efficient"))


def test_precedence_argument_scope_kernel_backend(monkeypatch):
    monkeypatch.setattr(_MOD, "_PROCESS", [None])
    q = torch.randn(1, 1, 2, 8)
    with use_backend("torch"):
        assert resolve_attention_backend(None, q)[0] == "math"
        with use_attention_backend("sdpa:efficient"):
            assert resolve_attention_backend(None, q) == ("sdpa", ("efficient",))
            assert resolve_attention_backend("math", q)[0] == "math"
    monkeypatch.setattr(_MOD, "_PROCESS", ["sdpa:cudnn"])
    with use_backend("torch"):
        assert resolve_attention_backend(None, q) == ("sdpa", ("cudnn",))


def test_torch_scope_gives_the_reference_exactly():
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    with use_backend("torch"):
        assert torch.equal(attention(q, k, v), attention_ref(q, k, v))
    with use_attention_backend("math"):
        assert torch.equal(attention(q, k, v), attention_ref(q, k, v))


@pytest.mark.parametrize("backend,package", [("flash_attn", "flash-attn"), ("xformers", "xformers")])
def test_unavailable_backends_name_the_missing_package(backend, package):
    q = torch.randn(1, 1, 4, 8)
    module = "flash_attn" if backend == "flash_attn" else "xformers"
    if importlib.util.find_spec(module) is None:
        with pytest.raises(BackendUnavailable, match=rf"{backend}.*the {package} package is not usable"):
            attention(q, q, q, backend=backend)
        assert package in attention_backend_reasons()[backend]
    else:  # installed (a GPU machine): CPU tensors are the reason it cannot run
        with pytest.raises(BackendUnavailable, match=r"CUDA tensors only"):
            attention(q, q, q, backend=backend)


def test_info_lists_every_attention_backend():
    reasons = OP.available_backends()
    assert {"sdpa", "flash_attn", "xformers", "math"} <= set(reasons)
    assert reasons["sdpa"] is None and reasons["math"] is None


def test_bad_names_and_shapes_are_clear():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*valid: sdpa, flash_attn"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match=r"unknown SDPA kernel.*valid kernels: flash, cudnn, efficient, math"):
        attention(q, q, q, backend="sdpa:fast")
    with pytest.raises(ValueError, match=r"backend 'math:flash'"), use_attention_backend("math:flash"):
        pass
    with pytest.raises(ValueError, match=r"batch and head dims must match"):
        attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match=r"q must be \(B, H, N, head_dim\)"):
        attention(q[0], q, q)


def test_meta_device_forward_backward():
    q, k, v = (torch.empty(2, 16, 256, 72, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa:flash", "sdpa:cudnn", "sdpa:efficient", "sdpa"])
@pytest.mark.parametrize("hd", [72, 128])
def test_pinned_sdpa_kernels_match_math_on_cuda(backend, hd):
    q, k, v = (torch.randn(2, 4, 256, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    atol, rtol = OP.tolerances[torch.bfloat16]
    assert_op_matches(attention, attention_ref, (q, k, v), {}, atol=atol, rtol=rtol, ref_dtype=torch.float64,
                      fused_kwargs={"backend": backend})  # fmt: skip


def test_fp32_on_cuda_with_only_half_precision_kernels_pinned_is_refused():
    # fake CUDA tensors: resolution only looks at device and dtype, so this runs without a GPU
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q16 = torch.empty(1, 2, 8, 72, device="cuda", dtype=torch.bfloat16)
        q32 = torch.empty(1, 2, 8, 72, device="cuda")
        assert resolve_attention_backend("triton", q16) == ("sdpa", ("flash",))
        assert resolve_attention_backend("auto", q32) == ("sdpa", DEFAULT_SDPA_ORDER)
        with pytest.raises(BackendUnavailable, match=r"'sdpa:flash,cudnn'.*need fp16/bf16 on CUDA"):
            resolve_attention_backend("sdpa:flash,cudnn", q32)
