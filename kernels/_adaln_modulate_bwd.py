"""Backward kernel of :mod:`.adaln_modulate` (its own module: the row is split into two column tiles, like
:mod:`._gated_residual_adaln_bwd`, so 1152 = 1024 + 128 lanes leave none idle).

The math is in :mod:`.adaln_modulate`'s docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._adaln_common import (
    _bwd_norm_modulation,
    _norm_bwd,
    _program_tiles,
    _store_partials,
    _two_tile_stats,
    _two_tile_zeros,
)

__all__ = ["_adaln_modulate_bwd_kernel", "_load_rows"]


@triton.jit
def _load_rows(X, b, t, cols, T, D, sxb, sxt):
    """One column tile of a row block as fp32 (zeros outside the masks), with its masks."""
    cmask = cols < D
    mask = (t < T)[:, None] & cmask[None, :]
    x = tl.load(X + b * sxb + t[:, None] * sxt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, mask, cmask


@triton.jit
def _adaln_modulate_bwd_kernel(
    DY,  # (B, T, D) upstream gradient, contiguous
    X,  # (B, T, D) forward input, strides (sxb, sxt, 1)
    SCALE,  # (B, D) | (B, T, D), strides (s_scb, s_sct, 1)
    W,  # (D,) RMSNorm weight (HAS_WEIGHT)
    DX,  # (B, T, D) gradient of x, contiguous
    DSHIFT,  # (B, T, D) gradient per token | (B, P, D) fp32 per-program partial sums per sample (HAS_SHIFT)
    DSCALE,  # (B, T, D) gradient per token | (B, P, D) fp32 partial sums per sample
    DW,  # (B, P, D) fp32 partial sums of the weight gradient (HAS_WEIGHT)
    T,
    D,
    P,
    ITERS,
    sxb,
    sxt,
    s_scb,
    s_sct,
    eps,
    IS_RMS: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SHIFT_PT: tl.constexpr,
    SCALE_PT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # first column tile (``col_tiles``: the largest power of two <= D)
    BLOCK_C2: tl.constexpr,  # second column tile (0: none)
):
    # program (pid_t, b) handles row blocks pid_t*ITERS .. pid_t*ITERS + ITERS - 1 of sample b
    pid_t, b, cols, cols2 = _program_tiles(BLOCK_C, BLOCK_C2)
    acc_shift, acc_shift2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    acc_scale, acc_scale2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    acc_w, acc_w2 = _two_tile_zeros(BLOCK_C, BLOCK_C2)
    for it in range(ITERS):
        t = (pid_t * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
        # recompute the row statistics over both tiles (the second tile's names alias the first when there is none)
        x, mask, cmask = _load_rows(X, b, t, cols, T, D, sxb, sxt)
        x2, mask2, cmask2 = x, mask, cmask
        if BLOCK_C2 > 0:
            x2, mask2, cmask2 = _load_rows(X, b, t, cols2, T, D, sxb, sxt)
        x, x2, rstd = _two_tile_stats(x, x2, mask, mask2, D, eps, IS_RMS, BLOCK_C2 > 0)
        n = x * rstd[:, None]
        # modulation gradients, then the norm backward dx = rstd * (dn - n * mean(dn * n) [- mean(dn)]) per tile
        dn, dn2, n2, shift_dn, mean_dn_n, acc_shift, acc_scale, acc_w, acc_shift2, acc_scale2, acc_w2 = (
            _bwd_norm_modulation(DY, DSHIFT, DSCALE, SCALE, W, b, t, cols, cols2, T, D, n, x2, rstd, mask, mask2,
                                 cmask, cmask2, s_scb, s_sct, acc_shift, acc_scale, acc_w, acc_shift2, acc_scale2,
                                 acc_w2, IS_RMS, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT, BLOCK_C2 > 0))  # fmt: skip
        dx = _norm_bwd(dn, n, rstd, shift_dn, mean_dn_n)
        tl.store(DX + (b * T + t[:, None]) * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if BLOCK_C2 > 0:
            dx2 = _norm_bwd(dn2, n2, rstd, shift_dn, mean_dn_n)
            tl.store(DX + (b * T + t[:, None]) * D + cols2[None, :], dx2.to(DX.dtype.element_ty), mask=mask2)
    part = (b * P + pid_t) * D
    _store_partials(DSHIFT, part, cols, cols2, acc_shift, acc_shift2, D, HAS_SHIFT and not SHIFT_PT, BLOCK_C2 > 0)
    _store_partials(DSCALE, part, cols, cols2, acc_scale, acc_scale2, D, not SCALE_PT, BLOCK_C2 > 0)
    _store_partials(DW, part, cols, cols2, acc_w, acc_w2, D, HAS_WEIGHT, BLOCK_C2 > 0)
