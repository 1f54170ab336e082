"""lpips_relu_distance_pool: an LPIPS stage's closing ReLU, its distance to a fixed anchor and the 2x2 max-pool that
opens the next stage, in one kernel each way (docs/method.md § LPIPS fast path).

    y = relu(x)                                              (the stage's features, returned)
    d[n] = lpips_distance(y, b, w)[n]                        (B,) fp32, b a detached anchor
    p = maxpool2x2(y)                                        (B, C, H // 2, W // 2), the next stage's input

The three formulas have one home each: ``lpips_relu_distance`` (ReLU + distance, the per-tile math shared as jit
helpers) and ``maxpool2x2`` (the 2x2 window scan, torch's first-max / NaN rule, floor mode). In VGG-16 stages 1-4 end
in ReLU -> pool; fused, the pool reads ``y`` from registers instead of memory, and ONE autograd node receives the
gradients of the pooled output ``g_p``, of the distance ``g_d`` and (rarely) of ``y`` itself ``g_y``, and writes

    dx = [y > 0] * (route(g_p) + dy_distance + g_y)          (route: g_p at each window's chosen element, else 0)

in one pass over ``y, b, g_p`` (+ ``g_y``). Unfused, the pool's backward reads ``y`` and ``g_p`` and writes its
``∂y``, which the ReLU + distance backward reads again. Forward: reads ``x, b``, writes ``y`` and ``p``. A tile is
(BLOCK_Q windows, all C channels) per window position; partial windows of odd H / W get their ReLU, distance and
gradient but are not pooled. The anchor and the lin weights get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes
from .lpips_distance import LPIPS_EPS
from .lpips_relu_distance import _check, _distance_grad_rows, _relu_distance_rows, lpips_relu_distance_ref
from .maxpool2x2 import _max_step, _out_format, maxpool2x2_ref

__all__ = ["lpips_relu_distance_pool", "lpips_relu_distance_pool_ref"]

_OP = "lpips_relu_distance_pool"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _pos(n, oh, ow, cols, qin, cmask, H, W, s_n, s_c, s_h, s_w, DH: tl.constexpr, DW: tl.constexpr):
    """int64 offsets of window position (DH, DW) of windows (oh, ow) (BLOCK_Q,) over channels ``cols``, the pixels'
    in-range mask (BLOCK_Q,) and the tile's mask (BLOCK_Q, BLOCK_C)."""
    ih = 2 * oh + DH
    iw = 2 * ow + DW
    pin = qin & (ih < H) & (iw < W)
    off = (n.to(tl.int64) * s_n + ih.to(tl.int64) * s_h + iw.to(tl.int64) * s_w)[:, None]
    return off + (cols.to(tl.int64) * s_c)[None, :], pin, pin[:, None] & cmask[None, :]


@triton.jit
def _fwd_position(X, Bf, Y, w, n, oh, ow, cols, qin, cmask, H, W, sx_n, sx_c, sx_h, sx_w, sb_n, sb_c, sb_h, sb_w,
                  sy_n, sy_c, sy_h, sy_w, eps, DH: tl.constexpr, DW: tl.constexpr):  # fmt: skip
    """ReLU + distance of one window position: stores y there, returns y (x's dtype) and the per-window sums."""
    off_x, pin, mask = _pos(n, oh, ow, cols, qin, cmask, H, W, sx_n, sx_c, sx_h, sx_w, DH, DW)
    off_b, _, _ = _pos(n, oh, ow, cols, qin, cmask, H, W, sb_n, sb_c, sb_h, sb_w, DH, DW)
    x = tl.load(X + off_x, mask=mask, other=0.0)
    b = tl.load(Bf + off_b, mask=mask, other=0.0)
    y, v = _relu_distance_rows(x, b, w, pin, eps)
    off_y, _, _ = _pos(n, oh, ow, cols, qin, cmask, H, W, sy_n, sy_c, sy_h, sy_w, DH, DW)
    tl.store(Y + off_y, y.to(Y.dtype.element_ty), mask=mask)
    return y, v


@triton.jit
def _lpips_relu_distance_pool_fwd_kernel(
    X,  # (B, C, H, W) pre-activation, strides (sx_n, sx_c, sx_h, sx_w)
    Bf,  # (B, C, H, W) anchor features, strides (sb_n, sb_c, sb_h, sb_w)
    WL,  # (C,) lin weights
    Y,  # (B, C, H, W) output relu(x), strides (sy_n, sy_c, sy_h, sy_w)
    PO,  # (B, C, H // 2, W // 2) output maxpool2x2(y), strides (sp_n, sp_c, sp_h, sp_w)
    PART,  # (B, NP) fp32 output: per-program sums of sum_c w_c (ŷ - b̂)^2
    C,
    H,
    W,
    Ho,
    Wo,
    Wc,  # ceil(W / 2)
    Q,  # ceil(H / 2) * Wc windows, partial ones included
    NP,
    sx_n, sx_c, sx_h, sx_w, sb_n, sb_c, sb_h, sb_w, sy_n, sy_c, sy_h, sy_w, sp_n, sp_c, sp_h, sp_w,
    eps,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    n = tl.program_id(1)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    qin = q < Q
    oh = q // Wc
    ow = q % Wc
    w = tl.load(WL + cols, mask=cmask, other=0.0).to(tl.float32)
    y, acc = _fwd_position(X, Bf, Y, w, n, oh, ow, cols, qin, cmask, H, W, sx_n, sx_c, sx_h, sx_w,
                           sb_n, sb_c, sb_h, sb_w, sy_n, sy_c, sy_h, sy_w, eps, 0, 0)  # fmt: skip
    best = y.to(tl.float32)
    sel = tl.zeros(best.shape, dtype=tl.int32)
    y, v = _fwd_position(X, Bf, Y, w, n, oh, ow, cols, qin, cmask, H, W, sx_n, sx_c, sx_h, sx_w,
                         sb_n, sb_c, sb_h, sb_w, sy_n, sy_c, sy_h, sy_w, eps, 0, 1)  # fmt: skip
    best, sel = _max_step(best, sel, y, 1)
    acc += v
    y, v = _fwd_position(X, Bf, Y, w, n, oh, ow, cols, qin, cmask, H, W, sx_n, sx_c, sx_h, sx_w,
                         sb_n, sb_c, sb_h, sb_w, sy_n, sy_c, sy_h, sy_w, eps, 1, 0)  # fmt: skip
    best, sel = _max_step(best, sel, y, 2)
    acc += v
    y, v = _fwd_position(X, Bf, Y, w, n, oh, ow, cols, qin, cmask, H, W, sx_n, sx_c, sx_h, sx_w,
                         sb_n, sb_c, sb_h, sb_w, sy_n, sy_c, sy_h, sy_w, eps, 1, 1)  # fmt: skip
    best, sel = _max_step(best, sel, y, 3)
    acc += v
    tl.store(PART + n * NP + pid_q, tl.sum(acc, axis=0))
    live = (qin & (oh < Ho) & (ow < Wo))[:, None] & cmask[None, :]  # full windows only (floor mode)
    off_p = (n.to(tl.int64) * sp_n + oh.to(tl.int64) * sp_h + ow.to(tl.int64) * sp_w)[:, None]
    off_p += (cols.to(tl.int64) * sp_c)[None, :]
    tl.store(PO + off_p, best.to(PO.dtype.element_ty), mask=live)  # the chosen y, bit-exact


@triton.jit
def _bwd_position(GY, Y, Bf, DX, w, g, gp, sel, n, oh, ow, cols, qin, cmask, H, W,
                  sg_n, sg_c, sg_h, sg_w, sy_n, sy_c, sy_h, sy_w, sb_n, sb_c, sb_h, sb_w, sd_n, sd_c, sd_h, sd_w,
                  eps, HAS_GY: tl.constexpr, K: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):  # fmt: skip
    """dx of one window position: [y > 0] (distance gradient + g_p where this position was chosen + g_y)."""
    off_y, _, mask = _pos(n, oh, ow, cols, qin, cmask, H, W, sy_n, sy_c, sy_h, sy_w, DH, DW)
    off_b, _, _ = _pos(n, oh, ow, cols, qin, cmask, H, W, sb_n, sb_c, sb_h, sb_w, DH, DW)
    a = tl.load(Y + off_y, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bf + off_b, mask=mask, other=0.0).to(tl.float32)
    dx = _distance_grad_rows(a, b, w, g, eps) + tl.where(sel == K, gp, 0.0)
    if HAS_GY:
        off_g, _, _ = _pos(n, oh, ow, cols, qin, cmask, H, W, sg_n, sg_c, sg_h, sg_w, DH, DW)
        dx += tl.load(GY + off_g, mask=mask, other=0.0).to(tl.float32)
    dx = tl.where(a > 0.0, dx, 0.0)
    off_d, _, _ = _pos(n, oh, ow, cols, qin, cmask, H, W, sd_n, sd_c, sd_h, sd_w, DH, DW)
    tl.store(DX + off_d, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _lpips_relu_distance_pool_bwd_kernel(
    GD,  # (B,) fp32 dL/dd
    GY,  # (B, C, H, W) dL/dy from outside, strides (sg_n, sg_c, sg_h, sg_w) (read only when HAS_GY)
    GP,  # (B, C, H // 2, W // 2) dL/dp, strides (sq_n, sq_c, sq_h, sq_w) (read only when HAS_GP)
    Y,  # (B, C, H, W) saved relu(x), strides (sy_n, sy_c, sy_h, sy_w)
    Bf,  # (B, C, H, W) anchor features, strides (sb_n, sb_c, sb_h, sb_w)
    WL,  # (C,) lin weights
    DX,  # (B, C, H, W) output dL/dx, strides (sd_n, sd_c, sd_h, sd_w)
    C,
    H,
    W,
    Ho,
    Wo,
    Wc,
    Q,
    sg_n, sg_c, sg_h, sg_w, sq_n, sq_c, sq_h, sq_w, sy_n, sy_c, sy_h, sy_w, sb_n, sb_c, sb_h, sb_w,
    sd_n, sd_c, sd_h, sd_w,
    eps,
    HAS_GY: tl.constexpr,
    HAS_GP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    n = tl.program_id(1)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    qin = q < Q
    oh = q // Wc
    ow = q % Wc
    live = (qin & (oh < Ho) & (ow < Wo))[:, None] & cmask[None, :]
    w = tl.load(WL + cols, mask=cmask, other=0.0).to(tl.float32)
    g = tl.load(GD + n) / (H * W)
    # the window scan over the saved y (the values the forward pooled): the chosen position of every window
    off, _, mask = _pos(n, oh, ow, cols, qin, cmask, H, W, sy_n, sy_c, sy_h, sy_w, 0, 0)
    best = tl.load(Y + off, mask=mask & live, other=0.0).to(tl.float32)
    sel = tl.zeros(best.shape, dtype=tl.int32)
    off, _, mask = _pos(n, oh, ow, cols, qin, cmask, H, W, sy_n, sy_c, sy_h, sy_w, 0, 1)
    best, sel = _max_step(best, sel, tl.load(Y + off, mask=mask & live, other=0.0), 1)
    off, _, mask = _pos(n, oh, ow, cols, qin, cmask, H, W, sy_n, sy_c, sy_h, sy_w, 1, 0)
    best, sel = _max_step(best, sel, tl.load(Y + off, mask=mask & live, other=0.0), 2)
    off, _, mask = _pos(n, oh, ow, cols, qin, cmask, H, W, sy_n, sy_c, sy_h, sy_w, 1, 1)
    best, sel = _max_step(best, sel, tl.load(Y + off, mask=mask & live, other=0.0), 3)
    if HAS_GP:
        off_p = (n.to(tl.int64) * sq_n + oh.to(tl.int64) * sq_h + ow.to(tl.int64) * sq_w)[:, None]
        off_p += (cols.to(tl.int64) * sq_c)[None, :]
        gp = tl.load(GP + off_p, mask=live, other=0.0).to(tl.float32)
    else:
        gp = tl.zeros(best.shape, dtype=tl.float32)
    _bwd_position(GY, Y, Bf, DX, w, g, gp, sel, n, oh, ow, cols, qin, cmask, H, W, sg_n, sg_c, sg_h, sg_w,
                  sy_n, sy_c, sy_h, sy_w, sb_n, sb_c, sb_h, sb_w, sd_n, sd_c, sd_h, sd_w, eps, HAS_GY, 0, 0, 0)
    _bwd_position(GY, Y, Bf, DX, w, g, gp, sel, n, oh, ow, cols, qin, cmask, H, W, sg_n, sg_c, sg_h, sg_w,
                  sy_n, sy_c, sy_h, sy_w, sb_n, sb_c, sb_h, sb_w, sd_n, sd_c, sd_h, sd_w, eps, HAS_GY, 1, 0, 1)
    _bwd_position(GY, Y, Bf, DX, w, g, gp, sel, n, oh, ow, cols, qin, cmask, H, W, sg_n, sg_c, sg_h, sg_w,
                  sy_n, sy_c, sy_h, sy_w, sb_n, sb_c, sb_h, sb_w, sd_n, sd_c, sd_h, sd_w, eps, HAS_GY, 2, 1, 0)
    _bwd_position(GY, Y, Bf, DX, w, g, gp, sel, n, oh, ow, cols, qin, cmask, H, W, sg_n, sg_c, sg_h, sg_w,
                  sy_n, sy_c, sy_h, sy_w, sb_n, sb_c, sb_h, sb_w, sd_n, sd_c, sd_h, sd_w, eps, HAS_GY, 3, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _blocks(C: int, Q: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_C, num_warps): all C channels of BLOCK_Q windows per program, each window position a
    1024-element tile on a GPU (8 elements per thread; the backward keeps the scan's max, its choice and g_p live
    beside each position's y, b and dx); larger tiles under the interpreter (fewer programs)."""
    BLOCK_C = triton.next_power_of_2(max(C, 1))
    max_elems = 16384 if interpreter_enabled() else 1024
    BLOCK_Q = max(1, min(triton.next_power_of_2(max(Q, 1)), max_elems // BLOCK_C))
    return BLOCK_Q, BLOCK_C, max(4, min(16, triton.next_power_of_2(BLOCK_Q * BLOCK_C) // (32 * 4)))


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(Ho, Wo, Wc, Q): pooled grid, windows per row including a partial last one, and all windows."""
    _, _, H, W = x.shape
    Wc = (W + 1) // 2
    return H // 2, W // 2, Wc, ((H + 1) // 2) * Wc


def _pooled(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    return torch.empty((B, C, H // 2, W // 2), dtype=x.dtype, device=x.device, memory_format=_out_format(x))


def _fwd(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    B, C, H, W = x.shape
    Ho, Wo, Wc, Q = _geometry(x)
    BLOCK_Q, BLOCK_C, warps = _blocks(C, Q)
    NP = triton.cdiv(Q, BLOCK_Q)
    y, p = torch.empty_like(x), _pooled(x)
    part = torch.empty((B, NP), dtype=torch.float32, device=x.device)
    _lpips_relu_distance_pool_fwd_kernel[(NP, B)](
        x, b, w, y, p, part, C, H, W, Ho, Wo, Wc, Q, NP, *x.stride(), *b.stride(), *y.stride(), *p.stride(),
        float(eps), BLOCK_Q=BLOCK_Q, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return y, part.sum(1) / (H * W), p


def _bwd(gd: torch.Tensor, gy: torch.Tensor | None, gp: torch.Tensor | None, y: torch.Tensor, b: torch.Tensor,
         w: torch.Tensor, eps: float) -> torch.Tensor:  # fmt: skip
    B, C, H, W = y.shape
    Ho, Wo, Wc, Q = _geometry(y)
    BLOCK_Q, BLOCK_C, warps = _blocks(C, Q)
    dx = torch.empty_like(y)
    zero4 = (0, 0, 0, 0)
    _lpips_relu_distance_pool_bwd_kernel[(triton.cdiv(Q, BLOCK_Q), B)](
        gd.float().contiguous(), y if gy is None else gy, y if gp is None else gp, y, b, w, dx, C, H, W, Ho, Wo, Wc,
        Q, *(zero4 if gy is None else gy.stride()), *(zero4 if gp is None else gp.stride()), *y.stride(),
        *b.stride(), *dx.stride(), float(eps), HAS_GY=gy is not None, HAS_GP=gp is not None, BLOCK_Q=BLOCK_Q,
        BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return dx


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::lpips_relu_distance_pool", mutates_args=())
def _lpips_relu_distance_pool_op(
    x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y = relu(x), d (B,) fp32, p = maxpool2x2(y))``."""
    return _fwd(x, b, w, eps)


@_lpips_relu_distance_pool_op.register_fake
def _(x, b, w, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32), _pooled(x)


@torch.library.custom_op("pae_fast::lpips_relu_distance_pool_backward", mutates_args=())
def _lpips_relu_distance_pool_backward_op(
    gd: torch.Tensor, gy: torch.Tensor | None, gp: torch.Tensor | None, y: torch.Tensor, b: torch.Tensor,
    w: torch.Tensor, eps: float,
) -> torch.Tensor:
    """``dx`` in ``y``'s dtype and layout (``gy`` / ``gp`` None: nothing used ``y`` / ``p``)."""
    return _bwd(gd, gy, gp, y, b, w, eps)


@_lpips_relu_distance_pool_backward_op.register_fake
def _(gd, gy, gp, y, b, w, eps):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _, b, w, eps = inputs
    y, _, _ = output
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs (y is rarely used outside)
    ctx.save_for_backward(y, b, w)


def _backward(ctx, gy, gd, gp):
    y, b, w = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (gy is None and gd is None and gp is None):
        return None, None, None, None
    if gd is None:
        gd = y.new_zeros((y.shape[0],), dtype=torch.float32)
    return _lpips_relu_distance_pool_backward_op(gd, gy, gp, y, b, w, ctx.eps), None, None, None


_lpips_relu_distance_pool_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def lpips_relu_distance_pool(
    x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = LPIPS_EPS, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An LPIPS stage's closing ReLU, its distance to an anchor and the next stage's 2x2 max-pool:
    ``(relu(x), lpips_distance(relu(x), b, w), maxpool2x2(relu(x)))``.

    Args:
        x: ``(B, C, H, W)`` pre-activation of the stage's last ReLU (H, W >= 2), any strides (channels-last is fast).
        b: ``(B, C, H, W)`` anchor features of ``x``'s dtype (no gradient: pass them detached).
        w: ``(C,)`` frozen non-negative lin weights (any floating dtype, read in fp32).
        eps: added to each pixel's channel norm.
        backend: ``auto | triton | torch`` (None: the scope / process default). fp64 inputs run the reference.

    Returns:
        ``y (B, C, H, W)`` in ``x``'s dtype and layout, ``d (B,)`` fp32 (fp64 for fp64 inputs) and
        ``p (B, C, H // 2, W // 2)`` (channels-last when ``x`` is); gradient for ``x`` through all three.
    """
    _check(x, b, w, _OP)
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"{_OP}: H and W must be >= 2 (a 2x2 window), got {tuple(x.shape)}")
    if x.dtype == torch.float64 or resolve_backend(backend, x) == "torch":
        return lpips_relu_distance_pool_ref(x, b, w, eps)
    return _lpips_relu_distance_pool_op(x, b, w, float(eps))


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def lpips_relu_distance_pool_ref(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = LPIPS_EPS
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """PyTorch reference of :func:`lpips_relu_distance_pool`: ``lpips_relu_distance_ref`` then ``maxpool2x2_ref``."""
    y, d = lpips_relu_distance_ref(x, b, w, eps)
    return y, d, maxpool2x2_ref(y)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    x, b, w = args[:3]
    B, C, H, W = x.shape
    p = B * C * (H // 2) * (W // 2) * x.element_size()
    fwd = tensor_bytes(x, b, w) + tensor_bytes(x) + 4 * B + p  # read x, b, w; write y, d, p
    bwd = 4 * B + p + 2 * tensor_bytes(x) + tensor_bytes(b, w)  # read g_d, g_p, y, b, w; write dx
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def tensor(shape, relu, channels_last, ties=False):
        t = torch.randn(*shape, generator=g)
        t = t.mul(2).round().clamp(-1, 1) if ties else t  # few values: ties in the pool windows
        t = (t.relu() + 0.05 if relu else t).to(device=device, dtype=dtype)  # anchors: ReLU features
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    def case(B, C, H, W, cl=True, ties=False):
        shp = (B, C, H, W)
        w = torch.rand(C, generator=g).to(device=device) * (2.0 / C)
        label = f"{shp}{' channels-last' if cl else ''}{' ties' if ties else ''}"
        return label, (tensor(shp, False, cl, ties).requires_grad_(True), tensor(shp, True, cl), w), {}

    if size == "model":  # VGG-16 stages 1-4 of a 256 px image, each followed by a pool (batch 2)
        return [case(2, c, s, s) for c, s in ((64, 256), (128, 128), (256, 64), (512, 32))]
    return [case(2, 3, 7, 9), case(2, 5, 7, 9, cl=False), case(2, 64, 7, 9, ties=True), case(3, 13, 6, 5, cl=False)]


register_op(
    OpSpec(
        name=_OP,
        fn=lpips_relu_distance_pool,
        ref=lpips_relu_distance_pool_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="an LPIPS stage's last ReLU, its distance to a detached anchor and the next 2x2 max-pool (y, d, p)",
    )
)
