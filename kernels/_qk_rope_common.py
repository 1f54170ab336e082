"""Shared private part of :mod:`.qk_norm_rope` and :mod:`.qkv_norm_rope`: the Triton kernels, their launchers and the
argument check (the math is documented in :mod:`.qk_norm_rope`; docs/method.md § Generators).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import interpreter_enabled
from ._utils import row_block

__all__ = ["qk_fwd", "qk_bwd", "qk_check", "token_major"]

# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_biased(X, BIAS, n, d, pd, mask, stride_n, D, HAS_B: tl.constexpr):
    """fp32 tile x and its pair partners x[.., d ^ 1], plus the per-column bias (HAS_B; 0 outside ``mask``)."""
    x = tl.load(X + n[:, None] * stride_n + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(X + n[:, None] * stride_n + pd[None, :], mask=mask, other=0.0).to(tl.float32)  # pair partner
    if HAS_B:
        dmask = d < D
        x += tl.where(mask, tl.load(BIAS + d, mask=dmask, other=0.0).to(tl.float32)[None, :], 0.0)
        xp += tl.where(mask, tl.load(BIAS + pd, mask=dmask, other=0.0).to(tl.float32)[None, :], 0.0)
    return x, xp


@triton.jit
def _norm_rope_tile(
    X,  # (B, H, N, D) input (q or k), strides sb, sh, sn, unit d stride; already offset to (b, h)
    BIAS,  # (D,) bias added to x first (read only when HAS_B); already offset to head h
    W,  # (D,) norm weight (read only when HAS_W)
    O,  # (B, H, N, D) output, strides (.., .., stride_on, 1); already offset to (b, h)
    n,
    d,
    pd,
    mask,
    c,
    s,
    sign,
    stride_n,
    stride_on,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
    x, xp = _load_biased(X, BIAS, n, d, pd, mask, stride_n, D, HAS_B)
    if NORMALIZE:
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * r[:, None]
        xp = xp * r[:, None]
        if HAS_W:
            dmask = d < D
            x = x * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            xp = xp * tl.load(W + pd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    out = x * c + sign[None, :] * xp * s
    tl.store(O + n[:, None] * stride_on + d[None, :], out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q,  # (B, H, N, D) strides sqb, sqh, sqn, unit d stride
    K,  # (B, H, N, D) strides skb, skh, skn, unit d stride
    COS,  # (N, D) contiguous
    SIN,  # (N, D) contiguous
    QW,  # (D,) q norm weight (HAS_QW)
    KW,  # (D,) k norm weight (HAS_KW)
    QB,  # (H * D,) bias added to q before the norm, head h at h * D (HAS_BIAS)
    KB,  # (H * D,) bias added to k (HAS_BIAS)
    V,  # (B, H, N, D) strides svb, svh, svn, unit d stride (WRITE_V)
    VB,  # (H * D,) bias added to v (WRITE_V and HAS_BIAS)
    QO,  # (B, H, N, D) output, strides sob, soh, son, unit d stride (contiguous, or token-major (B, N, H, D))
    KO,  # (B, H, N, D) output, the same strides as QO
    VO,  # (B, H, N, D) output v (+ bias), the same strides as QO (WRITE_V)
    H,
    N,
    D,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bi = pid_bh // H
    hi = pid_bh % H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    pd = d ^ 1  # the other member of the pair (2i, 2i+1); D is even so pd < D wherever d < D
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    mask = (n < N)[:, None] & (d < D)[None, :]
    c = tl.load(COS + n[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + n[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    b64 = bi.to(tl.int64)
    h64 = hi.to(tl.int64)
    out_off = b64 * sob + h64 * soh
    _norm_rope_tile(
        Q + b64 * sqb + h64 * sqh, QB + hi * D, QW, QO + out_off, n, d, pd, mask, c, s, sign, sqn, son, D,
        eps, NORMALIZE, HAS_QW, HAS_BIAS,
    )  # fmt: skip
    _norm_rope_tile(
        K + b64 * skb + h64 * skh, KB + hi * D, KW, KO + out_off, n, d, pd, mask, c, s, sign, skn, son, D,
        eps, NORMALIZE, HAS_KW, HAS_BIAS,
    )  # fmt: skip
    if WRITE_V:  # v (+ bias) into its (token-major) output: the only pass over v in the forward
        v = tl.load(V + b64 * svb + h64 * svh + n[:, None] * svn + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(VB + hi * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        tl.store(VO + out_off + n[:, None] * son + d[None, :], v.to(VO.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_tile_bwd(
    G,  # (B, H, N, D) upstream gradient, strides (.., .., stride_gn, 1); already offset to (b, h)
    X,  # (B, H, N, D) forward input, strides (.., .., stride_n, 1); already offset to (b, h)
    BIAS,  # (D,) bias added to x in the forward (HAS_B); already offset to head h
    W,  # (D,) norm weight (HAS_W)
    DX,  # (B, H, N, D) gradient of x, strides (.., .., stride_dn, 1); already offset to (b, h)
    n,
    d,
    pd,
    mask,
    c,
    sp,
    sign,
    stride_gn,
    stride_n,
    stride_dn,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Stores dx; returns this tile's fp32 column sums ``(dw, db)`` over tokens (zeros without HAS_W / HAS_B)."""
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    g = tl.load(G + n[:, None] * stride_gn + d[None, :], mask=mask, other=0.0).to(tl.float32)
    gp = tl.load(G + n[:, None] * stride_gn + pd[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = g * c - sign[None, :] * gp * sp  # g * cos - rot(g * sin)
    if NORMALIZE:
        x, _ = _load_biased(X, BIAS, n, d, pd, mask, stride_n, D, HAS_B)  # the forward's pre-norm x + bias
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        xn = x * r[:, None]
        if HAS_W:
            dmask = d < D
            dw = tl.sum(dy * xn, axis=0)
            dy = dy * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        dot = tl.sum(dy * xn, axis=1) / D
        dy = r[:, None] * (dy - xn * dot[:, None])
    if HAS_B:  # rows outside the mask have g = 0, hence dy = 0
        db = tl.sum(dy, axis=0)
    tl.store(DX + n[:, None] * stride_dn + d[None, :], dy.to(DX.dtype.element_ty), mask=mask)
    return dw, db


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO,  # (B, H, N, D) gradient of q', strides gqb, gqh, gqn, unit d stride (as attention's backward wrote it)
    DKO,  # (B, H, N, D) gradient of k', strides gkb, gkh, gkn, unit d stride
    Q,  # (B, H, N, D) strides sqb, sqh, sqn, unit d stride
    K,  # (B, H, N, D) strides skb, skh, skn, unit d stride
    COS,  # (N, D) contiguous
    SIN,  # (N, D) contiguous
    QW,  # (D,) (HAS_QW)
    KW,  # (D,) (HAS_KW)
    DQ,  # (B, H, N, D) gradient of q, strides dqb, dqh, dqn, unit d stride (e.g. a slice of a packed dqkv)
    DK,  # (B, H, N, D) gradient of k, strides dkb, dkh, dkn, unit d stride
    DQW_PART,  # (P, D) fp32 partial sums of dL/dq_weight, P = B * H * cdiv(N, TILES * BLOCK_N) (HAS_QW)
    DKW_PART,  # (P, D) fp32 partial sums of dL/dk_weight (HAS_KW)
    QB,  # (H * D,) q bias, head h at h * D (HAS_BIAS)
    KB,  # (H * D,) k bias (HAS_BIAS)
    DB_PART,  # (B * cdiv(N, TILES * BLOCK_N), 3 * H * D) fp32 column sums of dq | dk | dv per program row (HAS_BIAS)
    DVO,  # (B, H, N, D) gradient of v', strides gvb, gvh, gvn, unit d stride (WRITE_DV)
    DV,  # (B, H, N, D) gradient of v, strides dvb, dvh, dvn, unit d stride (WRITE_DV)
    H,
    N,
    D,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    dqb,
    dqh,
    dqn,
    dkb,
    dkh,
    dkn,
    gqb,
    gqh,
    gqn,
    gkb,
    gkh,
    gkn,
    gvb,
    gvh,
    gvn,
    dvb,
    dvh,
    dvn,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_DV: tl.constexpr,
    TILES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # program (b * H + h, j) covers tokens [j * TILES * BLOCK_N, (j + 1) * TILES * BLOCK_N) of head h in sample b,
    # TILES tiles of BLOCK_N tokens; the column sums (weight / bias gradients) accumulate in registers across them
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    d = tl.arange(0, BLOCK_D)
    pd = d ^ 1
    dmask = d < D
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    b64 = bi.to(tl.int64)
    h64 = hi.to(tl.int64)
    acc_qw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_kw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_qb = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_kb = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_vb = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(TILES):
        n = (pid_n * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & dmask[None, :]
        c = tl.load(COS + n[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        sp = tl.load(SIN + n[:, None] * D + pd[None, :], mask=mask, other=0.0).to(tl.float32)  # sin of the partner
        qw, qb = _norm_rope_tile_bwd(
            DQO + b64 * gqb + h64 * gqh, Q + b64 * sqb + h64 * sqh, QB + hi * D, QW, DQ + b64 * dqb + h64 * dqh,
            n, d, pd, mask, c, sp, sign, gqn, sqn, dqn, D, eps, NORMALIZE, HAS_QW, HAS_BIAS, BLOCK_D,
        )  # fmt: skip
        kw, kb = _norm_rope_tile_bwd(
            DKO + b64 * gkb + h64 * gkh, K + b64 * skb + h64 * skh, KB + hi * D, KW, DK + b64 * dkb + h64 * dkh,
            n, d, pd, mask, c, sp, sign, gkn, skn, dkn, D, eps, NORMALIZE, HAS_KW, HAS_BIAS, BLOCK_D,
        )  # fmt: skip
        acc_qw += qw
        acc_kw += kw
        acc_qb += qb
        acc_kb += kb
        if WRITE_DV:  # dv passes through into the packed gradient; its column sums are v's bias gradient
            g = tl.load(DVO + b64 * gvb + h64 * gvh + n[:, None] * gvn + d[None, :], mask=mask, other=0.0)
            tl.store(DV + b64 * dvb + h64 * dvh + n[:, None] * dvn + d[None, :], g.to(DV.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                acc_vb += tl.sum(g.to(tl.float32), axis=0)
    part = (pid_bh * tl.num_programs(1) + pid_n).to(tl.int64) * D
    if HAS_QW:
        tl.store(DQW_PART + part + d, acc_qw, mask=dmask)
    if HAS_KW:
        tl.store(DKW_PART + part + d, acc_kw, mask=dmask)
    if HAS_BIAS:
        HD = H * D
        db = (bi * tl.num_programs(1) + pid_n).to(tl.int64) * 3 * HD + hi * D  # this program's row, head h columns
        tl.store(DB_PART + db + d, acc_qb, mask=dmask)
        tl.store(DB_PART + db + HD + d, acc_kb, mask=dmask)
        if WRITE_DV:
            tl.store(DB_PART + db + 2 * HD + d, acc_vb, mask=dmask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _unit_d(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when head_dim has unit stride (any b/h/n strides are fine), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _table(t: torch.Tensor, N: int, D: int) -> torch.Tensor:
    return t.reshape(N, D).contiguous()


# tokens one backward program covers (in TILES tiles of BLOCK_N): fewer fp32 partial rows of the weight / bias column
# sums to write and re-read (at LightningDiT-XL, batch 32: 128 rows of 3 * 1152 bias columns per block, not 512)
BWD_TOKENS_PER_PROGRAM = 64


def _blocks(N: int, D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): whole heads; 2048-element tiles on GPU (each program holds ~6 tiles of q and k live in
    registers), the interpreter's large blocks otherwise."""
    return row_block(N, D, None if interpreter_enabled() else 2048)


def token_major(B: int, H: int, N: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, H, N, D)`` tensor laid out as ``(B, N, H, D)`` memory: the layout in which attention's output
    ``o.transpose(1, 2).reshape(B, N, H * D)`` is a view (FlashAttention / cuDNN allocate the output like q)."""
    return torch.empty((B, N, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def qk_fwd(
    q, k, cos, sin, q_weight, k_weight, eps: float, normalize: bool, token_major_out: bool = False,
    bias=None, v=None,
):  # fmt: skip
    """q', k' ``(B, H, N, D)`` and v' (None unless ``v`` is given): contiguous, or token-major
    (:func:`token_major`) with ``token_major_out``.

    ``bias`` ``(3 * H * D,)`` (q | k | v parts, heads inside; packed form only, needs ``v``) is added to q, k, v before
    the norm; v' = v + bias_v is written only when ``v`` is given.
    """
    B, H, N, D = q.shape
    q, k = _unit_d(q), _unit_d(k)
    v = _unit_d(v) if v is not None else None
    if bias is not None and v is None:
        raise ValueError("qk_fwd: a bias needs v (the packed form: the bias covers q | k | v)")
    c, s = _table(cos, N, D), _table(sin, N, D)

    def new(x: torch.Tensor) -> torch.Tensor:
        if token_major_out:
            return token_major(B, H, N, D, x)
        return torch.empty((B, H, N, D), dtype=x.dtype, device=x.device)

    qo, ko = new(q), new(k)
    vo = new(v) if v is not None else None
    if qo.numel():
        BLOCK_N, BLOCK_D = _blocks(N, D)
        grid = (B * H, triton.cdiv(N, BLOCK_N))
        HD = H * D
        qb, kb, vb = (bias[:HD], bias[HD : 2 * HD], bias[2 * HD :]) if bias is not None else (c, c, c)
        vv = v if v is not None else q
        _qk_norm_rope_fwd_kernel[grid](
            q, k, c, s,
            q_weight if q_weight is not None else c, k_weight if k_weight is not None else c,
            qb, kb, vv, vb, qo, ko, vo if vo is not None else qo, H, N, D,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            vv.stride(0), vv.stride(1), vv.stride(2), qo.stride(0), qo.stride(1), qo.stride(2), float(eps),
            NORMALIZE=normalize, HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
            HAS_BIAS=bias is not None, WRITE_V=v is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return qo, ko, vo


def qk_bwd(
    dqo, dko, q, k, cos, sin, q_weight, k_weight, eps: float, normalize: bool, dq=None, dk=None,
    bias=None, dvo=None, dv=None,
):  # fmt: skip
    """Gradients of q, k (written into ``dq``/``dk`` when given: any b/h/n strides, unit head_dim stride), of the
    norm weights and of ``bias`` (None without it).

    With ``dvo`` and ``dv`` (packed form), v's gradient ``dvo`` is copied into ``dv`` by the same kernel; with
    ``bias`` ``(3 * H * D,)`` (needs ``dvo``/``dv``) q and k are recomputed as q + bias_q, k + bias_k and the bias
    gradient is the column sums of dq | dk | dv: per-(batch, token-block) fp32 partial rows written without atomics,
    summed here (deterministic).
    """
    B, H, N, D = q.shape
    q, k = _unit_d(q), _unit_d(k)
    c, s = _table(cos, N, D), _table(sin, N, D)
    dqo, dko = _unit_d(dqo), _unit_d(dko)  # any b/h/n strides: read where attention's backward wrote them
    if (dvo is None) != (dv is None) or (bias is not None and dv is None):
        raise ValueError("qk_bwd: dvo and dv come together, and a bias needs them (the packed form)")
    dvo = _unit_d(dvo) if dvo is not None else None
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty((B, H, N, D), dtype=k.dtype, device=k.device) if dk is None else dk
    BLOCK_N, BLOCK_D = _blocks(N, D)
    TILES = max(1, min(triton.cdiv(N, BLOCK_N), BWD_TOKENS_PER_PROGRAM // BLOCK_N))
    grid = (B * H, triton.cdiv(N, TILES * BLOCK_N))
    P = grid[0] * grid[1]
    f32 = {"dtype": torch.float32, "device": q.device}
    dqw_p = torch.empty((P, D) if q_weight is not None else (1,), **f32)
    dkw_p = torch.empty((P, D) if k_weight is not None else (1,), **f32)
    db_p = torch.empty((B * grid[1], 3 * H * D) if bias is not None else (1,), **f32)
    if dq.numel():
        HD = H * D
        qb, kb = (bias[:HD], bias[HD : 2 * HD]) if bias is not None else (c, c)
        gv, dvv = (dvo, dv) if dv is not None else (dqo, dq)
        _qk_norm_rope_bwd_kernel[grid](
            dqo, dko, q, k, c, s,
            q_weight if q_weight is not None else c, k_weight if k_weight is not None else c,
            dq, dk, dqw_p, dkw_p, qb, kb, db_p, gv, dvv, H, N, D,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dqo.stride(0), dqo.stride(1), dqo.stride(2), dko.stride(0), dko.stride(1), dko.stride(2),
            gv.stride(0), gv.stride(1), gv.stride(2), dvv.stride(0), dvv.stride(1), dvv.stride(2), float(eps),
            NORMALIZE=normalize, HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
            HAS_BIAS=bias is not None, WRITE_DV=dv is not None, TILES=TILES, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    else:
        dqw_p.zero_()
        dkw_p.zero_()
        db_p.zero_()
    dqw = dqw_p.sum(0).to(q_weight.dtype) if q_weight is not None else q.new_empty(0)
    dkw = dkw_p.sum(0).to(k_weight.dtype) if k_weight is not None else q.new_empty(0)
    db = db_p.sum(0).to(bias.dtype) if bias is not None else None
    return dq, dk, dqw, dkw, db


def qk_check(q, k, cos, sin, q_weight, k_weight, normalize) -> None:
    if q.dim() != 4:
        raise ValueError(f"qk_norm_rope: q must be (B, H, N, head_dim), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"qk_norm_rope: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(
            f"qk_norm_rope: q and k must share dtype/device, got {q.dtype}/{q.device} and {k.dtype}/{k.device}"
        )
    N, D = q.shape[2], q.shape[3]
    if D % 2:
        raise ValueError(f"qk_norm_rope: head_dim must be even (RoPE rotates pairs), got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() < 2 or tuple(t.shape[-2:]) != (N, D) or t.numel() != N * D:
            raise ValueError(
                f"qk_norm_rope: {name} must have shape (N, head_dim) = ({N}, {D}) (leading 1-dims allowed), "
                f"got {tuple(t.shape)}"
            )
        if not t.is_floating_point() or t.device != q.device:
            raise ValueError(f"qk_norm_rope: {name} must be a floating tensor on {q.device}, got {t.dtype}/{t.device}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is None:
            continue
        if not normalize:
            raise ValueError(f"qk_norm_rope: {name} is an RMSNorm weight but normalize=False; pass None or normalize")
        if w.shape != (D,) or w.device != q.device:
            raise ValueError(
                f"qk_norm_rope: {name} must have shape ({D},) = (head_dim,) on {q.device}, "
                f"got {tuple(w.shape)} on {w.device}"
            )
