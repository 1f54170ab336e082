"""qkv_norm_rope: the packed-qkv op against its reference, forward and every gradient; packed gradient layout."""

import pytest
import torch

from pae_fast.kernels import OPS, qk_norm_rope_ref, qkv_norm_rope, qkv_norm_rope_ref, rope_2d_tables, use_backend
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
    """The packed op is exactly the unpacked one on views (and v is passed through)."""
    B, N, H, hd = 2, 6, 2, 8
    qkv = torch.randn(B, N, 3 * H * hd)
    cos, sin = rope_2d_tables(2, 3, hd)
    q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    qo, ko, vo = qkv_norm_rope(qkv, H, cos, sin, backend="triton")
    rq, rk = qk_norm_rope_ref(q, k, cos, sin)
    torch.testing.assert_close(qo, rq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, rk, atol=1e-6, rtol=1e-6)
    assert torch.equal(vo, v)
    # token-major: (B, N, H, hd) memory, the layout in which attention's output needs no transpose copy
    assert all(t.transpose(1, 2).is_contiguous() for t in (qo, ko, vo))


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
    assert q.stride() == k.stride() == v.stride() == (257 * 16 * 72, 72, 16 * 72, 1)  # fake impl: token-major
    (q.sum() + k.sum() + v.sum()).backward()
    assert qkv.grad.shape == qkv.shape
    x = torch.randn(1, 4, 3 * 2 * 8)
    c, s = rope_2d_tables(2, 2, 8)
    with use_backend("torch"):
        for a, b in zip(qkv_norm_rope(x, 2, c, s), qkv_norm_rope_ref(x, 2, c, s)):
            assert torch.equal(a, b)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"qkv must be \(B, N, 3 \* num_heads \* head_dim\)"):
        qkv_norm_rope(torch.randn(1, 4, 50), 2, *rope_2d_tables(2, 2, 8))
    with pytest.raises(ValueError, match="cos must have shape"):
        qkv_norm_rope(torch.randn(1, 4, 48), 2, *rope_2d_tables(1, 3, 8))
