"""adaln_modulate: fused norm + adaLN modulation against its reference, forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from pae_fast.kernels import OPS, adaln_modulate, adaln_modulate_ref, use_backend
from pae_fast.kernels import _adaln_common as common
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["adaln_modulate"]


def rnd(*shape, dtype=torch.float32, scale=1.0, offset=0.0, grad=True):
    return (torch.randn(*shape) * scale + offset).to(dtype).requires_grad_(grad)


def mod(kind, B, N, D, dtype=torch.float32):
    return None if kind is None else rnd(*((B, D) if kind == "sample" else (B, N, D)), dtype=dtype, scale=0.5)


def check(args, kwargs, dtype=torch.float32):
    atol, rtol = OP.tolerances[dtype]
    return assert_op_matches(adaln_modulate, adaln_modulate_ref, args, kwargs, atol=atol, rtol=rtol,
                             ref_dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_registered_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize(
    "B,N,D,norm,weight,shift,scale",
    [
        (1, 257, 1152, "rms", True, "sample", "sample"),  # LightningDiT trunk width, odd token count
        (1, 5, 2048, "rms", True, "token", "token"),  # DiT^DH head block
        (2, 5, 2048, "layer", False, "token", "sample"),  # mixed, LayerNorm
        (2, 5, 1152, "rms", False, "sample", "token"),  # mixed the other way
        (2, 257, 33, "layer", False, None, "sample"),  # wo_shift, odd width
        (1, 6, 72, "rms", True, None, "token"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_widths_norms_and_modulation_kinds(B, N, D, norm, weight, shift, scale, dtype):
    kw = {"norm": norm, "weight": rnd(D, dtype=dtype, scale=0.1, offset=1.0) if weight else None}
    check((rnd(B, N, D, dtype=dtype, scale=2.0, offset=0.3), mod(shift, B, N, D, dtype), mod(scale, B, N, D, dtype)),
          kw, dtype)  # fmt: skip


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_many_programs_per_sample_reduce_partial_sums(monkeypatch, norm):
    # small tiles: 9 row blocks of 4 tokens per sample, two programs looping over 5 blocks each (the last block of
    # the second program lies entirely past N)
    monkeypatch.setattr(common, "MAX_BLOCK_ELEMS", 256)
    B, N, D = 2, 35, 33
    from pae_fast.kernels._gated_residual_adaln_bwd import bwd_blocks

    assert common.fwd_blocks(N, D)[:3] == bwd_blocks(N, D)[:3] == (4, 32, 16)  # 33 = 32 + 16 lanes, 4 rows
    assert common.bwd_programs(B, 9, torch.device("cpu")) == (2, 5)
    kw = {"norm": norm, "weight": rnd(D, offset=1.0) if norm == "rms" else None}
    check((rnd(B, N, D), mod("sample", B, N, D), mod("sample", B, N, D)), kw)
    check((rnd(B, N, D), mod("token", B, N, D), mod("sample", B, N, D)), kw)


def test_reference_matches_torch_norms():
    B, N, D = 2, 7, 40
    x, shift, scale, w = rnd(B, N, D, grad=False), rnd(B, D, grad=False), rnd(B, D, grad=False), rnd(D, grad=False)
    want = F.rms_norm(x, (D,), w, eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(adaln_modulate_ref(x, shift, scale, w), want)
    want = F.layer_norm(x, (D,), eps=1e-5) * (1 + scale[:, None])
    torch.testing.assert_close(adaln_modulate_ref(x, None, scale, norm="layer", eps=1e-5), want)


def test_strided_inputs_and_chunked_modulation():
    B, N, D = 2, 9, 40
    xt = rnd(N, B, D, scale=2.0)
    ada = rnd(B, 3 * D)  # like Linear(SiLU(c)).chunk(3, dim=1): (B, D) views with row stride 3D
    ada_tok = rnd(B, N, 2 * D)  # per-token chunks with token stride 2D

    def fn(impl, backend):
        shift, scale, _ = ada.chunk(3, dim=1)
        return impl(xt.transpose(0, 1), shift, ada_tok[..., :D], weight=None, **backend)

    out = fn(adaln_modulate, {"backend": "triton"})
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (xt, ada, ada_tok), g)
    ref = fn(adaln_modulate_ref, {})
    ref_grads = torch.autograd.grad(ref, (xt, ada, ada_tok), g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert grads[1][:, 2 * D :].abs().max() == 0  # the unused chunk gets no gradient


def test_leading_dims_and_singleton_token_modulation():
    B, H, W, D = 2, 3, 5, 24
    check((rnd(B, H, W, D), rnd(B, 1, 1, D), rnd(B, H, W, D)), {"weight": rnd(D, offset=1.0)})


def test_mixed_dtypes_keep_x_dtype_and_input_grad_dtypes():
    B, N, D = 2, 5, 32
    x, shift, scale = rnd(B, N, D), rnd(B, D, dtype=torch.float16), rnd(B, N, D, dtype=torch.float16)
    out = adaln_modulate(x, shift, scale, backend="triton")
    assert out.dtype == torch.float32
    ref = adaln_modulate_ref(x, shift, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and shift.grad.dtype == scale.grad.dtype == torch.float16


@pytest.mark.parametrize(
    "shift,scale,weight", [("sample", "sample", True), ("token", "sample", False), (None, "token", True)]
)
def test_meta_device_forward_backward(shift, scale, weight):
    B, N, D = 2, 257, 1152
    meta = {"device": "meta", "requires_grad": True}
    x = torch.empty(B, N, D, **meta)
    mods = {k: None if v is None else torch.empty(*((B, D) if v == "sample" else (B, N, D)), **meta)
            for k, v in (("shift", shift), ("scale", scale))}  # fmt: skip
    w = torch.empty(D, **meta) if weight else None
    y = adaln_modulate(x, mods["shift"], mods["scale"], w, backend="triton")
    assert y.shape == x.shape and y.device.type == "meta" and y.dtype == x.dtype
    y.sum().backward()
    for t in (x, w, *mods.values()):
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape


def test_scope_switches_to_the_reference_exactly():
    x, shift, scale, w = rnd(2, 7, 33), rnd(2, 33), rnd(2, 7, 33), rnd(33)
    with use_backend("torch"):
        assert torch.equal(adaln_modulate(x, shift, scale, w), adaln_modulate_ref(x, shift, scale, w))
    assert torch.equal(adaln_modulate(x, None, scale, norm="layer", backend="torch"),
                       adaln_modulate_ref(x, None, scale, norm="layer"))  # fmt: skip


def test_compiles_fullgraph_with_autograd():
    x, shift, scale, w = rnd(2, 5, 16), rnd(2, 16), rnd(2, 16), rnd(16)
    fn = torch.compile(lambda *a: adaln_modulate(*a, backend="triton"), backend="aot_eager", fullgraph=True)
    out = fn(x, shift, scale, w)
    out.sum().backward()
    torch.testing.assert_close(out, adaln_modulate_ref(x, shift, scale, w), atol=1e-5, rtol=1e-5)
    assert x.grad is not None and w.grad is not None


def test_bad_inputs_raise_clear_errors():
    x, m = torch.randn(2, 5, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"scale must be per sample \(2, 8\) or per token \(2, 5, 8\)"):
        adaln_modulate(x, m, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"shift must be per sample"):
        adaln_modulate(x, torch.randn(3, 8), m)
    with pytest.raises(ValueError, match="norm must be one of rms, layer"):
        adaln_modulate(x, m, m, norm="batch")
    with pytest.raises(ValueError, match="weight is only used with norm='rms'"):
        adaln_modulate(x, m, m, torch.ones(8), norm="layer")
    with pytest.raises(ValueError, match=r"weight must be .* shape \(8,\)"):
        adaln_modulate(x, m, m, torch.ones(7))
    with pytest.raises(ValueError, match="scale is required"):
        adaln_modulate(x, m, None)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        adaln_modulate(x.long(), m, m)
    with pytest.raises(ValueError, match="shift is on meta but x is on cpu"):
        adaln_modulate(x, m.to("meta"), m)


def test_min_bytes_counts_reads_and_writes():
    x, shift, scale, w = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 5, 8), torch.randn(8)
    fwd = OP.min_bytes((x, shift, scale), {"weight": w}, False)
    assert fwd == 4 * (80 + 16 + 80 + 8 + 80)
    assert OP.min_bytes((x, shift, scale), {"weight": w}, True) == fwd + 4 * (3 * 80 + 88 + 16 + 80 + 8)


def test_no_tokens_gives_empty_output_and_zero_gradients():
    x, s, w = rnd(2, 0, 16), rnd(2, 16), rnd(16)
    y = adaln_modulate(x, s, s, w, backend="triton")
    assert y.shape == (2, 0, 16)
    y.sum().backward()
    assert s.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "needs", [(True, False, False, False), (False, False, True, False), (False, True, False, True)]
)
def test_gradients_for_any_subset_of_inputs(needs):
    B, N, D = 2, 6, 24
    ts = [rnd(B, N, D), rnd(B, D), rnd(B, N, D), rnd(D, offset=1.0)]
    check(tuple(t.requires_grad_(n) for t, n in zip(ts[:3], needs)), {"weight": ts[3].requires_grad_(needs[3])})
    with torch.no_grad():
        torch.testing.assert_close(adaln_modulate(*ts[:3], ts[3], backend="triton"), adaln_modulate_ref(*ts[:3], ts[3]))
