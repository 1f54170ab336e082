"""qkv_norm_rope: the packed-qkv op (+ bias) against its reference, forward and every gradient; packed gradient
layout, the v view, torch.compile."""

import pytest
import torch

from pae_fast.kernels import (
    OPS,
    qk_norm_rope,
    qk_norm_rope_ref,
    qkv_norm_rope,
    qkv_norm_rope_ref,
    rope_2d_tables,
    use_backend,
)
from pae_fast.kernels.qkv_norm_rope import split_heads
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["qkv_norm_rope"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("H,hd,N", [(16, 72, 5), (16, 128, 3), (1, 64, 257)])
def test_model_head_dims_and_odd_tokens(H, hd, N):
    qkv = torch.randn(2, N, 3 * H * hd, requires_grad=True)
    cos, sin = rope_2d_tables(1, N, hd)
    w = {"q_weight": torch.rand(hd).add(0.5).requires_grad_(), "k_weight": torch.rand(hd).add(0.5).requires_grad_()}
    assert_op_matches(qkv_norm_rope, qkv_norm_rope_ref, (qkv, H, cos, sin), w, atol=1e-5, rtol=1e-5,
                      ref_dtype=torch.float64)  # fmt: skip


def test_equals_split_then_qk_norm_rope():
    """The packed op is exactly the unpacked one on views; without a bias v is a view of qkv (no copy)."""
    B, N, H, hd = 2, 6, 2, 8
    qkv = torch.randn(B, N, 3 * H * hd)
    cos, sin = rope_2d_tables(2, 3, hd)
    q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    qo, ko, vo = qkv_norm_rope(qkv, H, cos, sin, backend="triton")
    rq, rk = qk_norm_rope_ref(q, k, cos, sin)
    torch.testing.assert_close(qo, rq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, rk, atol=1e-6, rtol=1e-6)
    assert torch.equal(vo, v)
    assert vo.data_ptr() == v.data_ptr() and vo.stride() == v.stride() == (N * 3 * H * hd, hd, 3 * H * hd, 1)
    # token-major: (B, N, H, hd) memory, the layout in which attention's output needs no transpose copy
    assert all(t.transpose(1, 2).is_contiguous() for t in (qo, ko))


def test_bias_is_added_before_norm_and_v_is_written_token_major():
    B, N, H, hd = 2, 5, 3, 8
    qkv, bias = torch.randn(B, N, 3 * H * hd), torch.randn(3 * H * hd)
    cos, sin = rope_2d_tables(1, N, hd)
    qo, ko, vo = qkv_norm_rope(qkv, H, cos, sin, bias=bias, backend="triton")
    q, k, v = split_heads(qkv + bias, H)
    rq, rk = qk_norm_rope_ref(q, k, cos, sin)
    torch.testing.assert_close(qo, rq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, rk, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vo, v, atol=0, rtol=0)
    assert all(t.transpose(1, 2).is_contiguous() for t in (qo, ko, vo))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_bias_and_every_gradient_odd_shape(dtype, normalize):
    """x W^T through the op with ``bias=b`` equals the reference on the biased Linear: outputs and the gradients of
    qkv, the bias and the norm weights (odd token count, 3 heads of 72)."""
    B, N, H, hd = 2, 7, 3, 72
    qkv = torch.randn(B, N, 3 * H * hd).to(dtype).requires_grad_()
    cos, sin = rope_2d_tables(1, N, hd)
    kw = {"bias": (torch.randn(3 * H * hd) * 0.5).to(dtype).requires_grad_(), "normalize": normalize}
    if normalize:
        kw.update(q_weight=torch.rand(hd).add(0.5).to(dtype).requires_grad_(),
                  k_weight=torch.rand(hd).add(0.5).to(dtype).requires_grad_())  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_op_matches(qkv_norm_rope, qkv_norm_rope_ref, (qkv, H, cos, sin), kw, atol=tol, rtol=tol,
                      ref_dtype=torch.float64)  # fmt: skip


def test_bias_gradient_is_deterministic_and_mixed_dtype():
    """The bias gradient (partial column sums, no atomics) is bitwise reproducible; a fp32 bias on a half qkv (the
    bf16-autocast policy) gets a fp32 gradient."""
    B, N, H, hd = 3, 33, 2, 16
    qkv = torch.randn(B, N, 3 * H * hd, dtype=torch.float16, requires_grad=True)
    bias = torch.randn(3 * H * hd, requires_grad=True)
    cos, sin = rope_2d_tables(3, 11, hd)
    grads = [torch.randn(B, H, N, hd, dtype=torch.float16) for _ in range(3)]
    runs = [torch.autograd.grad(qkv_norm_rope(qkv, H, cos, sin, bias=bias, backend="triton"), (qkv, bias), grads)
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][1].dtype == torch.float32
    ref = torch.autograd.grad(qkv_norm_rope_ref(qkv.double(), H, cos, sin, bias=bias.double()), bias,
                              [g.double() for g in grads])[0]  # fmt: skip
    torch.testing.assert_close(runs[0][1], ref, atol=2e-2, rtol=2e-3)  # fp16 dqkv vs an fp64 reference


def test_v_view_gradient_accumulates_with_other_uses_of_qkv():
    """Autograd through the v view: v used non-linearly and qkv used again elsewhere; the grad of qkv sums both."""
    B, N, H, hd = 1, 6, 2, 8
    qkv = torch.randn(B, N, 3 * H * hd, requires_grad=True)
    cos, sin = rope_2d_tables(2, 3, hd)

    def loss(fn):
        q, k, v = fn(qkv, H, cos, sin)
        return (q * k).sum() + (v.sin() * q).sum() + qkv.pow(2).sum()

    (a,) = torch.autograd.grad(loss(lambda *x: qkv_norm_rope(*x, backend="triton")), qkv)
    (b,) = torch.autograd.grad(loss(qkv_norm_rope_ref), qkv)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_compile_fullgraph_v_view(with_bias):
    """torch.compile(fullgraph) traces the autograd.Function (v as a view without a bias) in one graph and matches
    eager, forward and gradients."""
    B, N, H, hd = 1, 5, 2, 8
    cos, sin = rope_2d_tables(1, N, hd)
    bias = torch.randn(3 * H * hd, requires_grad=True) if with_bias else None

    def f(qkv):
        q, k, v = qkv_norm_rope(qkv, H, cos, sin, bias=bias, backend="triton")
        return (q * v).sum() + (k * v).pow(2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qkv = torch.randn(B, N, 3 * H * hd, requires_grad=True)
    leaves = (qkv, bias) if with_bias else (qkv,)
    ga = torch.autograd.grad(compiled(qkv), leaves)
    gb = torch.autograd.grad(f(qkv), leaves)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_token_major_gradients_are_read_in_place():
    """Incoming gradients laid out as attention's backward writes them (like q: token-major) or contiguous give
    the same packed gradient."""
    B, N, H, hd = 2, 7, 2, 16
    qkv = torch.randn(B, N, 3 * H * hd, requires_grad=True)
    cos, sin = rope_2d_tables(1, N, hd)
    w = torch.rand(hd).add(0.5)
    grads = [torch.randn(B, H, N, hd) for _ in range(3)]
    token_major = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
    outs = qkv_norm_rope(qkv, H, cos, sin, q_weight=w, k_weight=w, backend="triton")
    (a,) = torch.autograd.grad(outs, qkv, grads, retain_graph=True)
    (b,) = torch.autograd.grad(outs, qkv, token_major)
    (ref,) = torch.autograd.grad(qkv_norm_rope_ref(qkv, H, cos, sin, w, w), qkv, grads)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_packed_gradient_layout_matches_autograd_of_views():
    B, N, H, hd = 1, 5, 3, 8
    qkv = torch.randn(B, N, 3 * H * hd, requires_grad=True)
    cos, sin = rope_2d_tables(1, N, hd)
    gq, gk, gv = (torch.randn(B, H, N, hd) for _ in range(3))
    outs = qkv_norm_rope(qkv, H, cos, sin, backend="triton")
    (dqkv,) = torch.autograd.grad(outs, qkv, (gq, gk, gv))
    # the v third of the gradient is dv transposed back into the packed layout
    torch.testing.assert_close(split_heads(dqkv, H)[2], gv)
    outs_ref = qkv_norm_rope_ref(qkv, H, cos, sin)
    (ref,) = torch.autograd.grad(outs_ref, qkv, (gq, gk, gv))
    torch.testing.assert_close(dqkv, ref, atol=1e-5, rtol=1e-5)


def test_meta_device_and_scope():
    qkv = torch.empty(2, 257, 3 * 16 * 72, device="meta", requires_grad=True)
    cos, sin = torch.empty(257, 72, device="meta"), torch.empty(257, 72, device="meta")
    q, k, v = qkv_norm_rope(qkv, 16, cos, sin, backend="triton")
    assert q.shape == k.shape == v.shape == (2, 16, 257, 72)
    assert q.stride() == k.stride() == (257 * 16 * 72, 72, 16 * 72, 1)  # fake impl: token-major
    assert v.stride() == (257 * 3 * 16 * 72, 72, 3 * 16 * 72, 1)  # a view of qkv
    (q.sum() + k.sum() + v.sum()).backward()
    assert qkv.grad.shape == qkv.shape
    bias = torch.empty(3 * 16 * 72, device="meta", requires_grad=True)
    q, k, v = qkv_norm_rope(qkv, 16, cos, sin, bias=bias, backend="triton")
    assert v.stride() == q.stride() == (257 * 16 * 72, 72, 16 * 72, 1)
    (q.sum() + k.sum() + v.sum()).backward()
    assert bias.grad.shape == bias.shape and bias.grad.device.type == "meta"
    x, b = torch.randn(1, 4, 3 * 2 * 8), torch.randn(3 * 2 * 8)
    c, s = rope_2d_tables(2, 2, 8)
    with use_backend("torch"):
        for a, r in zip(qkv_norm_rope(x, 2, c, s, bias=b), qkv_norm_rope_ref(x, 2, c, s, bias=b)):
            assert torch.equal(a, r)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"qkv must be \(B, N, 3 \* num_heads \* head_dim\)"):
        qkv_norm_rope(torch.randn(1, 4, 50), 2, *rope_2d_tables(2, 2, 8))
    with pytest.raises(ValueError, match="cos must have shape"):
        qkv_norm_rope(torch.randn(1, 4, 48), 2, *rope_2d_tables(1, 3, 8))
    with pytest.raises(ValueError, match=r"bias must be a floating \(48,\) tensor"):
        qkv_norm_rope(torch.randn(1, 4, 48), 2, *rope_2d_tables(2, 2, 8), bias=torch.randn(16))


@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_tiling_several_programs_and_tiles_per_program(monkeypatch, with_bias):
    """The GPU tiling (under the interpreter one program holds all tokens): 4-token tiles, 2 tiles per backward
    program, 33 tokens (a partly and a wholly empty tile at the end); the weight and bias column sums then come from
    several partial rows per sample."""
    from pae_fast.kernels import _qk_rope_common

    monkeypatch.setattr(_qk_rope_common, "_blocks", lambda N, D: (4, 16))
    monkeypatch.setattr(_qk_rope_common, "BWD_TOKENS_PER_PROGRAM", 8)
    B, N, H, hd = 2, 33, 2, 16
    qkv = torch.randn(B, N, 3 * H * hd, requires_grad=True)
    cos, sin = rope_2d_tables(3, 11, hd)
    w = {"q_weight": torch.rand(hd).add(0.5).requires_grad_(), "k_weight": torch.rand(hd).add(0.5).requires_grad_()}
    if with_bias:
        w["bias"] = torch.randn(3 * H * hd, requires_grad=True)
    assert_op_matches(qkv_norm_rope, qkv_norm_rope_ref, (qkv, H, cos, sin), w, atol=1e-5, rtol=1e-5,
                      ref_dtype=torch.float64)  # fmt: skip
    q, k = (torch.randn(B, H, N, hd, requires_grad=True) for _ in range(2))  # the unpacked op shares the kernels
    assert_op_matches(qk_norm_rope, qk_norm_rope_ref, (q, k, cos, sin), {"q_weight": w["q_weight"]}, atol=1e-5,
                      rtol=1e-5, ref_dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_heads_views_and_packed_gradient_in_one_copy(dtype):
    """``qkv_heads``: the same views as ``view -> permute -> unbind`` (what a plain ViT attention writes) and the same
    gradient bit for bit, on an odd shape with distinct gradients per q / k / v (a swap would show); its backward
    reads the three head gradients and writes the packed one once (autograd's views: a stack, then a clone)."""
    from pae_fast.kernels import qkv_heads
    from pae_fast.kernels.tools.traffic import TrafficCounter

    B, N, H, hd = 2, 7, 3, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, 3 * H * hd, generator=g).to(dtype)
    weights = [torch.randn(B, H, N, hd, generator=g).to(dtype) for _ in range(3)]

    def run(split):
        qkv = x.clone().requires_grad_()
        q, k, v = split(qkv * 1)  # a non-leaf, as the Linear's output is
        sum((t.float() * w.float()).sum() for t, w in zip((q * k, k, v.exp()), weights)).backward()
        return (q, k, v), qkv.grad

    (ours, g_ours) = run(lambda t: qkv_heads(t, H))
    (plain, g_plain) = run(lambda t: t.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0))
    for a, b in zip(ours, plain):
        assert a.shape == (B, H, N, hd) and a.stride() == b.stride() and torch.equal(a, b)
    assert torch.equal(g_ours, g_plain) and g_ours.is_contiguous()
    # bytes of the split's backward alone: incoming dq, dk, dv (B, H, N, hd) each -> dqkv (B, N, 3 H hd)
    n_bytes = x.numel() * x.element_size()
    for split, expect in ((lambda t: qkv_heads(t, H), 2 * n_bytes), (lambda t: t.view(B, N, 3, H, hd).permute(
            2, 0, 3, 1, 4).unbind(0), 4 * n_bytes)):  # fmt: skip
        qkv = x.clone().requires_grad_()
        outs = split(qkv)
        grads = [torch.ones(B, H, N, hd, dtype=dtype) for _ in range(3)]
        with TrafficCounter() as tc:
            torch.autograd.backward(outs, grads)
        s = tc.summary()
        assert s["other_bytes"] == expect, [(r["op"], r["read_bytes"], r["written_bytes"]) for r in s["rows"]]
