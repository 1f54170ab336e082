"""maxpool2x2: 2x2 stride-2 max-pool without saved indices (docs/method.md § LPIPS fast path).

    y[n, c, i, j] = max(x[n, c, 2i, 2j], x[n, c, 2i, 2j+1], x[n, c, 2i+1, 2j], x[n, c, 2i+1, 2j+1])

for i < H // 2, j < W // 2 (floor mode, ``ceil_mode=False``: an odd last row / column is dropped), as VGG-16's
``nn.MaxPool2d(2, 2)``. The selection rule is torch's, checked on CPU (``max_pool2d_with_indices``, both layouts,
fp32 / fp16): the window is scanned in row-major order (top-left, top-right, bottom-left, bottom-right) and an element
replaces the running max when it is greater or NaN. So among equal maxima the FIRST wins, and a window with NaN
yields NaN and routes its gradient to its LAST NaN. The gradient of each input element is ``dy`` of its window where
it is the selected element, else 0 (the dropped row / column: 0).

torch's ``max_pool2d`` writes int64 indices (8 bytes per output element) in forward, and its backward zero-fills the
whole input gradient, then scatters ``dy``. Here the forward reads ``x`` once and writes ``y`` only; the backward
re-reads ``x`` (autograd keeps it alive anyway: it is the previous ReLU's output) with ``dy`` and writes every
element of ``dx`` once, the selection recomputed. Any strides (explicit stride arguments); channels-last, the
trunk's layout, is the fast one: a tile is (BLOCK_P output pixels, BLOCK_C channels), channels contiguous. ``y`` is
channels-last when ``x`` is, else contiguous; ``dx`` has ``x``'s layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes

__all__ = ["maxpool2x2", "maxpool2x2_ref"]

_OP = "maxpool2x2"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _window(
    X,  # (B, C, H, W) input, strides (sx_n, sx_c, sx_h, sx_w)
    n,
    oh,  # (BLOCK_P,) window rows
    ow,  # (BLOCK_P,) window columns
    cols,  # (BLOCK_C,) channels
    H,
    W,
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    live,  # (BLOCK_P, BLOCK_C) windows that exist in the output (all four elements in range)
    cmask,  # (BLOCK_C,) channels in range
):
    """Offsets, in-range masks and values of the four elements of each window, in torch's scan order, and the scan's
    choice ``sel`` in 0..3 (first maximum; a NaN replaces the running max, so the last NaN wins)."""
    ih = (2 * oh).to(tl.int64)
    iw = (2 * ow).to(tl.int64)
    base = n.to(tl.int64) * sx_n + (cols.to(tl.int64) * sx_c)[None, :]
    o0 = base + (ih * sx_h + iw * sx_w)[:, None]
    o1 = o0 + sx_w
    o2 = o0 + sx_h
    o3 = o2 + sx_w
    # in-range masks (an odd last row / column belongs to no window but still gets its zero gradient)
    m0 = ((ih < H) & (iw < W))[:, None] & cmask[None, :]
    m1 = ((ih < H) & (iw + 1 < W))[:, None] & cmask[None, :]
    m2 = ((ih + 1 < H) & (iw < W))[:, None] & cmask[None, :]
    m3 = ((ih + 1 < H) & (iw + 1 < W))[:, None] & cmask[None, :]
    v0 = tl.load(X + o0, mask=m0 & live, other=0.0)
    v1 = tl.load(X + o1, mask=m1 & live, other=0.0)
    v2 = tl.load(X + o2, mask=m2 & live, other=0.0)
    v3 = tl.load(X + o3, mask=m3 & live, other=0.0)
    best = v0.to(tl.float32)
    sel = tl.zeros(best.shape, dtype=tl.int32)
    best, sel = _max_step(best, sel, v1, 1)
    best, sel = _max_step(best, sel, v2, 2)
    best, sel = _max_step(best, sel, v3, 3)
    return o0, o1, o2, o3, m0, m1, m2, m3, v0, v1, v2, v3, sel


@triton.jit
def _max_step(best, sel, v, k: tl.constexpr):
    """One step of torch's window scan: ``v`` (the window's k-th element in row-major order) replaces the running max
    ``best`` (fp32) when greater or NaN; ``sel`` is the chosen position. fp32 compares are exact for fp16 / bf16."""
    f = v.to(tl.float32)
    take = (f > best) | (f != f)
    return tl.where(take, f, best), tl.where(take, k, sel)


@triton.jit
def _maxpool2x2_fwd_kernel(
    X,  # (B, C, H, W) input, strides (sx_n, sx_c, sx_h, sx_w)
    Y,  # (B, C, Ho, Wo) output, strides (sy_n, sy_c, sy_h, sy_w)
    C,
    H,
    W,
    Wo,
    P,  # Ho * Wo
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    sy_n,
    sy_c,
    sy_h,
    sy_w,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    oh = pix // Wo
    ow = pix % Wo
    live = (pix < P)[:, None] & cmask[None, :]
    _, _, _, _, _, _, _, _, v0, v1, v2, v3, sel = _window(
        X, n, oh, ow, cols, H, W, sx_n, sx_c, sx_h, sx_w, live, cmask
    )
    y = tl.where(sel == 0, v0, tl.where(sel == 1, v1, tl.where(sel == 2, v2, v3)))  # the chosen element, bit-exact
    off_y = n.to(tl.int64) * sy_n + (oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w)[:, None]
    off_y += (cols.to(tl.int64) * sy_c)[None, :]
    tl.store(Y + off_y, y, mask=live)


@triton.jit
def _maxpool2x2_bwd_kernel(
    X,  # (B, C, H, W) saved input, strides (sx_n, sx_c, sx_h, sx_w)
    DY,  # (B, C, Ho, Wo) dL/dy, strides (sg_n, sg_c, sg_h, sg_w)
    DX,  # (B, C, H, W) output dL/dx, strides (sd_n, sd_c, sd_h, sd_w)
    C,
    H,
    W,
    Ho,
    Wo,
    Wc,  # ceil(W / 2): windows per row including a partial last one
    P,  # ceil(H / 2) * Wc: every input element lies in exactly one (possibly partial) window
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    sg_n,
    sg_c,
    sg_h,
    sg_w,
    sd_n,
    sd_c,
    sd_h,
    sd_w,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    oh = pix // Wc
    ow = pix % Wc
    inb = pix < P
    live = (inb & (oh < Ho) & (ow < Wo))[:, None] & cmask[None, :]  # partial windows (odd H / W) are not pooled
    o0, o1, o2, o3, m0, m1, m2, m3, _, _, _, _, sel = _window(
        X, n, oh, ow, cols, H, W, sx_n, sx_c, sx_h, sx_w, live, cmask
    )
    off_g = n.to(tl.int64) * sg_n + (oh.to(tl.int64) * sg_h + ow.to(tl.int64) * sg_w)[:, None]
    off_g += (cols.to(tl.int64) * sg_c)[None, :]
    g = tl.load(DY + off_g, mask=live, other=0.0)
    zero = tl.zeros_like(g)
    # every element of each (possibly partial) window is written: dy where selected, else 0
    d0 = n.to(tl.int64) * sd_n + (cols.to(tl.int64) * sd_c)[None, :]
    d0 += ((2 * oh).to(tl.int64) * sd_h + (2 * ow).to(tl.int64) * sd_w)[:, None]
    inb2 = inb[:, None]
    tl.store(DX + d0, tl.where(sel == 0, g, zero), mask=m0 & inb2)
    tl.store(DX + d0 + sd_w, tl.where(sel == 1, g, zero), mask=m1 & inb2)
    tl.store(DX + d0 + sd_h, tl.where(sel == 2, g, zero), mask=m2 & inb2)
    tl.store(DX + d0 + sd_h + sd_w, tl.where(sel == 3, g, zero), mask=m3 & inb2)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): up to 64 channels by 1024 / BLOCK_C output pixels per program, four window
    elements each (4096 input elements per tile on a GPU); larger tiles under the interpreter (fewer programs)."""
    BLOCK_C = min(64, triton.next_power_of_2(max(C, 1)))
    BLOCK_P = (16384 if interpreter_enabled() else 1024) // BLOCK_C
    return BLOCK_P, BLOCK_C, 4


def _out_format(x: torch.Tensor) -> torch.memory_format:
    """channels-last output for a channels-last input (the trunk's layout), else contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _fwd(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    y = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=_out_format(x))
    if y.numel() == 0:  # B == 0 or C == 0
        return y
    BLOCK_P, BLOCK_C, warps = _blocks(C)
    grid = (triton.cdiv(Ho * Wo, BLOCK_P), triton.cdiv(C, BLOCK_C), B)
    _maxpool2x2_fwd_kernel[grid](
        x, y, C, H, W, Wo, Ho * Wo, *x.stride(), *y.stride(), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps
    )
    return y


def _bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx
    Hc, Wc = (H + 1) // 2, (W + 1) // 2
    BLOCK_P, BLOCK_C, warps = _blocks(C)
    grid = (triton.cdiv(Hc * Wc, BLOCK_P), triton.cdiv(C, BLOCK_C), B)
    _maxpool2x2_bwd_kernel[grid](
        x, dy, dx, C, H, W, H // 2, W // 2, Wc, Hc * Wc, *x.stride(), *dy.stride(), *dx.stride(),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return dx


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::maxpool2x2", mutates_args=())
def _maxpool2x2_op(x: torch.Tensor) -> torch.Tensor:
    """``y (B, C, H // 2, W // 2)``."""
    return _fwd(x)


@_maxpool2x2_op.register_fake
def _(x):
    B, C, H, W = x.shape
    return torch.empty((B, C, H // 2, W // 2), dtype=x.dtype, device=x.device, memory_format=_out_format(x))


@torch.library.custom_op("pae_fast::maxpool2x2_backward", mutates_args=())
def _maxpool2x2_backward_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dx`` in ``x``'s dtype and layout."""
    return _bwd(dy, x)


@_maxpool2x2_backward_op.register_fake
def _(dy, x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    return _maxpool2x2_backward_op(dy, x)


_maxpool2x2_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def maxpool2x2(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """2x2 stride-2 max-pool (floor mode) with torch's selection rule and no saved indices.

    Args:
        x: ``(B, C, H, W)`` floating tensor, any strides (channels-last is the fast layout).
        backend: ``auto | triton | torch`` (None: the scope / process default). fp64 inputs run the reference.

    Returns:
        ``(B, C, H // 2, W // 2)`` in ``x``'s dtype, channels-last when ``x`` is; gradient for ``x``.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{_OP}: x must be a floating (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[2] < 2 or x.shape[3] < 2:  # torch's max_pool2d refuses an empty output too
        raise ValueError(f"{_OP}: H and W must be >= 2 (a 2x2 window), got {tuple(x.shape)}")
    if x.dtype == torch.float64 or resolve_backend(backend, x) == "torch":
        return maxpool2x2_ref(x)
    return _maxpool2x2_op(x)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def maxpool2x2_ref(x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`maxpool2x2`: ``F.max_pool2d(x, 2, 2)`` (VGG's ``nn.MaxPool2d(2, 2)``)."""
    return F.max_pool2d(x, 2, 2)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    (x,) = args[:1]
    B, C, H, W = x.shape
    y = B * C * (H // 2) * (W // 2) * x.element_size()
    fwd = tensor_bytes(x) + y  # read x, write y
    bwd = 2 * tensor_bytes(x) + y  # read x, dy; write dx
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def case(B, C, H, W, cl=True, ties=False):
        x = torch.randn(B, C, H, W, generator=g)
        if ties:  # few distinct values: many windows with equal maxima (the first one must win)
            x = x.mul(2).round().clamp(-1, 1)
        x = x.to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        label = f"{(B, C, H, W)}{' channels-last' if cl else ''}{' ties' if ties else ''}"
        return label, (x.requires_grad_(True),), {}

    if size == "model":  # the four pools of VGG-16 on a 256 px image (batch 2)
        return [case(2, c, s, s) for c, s in ((64, 256), (128, 128), (256, 64), (512, 32))]
    return [case(2, 3, 7, 9), case(2, 5, 7, 9, cl=False), case(2, 64, 7, 9, ties=True), case(3, 67, 6, 5, cl=False),
            case(1, 5, 2, 3)]  # fmt: skip


register_op(
    OpSpec(
        name=_OP,
        fn=maxpool2x2,
        ref=maxpool2x2_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="2x2 stride-2 max-pool without saved indices (torch's first-max / NaN rule; floor mode)",
    )
)
