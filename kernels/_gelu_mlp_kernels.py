"""Triton GEMM kernels of ``gelu_mlp`` (the public op, its math and its autograd live in ``gelu_mlp.py``).

Forward: ``pre = x @ w1^T + b1`` with ``h = gelu(pre)`` in the epilogue; backward: ``dh = dy @ w2`` with
``d_pre = dh * gelu'(pre)`` and the bias gradient's partials in the epilogue (docs/method.md § GELU in GEMM
epilogues). One fp32 accumulator per tile; tiles, configs, launcher and bias partials are ``_gemm_epilogue``'s, shared
with ``swiglu_mlp``.

:func:`gelu` and :func:`gelu_grad` are the Triton home of the GELU and its derivative, exact (erf) or tanh-approximated
(``TANH``), both from an fp32 argument:

    exact:  gelu(u) = u Phi(u),  Phi(u) = (1 + erf(u / sqrt 2)) / 2,   gelu'(u) = Phi(u) + u phi(u),
            phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
    tanh:   t = tanh(k (u + c u^3)),  k = sqrt(2 / pi),  c = 0.044715,  gelu(u) = u (1 + t) / 2,
            gelu'(u) = (1 + t) / 2 + u (1 - t^2) k (1 + 3 c u^2) / 2
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gemm_epilogue import autotuned, bias_partials, launch, mm_tile, tile_offsets, unit_cols

__all__ = ["APPROXIMATIONS", "gemm_gelu_fwd", "gemm_gelu_bwd"]

APPROXIMATIONS = ("none", "tanh")  # F.gelu's ``approximate`` values


@triton.jit
def _tanh(v):
    """tanh(v) = 2 sigmoid(2v) - 1 (no tanh in triton.language; exact at both tails)."""
    return 2.0 * tl.sigmoid(2.0 * v) - 1.0


@triton.jit
def gelu(u, TANH: tl.constexpr):
    """GELU of the fp32 tile ``u``: exact (erf) or, with ``TANH``, the tanh approximation (module docstring)."""
    if TANH:
        t = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))  # k = sqrt(2 / pi), c = 0.044715
        y = 0.5 * u * (1.0 + t)
    else:
        y = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))  # 1 / sqrt(2)
    return y


@triton.jit
def gelu_grad(u, TANH: tl.constexpr):
    """d gelu / du of the fp32 tile ``u`` (module docstring)."""
    if TANH:
        t = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        d = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)  # 3c = 0.134145
    else:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        d = cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return d


@triton.jit
def _gelu_mlp_fwd_kernel(
    X,  # (M, K) input rows (K = model width D), row stride stride_xm, unit column stride
    W,  # (N, K) fc1 weight (N = hidden H), row stride stride_wn, unit column stride
    BIAS,  # (N,) fc1 bias (read only when HAS_BIAS)
    PRE,  # (M, N) output: pre-activation (bias included), contiguous; saved for backward (written when SAVE_PRE)
    HID,  # (M, N) output: gelu(pre), contiguous
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, rm, rn, rk, xm = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    wn = (rn % N).to(tl.int64)  # columns past the end load a valid row of W: no N mask in the loop
    x_ptr = X + xm[:, None] * stride_xm + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptr = W + wn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N): w1^T tile
    acc = mm_tile(x_ptr, w_ptr, K, 1, BLOCK_M, BLOCK_N, BLOCK_K)
    nmask = rn < N
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & nmask[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SAVE_PRE:
        tl.store(PRE + offs, acc.to(PRE.dtype.element_ty), mask=mask)
    # epilogue: the activation from the unrounded fp32 accumulator
    tl.store(HID + offs, gelu(acc, TANH).to(HID.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_mlp_bwd_kernel(
    DY,  # (M, K) upstream gradient of y (K = model width D), row stride stride_dym, unit column stride
    W2,  # (K, N) fc2 weight (D, H), row stride stride_w2k, unit column stride
    PRE,  # (M, N) saved pre-activation, contiguous
    DPRE,  # (M, N) output: d pre = (dy @ w2) * gelu'(pre), contiguous
    DBIAS,  # (cdiv(M, BLOCK_M), N) fp32 output: per-row-block column sums of d pre (written when HAS_BIAS)
    M,
    N,
    K,
    stride_dym,
    stride_w2k,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, rm, rn, rk, dym = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    dy_ptr = DY + dym[:, None] * stride_dym + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w2_ptr = W2 + rk.to(tl.int64)[:, None] * stride_w2k + (rn % N)[None, :]  # (BLOCK_K, BLOCK_N)
    acc = mm_tile(dy_ptr, w2_ptr, K, stride_w2k, BLOCK_M, BLOCK_N, BLOCK_K)  # dh = dy @ w2
    # epilogue: the activation's derivative at the saved pre-activation
    nmask = rn < N
    mask = (rm < M)[:, None] & nmask[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    pre = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    dpre = tl.where(mask, acc * gelu_grad(pre, TANH), 0.0)
    tl.store(DPRE + offs, dpre.to(DPRE.dtype.element_ty), mask=mask)
    if HAS_BIAS:  # the bias gradient's partials, from the fp32 values before rounding (deterministic, no atomics)
        tl.store(DBIAS + pid_m.to(tl.int64) * N + rn, tl.sum(dpre, axis=0), mask=nmask)


_fwd_tuned = autotuned(_gelu_mlp_fwd_kernel)
_bwd_tuned = autotuned(_gelu_mlp_bwd_kernel)


def gemm_gelu_fwd(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, approximate: str, save_pre: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(pre, h)``: ``pre = x @ w1^T + b1`` (M, H; None without ``save_pre``) and ``h = gelu(pre)`` (M, H) in
    ``x.dtype``, for ``x (M, D)``, ``w1 (H, D)``, ``b1 (H,)`` or None."""
    M, D = x.shape
    H = w1.shape[0]
    h = torch.empty((M, H), dtype=x.dtype, device=x.device)
    pre = torch.empty((M, H), dtype=x.dtype, device=x.device) if save_pre else None
    if M and H:
        x, w1 = unit_cols(x), unit_cols(w1)
        launch(_fwd_tuned, _gelu_mlp_fwd_kernel, M, H, x, w1, b1 if b1 is not None else w1, pre if save_pre else h, h,
               M, H, D, x.stride(0), w1.stride(0), HAS_BIAS=b1 is not None, SAVE_PRE=save_pre,
               TANH=approximate == "tanh")  # fmt: skip
    return pre, h


def gemm_gelu_bwd(
    dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, approximate: str, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d pre`` (M, H) in ``pre.dtype`` from ``dh = dy @ w2`` for ``dy (M, D)``, ``w2 (D, H)``, ``pre (M, H)``; with
    ``with_bias`` also the fc1 bias gradient ``(H,)`` in fp32 (summed from per-row-block partials)."""
    M, D = dy.shape
    H = w2.shape[1]
    dpre = torch.empty((M, H), dtype=pre.dtype, device=pre.device)
    parts = bias_partials(M, H, with_bias, pre.device)
    if M and H:
        dy, w2 = unit_cols(dy), unit_cols(w2)
        launch(_bwd_tuned, _gelu_mlp_bwd_kernel, M, H, dy, w2, pre.contiguous(), dpre, parts, M, H, D, dy.stride(0),
               w2.stride(0), HAS_BIAS=with_bias, TANH=approximate == "tanh")  # fmt: skip
    return dpre, (parts.sum(0) if with_bias else None)
