"""gated_residual_adaln: fused gated residual + next norm/adaLN against its reference, both outputs, every gradient."""

import pytest
import torch

from pae_fast.kernels import OPS, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref, use_backend
from pae_fast.kernels import _adaln_common as common
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["gated_residual_adaln"]


def rnd(*shape, dtype=torch.float32, scale=1.0, offset=0.0, grad=True):
    return (torch.randn(*shape) * scale + offset).to(dtype).requires_grad_(grad)


def mod(kind, B, N, D, dtype=torch.float32):
    return None if kind is None else rnd(*((B, D) if kind == "sample" else (B, N, D)), dtype=dtype, scale=0.5)


def check(args, kwargs, dtype=torch.float32):
    atol, rtol = OP.tolerances[dtype]
    return assert_op_matches(gated_residual_adaln, gated_residual_adaln_ref, args, kwargs, atol=atol, rtol=rtol,
                             ref_dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_registered_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize(
    "B,N,D,norm,weight,gate,shift,scale,bias",
    [
        (1, 257, 1152, "rms", True, "sample", "sample", "sample", True),  # LightningDiT-XL block, odd token count
        (1, 5, 2048, "rms", True, "token", "token", "token", True),  # DiT^DH head block
        (2, 5, 2048, "layer", False, "sample", "token", "sample", False),  # mixed
        (2, 5, 1152, "rms", False, "token", None, "sample", True),  # mixed, wo_shift
        (2, 257, 33, "layer", False, "sample", None, "token", True),
        (1, 6, 72, "rms", True, "token", "sample", "token", False),
        (2, 7, 40, "rms", True, "sample", "token", "token", True),  # 32 + 16 lanes
        (1, 3, 384, "layer", False, "token", "sample", "sample", True),  # DiTDH-S width: 256 + 128 lanes
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_widths_norms_and_modulation_kinds(B, N, D, norm, weight, gate, shift, scale, bias, dtype):
    kw = {"norm": norm, "weight": rnd(D, dtype=dtype, scale=0.1, offset=1.0) if weight else None}
    if bias:
        kw["bias"] = rnd(D, dtype=dtype, scale=0.5)
    args = (rnd(B, N, D, dtype=dtype, scale=2.0, offset=0.3), rnd(B, N, D, dtype=dtype), mod(gate, B, N, D, dtype),
            mod(shift, B, N, D, dtype), mod(scale, B, N, D, dtype))  # fmt: skip
    check(args, kw, dtype)


def test_many_programs_per_sample_reduce_partial_sums(monkeypatch):
    # small tiles: 9 row blocks of 4 tokens per sample, two programs looping over 5 blocks each
    # (33 = 32 + 16 lanes: 5 rows per tile -> 4), bias partials reduced over programs and samples too
    monkeypatch.setattr(common, "MAX_BLOCK_ELEMS", 256)
    B, N, D = 2, 35, 33
    assert common.fwd_blocks(N, D)[:3] == (4, 32, 16) and common.bwd_programs(B, 9, torch.device("cpu")) == (2, 5)
    check((rnd(B, N, D), rnd(B, N, D), mod("sample", B, N, D), mod("sample", B, N, D), mod("sample", B, N, D)),
          {"weight": rnd(D, offset=1.0), "bias": rnd(D)})  # fmt: skip


def test_equals_residual_add_then_adaln_modulate():
    B, N, D = 2, 7, 40
    x, y, gate, shift, scale, w = rnd(B, N, D), rnd(B, N, D), rnd(B, D), rnd(B, N, D), rnd(B, D), rnd(D)
    r, h = gated_residual_adaln(x, y, gate, shift, scale, w, backend="triton")
    r_want = x + gate[:, None] * y
    torch.testing.assert_close(r, r_want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, adaln_modulate_ref(r_want, shift, scale, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use", ["r", "h"])
def test_gradient_from_one_output_only(use):
    B, N, D = 2, 9, 24
    leaves = [rnd(B, N, D), rnd(B, N, D), rnd(B, N, D), rnd(B, D), rnd(B, D), rnd(D)]
    grads = []
    for fn, kw in ((gated_residual_adaln, {"backend": "triton"}), (gated_residual_adaln_ref, {})):
        r, h = fn(*leaves[:5], leaves[5], **kw)
        out = r if use == "r" else h
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, D)).sum(), leaves, allow_unused=True))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_chunked_modulation():
    B, N, D = 2, 9, 40
    xt, yt = rnd(N, B, D, scale=2.0), rnd(N, B, D)
    ada = rnd(B, 6 * D)  # like adaLN_modulation(c).chunk(6, dim=1): (B, D) views with row stride 6D

    def fn(impl, backend):
        _, _, g_msa, shift, scale, _ = ada.chunk(6, dim=1)
        return impl(xt.transpose(0, 1), yt.transpose(0, 1), g_msa, shift, scale, **backend)

    out = fn(gated_residual_adaln, {"backend": "triton"})
    ups = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(out, (xt, yt, ada), ups)
    ref = fn(gated_residual_adaln_ref, {})
    ref_grads = torch.autograd.grad(ref, (xt, yt, ada), ups)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_mixed_dtypes_fp32_stream_half_branch():
    # autocast layout: fp32 residual stream, fp16 sub-block output and modulation
    B, N, D = 2, 5, 32
    x, y = rnd(B, N, D), rnd(B, N, D, dtype=torch.float16)
    gate, shift, scale = (rnd(B, D, dtype=torch.float16) for _ in range(3))
    r, h = gated_residual_adaln(x, y, gate, shift, scale, backend="triton")
    assert r.dtype == h.dtype == torch.float32
    for a, b in zip((r, h), gated_residual_adaln_ref(x, y, gate, shift, scale)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (r.sum() + h.sum()).backward()
    assert x.grad.dtype == torch.float32 and y.grad.dtype == gate.grad.dtype == scale.grad.dtype == torch.float16


@pytest.mark.parametrize(
    "gate,shift,scale,weight", [("sample", "sample", "sample", True), ("token", None, "token", False)]
)
def test_meta_device_forward_backward(gate, shift, scale, weight):
    B, N, D = 2, 257, 2048
    meta = {"device": "meta", "requires_grad": True}
    x, y = torch.empty(B, N, D, **meta), torch.empty(B, N, D, **meta)
    mods = [None if v is None else torch.empty(*((B, D) if v == "sample" else (B, N, D)), **meta)
            for v in (gate, shift, scale)]  # fmt: skip
    w = torch.empty(D, **meta) if weight else None
    bias = torch.empty(D, **meta)
    r, h = gated_residual_adaln(x, y, *mods, w, backend="triton", bias=bias)
    assert r.shape == h.shape == x.shape and r.device.type == h.device.type == "meta"
    (r.sum() + h.sum()).backward()
    for t in (x, y, w, bias, *mods):
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape


def test_scope_switches_to_the_reference_exactly():
    x, y, gate, shift, scale, w = rnd(2, 7, 33), rnd(2, 7, 33), rnd(2, 33), rnd(2, 7, 33), rnd(2, 33), rnd(33)
    with use_backend("torch"):
        for a, b in zip(gated_residual_adaln(x, y, gate, shift, scale, w),
                        gated_residual_adaln_ref(x, y, gate, shift, scale, w)):  # fmt: skip
            assert torch.equal(a, b)


def test_compiles_fullgraph_with_autograd():
    x, y, gate, shift, scale, bias = rnd(2, 5, 16), rnd(2, 5, 16), rnd(2, 16), rnd(2, 16), rnd(2, 5, 16), rnd(16)
    fn = torch.compile(lambda *a: gated_residual_adaln(*a[:5], backend="triton", bias=a[5]), backend="aot_eager",
                       fullgraph=True)  # fmt: skip
    r, h = fn(x, y, gate, shift, scale, bias)
    (r.sum() + h.sum()).backward()
    for a, b in zip((r, h), gated_residual_adaln_ref(x, y, gate, shift, scale, bias=bias)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(t.grad is not None for t in (x, y, gate, shift, scale, bias))


def test_bad_inputs_raise_clear_errors():
    x, m = torch.randn(2, 5, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"y must have the shape of x \(2, 5, 8\)"):
        gated_residual_adaln(x, torch.randn(2, 4, 8), m, m, m)
    with pytest.raises(ValueError, match=r"gate must be per sample \(2, 8\) or per token \(2, 5, 8\)"):
        gated_residual_adaln(x, x, torch.randn(8), m, m)
    with pytest.raises(ValueError, match="gate is required"):
        gated_residual_adaln(x, x, None, m, m)
    with pytest.raises(ValueError, match="weight is only used with norm='rms'"):
        gated_residual_adaln(x, x, m, m, m, torch.ones(8), norm="layer")
    with pytest.raises(ValueError, match=r"bias must be a floating-point \(8,\) tensor .* got torch.float32 \(2, 8\)"):
        gated_residual_adaln(x, x, m, m, m, bias=m)


def test_min_bytes_counts_reads_and_writes():
    # forward: read x, y, gate, scale, weight, bias; write r, h. backward: read dr, dh, x, y, gate, scale, weight,
    # bias; write dx, dy and the gate / scale / weight / bias gradients (no shift here)
    x, m, w = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(8)
    args = (x, x, m, None, m)
    kw = {"weight": w, "bias": w}
    assert OP.min_bytes(args, kw, False) == 4 * (4 * 80 + 16 + 16 + 8 + 8)
    bwd = 4 * (4 * 80 + 2 * 80 + 2 * (16 + 16 + 8 + 8))
    assert OP.min_bytes(args, kw, True) == OP.min_bytes(args, kw, False) + bwd
    half = OP.min_bytes(args, {**kw, "out_dtype": torch.float16}, True)  # h and dh in the GEMM dtype
    assert half == OP.min_bytes(args, kw, True) - 2 * 2 * 80


@pytest.mark.parametrize(
    "needs", [(True,) + (False,) * 5, (False, True, False, True, False, False), (False,) * 4 + (True,) * 2]
)
def test_gradients_for_any_subset_of_inputs(needs):
    B, N, D = 2, 6, 24
    ts = [rnd(B, N, D), rnd(B, N, D), rnd(B, N, D), rnd(B, D), rnd(B, D), rnd(D, offset=1.0)]
    ts = [t.requires_grad_(n) for t, n in zip(ts, needs)]
    check(tuple(ts[:5]), {"weight": ts[5]})
    with torch.no_grad():
        for a, b in zip(gated_residual_adaln(*ts, backend="triton"), gated_residual_adaln_ref(*ts)):
            torch.testing.assert_close(a, b)


def test_backward_splits_the_row_into_two_power_of_two_tiles():
    """1152 = 1024 + 128 and 2048 = 2048 + 0: no padding lane at the model widths (a single 2048-wide tile padded
    1152 by 44 %); about 2048 elements per program at 4-8 warps, so two or more blocks fit an SM (the registers
    ptxas reports for these launches are in benchmarks/results/compile_check_sm90.json)."""
    from unittest import mock

    from pae_fast.kernels import _gated_residual_adaln_bwd as bwd

    with mock.patch.object(bwd, "interpreter_enabled", return_value=False):
        assert bwd.bwd_blocks(256, 1152) == (1, 1024, 128, 4)
        assert bwd.bwd_blocks(256, 2048) == (1, 2048, 0, 8)
        assert bwd.bwd_blocks(256, 768) == (2, 512, 256, 4)
        assert bwd.bwd_blocks(5, 33)[1:3] == (32, 16)
    for D in (1152, 2048, 768, 1024):
        _, c, c2, _ = bwd.bwd_blocks(256, D)
        assert c + c2 >= D and 1 - D / (c + c2) <= 0.25
