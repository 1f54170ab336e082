"""adaln_modulate: the pre-norm + adaLN modulation of every LightningDiT / DiT^DH block, in one pass.

    y = norm(x) * (1 + scale) + shift          norm: RMSNorm (optional weight) or LayerNorm without affine

``x (B, N, D)``; ``shift`` / ``scale`` per sample ``(B, D)`` or per token ``(B, N, D)`` (the DDT head), each
independently; ``shift`` may be None (LightningDiT ``wo_shift``). Layout and normalisation math:
``_adaln_common``.

Backward (g = dL/dy, n = the normalised row before the weight, xh = n * w):
    dshift = g,  dscale = g * xh      (summed over tokens when per sample)
    dw = sum_rows g * (1 + scale) * n
    dn = g * (1 + scale) * w  ->  dx by the normalisation backward
The backward recomputes the row statistics from x (already read for dx), so the forward saves nothing extra; its
kernel is in ``_adaln_modulate_bwd``. Both kernels hold a row as two column tiles (``_adaln_common.col_tiles``:
1152 = 1024 + 128 lanes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _adaln_common as C
from ._adaln_common import _norm_modulate_store, _program_tiles
from ._adaln_modulate_bwd import _adaln_modulate_bwd_kernel, _load_rows
from ._dispatch import OpSpec, gemm_input_dtype, register_op, resolve_backend, tensor_bytes
from ._gated_residual_adaln_bwd import bwd_blocks

__all__ = ["adaln_modulate", "adaln_modulate_ref"]

_OP = "adaln_modulate"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _adaln_modulate_fwd_kernel(
    X,  # (B, T, D) input, strides (sxb, sxt, 1)
    SHIFT,  # (B, D) per sample | (B, T, D) per token, strides (s_shb, s_sht, 1) (read only when HAS_SHIFT)
    SCALE,  # (B, D) per sample | (B, T, D) per token, strides (s_scb, s_sct, 1)
    W,  # (D,) RMSNorm weight (read only when HAS_WEIGHT)
    Y,  # (B, T, D) output, contiguous
    T,
    D,
    sxb,
    sxt,
    s_shb,
    s_sht,
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
    BLOCK_C2: tl.constexpr,  # second column tile (0: none), so 1152 = 1024 + 128 lanes, none idle
):
    pid_t, b, cols, cols2 = _program_tiles(BLOCK_C, BLOCK_C2)
    t = pid_t * BLOCK_R + tl.arange(0, BLOCK_R)
    x, mask, cmask = _load_rows(X, b, t, cols, T, D, sxb, sxt)
    x2, mask2, cmask2 = x, mask, cmask  # aliases of the first tile when the row is one tile (never read then)
    if BLOCK_C2 > 0:
        x2, mask2, cmask2 = _load_rows(X, b, t, cols2, T, D, sxb, sxt)
    _norm_modulate_store(Y, SHIFT, SCALE, W, b, t, cols, cols2, T, D, x, x2, mask, mask2, cmask, cmask2, s_shb,
                         s_sht, s_scb, s_sct, eps, IS_RMS, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT,
                         BLOCK_C2 > 0)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Launchers (x is (B, T, D); shift / scale canonical (B, D) or (B, T, D))
# ----------------------------------------------------------------------------------------------------------------


def _fwd(x, shift, scale, weight, norm: str, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    B, T, D = x.shape
    out = torch.empty((B, T, D), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    x, scale = C.unit_cols(x), C.unit_cols(scale)
    shift = C.unit_cols(shift) if shift is not None else None
    BLOCK_R, BLOCK_C, BLOCK_C2, num_warps = C.fwd_blocks(T, D)
    (s_shb, s_sht), (s_scb, s_sct) = C.mod_strides(shift), C.mod_strides(scale)
    _adaln_modulate_fwd_kernel[(triton.cdiv(T, BLOCK_R), B)](
        x, shift if shift is not None else scale, scale, weight if weight is not None else scale, out,
        T, D, x.stride(0), x.stride(1), s_shb, s_sht, s_scb, s_sct, float(eps),
        IS_RMS=norm == "rms", HAS_SHIFT=shift is not None, SHIFT_PT=shift is not None and shift.dim() == 3,
        SCALE_PT=scale.dim() == 3, HAS_WEIGHT=weight is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        BLOCK_C2=BLOCK_C2, num_warps=num_warps,
    )  # fmt: skip
    return out


def _bwd(dy, x, scale, weight, shift_kind: int, shift_dtype: torch.dtype, norm: str, eps: float):
    B, T, D = x.shape
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    BLOCK_R, BLOCK_C, BLOCK_C2, num_warps = bwd_blocks(T, D)
    P, iters = C.bwd_programs(B, triton.cdiv(T, BLOCK_R), x.device)
    dsh = C.shift_grad_buffer(shift_kind, shift_dtype, B, T, P, D, x)
    dsc = C.mod_grad_buffer(scale, B, P, D, x)
    dw = torch.empty((B, P, D), dtype=torch.float32, device=x.device) if weight is not None else x.new_empty(1)
    if dx.numel() > 0:
        x, scale = C.unit_cols(x), C.unit_cols(scale)
        s_scb, s_sct = C.mod_strides(scale)
        _adaln_modulate_bwd_kernel[(P, B)](
            dy.contiguous(), x, scale, weight if weight is not None else scale, dx, dsh, dsc, dw,
            T, D, P, iters, x.stride(0), x.stride(1), s_scb, s_sct, float(eps),
            IS_RMS=norm == "rms", HAS_SHIFT=shift_kind > 0, SHIFT_PT=shift_kind == 2,
            SCALE_PT=scale.dim() == 3, HAS_WEIGHT=weight is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
            BLOCK_C2=BLOCK_C2, num_warps=num_warps,
        )  # fmt: skip
    else:  # nothing to reduce: zero gradients of the right shapes
        for buf in (dsh, dsc, dw):
            buf.zero_()
    dweight = dw.sum((0, 1)).to(weight.dtype) if weight is not None else x.new_empty(0)
    return dx, C.finish_shift_grad(dsh, shift_kind, shift_dtype, x), C.finish_mod_grad(dsc, scale, x), dweight


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::adaln_modulate", mutates_args=())
def _adaln_modulate_op(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    norm: str,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _fwd(x, shift, scale, weight, norm, eps, out_dtype)


@_adaln_modulate_op.register_fake
def _(x, shift, scale, weight, norm, eps, out_dtype):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


@torch.library.custom_op("pae_fast::adaln_modulate_backward", mutates_args=())
def _adaln_modulate_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    shift_kind: int,
    shift_dtype: torch.dtype,
    norm: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # dshift = dy needs no shift value: only its kind (C.shift_kind) and dtype are passed (no unused per-token read)
    return _bwd(dy, x, scale, weight, shift_kind, shift_dtype, norm, eps)


@_adaln_modulate_backward_op.register_fake
def _(dy, x, scale, weight, shift_kind, shift_dtype, norm, eps):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        C.fake_shift_grad(shift_kind, shift_dtype, x),
        C.fake_grad(scale, x),
        C.fake_grad(weight, x),
    )


def _setup_context(ctx, inputs, output):
    x, shift, scale, weight, norm, eps, _ = inputs
    ctx.norm, ctx.eps = norm, eps
    ctx.shift_kind, ctx.shift_dtype = C.shift_kind(shift), shift.dtype if shift is not None else x.dtype
    ctx.save_for_backward(x, scale, weight)


def _backward(ctx, dy):
    x, scale, weight = ctx.saved_tensors
    dx, dshift, dscale, dweight = _adaln_modulate_backward_op(dy, x, scale, weight, ctx.shift_kind, ctx.shift_dtype,
                                                              ctx.norm, ctx.eps)  # fmt: skip
    dshift = dshift if ctx.shift_kind else None
    return dx, dshift, dscale, dweight if weight is not None else None, None, None, None


_adaln_modulate_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _canon(x, shift, scale, weight, norm):
    B, T, D = C.check_x(_OP, "x", x)
    if scale is None:
        raise ValueError(f"{_OP}: scale is required (per sample ({B}, {D}) or per token {tuple(x.shape)})")
    C.check_norm(_OP, norm, weight, x, D)
    shift = C.canon_mod(_OP, "shift", shift, x, B, T, D)
    scale = C.canon_mod(_OP, "scale", scale, x, B, T, D)
    return x.reshape(B, T, D), shift, scale


def adaln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    norm: str = "rms",
    eps: float = 1e-6,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in one pass (statistics in fp32).

    Args:
        x: ``(B, N, D)`` tokens (any ``(B, *, D)``; strided views are read in place when the last dim is unit-stride).
        shift: per sample ``(B, D)`` (or ``(B, 1, D)``) or per token ``(B, N, D)``; None: no shift.
        scale: per sample ``(B, D)`` or per token ``(B, N, D)``.
        weight: ``(D,)`` RMSNorm weight (``norm="rms"`` only) or None.
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm without affine).
        eps: added to the mean square / variance.
        backend: ``auto | triton | torch`` (None: the scope / process default).
        out_dtype: dtype of the output (it feeds a GEMM). None: the autocast dtype when autocast is on for x's
            device (an fp32 residual stream under bf16 autocast gives a bf16 output, no cast op), else ``x.dtype``.

    Returns:
        ``(B, N, D)`` in ``out_dtype`` (the other inputs may have other float dtypes; each gradient has its input's;
        the incoming gradient may be in any float dtype).
    """
    x3, shift3, scale3 = _canon(x, shift, scale, weight, norm)
    od = gemm_input_dtype(x, out_dtype)
    if resolve_backend(backend, x) == "torch":
        return adaln_modulate_ref(x, shift, scale, weight, norm, eps, out_dtype=od)
    return _adaln_modulate_op(x3, shift3, scale3, weight, norm, float(eps), od).view(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def adaln_modulate_ref(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None = None,
    norm: str = "rms",
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`adaln_modulate` (fp32 statistics for half inputs; fp64 stays fp64)."""
    x3, shift3, scale3 = _canon(x, shift, scale, weight, norm)
    dt = C.compute_dtype(x, shift, scale, weight)
    out = C.norm_modulate_ref(x3.to(dt), shift3, scale3, weight, norm, eps)
    return out.to(gemm_input_dtype(x, out_dtype)).view(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    a = C.bound(adaln_modulate, args, kwargs)
    x, shift, scale, weight = a["x"], a["shift"], a["scale"], a["weight"]
    y = x.numel() * (a["out_dtype"] or x.dtype).itemsize  # the output (and its gradient) in the GEMM dtype
    fwd = tensor_bytes(x) + y + tensor_bytes(shift, scale, weight)  # read x and the modulation, write y
    # backward: read dy, x, scale, weight; write dx and the shift / scale / weight gradients
    bwd = 2 * tensor_bytes(x) + y + tensor_bytes(scale, weight) + tensor_bytes(shift, scale, weight)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        t = (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype)
        return t.requires_grad_(True)

    def case(B, N, D, norm="rms", weight=True, shift="sample", scale="sample", label=""):
        mod = {"sample": (B, D), "token": (B, N, D), None: None}
        sh = rnd(*mod[shift], scale=0.5) if shift else None
        kw = {"norm": norm}
        if weight:
            kw["weight"] = rnd(D, scale=0.1, offset=1.0)
        name = f"({B},{N},{D}) {norm}{'+w' if weight else ''} shift={shift} scale={scale}{label}"
        return name, (rnd(B, N, D, scale=2.0, offset=0.3), sh, rnd(*mod[scale], scale=0.5)), kw

    if size == "model":
        out = [
            case(32, 256, 1152, label=" (LightningDiT-XL block)"),
            case(32, 256, 2048, shift="token", scale="token", label=" (DiT^DH head block)"),
            case(32, 256, 2048, norm="layer", weight=False, shift="token", scale="token", label=" (DiT^DH final)"),
        ]
    else:
        out = [
            case(2, 257, 72),
            case(2, 5, 33, norm="layer", weight=False, shift="token", scale="token"),
            case(1, 9, 1152, weight=False, shift=None),
            case(2, 7, 48, shift="token", scale="sample"),
        ]
    # non-contiguous input: a transposed view whose rows are strided
    x = rnd(33, 2, 40)
    out.append(("non-contiguous (2,33,40)", (x.transpose(0, 1), rnd(2, 40), rnd(2, 40)), {}))
    if dtype in (torch.float16, torch.bfloat16):  # under autocast: fp32 residual stream in, GEMM-dtype output
        x32 = (torch.randn(2, 17, 72, generator=g) * 2.0).to(device).requires_grad_(True)
        kw = {"weight": rnd(72, scale=0.1, offset=1.0), "out_dtype": dtype}
        out.append(("fp32 x -> half out (2,17,72)", (x32, rnd(2, 72, scale=0.5), rnd(2, 72, scale=0.5)), kw))
    return out


register_op(
    OpSpec(
        name="adaln_modulate",
        fn=adaln_modulate,
        ref=adaln_modulate_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        tolerances=C.tolerances(),
        description="RMSNorm/LayerNorm + adaLN modulate x*(1+scale)+shift (per-sample or per-token)",
    )
)
