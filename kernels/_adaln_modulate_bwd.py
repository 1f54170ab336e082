"""Backward kernel of :mod:`.adaln_modulate` (its own module: the row is split into two column tiles, like
:mod:`._gated_residual_adaln_bwd`, so 1152 = 1024 + 128 lanes leave none idle).

The math is in :mod:`.adaln_modulate`'s docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._adaln_common import _bwd_modulation, _two_tile_mean, _two_tile_rstd

__all__ = ["_adaln_modulate_bwd_kernel"]


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
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    acc_shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_w = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if BLOCK_C2 > 0:
        cols2 = BLOCK_C + tl.arange(0, BLOCK_C2)
        acc_shift2 = tl.zeros((BLOCK_C2,), dtype=tl.float32)
        acc_scale2 = tl.zeros((BLOCK_C2,), dtype=tl.float32)
        acc_w2 = tl.zeros((BLOCK_C2,), dtype=tl.float32)
    for it in range(ITERS):
        t = (pid_t * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
        # recompute the row statistics over both tiles
        x, mask, cmask = _load_rows(X, b, t, cols, T, D, sxb, sxt)
        x2 = x  # placeholder when the row is one tile (never read then)
        if BLOCK_C2 > 0:
            x2, mask2, cmask2 = _load_rows(X, b, t, cols2, T, D, sxb, sxt)
        if not IS_RMS:
            mean = _two_tile_mean(x, x2, D, BLOCK_C2 > 0)
            x = tl.where(mask, x - mean[:, None], 0.0)
            if BLOCK_C2 > 0:
                x2 = tl.where(mask2, x2 - mean[:, None], 0.0)
        rstd = _two_tile_rstd(x, x2, D, eps, BLOCK_C2 > 0)
        n = x * rstd[:, None]
        # modulation gradients and dn = dL/dn (weight applied) per tile
        dn, s_sh, s_sc, s_w = _bwd_modulation(DY, DSHIFT, DSCALE, SCALE, W, b, t, cols, T, D, n, mask, cmask, s_scb,
                                              s_sct, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT)  # fmt: skip
        acc_shift += s_sh
        acc_scale += s_sc
        acc_w += s_w
        dot = tl.sum(dn * n, axis=1)
        mdn = tl.sum(dn, axis=1)
        if BLOCK_C2 > 0:
            n2 = x2 * rstd[:, None]
            dn2, s_sh2, s_sc2, s_w2 = _bwd_modulation(DY, DSHIFT, DSCALE, SCALE, W, b, t, cols2, T, D, n2, mask2,
                                                      cmask2, s_scb, s_sct, HAS_SHIFT, SHIFT_PT, SCALE_PT,
                                                      HAS_WEIGHT)  # fmt: skip
            acc_shift2 += s_sh2
            acc_scale2 += s_sc2
            acc_w2 += s_w2
            dot += tl.sum(dn2 * n2, axis=1)
            mdn += tl.sum(dn2, axis=1)
        # norm backward: dx = rstd * (dn - n * mean(dn * n) [- mean(dn)])
        shift_dn = tl.zeros_like(mdn) if IS_RMS else mdn / D
        out_off = (b * T + t[:, None]) * D + cols[None, :]
        dx = rstd[:, None] * (dn - shift_dn[:, None] - n * (dot / D)[:, None])
        tl.store(DX + out_off, dx.to(DX.dtype.element_ty), mask=mask)
        if BLOCK_C2 > 0:
            dx2 = rstd[:, None] * (dn2 - shift_dn[:, None] - n2 * (dot / D)[:, None])
            tl.store(DX + (b * T + t[:, None]) * D + cols2[None, :], dx2.to(DX.dtype.element_ty), mask=mask2)
    part = (b * P + pid_t) * D
    cmask = cols < D
    if HAS_SHIFT and not SHIFT_PT:
        tl.store(DSHIFT + part + cols, acc_shift, mask=cmask)
    if not SCALE_PT:
        tl.store(DSCALE + part + cols, acc_scale, mask=cmask)
    if HAS_WEIGHT:
        tl.store(DW + part + cols, acc_w, mask=cmask)
    if BLOCK_C2 > 0:
        cmask2 = cols2 < D
        if HAS_SHIFT and not SHIFT_PT:
            tl.store(DSHIFT + part + cols2, acc_shift2, mask=cmask2)
        if not SCALE_PT:
            tl.store(DSCALE + part + cols2, acc_scale2, mask=cmask2)
        if HAS_WEIGHT:
            tl.store(DW + part + cols2, acc_w2, mask=cmask2)

