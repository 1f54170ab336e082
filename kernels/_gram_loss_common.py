"""Gram tiles of :mod:`.gram_loss`, shared by its forward and backward kernels.

``_gram_tile`` computes one (BLOCK_M, BLOCK_M) tile of a token x token Gram matrix with ``tl.dot`` over the channel
dim (row norms accumulated in the same loop: the cosine Gram is the raw tile scaled by ``r_i r_j``); ``_diff_tile``
the tile of ``D = G_z - G_T``. The math is in :mod:`.gram_loss`'s docstring (docs/method.md § SSR).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gram_tile(
    X,  # (B, N, C) tokens of one operand, strides (stride_b, stride_n, stride_c)
    b,
    rows_i,  # (BLOCK_M,) token indices of the tile's rows
    rows_j,  # (BLOCK_M,) token indices of the tile's columns
    N,
    C,
    stride_b,
    stride_n,
    stride_c,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_M, BLOCK_M) Gram tile of sample b, ``<x_i, x_j> r_i r_j`` with r = 1 / max(||x||, eps) when NORMALIZE
    (else 1), fp32 accumulation; also returns r_i, r_j and the rows' squared norms ||x_i||^2."""
    base = X + b.to(tl.int64) * stride_b
    mi = rows_i < N
    mj = rows_j < N
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    sqi = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sqj = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < C
        koffs = ks[None, :] * stride_c
        xi = tl.load(base + rows_i[:, None] * stride_n + koffs, mask=mi[:, None] & km[None, :], other=0.0)
        xj = tl.load(base + rows_j[:, None] * stride_n + koffs, mask=mj[:, None] & km[None, :], other=0.0)
        if xi.dtype == tl.float64:  # (compile-time) fp32 math throughout, like every kernel here
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee")  # half inputs: exact products, fp32 sums
        if NORMALIZE:
            xi32 = xi.to(tl.float32)
            xj32 = xj.to(tl.float32)
            sqi += tl.sum(xi32 * xi32, axis=1)
            sqj += tl.sum(xj32 * xj32, axis=1)
    if NORMALIZE:
        ri = 1.0 / tl.maximum(tl.sqrt(sqi), eps)
        rj = 1.0 / tl.maximum(tl.sqrt(sqj), eps)
        acc = acc * ri[:, None] * rj[None, :]
    else:
        ri = tl.full((BLOCK_M,), 1.0, tl.float32)
        rj = tl.full((BLOCK_M,), 1.0, tl.float32)
    return acc, ri, rj, sqi


@triton.jit
def _diff_tile(
    Z, T, b, rows_i, rows_j, N, C1, C2,
    szb, szn, szc, stb, stn, stc, eps,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_K2: tl.constexpr,
):  # fmt: skip
    """D = G_z - G_T on one (BLOCK_M, BLOCK_M) tile, with both operands' inverse row norms and squared norms."""
    gz, rzi, rzj, sqzi = _gram_tile(Z, b, rows_i, rows_j, N, C1, szb, szn, szc, eps, NORMALIZE, BLOCK_M, BLOCK_K1)
    gt, rti, rtj, sqti = _gram_tile(T, b, rows_i, rows_j, N, C2, stb, stn, stc, eps, NORMALIZE, BLOCK_M, BLOCK_K2)
    return gz - gt, rzi, rzj, rti, rtj, sqzi, sqti
