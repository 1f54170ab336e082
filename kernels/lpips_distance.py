"""lpips_distance: one LPIPS stage's distance, the channel normalisation, squared difference, non-negative 1x1 head and
spatial mean in one pass (docs/method.md § LPIPS fast path).

    â = a / (||a||_c + eps),   b̂ = b / (||b||_c + eps)           (per pixel, over the C channels; eps = 1e-10)
    d[n] = mean_{h,w} sum_c w_c (â - b̂)^2                          (B,) fp32

This is exactly the per-stage term of the LPIPS forward (Zhang et al., 2018; ``pae_fast.losses.lpips``): the same eps
placement (added to the norm, not under the square root), the same mean over ``H * W``.

Backward (g_n = dL/dd[n], u = 2 w (â - b̂) g_n / (H W), s_a = ||a|| + eps, s_b = ||b|| + eps):
    da = u / s_a - a (u . a) / (s_a^2 ||a||)
    db = -u / s_b + b (u . b) / (s_b^2 ||b||)
At an all-zero feature vector (||a|| = 0) autograd of the reference gives NaN (``sqrt``'s derivative at 0 times 0);
the kernel gives the limit, ``u / eps`` (the second term vanishes). In the LPIPS trunk every stage ends in a ReLU,
whose backward masks such a pixel (all its pre-activations were <= 0), so both reach the image as 0.
The lin weights ``w`` are frozen: no gradient for them (a ``w`` that requires grad is refused).

Layout: ``a, b (B, C, H, W)`` with any strides; channels-last (C contiguous, ``memory_format=torch.channels_last``)
is the fast one: a program reads ``BLOCK_P`` pixels x all C channels of one image. Accumulation is fp32 whatever the
input dtype; the forward writes one fp32 partial sum per program, ``(B, P)``, summed by one small ``sum``
(deterministic, no atomics). The backward recomputes the norms from a and b (nothing is saved but the inputs) and
writes da / db in the inputs' dtype, each only when needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes
from ._utils import row_block

__all__ = ["lpips_distance", "lpips_distance_ref", "LPIPS_EPS"]

_OP = "lpips_distance"
LPIPS_EPS = 1e-10  # added to each feature vector's norm (the official LPIPS ``normalize_tensor``)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(
    A,  # (B, C, H, W) features, strides (sa_n, sa_c, sa_h, sa_w)
    Bf,  # (B, C, H, W) features, strides (sb_n, sb_c, sb_h, sb_w)
    WL,  # (C,) lin weights
    n,
    pid_p,
    HW,
    Wd,
    C,
    sa_n,
    sa_c,
    sa_h,
    sa_w,
    sb_n,
    sb_c,
    sb_h,
    sb_w,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Load one (BLOCK_P pixels, C) tile of a and b in fp32 and their per-pixel norms."""
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    pmask = pix < HW
    cmask = cols < C
    mask = pmask[:, None] & cmask[None, :]
    hh = (pix // Wd).to(tl.int64)
    ww = (pix % Wd).to(tl.int64)
    n64 = n.to(tl.int64)
    c64 = cols.to(tl.int64)
    off_a = (n64 * sa_n + hh * sa_h + ww * sa_w)[:, None] + (c64 * sa_c)[None, :]
    off_b = (n64 * sb_n + hh * sb_h + ww * sb_w)[:, None] + (c64 * sb_c)[None, :]
    a = tl.load(A + off_a, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bf + off_b, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(WL + cols, mask=cmask, other=0.0).to(tl.float32)
    na = tl.sqrt(tl.sum(a * a, axis=1))
    nb = tl.sqrt(tl.sum(b * b, axis=1))
    return a, b, w, na, nb, pmask, mask


@triton.jit
def _lpips_distance_fwd_kernel(
    A,  # (B, C, H, W) features, strides (sa_n, sa_c, sa_h, sa_w)
    Bf,  # (B, C, H, W) features, strides (sb_n, sb_c, sb_h, sb_w)
    WL,  # (C,) lin weights
    PART,  # (B, P) fp32 output: sum over the program's pixels of sum_c w_c (â - b̂)^2
    HW,
    Wd,
    C,
    P,
    sa_n,
    sa_c,
    sa_h,
    sa_w,
    sb_n,
    sb_c,
    sb_h,
    sb_w,
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    a, b, w, na, nb, pmask, mask = _tile(
        A, Bf, WL, n, pid_p, HW, Wd, C, sa_n, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w, BLOCK_P, BLOCK_C
    )
    diff = a / (na + eps)[:, None] - b / (nb + eps)[:, None]
    v = tl.sum(w[None, :] * diff * diff, axis=1)  # (BLOCK_P,)
    v = tl.where(pmask, v, 0.0)
    tl.store(PART + n * P + pid_p, tl.sum(v, axis=0))


@triton.jit
def _lpips_distance_bwd_kernel(
    G,  # (B,) fp32 upstream gradient dL/dd
    A,  # (B, C, H, W) features, strides (sa_n, sa_c, sa_h, sa_w)
    Bf,  # (B, C, H, W) features, strides (sb_n, sb_c, sb_h, sb_w)
    WL,  # (C,) lin weights
    DA,  # (B, C, H, W) output dL/da, strides (sda_n, sda_c, sda_h, sda_w) (written only when NEED_A)
    DB,  # (B, C, H, W) output dL/db, strides (sdb_n, sdb_c, sdb_h, sdb_w) (written only when NEED_B)
    HW,
    Wd,
    C,
    sa_n,
    sa_c,
    sa_h,
    sa_w,
    sb_n,
    sb_c,
    sb_h,
    sb_w,
    sda_n,
    sda_c,
    sda_h,
    sda_w,
    sdb_n,
    sdb_c,
    sdb_h,
    sdb_w,
    eps,
    NEED_A: tl.constexpr,
    NEED_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    a, b, w, na, nb, pmask, mask = _tile(
        A, Bf, WL, n, pid_p, HW, Wd, C, sa_n, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w, BLOCK_P, BLOCK_C
    )
    s_a = na + eps
    s_b = nb + eps
    g = tl.load(G + n) / HW
    u = 2.0 * g * w[None, :] * (a / s_a[:, None] - b / s_b[:, None])  # dL/dâ = -dL/db̂
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    hh = (pix // Wd).to(tl.int64)
    ww = (pix % Wd).to(tl.int64)
    n64 = n.to(tl.int64)
    c64 = cols.to(tl.int64)
    if NEED_A:
        coef = tl.where(na > 0.0, tl.sum(u * a, axis=1) / (s_a * s_a) / tl.maximum(na, 1e-30), 0.0)
        da = u / s_a[:, None] - a * coef[:, None]
        off = (n64 * sda_n + hh * sda_h + ww * sda_w)[:, None] + (c64 * sda_c)[None, :]
        tl.store(DA + off, da.to(DA.dtype.element_ty), mask=mask)
    if NEED_B:
        coef = tl.where(nb > 0.0, tl.sum(u * b, axis=1) / (s_b * s_b) / tl.maximum(nb, 1e-30), 0.0)
        db = b * coef[:, None] - u / s_b[:, None]
        off = (n64 * sdb_n + hh * sdb_h + ww * sdb_w)[:, None] + (c64 * sdb_c)[None, :]
        tl.store(DB + off, db.to(DB.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _blocks(a: torch.Tensor, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): all C channels of BLOCK_P pixels per program, about 16 elements per thread and
    tile (forward: 4096-element tiles) or 8 (backward, 2048: it keeps a, b, u, the gradients and their pointers live).
    With 8192-element tiles at 32 per thread the backward spilled up to 644 B (``compile_check --ptxas``, sm_90)."""
    _, C, H, W = a.shape
    BLOCK_P, BLOCK_C = row_block(H * W, C, None if interpreter_enabled() else (2048 if backward else 4096))
    per_thread = 8 if backward else 16
    return BLOCK_P, BLOCK_C, max(4, min(16, triton.next_power_of_2(BLOCK_P * BLOCK_C) // (32 * per_thread)))


def _fwd(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    B, C, H, W = a.shape
    BLOCK_P, BLOCK_C, warps = _blocks(a, backward=False)
    P = triton.cdiv(H * W, BLOCK_P)
    part = torch.empty((B, P), dtype=torch.float32, device=a.device)
    _lpips_distance_fwd_kernel[(P, B)](
        a, b, w, part, H * W, W, C, P, *a.stride(), *b.stride(), float(eps),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return part.sum(1) / (H * W)


def _bwd(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float, need_a: bool, need_b: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    B, C, H, W = a.shape
    BLOCK_P, BLOCK_C, warps = _blocks(a, backward=True)
    P = triton.cdiv(H * W, BLOCK_P)
    # distinct empty tensors when not needed: custom-op outputs must not alias
    da = torch.empty_like(a) if need_a else a.new_empty((0, 0, 0, 0))
    db = torch.empty_like(b) if need_b else b.new_empty((0, 0, 0, 0))
    sda = da.stride() if need_a else (0, 0, 0, 0)
    sdb = db.stride() if need_b else (0, 0, 0, 0)
    _lpips_distance_bwd_kernel[(P, B)](
        g.float().contiguous(), a, b, w, da, db, H * W, W, C, *a.stride(), *b.stride(), *sda, *sdb, float(eps),
        NEED_A=need_a, NEED_B=need_b, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return da, db


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::lpips_distance", mutates_args=())
def _lpips_distance_op(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``(B,)`` fp32 distances."""
    return _fwd(a, b, w, eps)


@_lpips_distance_op.register_fake
def _(a, b, w, eps):
    return a.new_empty((a.shape[0],), dtype=torch.float32)


@torch.library.custom_op("pae_fast::lpips_distance_backward", mutates_args=())
def _lpips_distance_backward_op(
    g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float, need_a: bool, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(da, db)`` in the inputs' dtype and layout, each empty when not needed."""
    return _bwd(g, a, b, w, eps, need_a, need_b)


@_lpips_distance_backward_op.register_fake
def _(g, a, b, w, eps, need_a, need_b):
    return (torch.empty_like(a) if need_a else a.new_empty((0, 0, 0, 0)),
            torch.empty_like(b) if need_b else b.new_empty((0, 0, 0, 0)))  # fmt: skip


def _setup_context(ctx, inputs, output):
    a, b, w, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(a, b, w)


def _backward(ctx, g):
    a, b, w = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None, None
    da, db = _lpips_distance_backward_op(g, a, b, w, ctx.eps, need_a, need_b)
    return da if need_a else None, db if need_b else None, None, None


_lpips_distance_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"{_OP}: a and b must be (B, C, H, W) of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"{_OP}: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if w.dim() != 1 or w.shape[0] != a.shape[1]:
        raise ValueError(f"{_OP}: w must be (C,) = ({a.shape[1]},) (the lin head's weights), got {tuple(w.shape)}")
    if b.device != a.device or w.device != a.device:
        raise ValueError(f"{_OP}: a, b and w must be on one device, got {a.device}, {b.device}, {w.device}")
    if w.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_OP}: w (the frozen LPIPS lin weights) gets no gradient; pass it with "
                         "requires_grad=False (or detached)")  # fmt: skip


def lpips_distance(
    a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = LPIPS_EPS, backend: str | None = None
) -> torch.Tensor:
    """One LPIPS stage: ``mean_{h,w} sum_c w_c (a / (||a||_c + eps) - b / (||b||_c + eps))^2`` per image.

    Args:
        a, b: ``(B, C, H, W)`` features of one dtype, any strides (channels-last is the fast layout).
        w: ``(C,)`` non-negative lin weights (frozen: no gradient; any floating dtype, read in fp32).
        eps: added to each pixel's channel norm.
        backend: ``auto | triton | torch`` (None: the scope / process default). fp64 inputs run the reference.

    Returns:
        ``(B,)`` distances in fp32 (fp64 for fp64 inputs), accumulated in fp32; gradients for a and b.
    """
    _check(a, b, w)
    if a.dtype == torch.float64 or resolve_backend(backend, a) == "torch":
        return lpips_distance_ref(a, b, w, eps)
    return _lpips_distance_op(a, b, w.detach(), float(eps))


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def lpips_distance_ref(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = LPIPS_EPS) -> torch.Tensor:
    """PyTorch reference of :func:`lpips_distance`: the LPIPS forward's per-stage term, in fp32 for half inputs
    (the 1x1 head as an explicit weighted channel sum, so autocast leaves it in fp32)."""
    dt = torch.promote_types(a.dtype, torch.float32)
    a, b, w = a.to(dt), b.to(dt), w.to(dt)
    a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + eps)
    b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + eps)
    return ((a - b).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    a, b, w = args[:3]
    fwd = tensor_bytes(a, b, w) + 4 * a.shape[0]  # read a, b, w; write d (fp32)
    # backward: read g, a, b, w; write da / db where needed
    bwd = 4 * a.shape[0] + tensor_bytes(a, b, w) + tensor_bytes(*(t for t in (a, b) if t.requires_grad))
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(shape, grad=True, relu=False, channels_last=False):
        t = torch.randn(*shape, generator=g)
        t = t.relu() + 0.05 if relu else t  # ReLU features (the trunk's), kept off the all-zero pixel
        t = t.to(device=device, dtype=dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    def head(C):
        return torch.rand(C, generator=g).to(device=device) * (2.0 / C)  # non-negative, as the trained heads

    def case(B, C, H, W, label="", grad_a=True, grad_b=True, cl=True):
        shp = (B, C, H, W)
        args = (rnd(shp, grad_a, True, cl), rnd(shp, grad_b, True, cl), head(C))
        return f"{shp}{' channels-last' if cl else ''}{label}", args, {}

    if size == "model":  # the five VGG-16 stages of a 256 px image (batch 2: the widths and grids are what matter)
        return [case(2, c, s, s, " (VGG-16 stage, 256 px)") for c, s in
                ((64, 256), (128, 128), (256, 64), (512, 32), (512, 16))]  # fmt: skip
    out = [case(2, 3, 7, 11), case(2, 5, 7, 11, cl=False), case(3, 64, 7, 11), case(2, 64, 5, 3, cl=False),
           case(2, 5, 7, 11, " grad a only", grad_b=False), case(2, 64, 7, 11, " grad b only", grad_a=False)]
    x = rnd((2, 13, 11, 7), relu=True).detach()  # a permuted view: (B, C, H, W) with odd strides
    y = rnd((2, 7, 13, 11), relu=True).detach()
    out.append(("strided views (2, 7, 13, 11)", (x.permute(0, 3, 1, 2).requires_grad_(True),
                                                y.requires_grad_(True), head(7)), {}))  # fmt: skip
    return out


register_op(
    OpSpec(
        name=_OP,
        fn=lpips_distance,
        ref=lpips_distance_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="one LPIPS stage: channel unit-norm, squared difference, 1x1 head, spatial mean (fp32 out)",
    )
)
