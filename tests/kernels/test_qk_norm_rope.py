"""qk_norm_rope: fused q/k RMSNorm + interleaved 2-D axial RoPE against its reference, and the RoPE tables."""

import math

import pytest
import torch

from pae_fast.kernels import OPS, qk_norm_rope, qk_norm_rope_ref, rope_2d_tables, use_backend
from pae_fast.kernels._qk_rope_common import _unit_d
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["qk_norm_rope"]


def _packed_qk(B, N, H, hd, dtype=torch.float32, requires_grad=True):
    """q, k as the models make them: views of one packed (B, N, 3 * H * hd) projection."""
    qkv = torch.randn(B, N, 3 * H * hd, dtype=dtype, requires_grad=requires_grad)
    q, k, _ = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("hd", [72, 128, 64])
@pytest.mark.parametrize("normalize", [True, False])
def test_head_dims_257_tokens_packed_layout(hd, normalize):
    q, k = _packed_qk(1, 257, 2, hd)
    cos, sin = rope_2d_tables(1, 257, hd)
    kw = {"normalize": normalize}
    if normalize:
        kw |= {"q_weight": torch.randn(hd, requires_grad=True), "k_weight": torch.randn(hd, requires_grad=True)}
    assert_op_matches(qk_norm_rope, qk_norm_rope_ref, (q, k, cos, sin), kw, atol=2e-5, rtol=2e-5,
                      ref_dtype=torch.float64)  # fmt: skip


def test_half_activations_with_fp32_weights_and_tables():
    # autocast: q, k come out of the bf16/fp16 qkv Linear while the norm weights and RoPE tables stay fp32
    q, k = _packed_qk(2, 9, 2, 72, dtype=torch.float16)
    cos, sin = rope_2d_tables(3, 3, 72)
    kw = {"q_weight": torch.randn(72, requires_grad=True), "k_weight": torch.randn(72, requires_grad=True)}
    res = assert_op_matches(qk_norm_rope, qk_norm_rope_ref, (q, k, cos, sin), kw, atol=2e-3, rtol=2e-3,
                            ref_dtype=torch.float64)  # fmt: skip
    assert len(res.rows) == 2 + 4  # outputs q', k'; gradients of q, k, q_weight, k_weight


def test_packed_views_are_read_in_place():
    q, k = _packed_qk(2, 5, 3, 8, requires_grad=False)
    assert not q.is_contiguous() and _unit_d(q) is q and _unit_d(k) is k
    # a head_dim stride other than 1 is the only layout that gets copied
    t = torch.randn(2, 3, 8, 5).transpose(-1, -2)
    assert _unit_d(t).is_contiguous()


def test_non_unit_head_dim_stride_matches():
    q = torch.randn(1, 2, 8, 9, requires_grad=True).transpose(-1, -2)  # (1, 2, 9, 8), head_dim stride 9
    k = torch.randn(1, 2, 9, 8, requires_grad=True)
    cos, sin = rope_2d_tables(3, 3, 8)
    assert_op_matches(qk_norm_rope, qk_norm_rope_ref, (q, k, cos, sin), {}, atol=1e-5, rtol=1e-5,
                      ref_dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("which", ["q", "k_weight"])
def test_gradient_to_a_subset_of_inputs(which):
    q = torch.randn(1, 2, 6, 16, requires_grad=which == "q")
    k = torch.randn(1, 2, 6, 16)
    kw = {"k_weight": torch.randn(16, requires_grad=which == "k_weight")}
    cos, sin = rope_2d_tables(2, 3, 16)
    i = 0 if which == "q" else 1  # compare the output that depends on the input requiring grad
    assert_op_matches(lambda *a, **kw: qk_norm_rope(*a, **kw)[i], lambda *a, **kw: qk_norm_rope_ref(*a, **kw)[i],
                      (q, k, cos, sin), kw, atol=1e-5, rtol=1e-5, ref_dtype=torch.float64)  # fmt: skip


def test_only_one_output_used_in_the_loss():
    # k' gets no upstream gradient: autograd hands the backward op zeros for it
    q, k = _packed_qk(1, 4, 2, 8)
    cos, sin = rope_2d_tables(2, 2, 8)
    qo, _ = qk_norm_rope(q, k, cos, sin, backend="triton")
    (g,) = torch.autograd.grad(qo.square().sum(), [q])
    qr = q.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(qk_norm_rope_ref(qr, k.detach(), cos, sin)[0].square().sum(), [qr])
    torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_rope_tables_layout():
    """EVA-02 / LightningDiT axial layout: first half of head_dim by row, second by column, pairs share angles."""
    h, w, hd, theta = 3, 5, 16, 100.0
    cos, sin = rope_2d_tables(h, w, hd, theta=theta, dtype=torch.float64)
    assert cos.shape == (h * w, hd)
    half = hd // 2
    for t in range(h * w):
        i, j = divmod(t, w)
        for d in range(hd):
            pos, f = (i, d // 2) if d < half else (j, (d - half) // 2)
            ang = pos * theta ** (-2 * f / half)
            assert math.isclose(cos[t, d].item(), math.cos(ang), abs_tol=1e-12)
            assert math.isclose(sin[t, d].item(), math.sin(ang), abs_tol=1e-12)


def test_rope_is_relative_along_each_axis():
    # with one q vector and one k vector at every position, q'.k' depends only on the (row, col) offset
    hd, h, w = 16, 4, 4
    cos, sin = rope_2d_tables(h, w, hd)
    q = torch.randn(hd).expand(1, 1, h * w, hd)
    k = torch.randn(hd).expand(1, 1, h * w, hd)
    qo, ko = qk_norm_rope(q, k, cos, sin, normalize=False, backend="triton")
    s = (qo[0, 0] @ ko[0, 0].T).reshape(h, w, h, w)
    torch.testing.assert_close(s[0, 0, 1, 2], s[2, 1, 3, 3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[1, 3, 0, 1], s[3, 2, 2, 0], atol=1e-5, rtol=1e-5)
    # rotation keeps norms
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_identity_rotation_is_rmsnorm_times_weight():
    q, k = torch.randn(2, 3, 5, 12), torch.randn(2, 3, 5, 12)
    wq = torch.randn(12)
    qo, ko = qk_norm_rope(q, k, torch.ones(5, 12), torch.zeros(5, 12), q_weight=wq, backend="triton")
    torch.testing.assert_close(qo, q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6) * wq)
    torch.testing.assert_close(ko, k * torch.rsqrt(k.square().mean(-1, keepdim=True) + 1e-6))


def test_scope_switches_to_the_reference_exactly():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    cos, sin = rope_2d_tables(2, 2, 8)
    with use_backend("torch"):
        out = qk_norm_rope(q, k, cos, sin)
    ref = qk_norm_rope_ref(q, k, cos, sin)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_gradcheck_reference_float64():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_2d_tables(2, 2, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: qk_norm_rope_ref(a, b, cos, sin, c, None), (q, k, w))


def test_meta_device_forward_backward():
    q, k = (torch.empty(2, 16, 256, 72, device="meta", dtype=torch.float16, requires_grad=True) for _ in range(2))
    wq, wk = (torch.empty(72, device="meta", requires_grad=True) for _ in range(2))
    cos, sin = rope_2d_tables(16, 16, 72, device="meta")
    qo, ko = qk_norm_rope(q, k, cos, sin, wq, wk, backend="triton")
    assert qo.shape == q.shape and qo.dtype == torch.float16 and qo.device.type == "meta"
    (qo.sum() + ko.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and wq.grad.shape == (72,) and wk.grad.shape == (72,)


def test_errors_are_clear():
    q = torch.randn(1, 2, 4, 8)
    cos, sin = rope_2d_tables(2, 2, 8)
    with pytest.raises(ValueError, match=r"head_dim must be even"):
        qk_norm_rope(torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos must have shape \(N, head_dim\) = \(4, 8\)"):
        qk_norm_rope(q, q, cos[:3], sin)
    with pytest.raises(ValueError, match=r"k must have q's shape"):
        qk_norm_rope(q, q[:, :1], cos, sin)
    with pytest.raises(ValueError, match=r"q_weight is an RMSNorm weight but normalize=False"):
        qk_norm_rope(q, q, cos, sin, q_weight=torch.ones(8), normalize=False)
    with pytest.raises(ValueError, match=r"k_weight must have shape \(8,\)"):
        qk_norm_rope(q, q, cos, sin, k_weight=torch.ones(4))
    with pytest.raises(ValueError, match=r"divisible by 4"):
        rope_2d_tables(4, 4, 18)
