"""Backward kernel of :mod:`.gated_residual_adaln` (its own module: the row is split into two column tiles), and
the residual tile both directions compute.

The math is in :mod:`.gated_residual_adaln`'s docstring (docs/method.md § Generators for the block it serves).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _adaln_common as C
from ._adaln_common import (
    _bwd_norm_modulation,
    _load_mod,
    _norm_bwd,
    _program_tiles,
    _store_partials,
    _two_tile_stats,
    _two_tile_zeros,
)
from ._dispatch import interpreter_enabled

__all__ = ["_gated_residual_adaln_bwd_kernel", "_residual_tile", "bwd_blocks"]


@triton.jit
def _residual_tile(X, YIN, GATE, BIAS, b, t, cols, T, D, sxb, sxt, syb, syt, s_gb, s_gt, GATE_PT: tl.constexpr,
                   HAS_BIAS: tl.constexpr):  # fmt: skip
    """One column tile of a row block in fp32: ``r = x + gate * (y + bias)`` (zero outside the masks), the biased
    branch output ``y + bias``, the gate and the masks. The forward stores ``r``; the backward recomputes it."""
    cmask = cols < D
    mask = (t < T)[:, None] & cmask[None, :]
    x = tl.load(X + b * sxb + t[:, None] * sxt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(YIN + b * syb + t[:, None] * syt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = tl.where(mask, y + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :], 0.0)
    gate = _load_mod(GATE, b, t, cols, s_gb, s_gt, mask, cmask, GATE_PT)
    return x + gate * y, y, gate, mask, cmask


@triton.jit
def _bwd_store(DR, DX, DYIN, DGATE, b, t, cols, T, D, dr, y, gate, mask, HAS_DR: tl.constexpr,
               GATE_PT: tl.constexpr):
    """One column tile: dx = dr (+ the upstream dr), dy = dr * gate, dgate = dr * (y + bias) (stored or summed);
    returns the column sums of dgate and of dy (the bias gradient's share of this tile, from the fp32 dy)."""
    out_off = (b * T + t[:, None]) * D + cols[None, :]
    if HAS_DR:
        dr += tl.load(DR + out_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + out_off, dr.to(DX.dtype.element_ty), mask=mask)
    dy = dr * gate
    tl.store(DYIN + out_off, dy.to(DYIN.dtype.element_ty), mask=mask)
    dgate = dr * y
    if GATE_PT:
        tl.store(DGATE + out_off, dgate.to(DGATE.dtype.element_ty), mask=mask)
    return tl.sum(dgate, axis=0), tl.sum(dy, axis=0)


@triton.jit
def _gated_residual_adaln_bwd_kernel(
    DR,  # (B, T, D) upstream gradient of r, contiguous (read only when HAS_DR)
    DH,  # (B, T, D) upstream gradient of h, contiguous
    X,  # (B, T, D) forward residual input, strides (sxb, sxt, 1)
    YIN,  # (B, T, D) forward sub-block output, strides (syb, syt, 1)
    GATE,  # (B, D) | (B, T, D), strides (s_gb, s_gt, 1)
    SCALE,  # (B, D) | (B, T, D), strides (s_scb, s_sct, 1)
    W,  # (D,) RMSNorm weight (HAS_WEIGHT)
    BIAS,  # (D,) branch bias (HAS_BIAS)
    DX,  # (B, T, D) gradient of x, contiguous
    DYIN,  # (B, T, D) gradient of y, contiguous
    DGATE,  # (B, T, D) gradient per token | (B, P, D) fp32 per-program partial sums per sample
    DSHIFT,  # (B, T, D) | (B, P, D) fp32 partials (HAS_SHIFT)
    DSCALE,  # (B, T, D) | (B, P, D) fp32 partials
    DW,  # (B, P, D) fp32 partial sums of the weight gradient (HAS_WEIGHT)
    DBIAS,  # (B, P, D) fp32 partial sums of the bias gradient (HAS_BIAS)
    T,
    D,
    P,
    ITERS,
    sxb,
    sxt,
    syb,
    syt,
    s_gb,
    s_gt,
    s_scb,
    s_sct,
    eps,
    IS_RMS: tl.constexpr,
    HAS_DR: tl.constexpr,
    GATE_PT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SHIFT_PT: tl.constexpr,
    SCALE_PT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # first column tile: the largest power of two <= D (or next_power_of_2(D) when small)
    BLOCK_C2: tl.constexpr,  # second column tile after it: next_power_of_2 of the rest (0: none)
):
    # A row is split into two power-of-two column tiles (1152 = 1024 + 128, 2048 = 2048 + 0): no lane of a tile is
    # padding where D is a sum of two powers of two, and half the registers of one 2048-wide tile. The row
    # statistics add both tiles' partial sums. Program (pid_t, b) handles row blocks pid_t*ITERS .. + ITERS - 1.
    pid_t, b, cols, cols2 = _program_tiles(BLOCK_C, BLOCK_C2)
    acc_gate, acc_gate2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    acc_shift, acc_shift2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    acc_scale, acc_scale2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    acc_w, acc_w2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    acc_bias, acc_bias2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    for it in range(ITERS):
        t = (pid_t * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
        # recompute the forward: r = x + gate * (y + bias), n = norm(r), statistics over both tiles (the second
        # tile's names alias the first when there is none)
        r, y, gate, mask, cmask = _residual_tile(X, YIN, GATE, BIAS, b, t, cols, T, D, sxb, sxt, syb, syt, s_gb, s_gt,
                                                 GATE_PT, HAS_BIAS)  # fmt: skip
        r2, y2, gate2, mask2, cmask2 = r, y, gate, mask, cmask
        if BLOCK_C2 > 0:
            r2, y2, gate2, mask2, cmask2 = _residual_tile(X, YIN, GATE, BIAS, b, t, cols2, T, D, sxb, sxt, syb, syt,
                                                          s_gb, s_gt, GATE_PT, HAS_BIAS)  # fmt: skip
        r, r2, rstd = _two_tile_stats(r, r2, mask, mask2, D, eps, IS_RMS, BLOCK_C2 > 0)
        n = r * rstd[:, None]
        # h = norm(r) * w * (1 + scale) + shift: modulation gradients, then per tile the norm backward
        # dr = rstd * (dn - n * mean(dn * n) [- mean(dn)])
        dn, dn2, n2, shift_dn, mean_dn_n, acc_shift, acc_scale, acc_w, acc_shift2, acc_scale2, acc_w2 = (
            _bwd_norm_modulation(DH, DSHIFT, DSCALE, SCALE, W, b, t, cols, cols2, T, D, n, r2, rstd, mask, mask2,
                                 cmask, cmask2, s_scb, s_sct, acc_shift, acc_scale, acc_w, acc_shift2, acc_scale2,
                                 acc_w2, IS_RMS, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT, BLOCK_C2 > 0))  # fmt: skip
        dr = _norm_bwd(dn, n, rstd, shift_dn, mean_dn_n)
        s_g, s_b = _bwd_store(DR, DX, DYIN, DGATE, b, t, cols, T, D, dr, y, gate, mask, HAS_DR, GATE_PT)
        acc_gate += s_g
        acc_bias += s_b
        if BLOCK_C2 > 0:
            dr2 = _norm_bwd(dn2, n2, rstd, shift_dn, mean_dn_n)
            s_g2, s_b2 = _bwd_store(DR, DX, DYIN, DGATE, b, t, cols2, T, D, dr2, y2, gate2, mask2, HAS_DR, GATE_PT)
            acc_gate2 += s_g2
            acc_bias2 += s_b2
    part = (b * P + pid_t) * D
    _store_partials(DGATE, part, cols, cols2, acc_gate, acc_gate2, D, not GATE_PT, BLOCK_C2 > 0)
    _store_partials(DSHIFT, part, cols, cols2, acc_shift, acc_shift2, D, HAS_SHIFT and not SHIFT_PT, BLOCK_C2 > 0)
    _store_partials(DSCALE, part, cols, cols2, acc_scale, acc_scale2, D, not SCALE_PT, BLOCK_C2 > 0)
    _store_partials(DW, part, cols, cols2, acc_w, acc_w2, D, HAS_WEIGHT, BLOCK_C2 > 0)
    _store_partials(DBIAS, part, cols, cols2, acc_bias, acc_bias2, D, HAS_BIAS, BLOCK_C2 > 0)


def bwd_blocks(T: int, D: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_C, BLOCK_C2, num_warps)`` of the backward: a row as two power-of-two column tiles
    (:func:`._adaln_common.col_tiles`: 1152 = 1024 + 128, 2048 = 2048 + 0).

    About 2048 row elements per program on GPU at 4-8 warps: registers for two blocks per SM
    (``compile_check --ptxas``); the interpreter takes larger blocks.
    """
    max_elems = C.MAX_BLOCK_ELEMS or (65536 if interpreter_enabled() else 2048)
    BLOCK_R, big, BLOCK_C2 = C.row_tiles(T, D, max_elems)
    return BLOCK_R, big, BLOCK_C2, 8 if BLOCK_R * (big + BLOCK_C2) >= 2048 else 4
