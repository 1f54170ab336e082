"""Triton GEMM kernels of ``swiglu_mlp`` (the public op, its math and its autograd live in ``swiglu_mlp.py``).

Forward: ``[a | b] = x @ w12^T + b12`` with the SwiGLU gate in the epilogue; backward: ``dh = dy @ w3`` with the gate's
derivative in the epilogue (docs/method.md § SwiGLU in GEMM epilogues). The tiles, their configs (autotuned on a GPU,
a fixed small one under the interpreter), the launcher and the bias partials are ``_gemm_epilogue``'s, shared with
``gelu_mlp``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gemm_epilogue import (
    GPU_BLOCK_M,
    GPU_CONFIGS,
    INTERPRET_CONFIG,
    autotuned,
    bias_partials,
    block_m,
    launch,
    mm_tile,
    tile_offsets,
    unit_cols,
)

__all__ = ["GPU_BLOCK_M", "GPU_CONFIGS", "INTERPRET_CONFIG", "block_m", "gemm_gate_fwd", "gemm_gate_bwd"]


@triton.jit
def _swiglu_mlp_fwd_kernel(
    X,  # (M, K) input rows (K = model width D), row stride stride_xm, unit column stride
    W,  # (2N, K) packed weight [w_a | w_b] (N = hidden H), row stride stride_wn, unit column stride
    BIAS,  # (2N,) packed bias [b_a | b_b] (read only when HAS_BIAS)
    AB,  # (M, 2N) output: pre-activations [a | b] (bias included), contiguous; saved for backward
    HID,  # (M, N) output: silu(a) * b, contiguous
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, rm, rn, rk, xm = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    wn = (rn % N).to(tl.int64)  # columns past the end load a valid row of W too: no N mask in the loop
    x_ptr = X + xm[:, None] * stride_xm + rk[None, :]  # (BLOCK_M, BLOCK_K)
    wa_ptr = W + wn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N): w_a^T tile
    wb_ptr = wa_ptr + N * stride_wn  # w_b^T tile (rows N .. 2N - 1 of W)
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        x = tl.load(x_ptr + k0, mask=kmask[None, :], other=0.0)
        wa = tl.load(wa_ptr + k0, mask=kmask[:, None], other=0.0)
        wb = tl.load(wb_ptr + k0, mask=kmask[:, None], other=0.0)
        acc_a = tl.dot(x, wa, acc_a, input_precision="ieee")  # half inputs: tensor cores, fp32 sums
        acc_b = tl.dot(x, wb, acc_b, input_precision="ieee")
    nmask = rn < N
    if HAS_BIAS:
        acc_a += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(BIAS + N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # epilogue: the gate from the unrounded fp32 accumulators
    hid = acc_a * tl.sigmoid(acc_a) * acc_b
    mask = (rm < M)[:, None] & nmask[None, :]
    rows = rm.to(tl.int64)[:, None]
    ab_ptr = AB + rows * (2 * N) + rn[None, :]
    tl.store(ab_ptr, acc_a.to(AB.dtype.element_ty), mask=mask)
    tl.store(ab_ptr + N, acc_b.to(AB.dtype.element_ty), mask=mask)
    tl.store(HID + rows * N + rn[None, :], hid.to(HID.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_mlp_bwd_kernel(
    DY,  # (M, K) upstream gradient of y (K = model width D), row stride stride_dym, unit column stride
    W3,  # (K, N) the second projection's weight (D, H), row stride stride_w3k, unit column stride
    AB,  # (M, 2N) saved pre-activations [a | b], contiguous
    DAB,  # (M, 2N) output: [da | db], contiguous
    DBIAS,  # (cdiv(M, BLOCK_M), 2N) fp32 output: per-row-block column sums of [da | db] (written when HAS_BIAS)
    M,
    N,
    K,
    stride_dym,
    stride_w3k,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, rm, rn, rk, dym = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    w3n = rn % N
    dy_ptr = DY + dym[:, None] * stride_dym + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w3_ptr = W3 + rk.to(tl.int64)[:, None] * stride_w3k + w3n[None, :]  # (BLOCK_K, BLOCK_N)
    acc = mm_tile(dy_ptr, w3_ptr, K, stride_w3k, BLOCK_M, BLOCK_N, BLOCK_K)  # dh = dy @ w3
    # epilogue: the gate's derivative with the saved a, b (s = sigmoid(a))
    nmask = rn < N
    mask = (rm < M)[:, None] & nmask[None, :]
    rows = rm.to(tl.int64)[:, None]
    ab_ptr = AB + rows * (2 * N) + rn[None, :]
    a = tl.load(ab_ptr, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ab_ptr + N, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = tl.where(mask, acc * b * s * (1.0 + a * (1.0 - s)), 0.0)
    db = tl.where(mask, acc * a * s, 0.0)
    dab_ptr = DAB + rows * (2 * N) + rn[None, :]
    tl.store(dab_ptr, da.to(DAB.dtype.element_ty), mask=mask)
    tl.store(dab_ptr + N, db.to(DAB.dtype.element_ty), mask=mask)
    if HAS_BIAS:  # the bias gradient's partials, from the fp32 values before rounding (deterministic, no atomics)
        part = DBIAS + pid_m.to(tl.int64) * (2 * N) + rn
        tl.store(part, tl.sum(da, axis=0), mask=nmask)
        tl.store(part + N, tl.sum(db, axis=0), mask=nmask)


_fwd_tuned = autotuned(_swiglu_mlp_fwd_kernel)
_bwd_tuned = autotuned(_swiglu_mlp_bwd_kernel)


def gemm_gate_fwd(x: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ab = x @ w12^T + b12`` (M, 2H) and ``h = silu(a) * b`` (M, H) in ``x.dtype``; ``x (M, D)``, ``w12 (2H, D)``."""
    M, D = x.shape
    H = w12.shape[0] // 2
    ab = torch.empty((M, 2 * H), dtype=x.dtype, device=x.device)
    h = torch.empty((M, H), dtype=x.dtype, device=x.device)
    if M and H:
        x, w12 = unit_cols(x), unit_cols(w12)
        launch(_fwd_tuned, _swiglu_mlp_fwd_kernel, M, H, x, w12, b12 if b12 is not None else w12, ab, h, M, H, D,
               x.stride(0), w12.stride(0), HAS_BIAS=b12 is not None)  # fmt: skip
    return ab, h


def gemm_gate_bwd(
    dy: torch.Tensor, w3: torch.Tensor, ab: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d[a | b]`` (M, 2H) in ``ab.dtype`` from ``dh = dy @ w3`` for ``dy (M, D)``, ``w3 (D, H)``, ``ab (M, 2H)``;
    with ``with_bias`` also the bias gradient ``(2H,)`` in fp32 (summed from per-row-block partials)."""
    M, D = dy.shape
    H = w3.shape[1]
    dab = torch.empty((M, 2 * H), dtype=ab.dtype, device=ab.device)
    parts = bias_partials(M, 2 * H, with_bias, ab.device)
    if M and H:
        dy, w3 = unit_cols(dy), unit_cols(w3)
        launch(_bwd_tuned, _swiglu_mlp_bwd_kernel, M, H, dy, w3, ab.contiguous(), dab, parts, M, H, D, dy.stride(0),
               w3.stride(0), HAS_BIAS=with_bias)  # fmt: skip
    return dab, (parts.sum(0) if with_bias else None)
