"""qk_norm_rope: RMSNorm over head_dim of q and k (optional weights) then 2-D axial RoPE, in one pass.

    x̂ = x / sqrt(mean_d x_d^2 + eps) * w                   (skipped with normalize=False)
    out = x̂ * cos + rot(x̂) * sin,   rot(x)_(2i, 2i+1) = (-x_(2i+1), x_(2i))

The rotation is the interleaved-pair form of EVA-02's ``VisionRotaryEmbeddingFast`` (``rotate_half`` stacks
``(-x2, x1)`` over adjacent pairs), which LightningDiT applies to q and k after its optional qk RMSNorm, built with
``dim = head_dim // 2`` so each spatial axis rotates half of head_dim (EVA-02 ``rope.py``; LightningDiT
``models/lightningdit.py`` / ``models/pos_embed.py``). :func:`rope_2d_tables` builds that layout.

Backward (g = dL/dout; R = rot is linear with R^T = -R):
    dx̂ = g * cos - rot(g * sin),   i.e. dx̂_2i = g_2i c_2i + g_2i+1 s_2i+1,  dx̂_2i+1 = g_2i+1 c_2i+1 - g_2i s_2i
    dw = sum_rows dx̂ * xn,   dxn = dx̂ * w,   dx = r * (dxn - xn * mean_d(dxn * xn))   (xn = x * r, r = 1/rms)

The kernels read q and k through their (batch, head, token) strides, so the views of a packed projection
``qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)`` are consumed in place (no ``.contiguous()`` copy); outputs
are contiguous ``(B, H, N, hd)``, the layout SDPA prefers. The rms is recomputed in backward (x is read anyway).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes
from ._utils import row_block

__all__ = ["qk_norm_rope", "qk_norm_rope_ref", "rope_2d_tables"]


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _norm_rope_tile(
    X,  # (B, H, N, D) input (q or k), strides sb, sh, sn, unit d stride; already offset to (b, h)
    W,  # (D,) norm weight (read only when HAS_W)
    O,  # (B, H, N, D) output, contiguous; already offset to (b, h)
    n,
    d,
    pd,
    mask,
    c,
    s,
    sign,
    stride_n,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_W: tl.constexpr,
):
    x = tl.load(X + n[:, None] * stride_n + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(X + n[:, None] * stride_n + pd[None, :], mask=mask, other=0.0).to(tl.float32)  # pair partner
    if NORMALIZE:
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * r[:, None]
        xp = xp * r[:, None]
        if HAS_W:
            dmask = d < D
            x = x * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            xp = xp * tl.load(W + pd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    out = x * c + sign[None, :] * xp * s
    tl.store(O + n[:, None] * D + d[None, :], out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q,  # (B, H, N, D) strides sqb, sqh, sqn, unit d stride
    K,  # (B, H, N, D) strides skb, skh, skn, unit d stride
    COS,  # (N, D) contiguous
    SIN,  # (N, D) contiguous
    QW,  # (D,) q norm weight (HAS_QW)
    KW,  # (D,) k norm weight (HAS_KW)
    QO,  # (B, H, N, D) contiguous output
    KO,  # (B, H, N, D) contiguous output
    H,
    N,
    D,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_KW: tl.constexpr,
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
    out_off = pid_bh.to(tl.int64) * N * D
    _norm_rope_tile(
        Q + bi.to(tl.int64) * sqb + hi.to(tl.int64) * sqh, QW, QO + out_off, n, d, pd, mask, c, s, sign, sqn, D, eps,
        NORMALIZE, HAS_QW,
    )  # fmt: skip
    _norm_rope_tile(
        K + bi.to(tl.int64) * skb + hi.to(tl.int64) * skh, KW, KO + out_off, n, d, pd, mask, c, s, sign, skn, D, eps,
        NORMALIZE, HAS_KW,
    )  # fmt: skip


@triton.jit
def _norm_rope_tile_bwd(
    G,  # (B, H, N, D) upstream gradient, contiguous; already offset to (b, h)
    X,  # (B, H, N, D) forward input, strides (.., .., stride_n, 1); already offset to (b, h)
    W,  # (D,) norm weight (HAS_W)
    DX,  # (B, H, N, D) gradient of x, strides (.., .., stride_dn, 1); already offset to (b, h)
    DW_PART,  # (P, D) fp32 per-program partial sums of dL/dw; already offset to this program's row (HAS_W)
    n,
    d,
    pd,
    mask,
    c,
    sp,
    sign,
    stride_n,
    stride_dn,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_W: tl.constexpr,
):
    g = tl.load(G + n[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    gp = tl.load(G + n[:, None] * D + pd[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = g * c - sign[None, :] * gp * sp  # g * cos - rot(g * sin)
    if NORMALIZE:
        x = tl.load(X + n[:, None] * stride_n + d[None, :], mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        xn = x * r[:, None]
        if HAS_W:
            dmask = d < D
            tl.store(DW_PART + d, tl.sum(dy * xn, axis=0), mask=dmask)
            dy = dy * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        dot = tl.sum(dy * xn, axis=1) / D
        dy = r[:, None] * (dy - xn * dot[:, None])
    tl.store(DX + n[:, None] * stride_dn + d[None, :], dy.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO,  # (B, H, N, D) gradient of q', contiguous
    DKO,  # (B, H, N, D) gradient of k', contiguous
    Q,  # (B, H, N, D) strides sqb, sqh, sqn, unit d stride
    K,  # (B, H, N, D) strides skb, skh, skn, unit d stride
    COS,  # (N, D) contiguous
    SIN,  # (N, D) contiguous
    QW,  # (D,) (HAS_QW)
    KW,  # (D,) (HAS_KW)
    DQ,  # (B, H, N, D) gradient of q, strides dqb, dqh, dqn, unit d stride (e.g. a slice of a packed dqkv)
    DK,  # (B, H, N, D) gradient of k, strides dkb, dkh, dkn, unit d stride
    DQW_PART,  # (P, D) fp32 partial sums of dL/dq_weight, P = B * H * cdiv(N, BLOCK_N) (HAS_QW)
    DKW_PART,  # (P, D) fp32 partial sums of dL/dk_weight (HAS_KW)
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
    eps,
    NORMALIZE: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_KW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    pd = d ^ 1
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    mask = (n < N)[:, None] & (d < D)[None, :]
    c = tl.load(COS + n[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    sp = tl.load(SIN + n[:, None] * D + pd[None, :], mask=mask, other=0.0).to(tl.float32)  # sin of the partner
    b64 = bi.to(tl.int64)
    h64 = hi.to(tl.int64)
    off = pid_bh.to(tl.int64) * N * D
    part = (pid_bh * tl.num_programs(1) + pid_n).to(tl.int64) * D
    _norm_rope_tile_bwd(
        DQO + off, Q + b64 * sqb + h64 * sqh, QW, DQ + b64 * dqb + h64 * dqh, DQW_PART + part,
        n, d, pd, mask, c, sp, sign, sqn, dqn, D, eps, NORMALIZE, HAS_QW,
    )  # fmt: skip
    _norm_rope_tile_bwd(
        DKO + off, K + b64 * skb + h64 * skh, KW, DK + b64 * dkb + h64 * dkh, DKW_PART + part,
        n, d, pd, mask, c, sp, sign, skn, dkn, D, eps, NORMALIZE, HAS_KW,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _unit_d(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when head_dim has unit stride (any b/h/n strides are fine), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _table(t: torch.Tensor, N: int, D: int) -> torch.Tensor:
    return t.reshape(N, D).contiguous()


def _blocks(N: int, D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): whole heads; 2048-element tiles on GPU (each program holds ~6 tiles of q and k live in
    registers), the interpreter's large blocks otherwise."""
    return row_block(N, D, None if interpreter_enabled() else 2048)


def _fwd(q, k, cos, sin, q_weight, k_weight, eps: float, normalize: bool):
    B, H, N, D = q.shape
    q, k = _unit_d(q), _unit_d(k)
    c, s = _table(cos, N, D), _table(sin, N, D)
    qo = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, H, N, D), dtype=k.dtype, device=k.device)
    if qo.numel():
        BLOCK_N, BLOCK_D = _blocks(N, D)
        grid = (B * H, triton.cdiv(N, BLOCK_N))
        _qk_norm_rope_fwd_kernel[grid](
            q, k, c, s,
            q_weight if q_weight is not None else c, k_weight if k_weight is not None else c,
            qo, ko, H, N, D,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), float(eps),
            NORMALIZE=normalize, HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return qo, ko


def _bwd(dqo, dko, q, k, cos, sin, q_weight, k_weight, eps: float, normalize: bool, dq=None, dk=None):
    """Gradients of q, k (written into ``dq``/``dk`` when given: any b/h/n strides, unit head_dim stride) and of the
    norm weights."""
    B, H, N, D = q.shape
    q, k = _unit_d(q), _unit_d(k)
    c, s = _table(cos, N, D), _table(sin, N, D)
    dqo, dko = dqo.contiguous(), dko.contiguous()
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty((B, H, N, D), dtype=k.dtype, device=k.device) if dk is None else dk
    BLOCK_N, BLOCK_D = _blocks(N, D)
    grid = (B * H, triton.cdiv(N, BLOCK_N))
    P = grid[0] * grid[1]
    dqw_p = torch.empty((P, D) if q_weight is not None else (1,), dtype=torch.float32, device=q.device)
    dkw_p = torch.empty((P, D) if k_weight is not None else (1,), dtype=torch.float32, device=q.device)
    if dq.numel():
        _qk_norm_rope_bwd_kernel[grid](
            dqo, dko, q, k, c, s,
            q_weight if q_weight is not None else c, k_weight if k_weight is not None else c,
            dq, dk, dqw_p, dkw_p, H, N, D,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), float(eps),
            NORMALIZE=normalize, HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    else:
        dqw_p.zero_()
        dkw_p.zero_()
    dqw = dqw_p.sum(0).to(q_weight.dtype) if q_weight is not None else q.new_empty(0)
    dkw = dkw_p.sum(0).to(k_weight.dtype) if k_weight is not None else q.new_empty(0)
    return dq, dk, dqw, dkw


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, cos, sin, q_weight, k_weight, eps, normalize)


@_qk_norm_rope_op.register_fake
def _(q, k, cos, sin, q_weight, k_weight, eps, normalize):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("pae_fast::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(
    dqo: torch.Tensor,
    dko: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dqo, dko, q, k, cos, sin, q_weight, k_weight, eps, normalize)


@_qk_norm_rope_backward_op.register_fake
def _(dqo, dko, q, k, cos, sin, q_weight, k_weight, eps, normalize):
    dqw = q_weight.new_empty(q_weight.shape) if q_weight is not None else q.new_empty(0)
    dkw = k_weight.new_empty(k_weight.shape) if k_weight is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), dqw, dkw


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, q_weight, k_weight, eps, normalize = inputs
    ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight)
    ctx.eps, ctx.normalize = eps, normalize


def _backward(ctx, dqo, dko):
    q, k, cos, sin, q_weight, k_weight = ctx.saved_tensors
    dq, dk, dqw, dkw = _qk_norm_rope_backward_op(dqo, dko, q, k, cos, sin, q_weight, k_weight, ctx.eps, ctx.normalize)
    need = ctx.needs_input_grad
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        None,  # cos, sin: constant tables
        None,
        dqw if q_weight is not None and need[4] else None,
        dkw if k_weight is not None and need[5] else None,
        None,
        None,
    )


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _check(q, k, cos, sin, q_weight, k_weight, normalize) -> None:
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


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k over head_dim (optional weights) then interleaved-pair 2-D RoPE, in one pass.

    Args:
        q, k: ``(B, H, N, hd)``; any batch/head/token strides (e.g. views of a packed qkv projection), hd even.
        cos, sin: ``(N, hd)`` rotation tables (see :func:`rope_2d_tables`); constants, no gradient.
        q_weight, k_weight: optional ``(hd,)`` RMSNorm weights (differentiable).
        eps: added to the mean square.
        normalize: False applies only RoPE (LightningDiT without qk-norm); the weights must then be None.
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        ``(q', k')``, each ``(B, H, N, hd)`` contiguous in the input dtype (statistics in fp32).
    """
    _check(q, k, cos, sin, q_weight, k_weight, normalize)
    if resolve_backend(backend, q) == "torch":
        return qk_norm_rope_ref(q, k, cos, sin, q_weight, k_weight, eps, normalize)
    return _qk_norm_rope_op(q, k, cos, sin, q_weight, k_weight, float(eps), bool(normalize))


def rope_2d_tables(
    h: int,
    w: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(h * w, head_dim)`` of 2-D axial RoPE in the EVA-02 / LightningDiT layout.

    Tokens are row-major (token ``i * w + j`` sits at row i, column j). The first half of head_dim rotates by the
    row index, the second half by the column index; each half has ``head_dim / 4`` frequencies
    ``theta^(-2i / (head_dim / 2))`` repeated interleaved, so the members of a pair ``(2i, 2i+1)`` share an angle.

    Args:
        h, w: token grid height and width.
        head_dim: divisible by 4 (two axes, pairs within each).
        theta: RoPE base.

    Returns:
        ``(cos, sin)``, each ``(h * w, head_dim)`` in ``dtype`` (angles computed in fp64).
    """
    if head_dim % 4:
        raise ValueError(f"rope_2d_tables: head_dim must be divisible by 4 (2 axes x pairs), got {head_dim}")
    if h < 1 or w < 1:
        raise ValueError(f"rope_2d_tables: grid must be at least 1x1, got h={h}, w={w}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (hd/4,)
    freqs = freqs.repeat_interleave(2)  # (hd/2,): pair members share a frequency
    rows = torch.arange(h, dtype=torch.float64)[:, None, None] * freqs  # (h, 1, hd/2)
    cols = torch.arange(w, dtype=torch.float64)[None, :, None] * freqs  # (1, w, hd/2)
    ang = torch.cat([rows.expand(h, w, half), cols.expand(h, w, half)], dim=-1).reshape(h * w, head_dim)
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """rot(x): each adjacent pair ``(x0, x1)`` -> ``(-x1, x0)``."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x1, x0), dim=-1).flatten(-2)


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`qk_norm_rope` (fp32 math for half inputs; fp64 stays fp64)."""
    N, D = q.shape[-2], q.shape[-1]

    def one(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if normalize:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
            if w is not None:
                y = y * w.to(y.dtype)
        c, s = cos.reshape(N, D).to(y.dtype), sin.reshape(N, D).to(y.dtype)
        return (y * c + _rotate_pairs(y) * s).to(x.dtype)

    return one(q, q_weight), one(k, k_weight)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    names = ("q", "k", "cos", "sin", "q_weight", "k_weight")
    v = {n: kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)}
    qk = tensor_bytes(v["q"], v["k"])
    tables = tensor_bytes(v["cos"], v["sin"])
    weights = tensor_bytes(v["q_weight"], v["k_weight"])
    fwd = 2 * qk + tables + weights  # read q, k, tables, weights; write q', k'
    bwd = 3 * qk + tables + 2 * weights  # read dq', dk', q, k, tables, weights; write dq, dk, dweights
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0, grad=True):
        t = (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    def packed(B, N, H, hd):
        # the models' layout: views of one (B, N, 3 * H * hd) projection
        qkv = rnd(B, N, 3 * H * hd).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]

    def grid(n):
        s = math.isqrt(n)
        return (s, n // s) if s * (n // s) == n else (1, n)

    out = []
    shapes = [(32, 16, 256, 72), (32, 16, 256, 128)] if size == "model" else [(2, 3, 17, 72), (1, 2, 16, 128)]
    for B, H, N, hd in shapes:
        cos, sin = rope_2d_tables(*grid(N), hd, device=device, dtype=torch.float32)
        w = {"q_weight": rnd(hd, scale=0.1, offset=1.0), "k_weight": rnd(hd, scale=0.1, offset=1.0)}
        out.append((f"packed qkv ({B},{H},{N},{hd})+w", (*packed(B, N, H, hd), cos, sin), w))
        out.append((f"({B},{H},{N},{hd}) no weight", (rnd(B, H, N, hd), rnd(B, H, N, hd), cos, sin), {}))
        plain = (rnd(B, H, N, hd), rnd(B, H, N, hd), cos, sin)
        out.append((f"({B},{H},{N},{hd}) rope only", plain, {"normalize": False}))
    if size != "model":
        cos, sin = rope_2d_tables(1, 257, 64, device=device)
        out.append(("(1,1,257,64)+w", (rnd(1, 1, 257, 64), rnd(1, 1, 257, 64), cos, sin), {"q_weight": rnd(64)}))
    return out


register_op(
    OpSpec(
        name="qk_norm_rope",
        fn=qk_norm_rope,
        ref=qk_norm_rope_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="RMSNorm of q, k over head_dim (+weights) then interleaved 2-D axial RoPE",
    )
)
