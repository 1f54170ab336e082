"""gated_residual_adaln: the gated residual add of one sub-block fused with the next sub-block's pre-norm + adaLN.

    r = x + gate * y                                  (x += g_msa * Attn(...)  /  x += g_mlp * MLP(...))
    h = norm(r) * (1 + scale) + shift                 (modulate(norm2(x)) of the next sub-block)

One pass reads x, y and the modulation and writes both the new residual stream ``r`` and the next input ``h``.
``x, y (B, N, D)``; ``gate``, ``shift``, ``scale`` per sample ``(B, D)`` or per token ``(B, N, D)``, each
independently; ``shift`` may be None. Layout and normalisation math: ``_adaln_common``.

Backward (gr = dL/dr, gh = dL/dh; the norm part is ``adaln_modulate``'s backward with x := r):
    dr = gr + norm_backward(gh * (1 + scale) * w)
    dx = dr,   dy = dr * gate,   dgate = dr * y       (summed over tokens when per sample)
    dshift = gh,   dscale = gh * norm(r),   dw = sum_rows gh * (1 + scale) * n
The backward recomputes r = x + gate * y in fp32 from x, y and gate (y and gate are read anyway for dgate and dy),
so it sees exactly the forward's unrounded r and the forward saves nothing extra.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _adaln_common as C
from ._adaln_common import _load_mod, _row_norm
from ._dispatch import OpSpec, gemm_input_dtype, register_op, resolve_backend, tensor_bytes
from ._gated_residual_adaln_bwd import _gated_residual_adaln_bwd_kernel, bwd_blocks

__all__ = ["gated_residual_adaln", "gated_residual_adaln_ref"]

_OP = "gated_residual_adaln"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gated_residual_adaln_fwd_kernel(
    X,  # (B, T, D) residual stream, strides (sxb, sxt, 1)
    YIN,  # (B, T, D) sub-block output, strides (syb, syt, 1)
    GATE,  # (B, D) per sample | (B, T, D) per token, strides (s_gb, s_gt, 1)
    SHIFT,  # (B, D) | (B, T, D), strides (s_shb, s_sht, 1) (read only when HAS_SHIFT)
    SCALE,  # (B, D) | (B, T, D), strides (s_scb, s_sct, 1)
    W,  # (D,) RMSNorm weight (read only when HAS_WEIGHT)
    R,  # (B, T, D) output: new residual stream, contiguous
    H,  # (B, T, D) output: modulated norm of R, contiguous
    T,
    D,
    sxb,
    sxt,
    syb,
    syt,
    s_gb,
    s_gt,
    s_shb,
    s_sht,
    s_scb,
    s_sct,
    eps,
    IS_RMS: tl.constexpr,
    GATE_PT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SHIFT_PT: tl.constexpr,
    SCALE_PT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < D
    mask = (t < T)[:, None] & cmask[None, :]
    x = tl.load(X + b * sxb + t[:, None] * sxt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(YIN + b * syb + t[:, None] * syt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = x + _load_mod(GATE, b, t, cols, s_gb, s_gt, mask, cmask, GATE_PT) * y
    out_off = (b * T + t[:, None]) * D + cols[None, :]
    tl.store(R + out_off, r.to(R.dtype.element_ty), mask=mask)
    n, rstd = _row_norm(r, mask, D, eps, IS_RMS)
    if HAS_WEIGHT:
        n = n * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    h = n * (1.0 + _load_mod(SCALE, b, t, cols, s_scb, s_sct, mask, cmask, SCALE_PT))
    if HAS_SHIFT:
        h = h + _load_mod(SHIFT, b, t, cols, s_shb, s_sht, mask, cmask, SHIFT_PT)
    tl.store(H + out_off, h.to(H.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (x, y are (B, T, D); gate / shift / scale canonical (B, D) or (B, T, D))
# ----------------------------------------------------------------------------------------------------------------


def _flags(norm, gate, shift, scale, weight) -> dict:
    return dict(
        IS_RMS=norm == "rms", GATE_PT=gate.dim() == 3, HAS_SHIFT=shift is not None,
        SHIFT_PT=shift is not None and shift.dim() == 3, SCALE_PT=scale.dim() == 3, HAS_WEIGHT=weight is not None,
    )  # fmt: skip


def _fwd(x, y, gate, shift, scale, weight, norm: str, eps: float, h_dtype: torch.dtype):
    B, T, D = x.shape
    r = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    h = torch.empty((B, T, D), dtype=h_dtype, device=x.device)
    if r.numel() == 0:
        return r, h
    x, y, gate, scale = C.unit_cols(x), C.unit_cols(y), C.unit_cols(gate), C.unit_cols(scale)
    shift = C.unit_cols(shift) if shift is not None else None
    BLOCK_R, BLOCK_C, num_warps = C.blocks(T, D)
    (s_gb, s_gt), (s_shb, s_sht), (s_scb, s_sct) = C.mod_strides(gate), C.mod_strides(shift), C.mod_strides(scale)
    _gated_residual_adaln_fwd_kernel[(triton.cdiv(T, BLOCK_R), B)](
        x, y, gate, shift if shift is not None else scale, scale, weight if weight is not None else scale, r, h,
        T, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), s_gb, s_gt, s_shb, s_sht, s_scb, s_sct, float(eps),
        **_flags(norm, gate, shift, scale, weight), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )  # fmt: skip
    return r, h


def _bwd(dr, dh, x, y, gate, shift, scale, weight, norm: str, eps: float):
    B, T, D = x.shape
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    dy = torch.empty((B, T, D), dtype=y.dtype, device=y.device)
    BLOCK_R, BLOCK_C, BLOCK_C2, num_warps = bwd_blocks(T, D)
    P, iters = C.bwd_programs(B, triton.cdiv(T, BLOCK_R), x.device)
    dg = C.mod_grad_buffer(gate, B, P, D, x)
    dsh = C.mod_grad_buffer(shift, B, P, D, x)
    dsc = C.mod_grad_buffer(scale, B, P, D, x)
    dw = torch.empty((B, P, D), dtype=torch.float32, device=x.device) if weight is not None else x.new_empty(1)
    if dx.numel() > 0:
        x, y, gate, scale = C.unit_cols(x), C.unit_cols(y), C.unit_cols(gate), C.unit_cols(scale)
        (s_gb, s_gt), (s_scb, s_sct) = C.mod_strides(gate), C.mod_strides(scale)
        dh = dh.contiguous()
        _gated_residual_adaln_bwd_kernel[(P, B)](
            dr.contiguous() if dr is not None else dh, dh, x, y, gate, scale, weight if weight is not None else scale,
            dx, dy, dg, dsh, dsc, dw,
            T, D, P, iters, x.stride(0), x.stride(1), y.stride(0), y.stride(1), s_gb, s_gt, s_scb, s_sct, float(eps),
            HAS_DR=dr is not None, **_flags(norm, gate, shift, scale, weight),
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_C2=BLOCK_C2, num_warps=num_warps,
        )  # fmt: skip
    else:  # nothing to reduce: zero gradients of the right shapes
        for buf in (dg, dsh, dsc, dw):
            buf.zero_()
    dweight = dw.sum((0, 1)).to(weight.dtype) if weight is not None else x.new_empty(0)
    return (
        dx,
        dy,
        C.finish_mod_grad(dg, gate, x),
        C.finish_mod_grad(dsh, shift, x),
        C.finish_mod_grad(dsc, scale, x),
        dweight,
    )


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    norm: str,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(x, y, gate, shift, scale, weight, norm, eps, out_dtype)


@_gated_residual_adaln_op.register_fake
def _(x, y, gate, shift, scale, weight, norm, eps, out_dtype):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(x.shape, dtype=out_dtype, device=x.device),
    )


@torch.library.custom_op("pae_fast::gated_residual_adaln_backward", mutates_args=())
def _gated_residual_adaln_backward_op(
    dr: torch.Tensor | None,
    dh: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    norm: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # shift is passed for its shape and dtype only (its gradient does not depend on its value)
    return _bwd(dr, dh, x, y, gate, shift, scale, weight, norm, eps)


@_gated_residual_adaln_backward_op.register_fake
def _(dr, dh, x, y, gate, shift, scale, weight, norm, eps):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(y.shape, dtype=y.dtype, device=y.device),
        C.fake_grad(gate, x),
        C.fake_grad(shift, x),
        C.fake_grad(scale, x),
        C.fake_grad(weight, x),
    )


def _setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, weight, norm, eps, _ = inputs
    ctx.norm, ctx.eps = norm, eps
    ctx.save_for_backward(x, y, gate, shift, scale, weight)


def _backward(ctx, dr, dh):
    x, y, gate, shift, scale, weight = ctx.saved_tensors
    if dh is None:  # only r is used downstream: the norm branch contributes nothing
        dh = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dx, dy, dgate, dshift, dscale, dweight = _gated_residual_adaln_backward_op(
        dr, dh, x, y, gate, shift, scale, weight, ctx.norm, ctx.eps
    )
    dshift = dshift if shift is not None else None
    dweight = dweight if weight is not None else None
    return dx, dy, dgate, dshift, dscale, dweight, None, None, None


_gated_residual_adaln_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _canon(x, y, gate, shift, scale, weight, norm):
    B, T, D = C.check_x(_OP, "x", x)
    C.check_x(_OP, "y", y)
    if y.shape != x.shape:
        raise ValueError(f"{_OP}: y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{_OP}: y is on {y.device} but x is on {x.device}")
    for name, m in (("gate", gate), ("scale", scale)):
        if m is None:
            raise ValueError(f"{_OP}: {name} is required (per sample ({B}, {D}) or per token {tuple(x.shape)})")
    C.check_norm(_OP, norm, weight, x, D)
    gate = C.canon_mod(_OP, "gate", gate, x, B, T, D)
    shift = C.canon_mod(_OP, "shift", shift, x, B, T, D)
    scale = C.canon_mod(_OP, "scale", scale, x, B, T, D)
    return x.reshape(B, T, D), y.reshape(B, T, D), gate, shift, scale


def gated_residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    norm: str = "rms",
    eps: float = 1e-6,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + gate * y`` and ``h = norm(r) * (1 + scale) + shift`` in one pass (statistics in fp32).

    Args:
        x: ``(B, N, D)`` residual stream (any ``(B, *, D)``; strided views with a unit-stride last dim are read
            in place).
        y: ``(B, N, D)`` sub-block output (attention or MLP), same shape as ``x``.
        gate: per sample ``(B, D)`` (or ``(B, 1, D)``) or per token ``(B, N, D)``.
        shift: per sample or per token, or None (no shift).
        scale: per sample or per token.
        weight: ``(D,)`` RMSNorm weight (``norm="rms"`` only) or None.
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm without affine).
        eps: added to the mean square / variance.
        backend: ``auto | triton | torch`` (None: the scope / process default).
        out_dtype: dtype of ``h`` (it feeds a GEMM). None: the autocast dtype when autocast is on for x's device
            (the residual stream stays in ``x.dtype``, e.g. fp32, while ``h`` leaves in bf16), else ``x.dtype``.

    Returns:
        ``(r, h)``, both ``(B, N, D)``: ``r`` in ``x.dtype``, ``h`` in ``out_dtype``; ``h`` is computed from the fp32
        ``r`` before rounding. Gradients flow from both (in any float dtype); each gradient has its input's dtype.
    """
    x3, y3, gate3, shift3, scale3 = _canon(x, y, gate, shift, scale, weight, norm)
    od = gemm_input_dtype(x, out_dtype)
    if resolve_backend(backend, x) == "torch":
        return gated_residual_adaln_ref(x, y, gate, shift, scale, weight, norm, eps, out_dtype=od)
    r, h = _gated_residual_adaln_op(x3, y3, gate3, shift3, scale3, weight, norm, float(eps), od)
    return r.view(x.shape), h.view(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def gated_residual_adaln_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    norm: str = "rms",
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`gated_residual_adaln` (fp32 math for half inputs; fp64 stays fp64)."""
    x3, y3, gate3, shift3, scale3 = _canon(x, y, gate, shift, scale, weight, norm)
    dt = C.compute_dtype(x, y, gate, shift, scale, weight)
    r = x3.to(dt) + C.mod_ref(gate3, dt) * y3.to(dt)
    h = C.norm_modulate_ref(r, shift3, scale3, weight, norm, eps)
    return r.to(x.dtype).view(x.shape), h.to(gemm_input_dtype(x, out_dtype)).view(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    a = C.bound(gated_residual_adaln, args, kwargs)
    x, y, gate, shift, scale, weight = (a[k] for k in ("x", "y", "gate", "shift", "scale", "weight"))
    h = x.numel() * (a["out_dtype"] or x.dtype).itemsize  # h (and dh) in the GEMM dtype
    # forward: read x, y and the modulation, write r and h
    fwd = tensor_bytes(x) + h + tensor_bytes(y, gate, shift, scale, weight)
    # backward: read dr, dh, x, y, gate, scale, weight; write dx, dy and the gate / shift / scale / weight gradients
    bwd = 2 * tensor_bytes(x) + h + 2 * tensor_bytes(y) + tensor_bytes(gate, scale, weight)
    bwd += tensor_bytes(gate, shift, scale, weight)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        t = (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype)
        return t.requires_grad_(True)

    def case(B, N, D, norm="rms", weight=True, gate="sample", shift="sample", scale="sample", label=""):
        mod = {"sample": (B, D), "token": (B, N, D)}
        kw = {"norm": norm}
        if weight:
            kw["weight"] = rnd(D, scale=0.1, offset=1.0)
        args = (
            rnd(B, N, D, scale=2.0, offset=0.3), rnd(B, N, D), rnd(*mod[gate], scale=0.5),
            rnd(*mod[shift], scale=0.5) if shift else None, rnd(*mod[scale], scale=0.5),
        )  # fmt: skip
        name = f"({B},{N},{D}) {norm}{'+w' if weight else ''} gate={gate} shift={shift} scale={scale}{label}"
        return name, args, kw

    if size == "model":
        return [
            case(32, 256, 1152, label=" (LightningDiT-XL block)"),
            case(32, 256, 2048, gate="token", shift="token", scale="token", label=" (DiT^DH head block)"),
        ]
    out = [
        case(2, 257, 72),
        case(2, 5, 33, norm="layer", weight=False, gate="token", shift=None, scale="token"),
        case(1, 9, 1152, weight=False, gate="token", shift="sample", scale="token"),
    ]
    # non-contiguous residual stream and sub-block output: transposed views whose rows are strided
    x, y = rnd(33, 2, 40), rnd(33, 2, 40)
    out.append(("non-contiguous (2,33,40)", (x.transpose(0, 1), y.transpose(0, 1), rnd(2, 40), rnd(2, 40), rnd(2, 40)),
                {}))  # fmt: skip
    if dtype in (torch.float16, torch.bfloat16):  # under autocast: fp32 residual, half branch output and h
        x32 = (torch.randn(2, 17, 72, generator=g) * 2.0).to(device).requires_grad_(True)
        args = (x32, rnd(2, 17, 72), rnd(2, 72, scale=0.5), rnd(2, 72, scale=0.5), rnd(2, 72, scale=0.5))
        out.append(("fp32 x -> half h (2,17,72)", args, {"weight": rnd(72, scale=0.1, offset=1.0), "out_dtype": dtype}))
    return out


register_op(
    OpSpec(
        name="gated_residual_adaln",
        fn=gated_residual_adaln,
        ref=gated_residual_adaln_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        tolerances=C.tolerances(),
        description="gated residual r = x + gate*y fused with the next norm + adaLN modulate of r",
    )
)
