"""lpips_relu_distance: an LPIPS stage's closing ReLU fused with that stage's distance to a fixed anchor
(docs/method.md § LPIPS fast path).

    y = relu(x)                                              (the stage's features, passed on to the next layer)
    d[n] = lpips_distance(y, b, w)[n]                        (B,) fp32, b a detached anchor

The distance is :func:`pae_fast.kernels.lpips_distance`'s (one home of the formula: ``lpips_distance_ref``). Fusing
the ReLU makes ONE autograd node own both uses of ``y``: its backward receives the gradient from the next layer
(``g_y``) and from the distance (``g_d``) together and writes

    dx = [y > 0] * (g_y + dy_distance)                       (dy_distance: lpips_distance's da with g = g_d)

in one pass over ``y, b, g_y``, where the unfused trunk adds the two gradients of ``y`` (read 2, write 1) and then runs
the ReLU backward (read 2, write 1) after the distance backward (read 2, write 1). The forward reads ``x, b`` and
writes ``y`` (the unfused: ReLU read + write, distance read 2). The anchor gets no gradient (refused if it requires
one), nor do the frozen lin weights ``w``. At an all-zero feature vector the ReLU mask zeroes the gradient, as in the
unfused trunk. Layout, tiles and fp32 accumulation as in ``lpips_distance``; ``y`` and ``dx`` keep ``x``'s dtype and
layout, and the backward reads the saved ``y`` (``x`` is not kept).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import OpSpec, register_op, resolve_backend, tensor_bytes
from .lpips_distance import LPIPS_EPS, _blocks, lpips_distance_ref

__all__ = ["lpips_relu_distance", "lpips_relu_distance_ref"]

_OP = "lpips_relu_distance"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _offsets(n, pid_p, HW, Wd, C, s_n, s_c, s_h, s_w, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """int64 element offsets of one (BLOCK_P pixels, BLOCK_C channels) tile of image n, and its masks."""
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    pmask = pix < HW
    mask = pmask[:, None] & (cols < C)[None, :]
    hh = (pix // Wd).to(tl.int64)
    ww = (pix % Wd).to(tl.int64)
    off = (n.to(tl.int64) * s_n + hh * s_h + ww * s_w)[:, None] + (cols.to(tl.int64) * s_c)[None, :]
    return off, pmask, mask


@triton.jit
def _relu_distance_rows(x, b, w, pmask, eps):
    """``y = relu(x)`` (x's dtype, exact) and each pixel's ``sum_c w_c (ŷ - b̂)^2`` (fp32, 0 off ``pmask``) of one tile
    x, b (BLOCK_P, BLOCK_C), w (BLOCK_C,) fp32, pmask (BLOCK_P,)."""
    y = tl.maximum(x, 0.0)
    a = y.to(tl.float32)
    b = b.to(tl.float32)
    na = tl.sqrt(tl.sum(a * a, axis=1))
    nb = tl.sqrt(tl.sum(b * b, axis=1))
    diff = a / (na + eps)[:, None] - b / (nb + eps)[:, None]
    return y, tl.where(pmask, tl.sum(w[None, :] * diff * diff, axis=1), 0.0)


@triton.jit
def _distance_grad_rows(a, b, w, g, eps):
    """dL/dy of the distance term alone (before the ReLU mask) for one tile: a = y, b fp32 (BLOCK_P, BLOCK_C), w
    (BLOCK_C,) fp32, g = dL/dd / (H W) of this image."""
    na = tl.sqrt(tl.sum(a * a, axis=1))
    s_a = na + eps
    s_b = tl.sqrt(tl.sum(b * b, axis=1)) + eps
    u = 2.0 * g * w[None, :] * (a / s_a[:, None] - b / s_b[:, None])  # dL/dŷ
    coef = tl.where(na > 0.0, tl.sum(u * a, axis=1) / (s_a * s_a) / tl.maximum(na, 1e-30), 0.0)
    return u / s_a[:, None] - a * coef[:, None]


@triton.jit
def _lpips_relu_distance_fwd_kernel(
    X,  # (B, C, H, W) pre-activation, strides (sx_n, sx_c, sx_h, sx_w)
    Bf,  # (B, C, H, W) anchor features, strides (sb_n, sb_c, sb_h, sb_w)
    WL,  # (C,) lin weights
    Y,  # (B, C, H, W) output relu(x), strides (sy_n, sy_c, sy_h, sy_w)
    PART,  # (B, P) fp32 output: per-program sums of sum_c w_c (ŷ - b̂)^2
    HW,
    Wd,
    C,
    P,
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    sb_n,
    sb_c,
    sb_h,
    sb_w,
    sy_n,
    sy_c,
    sy_h,
    sy_w,
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    off_x, pmask, mask = _offsets(n, pid_p, HW, Wd, C, sx_n, sx_c, sx_h, sx_w, BLOCK_P, BLOCK_C)
    x = tl.load(X + off_x, mask=mask, other=0.0)
    off_b, _, _ = _offsets(n, pid_p, HW, Wd, C, sb_n, sb_c, sb_h, sb_w, BLOCK_P, BLOCK_C)
    b = tl.load(Bf + off_b, mask=mask, other=0.0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(WL + cols, mask=cols < C, other=0.0).to(tl.float32)
    y, v = _relu_distance_rows(x, b, w, pmask, eps)
    off_y, _, _ = _offsets(n, pid_p, HW, Wd, C, sy_n, sy_c, sy_h, sy_w, BLOCK_P, BLOCK_C)
    tl.store(Y + off_y, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(PART + n * P + pid_p, tl.sum(v, axis=0))


@triton.jit
def _lpips_relu_distance_bwd_kernel(
    GD,  # (B,) fp32 dL/dd
    GY,  # (B, C, H, W) dL/dy from the next layer, strides (sg_n, sg_c, sg_h, sg_w) (read only when HAS_GY)
    Y,  # (B, C, H, W) saved relu(x), strides (sy_n, sy_c, sy_h, sy_w)
    Bf,  # (B, C, H, W) anchor features, strides (sb_n, sb_c, sb_h, sb_w)
    WL,  # (C,) lin weights
    DX,  # (B, C, H, W) output dL/dx, strides (sd_n, sd_c, sd_h, sd_w)
    HW,
    Wd,
    C,
    sg_n,
    sg_c,
    sg_h,
    sg_w,
    sy_n,
    sy_c,
    sy_h,
    sy_w,
    sb_n,
    sb_c,
    sb_h,
    sb_w,
    sd_n,
    sd_c,
    sd_h,
    sd_w,
    eps,
    HAS_GY: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    off_y, pmask, mask = _offsets(n, pid_p, HW, Wd, C, sy_n, sy_c, sy_h, sy_w, BLOCK_P, BLOCK_C)
    a = tl.load(Y + off_y, mask=mask, other=0.0).to(tl.float32)
    off_b, _, _ = _offsets(n, pid_p, HW, Wd, C, sb_n, sb_c, sb_h, sb_w, BLOCK_P, BLOCK_C)
    b = tl.load(Bf + off_b, mask=mask, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(WL + cols, mask=cols < C, other=0.0).to(tl.float32)
    dx = _distance_grad_rows(a, b, w, tl.load(GD + n) / HW, eps)
    if HAS_GY:
        off_g, _, _ = _offsets(n, pid_p, HW, Wd, C, sg_n, sg_c, sg_h, sg_w, BLOCK_P, BLOCK_C)
        dx += tl.load(GY + off_g, mask=mask, other=0.0).to(tl.float32)
    dx = tl.where(a > 0.0, dx, 0.0)
    off_d, _, _ = _offsets(n, pid_p, HW, Wd, C, sd_n, sd_c, sd_h, sd_w, BLOCK_P, BLOCK_C)
    tl.store(DX + off_d, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _fwd(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    BLOCK_P, BLOCK_C, warps = _blocks(x, backward=False)
    P = triton.cdiv(H * W, BLOCK_P)
    y = torch.empty_like(x)
    part = torch.empty((B, P), dtype=torch.float32, device=x.device)
    _lpips_relu_distance_fwd_kernel[(P, B)](
        x, b, w, y, part, H * W, W, C, P, *x.stride(), *b.stride(), *y.stride(), float(eps),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return y, part.sum(1) / (H * W)


def _bwd(gd: torch.Tensor, gy: torch.Tensor | None, y: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float
         ) -> torch.Tensor:  # fmt: skip
    B, C, H, W = y.shape
    BLOCK_P, BLOCK_C, warps = _blocks(y, backward=True)
    P = triton.cdiv(H * W, BLOCK_P)
    dx = torch.empty_like(y)
    has_gy = gy is not None
    _lpips_relu_distance_bwd_kernel[(P, B)](
        gd.float().contiguous(), gy if has_gy else y, y, b, w, dx, H * W, W, C,
        *(gy.stride() if has_gy else (0, 0, 0, 0)), *y.stride(), *b.stride(), *dx.stride(), float(eps),
        HAS_GY=has_gy, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return dx


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::lpips_relu_distance", mutates_args=())
def _lpips_relu_distance_op(
    x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y = relu(x), d (B,) fp32)``."""
    return _fwd(x, b, w, eps)


@_lpips_relu_distance_op.register_fake
def _(x, b, w, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("pae_fast::lpips_relu_distance_backward", mutates_args=())
def _lpips_relu_distance_backward_op(
    gd: torch.Tensor, gy: torch.Tensor | None, y: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float
) -> torch.Tensor:
    """``dx`` in ``y``'s dtype and layout (``gy`` None: nothing downstream used ``y``)."""
    return _bwd(gd, gy, y, b, w, eps)


@_lpips_relu_distance_backward_op.register_fake
def _(gd, gy, y, b, w, eps):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _, b, w, eps = inputs
    y, _ = output
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # no zero-filled dL/dy when y only feeds the distance (the last stage)
    ctx.save_for_backward(y, b, w)


def _backward(ctx, gy, gd):
    y, b, w = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (gy is None and gd is None):
        return None, None, None, None
    if gd is None:
        gd = y.new_zeros((y.shape[0],), dtype=torch.float32)
    return _lpips_relu_distance_backward_op(gd, gy, y, b, w, ctx.eps), None, None, None


_lpips_relu_distance_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, op: str = _OP) -> None:
    """The inputs' contract (shared with ``lpips_relu_distance_pool``, whose name ``op`` the messages carry)."""
    if x.dim() != 4 or x.shape != b.shape:
        raise ValueError(f"{op}: x and b must be (B, C, H, W) of one shape, got {tuple(x.shape)}, {tuple(b.shape)}")
    if x.dtype != b.dtype:
        raise ValueError(f"{op}: x and b must share a dtype, got {x.dtype} and {b.dtype}")
    if w.dim() != 1 or w.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: w must be (C,) = ({x.shape[1]},) (the lin head's weights), got {tuple(w.shape)}")
    if b.device != x.device or w.device != x.device:
        raise ValueError(f"{op}: x, b and w must be on one device, got {x.device}, {b.device}, {w.device}")
    if torch.is_grad_enabled() and (b.requires_grad or w.requires_grad):
        raise ValueError(f"{op}: the anchor b and the frozen lin weights w get no gradient; pass them detached")


def lpips_relu_distance(
    x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = LPIPS_EPS, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An LPIPS stage's closing ReLU and its distance to an anchor: ``(relu(x), lpips_distance(relu(x), b, w))``.

    Args:
        x: ``(B, C, H, W)`` pre-activation of the stage's last ReLU, any strides (channels-last is the fast layout).
        b: ``(B, C, H, W)`` anchor features of ``x``'s dtype (no gradient: pass them detached).
        w: ``(C,)`` frozen non-negative lin weights (any floating dtype, read in fp32).
        eps: added to each pixel's channel norm.
        backend: ``auto | triton | torch`` (None: the scope / process default). fp64 inputs run the reference.

    Returns:
        ``y (B, C, H, W)`` in ``x``'s dtype and layout, and ``d (B,)`` fp32 (fp64 for fp64 inputs); gradient for x
        through both.
    """
    _check(x, b, w)
    if x.dtype == torch.float64 or resolve_backend(backend, x) == "torch":
        return lpips_relu_distance_ref(x, b, w, eps)
    return _lpips_relu_distance_op(x, b, w, float(eps))


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def lpips_relu_distance_ref(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = LPIPS_EPS
                            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PyTorch reference of :func:`lpips_relu_distance`: ``torch.relu`` then ``lpips_distance_ref``."""
    y = torch.relu(x)
    return y, lpips_distance_ref(y, b, w, eps)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    x, b, w = args[:3]
    fwd = tensor_bytes(x, b, w) + tensor_bytes(x) + 4 * x.shape[0]  # read x, b, w; write y, d
    bwd = 4 * x.shape[0] + 3 * tensor_bytes(x) + tensor_bytes(b, w)  # read g_d, g_y, y, b, w; write dx
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def tensor(shape, relu, channels_last):
        t = torch.randn(*shape, generator=g)
        t = (t.relu() + 0.05 if relu else t).to(device=device, dtype=dtype)  # anchors: ReLU features
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    def case(B, C, H, W, label="", cl=True, dead_pixel=False):
        shp = (B, C, H, W)
        x = tensor(shp, False, cl)
        if dead_pixel:  # every channel negative at one pixel: y = 0 there
            x[0, :, 0, 0] = -x[0, :, 0, 0].abs() - 0.1
        w = torch.rand(C, generator=g).to(device=device) * (2.0 / C)
        return f"{shp}{' channels-last' if cl else ''}{label}", (x.requires_grad_(True), tensor(shp, True, cl), w), {}

    if size == "model":  # the five VGG-16 stages of a 256 px image (batch 2: the widths and grids are what matter)
        return [case(2, c, s, s, " (VGG-16 stage, 256 px)") for c, s in
                ((64, 256), (128, 128), (256, 64), (512, 32), (512, 16))]  # fmt: skip
    out = [case(2, 3, 7, 11, dead_pixel=True), case(2, 5, 7, 11, cl=False), case(3, 64, 7, 11),
           case(2, 64, 5, 3, cl=False, dead_pixel=True)]  # fmt: skip
    x = tensor((2, 13, 11, 7), False, False)  # a permuted view: (B, C, H, W) with odd strides
    out.append(("strided view (2, 7, 13, 11)", (x.permute(0, 3, 1, 2).requires_grad_(True),
                                               tensor((2, 7, 13, 11), True, False),
                                               torch.rand(7, generator=g).to(device=device) / 3.5), {}))  # fmt: skip
    return out


register_op(
    OpSpec(
        name=_OP,
        fn=lpips_relu_distance,
        ref=lpips_relu_distance_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="an LPIPS stage's last ReLU fused with its distance to a detached anchor ((y, d), fp32 d)",
    )
)
