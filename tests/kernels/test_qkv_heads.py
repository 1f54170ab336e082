"""qkv_heads: head views of a packed qkv whose backward packs dq, dk, dv into dqkv with the qkv bias gradient in the
same pass (Triton under the interpreter and the PyTorch path), against its reference and a naive biased Linear."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from pae_fast.kernels import OPS, linear_qkv_heads, qkv_heads, qkv_heads_ref
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["qkv_heads"]
MOD = importlib.import_module("pae_fast.kernels.qkv_heads")  # the tile-size knob


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_registered_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_qkv_heads_matches_naive_biased_linear(backend, dtype):
    """``linear_qkv_heads`` against the plain biased Linear + ``view -> permute -> unbind``: the same q, k, v and
    every gradient (x, W, and the bias, whose gradient now comes from the packing kernel), on an odd shape (rows
    2*37, 3 heads of 24) with different upstream gradients on q, k, v (a swapped third would show)."""
    g = torch.Generator().manual_seed(0)
    B, N, H, hd = 2, 37, 3, 24
    D = H * hd
    x = torch.randn(B, N, D, generator=g).to(dtype)
    w = (torch.randn(3 * D, D, generator=g) / D**0.5).to(dtype)
    b = torch.randn(3 * D, generator=g).to(dtype)
    ups = [torch.randn(B, H, N, hd, generator=g).to(dtype) for _ in range(3)]

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        q, k, v = fn(*leaves)
        loss = sum((t.float() * u.float()).sum() for t, u in zip((q, k, v), ups))
        return (q, k, v), torch.autograd.grad(loss, leaves)

    ours, g_ours = run(lambda x, w, b: linear_qkv_heads(x, w, b, H, backend=backend))
    plain, g_plain = run(lambda x, w, b: F.linear(x, w, b).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0))
    for a, p in zip(ours, plain):
        assert a.shape == (B, H, N, hd) and torch.equal(a, p)  # the same GEMM with the bias in its epilogue
    # dx, dW: the same GEMMs on the same dqkv (bit for bit); db: an fp32 sum instead of addmm's (rounding only)
    assert torch.equal(g_ours[0], g_plain[0]) and torch.equal(g_ours[1], g_plain[1])
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g_ours[2], g_plain[2], atol=atol, rtol=1e-3)
    want = torch.cat([u.double().sum((0, 2)).flatten() for u in ups])  # d b[s, h, :] = sum_(b, n) d(q|k|v)[s]
    torch.testing.assert_close(g_ours[2].double(), want, atol=atol, rtol=1e-3)


def test_many_programs_reduce_partials(monkeypatch):
    # 2-row tiles at width 40 (BLOCK_C 64): 2*13 = 26 rows = 13 row blocks over two programs (7 + 6)
    monkeypatch.setattr(MOD, "MAX_BLOCK_ELEMS", 128)
    qkv = torch.randn(2, 13, 120, requires_grad=True)
    bias = torch.randn(120, requires_grad=True)
    assert_op_matches(qkv_heads, qkv_heads_ref, (qkv, 4), {"bias": bias}, atol=1e-5, rtol=1e-5,
                      ref_dtype=torch.float64, atol_rms=True)  # fmt: skip


def test_strided_head_gradients_are_read_in_place():
    """dq, dk, dv of any strides (attention backends return token-major or head-major ones): the kernel reads them
    through their strides."""
    B, N, H, hd = 2, 5, 2, 8
    grads = [torch.randn(B, N, H, hd).transpose(1, 2), torch.randn(B, H, N, hd), torch.randn(B, H, hd, N).mT]
    dqkv, db = MOD._bwd(*grads, True)
    want = torch.stack([t.transpose(1, 2) for t in grads], dim=2).flatten(2)
    assert torch.equal(dqkv, want)
    torch.testing.assert_close(db, want.flatten(0, 1).sum(0), atol=1e-5, rtol=1e-5)


def test_bad_bias_is_refused():
    with pytest.raises(ValueError, match="qkv_heads: bias"):
        qkv_heads(torch.randn(1, 2, 12), 2, bias=torch.randn(11))
    with pytest.raises(ValueError, match="qkv_heads: qkv"):
        qkv_heads(torch.randn(1, 2, 10), 2)


def test_backward_traffic_packs_and_sums_in_one_pass():
    """Counted bytes of the backward alone: the Triton op reads dq, dk, dv and writes dqkv and the bias gradient
    (2 |qkv| + |b|); the PyTorch path's stack + column sum reads dqkv once more (3 |qkv| + |b|)."""
    from pae_fast.kernels.tools.traffic import TrafficCounter

    B, N, H, hd = 2, 7, 3, 5
    n, nb = B * N * 3 * H * hd * 4, 3 * H * hd * 4  # fp32 bytes of qkv and of the bias
    for backend, expect in (("triton", 2 * n + nb), ("torch", 3 * n + nb)):
        qkv, b = torch.randn(B, N, 3 * H * hd, requires_grad=True), torch.randn(3 * H * hd, requires_grad=True)
        outs = qkv_heads(qkv, H, bias=b, backend=backend)
        grads = [torch.ones(B, H, N, hd) for _ in range(3)]
        with TrafficCounter() as tc:
            torch.autograd.backward(outs, grads)
        rows = [(r["op"], r["read_bytes"], r["written_bytes"]) for r in tc.summary()["rows"]]
        assert tc.summary()["other_bytes"] == expect, (backend, rows)
