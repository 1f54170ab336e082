"""Shared pieces of the adaLN kernels ``adaln_modulate`` and ``gated_residual_adaln``.

Layout: ``x`` is ``(B, *, D)``: dim 0 is the sample, the last dim the channels, everything between is flattened to
``T`` tokens, so the kernels see ``(B, T, D)`` with explicit strides (unit column stride). A modulation tensor
(``shift``, ``scale``, ``gate``) is either per sample ``(B, D)`` (LightningDiT; ``(B, 1, D)`` is accepted too) or
per token, shaped like ``x`` (the DiT^DH head). A per-sample tensor is read with token stride 0; its gradient is a
sum over tokens, done atomic-free in two stages: every program writes fp32 partial sums over its rows to a
``(B, P, D)`` buffer, then one ``sum(1)`` reduces them.

Normalisation (statistics in fp32, over the last dim):
    rms:    n = x / sqrt(mean(x^2) + eps) * w            (RMSNorm, optional weight w (D,))
    layer:  n = (x - mean(x)) / sqrt(var(x) + eps)       (LayerNorm without affine)
Backward (rstd = 1/sqrt(...), dn = dL/dn before the weight, <.> = mean over D):
    rms:    dx = rstd * (dn - n * <dn n>)
    layer:  dx = rstd * (dn - <dn> - n * <dn n>)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import interpreter_enabled

NORMS = ("rms", "layer")

# Largest tile (row elements) per program; None: the GPU size of ``fwd_blocks`` / ``bwd_blocks`` (big when interpreted).
# Tests lower it to run the multi-block partial-sum paths on small shapes.
MAX_BLOCK_ELEMS: int | None = None


# ----------------------------------------------------------------------------------------------------------------
# Triton helpers (inlined into the kernels of both ops)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_mod(
    M,  # (B, D) per sample, row stride stride_b | (B, T, D) per token, strides (stride_b, stride_t, 1)
    b,
    t,
    cols,
    stride_b,
    stride_t,
    mask,
    cmask,
    PER_TOKEN: tl.constexpr,
):
    """A modulation tile as fp32: ``(BLOCK_R, BLOCK_C)`` per token, ``(1, BLOCK_C)`` per sample (broadcasts)."""
    if PER_TOKEN:
        m = tl.load(M + b * stride_b + t[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        m = tl.load(M + b * stride_b + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return m


@triton.jit
def _bwd_modulation(DH, DSHIFT, DSCALE, SCALE, W, b, t, cols, T, D, n, mask, cmask, s_scb, s_sct,
                    HAS_SHIFT: tl.constexpr, SHIFT_PT: tl.constexpr, SCALE_PT: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr):
    """One column tile: the shift / scale gradients (stored per token, or returned as column sums) and ``dn``, the
    gradient of the normalised row (before the weight), with the weight gradient's column sums."""
    out_off = (b * T + t[:, None]) * D + cols[None, :]
    gh = tl.load(DH + out_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        w = tl.full((1, 1), 1.0, tl.float32)
    sum_shift = tl.sum(gh, axis=0)
    if HAS_SHIFT and SHIFT_PT:
        tl.store(DSHIFT + out_off, gh.to(DSHIFT.dtype.element_ty), mask=mask)
    dscale = gh * n * w
    sum_scale = tl.sum(dscale, axis=0)
    if SCALE_PT:
        tl.store(DSCALE + out_off, dscale.to(DSCALE.dtype.element_ty), mask=mask)
    dn = gh * (1.0 + _load_mod(SCALE, b, t, cols, s_scb, s_sct, mask, cmask, SCALE_PT))
    sum_w = tl.sum(dn * n, axis=0)
    return dn * w, sum_shift, sum_scale, sum_w


@triton.jit
def _modulate_store(
    H,  # (B, T, D) output, contiguous
    SHIFT,  # (B, D) | (B, T, D), strides (s_shb, s_sht, 1) (read only when HAS_SHIFT)
    SCALE,  # (B, D) | (B, T, D), strides (s_scb, s_sct, 1)
    W,  # (D,) RMSNorm weight (read only when HAS_WEIGHT)
    b,
    t,
    cols,
    T,
    D,
    n,
    mask,
    cmask,
    s_shb,
    s_sht,
    s_scb,
    s_sct,
    HAS_SHIFT: tl.constexpr,
    SHIFT_PT: tl.constexpr,
    SCALE_PT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """One column tile of the forward: store ``h = n * w * (1 + scale) + shift`` for the normalised tile ``n``."""
    if HAS_WEIGHT:
        n = n * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    h = n * (1.0 + _load_mod(SCALE, b, t, cols, s_scb, s_sct, mask, cmask, SCALE_PT))
    if HAS_SHIFT:
        h = h + _load_mod(SHIFT, b, t, cols, s_shb, s_sht, mask, cmask, SHIFT_PT)
    tl.store(H + (b * T + t[:, None]) * D + cols[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _two_tile_rstd(r, r2, D, eps, HAS_C2: tl.constexpr):
    """``1 / sqrt(mean(r^2) + eps)`` per row over a row split into two tiles (``r2`` ignored unless ``HAS_C2``)."""
    ss = tl.sum(r * r, axis=1)
    if HAS_C2:
        ss += tl.sum(r2 * r2, axis=1)
    return 1.0 / tl.sqrt(ss / D + eps)


@triton.jit
def _two_tile_mean(r, r2, D, HAS_C2: tl.constexpr):
    """Row mean over a row split into two tiles (``r2`` ignored unless ``HAS_C2``)."""
    total = tl.sum(r, axis=1)
    if HAS_C2:
        total += tl.sum(r2, axis=1)
    return total / D


@triton.jit
def _program_tiles(BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr):
    """``(pid_t, b, cols, cols2)`` of a program of grid ``(row blocks, B)``: its row-block index, its sample (int64)
    and the column indices of a row's two tiles (``cols2`` aliases ``cols``, unused, when ``BLOCK_C2`` is 0)."""
    cols = tl.arange(0, BLOCK_C)
    cols2 = cols
    if BLOCK_C2 > 0:
        cols2 = BLOCK_C + tl.arange(0, BLOCK_C2)
    return tl.program_id(0), tl.program_id(1).to(tl.int64), cols, cols2


@triton.jit
def _two_tile_zeros(BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr):
    """fp32 column accumulators of both tiles (the second aliases the first, unused, when ``BLOCK_C2`` is 0)."""
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc2 = acc
    if BLOCK_C2 > 0:
        acc2 = tl.zeros((BLOCK_C2,), dtype=tl.float32)
    return acc, acc2


@triton.jit
def _two_tile_stats(r, r2, mask, mask2, D, eps, IS_RMS: tl.constexpr, HAS_C2: tl.constexpr):
    """``(r, r2, rstd)`` of a two-tile row block (centred for LayerNorm), so ``n = r * rstd``; ``r2`` / ``mask2`` are
    unused aliases unless ``HAS_C2``."""
    if not IS_RMS:
        mean = _two_tile_mean(r, r2, D, HAS_C2)
        r = tl.where(mask, r - mean[:, None], 0.0)
        if HAS_C2:
            r2 = tl.where(mask2, r2 - mean[:, None], 0.0)
    return r, r2, _two_tile_rstd(r, r2, D, eps, HAS_C2)


@triton.jit
def _norm_modulate_store(H, SHIFT, SCALE, W, b, t, cols, cols2, T, D, r, r2, mask, mask2, cmask, cmask2, s_shb,
                         s_sht, s_scb, s_sct, eps, IS_RMS: tl.constexpr, HAS_SHIFT: tl.constexpr,
                         SHIFT_PT: tl.constexpr, SCALE_PT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         HAS_C2: tl.constexpr):  # fmt: skip
    """Forward from an fp32 two-tile row block (the 2nd unused unless ``HAS_C2``): ``h = norm(r) * w * (1 + scale)
    + shift``, stored tile by tile."""
    r, r2, rstd = _two_tile_stats(r, r2, mask, mask2, D, eps, IS_RMS, HAS_C2)
    _modulate_store(H, SHIFT, SCALE, W, b, t, cols, T, D, r * rstd[:, None], mask, cmask, s_shb, s_sht, s_scb,
                    s_sct, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT)  # fmt: skip
    if HAS_C2:
        _modulate_store(H, SHIFT, SCALE, W, b, t, cols2, T, D, r2 * rstd[:, None], mask2, cmask2, s_shb, s_sht,
                        s_scb, s_sct, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT)  # fmt: skip


@triton.jit
def _bwd_norm_modulation(DH, DSHIFT, DSCALE, SCALE, W, b, t, cols, cols2, T, D, n, r2, rstd, mask, mask2, cmask,
                         cmask2, s_scb, s_sct, acc_shift, acc_scale, acc_w, acc_shift2, acc_scale2, acc_w2,
                         IS_RMS: tl.constexpr, HAS_SHIFT: tl.constexpr, SHIFT_PT: tl.constexpr,
                         SCALE_PT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """Backward of ``h = norm(r) * w * (1 + scale) + shift`` on a two-tile row block (the 2nd tile unused unless
    ``HAS_C2``; ``n2 = r2 * rstd``): :func:`_bwd_modulation` per tile (column sums added to the accumulators) and the
    means :func:`_norm_bwd` needs. Returns ``(dn, dn2, n2, <dn> or 0, <dn n>, acc_shift, acc_scale, acc_w, acc_*2)``."""
    dn, s_sh, s_sc, s_w = _bwd_modulation(DH, DSHIFT, DSCALE, SCALE, W, b, t, cols, T, D, n, mask, cmask, s_scb, s_sct,
                                          HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT)  # fmt: skip
    acc_shift += s_sh
    acc_scale += s_sc
    acc_w += s_w
    dot = tl.sum(dn * n, axis=1)
    mdn = tl.sum(dn, axis=1)
    dn2, n2 = dn, r2
    if HAS_C2:
        n2 = r2 * rstd[:, None]
        dn2, s_sh2, s_sc2, s_w2 = _bwd_modulation(DH, DSHIFT, DSCALE, SCALE, W, b, t, cols2, T, D, n2, mask2, cmask2,
                                                  s_scb, s_sct, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT)  # fmt: skip
        acc_shift2 += s_sh2
        acc_scale2 += s_sc2
        acc_w2 += s_w2
        dot += tl.sum(dn2 * n2, axis=1)
        mdn += tl.sum(dn2, axis=1)
    shift_dn = tl.zeros_like(mdn) if IS_RMS else mdn / D
    return dn, dn2, n2, shift_dn, dot / D, acc_shift, acc_scale, acc_w, acc_shift2, acc_scale2, acc_w2


@triton.jit
def _norm_bwd(dn, n, rstd, shift_dn, mean_dn_n):
    """One tile of the norm backward ``dr = rstd * (dn - <dn> - n * <dn n>)`` (means: :func:`_bwd_norm_modulation`)."""
    return rstd[:, None] * (dn - shift_dn[:, None] - n * mean_dn_n[:, None])


@triton.jit
def _store_partials(PTR, part, cols, cols2, acc, acc2, D, ENABLED: tl.constexpr, HAS_C2: tl.constexpr):
    """When ``ENABLED``: one program's fp32 column sums of both tiles to ``PTR + part`` (``(B, P, D)`` partials)."""
    if ENABLED:
        tl.store(PTR + part + cols, acc, mask=cols < D)
        if HAS_C2:
            tl.store(PTR + part + cols2, acc2, mask=cols2 < D)


# ----------------------------------------------------------------------------------------------------------------
# Launch geometry
# ----------------------------------------------------------------------------------------------------------------


def tolerances() -> dict[torch.dtype, tuple[float, float]]:
    """``OpSpec.tolerances`` of both ops: the defaults, with a looser fp32 ``atol``.

    The per-sample modulation and weight gradients are fp32 sums over N tokens (B*N rows for the weight); their
    absolute error grows like eps32 * sqrt(N) * |term| and so is not bounded by the element-wise default 1e-5 where
    a sum cancels to near zero (seen: 2.3e-5 at N=257 with unit terms; about 1e-4 at B*N = 8192 rows).
    Half-precision outputs round to their own ulp first, which the defaults already cover.
    """
    return {
        torch.float64: (1e-10, 1e-10),
        torch.float32: (1e-4, 1e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1.6e-2, 1.6e-2),
    }


def col_tiles(D: int) -> tuple[int, int]:
    """A row of width ``D`` as two power-of-two column tiles ``(BLOCK_C, BLOCK_C2)`` (``BLOCK_C2`` 0: one tile).

    ``BLOCK_C`` is the largest power of two <= D and ``BLOCK_C2`` the next power of two of the rest (at least 16),
    so 1152 = 1024 + 128, 768 = 512 + 256 and 2048 = 2048 + 0 waste no lane, where one power-of-two tile padded
    1152 to 2048 (44 % of the lanes idle). Where the rest would need as many lanes as the first tile (33 = 32 + 1 is
    fine, 1984 = 1024 + 960 is not) one ``next_power_of_2(D)`` tile is no worse.
    """
    big = 1 << (max(D, 1).bit_length() - 1)
    rest = D - big
    if rest and triton.next_power_of_2(rest) >= big:
        return triton.next_power_of_2(D), 0
    return big, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def row_tiles(T: int, D: int, max_elems: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, BLOCK_C2)``: whole rows as :func:`col_tiles`, a power of two of rows per program, at most
    ``max_elems`` row elements (at least one row)."""
    c, c2 = col_tiles(D)
    fit = max(1, max_elems // (c + c2))
    return min(triton.next_power_of_2(max(T, 1)), 1 << (fit.bit_length() - 1)), c, c2


def fwd_blocks(T: int, D: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_C, BLOCK_C2, num_warps)`` of the forward kernels: rows as two column tiles
    (:func:`col_tiles`), about 4096 row elements per program on GPU (2 rows at width 1152 or 2048) at 8 warps.

    Compiled offline for sm_90 (``compile_check --ptxas``): registers for two or more blocks per SM.
    """
    max_elems = MAX_BLOCK_ELEMS or (65536 if interpreter_enabled() else 4096)
    BLOCK_R, c, c2 = row_tiles(T, D, max_elems)
    return BLOCK_R, c, c2, 8 if BLOCK_R * (c + c2) >= 2048 else 4


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def bwd_programs(B: int, n_blocks: int, device: torch.device) -> tuple[int, int]:
    """``(P, ITERS)`` for a backward: ``P`` programs per sample, each looping over ``ITERS`` row blocks.

    Fewer programs mean fewer fp32 partial sums to write and reduce; enough of them keep the GPU busy (about four
    per SM). Under the interpreter two per sample keep both the loop and the partial reduction exercised.
    """
    if n_blocks == 0:
        return 1, 1
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 2 * B
    P = max(1, min(n_blocks, triton.cdiv(target, max(B, 1))))
    iters = triton.cdiv(n_blocks, P)
    return triton.cdiv(n_blocks, iters), iters


# ----------------------------------------------------------------------------------------------------------------
# Argument checks and canonical layout (shared by the public functions and the references)
# ----------------------------------------------------------------------------------------------------------------


def check_x(op: str, name: str, x: torch.Tensor) -> tuple[int, int, int]:
    """``(B, T, D)`` of ``x (B, *, D)``, or a clear error."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}")  # fmt: skip
    if x.dim() < 2:
        raise ValueError(f"{op}: {name} must be (B, N, D) (or (B, D)), got shape {tuple(x.shape)}")
    B, D = x.shape[0], x.shape[-1]
    T = x.numel() // (B * D) if B * D else 0
    return B, T, D


def canon_mod(op: str, name: str, m: torch.Tensor | None, x: torch.Tensor, B: int, T: int, D: int):
    """``m`` as ``(B, D)`` (per sample) or ``(B, T, D)`` (per token); None stays None."""
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or not m.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {type(m).__name__} "
                        f"{getattr(m, 'dtype', '')}")  # fmt: skip
    if m.device != x.device:
        raise ValueError(f"{op}: {name} is on {m.device} but x is on {x.device}")
    shp = tuple(m.shape)
    if shp == (B, D) or (m.dim() == x.dim() and shp[0] == B and shp[-1] == D and all(s == 1 for s in shp[1:-1])):
        return m.reshape(B, D)
    if shp == tuple(x.shape):
        return m.reshape(B, T, D)
    raise ValueError(
        f"{op}: {name} must be per sample ({B}, {D}) or per token {tuple(x.shape)} (the shape of x), got {shp}"
    )


def check_norm(op: str, norm: str, weight: torch.Tensor | None, x: torch.Tensor, D: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"{op}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if weight is None:
        return
    if norm != "rms":
        raise ValueError(f"{op}: weight is only used with norm='rms' (norm='layer' is LayerNorm without affine)")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or tuple(weight.shape) != (D,):
        raise ValueError(f"{op}: weight must be a floating-point tensor of shape ({D},) to match x's last dim, "
                         f"got {tuple(getattr(weight, 'shape', ()))}")  # fmt: skip
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")


def unit_cols(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride in the last dim (copies only when needed)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def mod_strides(m: torch.Tensor | None) -> tuple[int, int]:
    """(sample stride, token stride) of a canonical modulation tensor; token stride 0 per sample."""
    if m is None:
        return 0, 0
    return (m.stride(0), m.stride(1)) if m.dim() == 3 else (m.stride(0), 0)


def mod_grad_buffer(m: torch.Tensor | None, B: int, P: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes a modulation gradient: the gradient itself per token, fp32 partials per sample."""
    if m is None:
        return like.new_empty(1, dtype=torch.float32)
    if m.dim() == 3:
        return torch.empty(m.shape, dtype=m.dtype, device=m.device)
    return torch.empty((B, P, D), dtype=torch.float32, device=m.device)


def shift_kind(shift: torch.Tensor | None) -> int:
    """How a backward op is told about the shift, whose value it never needs (dshift = the upstream gradient):
    0 none, 1 per sample ``(B, D)``, 2 per token ``(B, T, D)`` (canonical layouts)."""
    return 0 if shift is None else shift.dim() - 1


def shift_grad_buffer(kind: int, dtype: torch.dtype, B: int, T: int, P: int, D: int, like: torch.Tensor):
    """Where a kernel writes the shift gradient: itself per token (``dtype``), fp32 partials per sample."""
    if kind == 2:
        return torch.empty((B, T, D), dtype=dtype, device=like.device)
    return like.new_empty((B, P, D) if kind == 1 else 1, dtype=torch.float32)


def finish_shift_grad(buf: torch.Tensor, kind: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """The shift gradient from :func:`shift_grad_buffer` (partials reduced); empty without a shift."""
    return buf if kind == 2 else buf.sum(1).to(dtype) if kind == 1 else like.new_empty(0, dtype=dtype)


def fake_shift_grad(kind: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """Fake (meta) shift gradient of a backward op told the shift's kind and dtype."""
    B, T, D = like.shape
    return like.new_empty(((B, D), (B, T, D))[kind - 1] if kind else 0, dtype=dtype)


def finish_mod_grad(buf: torch.Tensor, m: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The modulation gradient from ``mod_grad_buffer`` (partial sums reduced); empty for a missing tensor."""
    if m is None:
        return like.new_empty(0)
    return buf if m.dim() == 3 else buf.sum(1).to(m.dtype)


def fake_grad(m: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Fake (meta) gradient of an optional input: contiguous, its shape and dtype; empty for a missing one."""
    return like.new_empty(0) if m is None else torch.empty(m.shape, dtype=m.dtype, device=m.device)


def bound(fn, args: tuple, kwargs: dict) -> dict:
    """``fn``'s arguments by name (defaults filled), for the traffic floors."""
    import inspect

    ba = inspect.signature(fn).bind(*args, **kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


# ----------------------------------------------------------------------------------------------------------------
# Reference math (fp32 for half inputs, fp64 stays fp64)
# ----------------------------------------------------------------------------------------------------------------


def compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def mod_ref(m: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    """A canonical modulation tensor in ``dt``, broadcastable against ``(B, T, D)``."""
    if m is None:
        return None
    m = m.to(dt)
    return m[:, None, :] if m.dim() == 2 else m


def norm_modulate_ref(r, shift, scale, weight, norm: str, eps: float):
    """``norm(r) * (1 + scale) + shift`` on ``r (B, T, D)`` and canonical modulation tensors, all in ``r.dtype``."""
    if norm == "rms":
        n = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            n = n * weight.to(r.dtype)
    else:
        n = F.layer_norm(r, (r.shape[-1],), eps=eps)
    out = n * (1 + mod_ref(scale, r.dtype))
    if shift is not None:
        out = out + mod_ref(shift, r.dtype)
    return out
