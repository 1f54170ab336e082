"""Backward of :mod:`.residual_layernorm` (its own module, as ``_gated_residual_adaln_bwd``): the kernel, its
launcher, and the block sizes both directions use. The math is in :mod:`.residual_layernorm`'s docstring
(docs/method.md § Residual + LayerNorm fused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._adaln_common import bwd_programs
from ._dispatch import interpreter_enabled
from ._utils import as_rows, row_block, row_warps

__all__ = ["MAX_BLOCK_ELEMS", "bwd", "bwd_blocks", "dbranch_separate", "fwd_blocks"]

# Largest tile (row elements) per program; None: the GPU sizes of ``fwd_blocks`` / ``bwd_blocks`` (large when
# interpreted). Tests lower it to run several row blocks per program and the partial-sum reduction on small shapes.
MAX_BLOCK_ELEMS: int | None = None


@triton.jit
def _residual_layernorm_bwd_kernel(
    GY,  # (R, D) upstream gradient of y, contiguous (HAS_GY)
    GN,  # (R, D) upstream gradient of n, contiguous (HAS_GN)
    Y,  # (R, D) forward y (x for the plain LayerNorm), row stride sy (HAS_GN)
    BR,  # (R, D) forward branch, row stride sbr (HAS_GAMMA)
    GAMMA,  # (D,) LayerScale (HAS_GAMMA)
    BB,  # (D,) the branch's folded bias (HAS_BB; read for dgamma)
    W,  # (D,) LayerNorm weight (HAS_W)
    MEAN,  # (R,) fp32 saved row means
    RSTD,  # (R,) fp32 saved 1 / std
    DX,  # (R, D) gradient of x, contiguous
    DBR,  # (R, D) gradient of branch, contiguous (STORE_DBR)
    DGAMMA,  # (P, D) fp32 per-program partial column sums of dgamma (HAS_GAMMA)
    DBB,  # (P, D) fp32 partials of the branch bias gradient (HAS_BB)
    DW,  # (P, D) fp32 partials of dw (HAS_W)
    DB,  # (P, D) fp32 partials of db (HAS_B)
    R,
    D,
    ITERS,
    sy,
    sbr,
    HAS_GY: tl.constexpr,
    HAS_GN: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BB: tl.constexpr,
    STORE_DBR: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    PARAM_GRADS: tl.constexpr,  # accumulate dgamma / dbb / dw / db (False: frozen parameters; branch not read)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program pid handles row blocks pid*ITERS .. pid*ITERS + ITERS - 1, accumulating the column sums in fp32
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < D
    acc_gamma = tl.zeros((BLOCK_C,), tl.float32)
    acc_bb = tl.zeros((BLOCK_C,), tl.float32)
    acc_w = tl.zeros((BLOCK_C,), tl.float32)
    acc_b = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BB:
            bb = tl.load(BB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for it in range(ITERS):
        rows = (pid * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        off = rows[:, None] * D + cols[None, :]
        d = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        if HAS_GN:
            gn = tl.load(GN + off, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + rows[:, None] * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            nh = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)  # n̂, zero outside the row
            if HAS_W:
                if PARAM_GRADS:
                    acc_w += tl.sum(gn * nh, axis=0)
                g = gn * w
            else:
                g = gn
            if HAS_B and PARAM_GRADS:
                acc_b += tl.sum(gn, axis=0)
            mean_g = tl.sum(g, axis=1) / D
            mean_gn = tl.sum(g * nh, axis=1) / D
            d = rstd[:, None] * (g - mean_g[:, None] - nh * mean_gn[:, None])
        if HAS_GY:
            d += tl.load(GY + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, d.to(DX.dtype.element_ty), mask=mask)
        if HAS_GAMMA:
            if PARAM_GRADS:
                br = tl.load(BR + rows[:, None] * sbr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_BB:
                    br = br + bb
                acc_gamma += tl.sum(tl.where(mask, d * br, 0.0), axis=0)
            dbr = d * gamma
            tl.store(DBR + off, dbr.to(DBR.dtype.element_ty), mask=mask)
        else:
            dbr = d
            if STORE_DBR:
                tl.store(DBR + off, d.to(DBR.dtype.element_ty), mask=mask)
        if HAS_BB and PARAM_GRADS:
            acc_bb += tl.sum(tl.where(mask, dbr, 0.0), axis=0)  # d bb = sum_rows dbranch, before its rounding
    if PARAM_GRADS:
        if HAS_GAMMA:
            tl.store(DGAMMA + pid * D + cols, acc_gamma, mask=cmask)
        if HAS_BB:
            tl.store(DBB + pid * D + cols, acc_bb, mask=cmask)
        if HAS_W:
            tl.store(DW + pid * D + cols, acc_w, mask=cmask)
        if HAS_B:
            tl.store(DB + pid * D + cols, acc_b, mask=cmask)



def fwd_blocks(R: int, D: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)``: whole rows, about 4096 row elements per program on GPU (4 rows at width
    1024) so ~32 fp32 values per thread; the interpreter takes larger blocks."""
    BLOCK_R, BLOCK_C = row_block(R, D, MAX_BLOCK_ELEMS or (65536 if interpreter_enabled() else 4096))
    return BLOCK_R, BLOCK_C, row_warps(BLOCK_R, BLOCK_C)


def bwd_blocks(R: int, D: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` of the backward: about 2048 row elements per program on GPU (more live
    tiles than the forward: gn, y, n̂, d, branch)."""
    BLOCK_R, BLOCK_C = row_block(R, D, MAX_BLOCK_ELEMS or (65536 if interpreter_enabled() else 2048))
    return BLOCK_R, BLOCK_C, row_warps(BLOCK_R, BLOCK_C)


def dbranch_separate(gamma, branch, x_dtype: torch.dtype) -> bool:
    """Whether the backward writes dbranch (with gamma, or in another dtype than dx); else dbranch is dx."""
    return branch is not None and (gamma is not None or branch.dtype != x_dtype)


def bwd(gy, gn, y, branch, gamma, branch_bias, weight, bias, mean, rstd, x_dtype: torch.dtype, param_grads: bool):
    shape = y.shape
    yr, R, D = as_rows(y)
    dx = torch.empty(shape, dtype=x_dtype, device=y.device)
    separate = dbranch_separate(gamma, branch, x_dtype)
    dbr = torch.empty(shape if separate else (0,), dtype=branch.dtype if branch is not None else x_dtype,
                      device=y.device)  # fmt: skip
    BLOCK_R, BLOCK_C, num_warps = bwd_blocks(R, D)
    P, iters = bwd_programs(1, triton.cdiv(R, BLOCK_R), y.device)
    # per-program fp32 partial column sums, reduced below (no atomics)
    dg, dbb, dw, db = (y.new_empty((P, D) if t is not None and param_grads else 1, dtype=torch.float32)
                       for t in (gamma, branch_bias, weight, bias))  # fmt: skip
    if R > 0 and D > 0:
        br = as_rows(branch)[0] if gamma is not None and param_grads else yr
        _residual_layernorm_bwd_kernel[(P,)](
            gy.reshape(R, D).contiguous() if gy is not None else yr, gn.reshape(R, D).contiguous() if gn is not None
            else yr, yr, br, gamma if gamma is not None else yr, branch_bias if branch_bias is not None else yr,
            weight if weight is not None else yr, mean, rstd, dx, dbr if separate else dx, dg, dbb, dw, db, R, D,
            iters, yr.stride(0), br.stride(0), HAS_GY=gy is not None, HAS_GN=gn is not None,
            HAS_GAMMA=gamma is not None, HAS_BB=branch_bias is not None, STORE_DBR=separate,
            HAS_W=weight is not None, HAS_B=bias is not None, PARAM_GRADS=param_grads, BLOCK_R=BLOCK_R,
            BLOCK_C=BLOCK_C, num_warps=num_warps,
        )  # fmt: skip
    else:  # nothing to reduce: zero gradients of the right shapes
        for buf in (dg, dbb, dw, db):
            buf.zero_()
    return (
        dx,
        dbr,
        *(buf.sum(0).to(t.dtype) if t is not None and param_grads else y.new_empty(0)
          for buf, t in ((dg, gamma), (dbb, branch_bias), (dw, weight), (db, bias))),
    )  # fmt: skip

