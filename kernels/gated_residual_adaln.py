"""gated_residual_adaln: the gated residual add of one sub-block fused with the next sub-block's pre-norm + adaLN.

    r = x + gate * (y + bias)                         (x += g_msa * Attn(...)  /  x += g_mlp * MLP(...))
    h = norm(r) * (1 + scale) + shift                 (modulate(norm2(x)) of the next sub-block)

One pass reads x, y and the modulation and writes both the new residual stream ``r`` and the next input ``h``.
``bias`` (optional, ``(D,)``) is the bias of the sub-block's last linear (attention ``proj``, MLP ``w3``/``fc2``),
folded here so the linear runs without it (docs/method.md § Gated-residual bias fold).
``x, y (B, N, D)``; ``gate``, ``shift``, ``scale`` per sample ``(B, D)`` or per token ``(B, N, D)``, each
independently; ``shift`` may be None. Layout and normalisation math: ``_adaln_common``.

Backward (gr = dL/dr, gh = dL/dh; the norm part is ``adaln_modulate``'s backward with x := r):
    dr = gr + norm_backward(gh * (1 + scale) * w)
    dx = dr,   dy = dr * gate,   dgate = dr * (y + bias)       (summed over tokens when per sample)
    dbias = sum_rows dr * gate  (= the column sums of dy, taken from the fp32 dy before it is rounded)
    dshift = gh,   dscale = gh * norm(r),   dw = sum_rows gh * (1 + scale) * n
The backward recomputes r = x + gate * (y + bias) in fp32 from x, y and gate (y and gate are read anyway for dgate
and dy), so it sees exactly the forward's unrounded r and the forward saves nothing extra. Traffic: the forward reads
x, y and writes r, h; the backward reads dr, dh, x, y and writes dx, dy: 10 row-tensors per call, the floor of this
op boundary (``_min_bytes``). The weight / bias / per-sample modulation gradients leave as per-program fp32 partial
column sums (B, P, D) and one small ``sum`` each (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _adaln_common as C
from ._adaln_common import _norm_modulate_store, _program_tiles
from ._dispatch import OpSpec, gemm_input_dtype, register_op, resolve_backend, tensor_bytes
from ._gated_residual_adaln_bwd import _gated_residual_adaln_bwd_kernel, _residual_tile, bwd_blocks

__all__ = ["gated_residual_adaln", "gated_residual_adaln_ref"]

_OP = "gated_residual_adaln"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gated_residual_adaln_fwd_kernel(
    X,  # (B, T, D) residual stream, strides (sxb, sxt, 1)
    YIN,  # (B, T, D) sub-block output (without its bias), strides (syb, syt, 1)
    GATE,  # (B, D) per sample | (B, T, D) per token, strides (s_gb, s_gt, 1)
    SHIFT,  # (B, D) | (B, T, D), strides (s_shb, s_sht, 1) (read only when HAS_SHIFT)
    SCALE,  # (B, D) | (B, T, D), strides (s_scb, s_sct, 1)
    W,  # (D,) RMSNorm weight (read only when HAS_WEIGHT)
    BIAS,  # (D,) bias of the sub-block's last linear (read only when HAS_BIAS)
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
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # first column tile (``col_tiles``: the largest power of two <= D)
    BLOCK_C2: tl.constexpr,  # second column tile (0: none), so 1152 = 1024 + 128 lanes, none idle
):
    pid_t, b, cols, cols2 = _program_tiles(BLOCK_C, BLOCK_C2)
    t = pid_t * BLOCK_R + tl.arange(0, BLOCK_R)
    r, _, _, mask, cmask = _residual_tile(X, YIN, GATE, BIAS, b, t, cols, T, D, sxb, sxt, syb, syt, s_gb, s_gt,
                                          GATE_PT, HAS_BIAS)  # fmt: skip
    tl.store(R + (b * T + t[:, None]) * D + cols[None, :], r.to(R.dtype.element_ty), mask=mask)
    r2, mask2, cmask2 = r, mask, cmask  # aliases of the first tile when the row is one tile (never read then)
    if BLOCK_C2 > 0:
        r2, _, _, mask2, cmask2 = _residual_tile(X, YIN, GATE, BIAS, b, t, cols2, T, D, sxb, sxt, syb, syt, s_gb,
                                                 s_gt, GATE_PT, HAS_BIAS)  # fmt: skip
        tl.store(R + (b * T + t[:, None]) * D + cols2[None, :], r2.to(R.dtype.element_ty), mask=mask2)
    # row statistics of the fp32 r over both tiles (h is computed from the unrounded r)
    _norm_modulate_store(H, SHIFT, SCALE, W, b, t, cols, cols2, T, D, r, r2, mask, mask2, cmask, cmask2, s_shb,
                         s_sht, s_scb, s_sct, eps, IS_RMS, HAS_SHIFT, SHIFT_PT, SCALE_PT, HAS_WEIGHT,
                         BLOCK_C2 > 0)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Launchers (x, y are (B, T, D); gate / shift / scale canonical (B, D) or (B, T, D))
# ----------------------------------------------------------------------------------------------------------------


def _flags(norm, gate, shift_kind: int, scale, weight, bias) -> dict:
    return dict(
        IS_RMS=norm == "rms", GATE_PT=gate.dim() == 3, HAS_SHIFT=shift_kind > 0, SHIFT_PT=shift_kind == 2,
        SCALE_PT=scale.dim() == 3, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
    )  # fmt: skip


def _fwd(x, y, gate, shift, scale, weight, bias, norm: str, eps: float, h_dtype: torch.dtype):
    B, T, D = x.shape
    r = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    h = torch.empty((B, T, D), dtype=h_dtype, device=x.device)
    if r.numel() == 0:
        return r, h
    x, y, gate, scale = C.unit_cols(x), C.unit_cols(y), C.unit_cols(gate), C.unit_cols(scale)
    shift = C.unit_cols(shift) if shift is not None else None
    BLOCK_R, BLOCK_C, BLOCK_C2, num_warps = C.fwd_blocks(T, D)
    (s_gb, s_gt), (s_shb, s_sht), (s_scb, s_sct) = C.mod_strides(gate), C.mod_strides(shift), C.mod_strides(scale)
    _gated_residual_adaln_fwd_kernel[(triton.cdiv(T, BLOCK_R), B)](
        x, y, gate, shift if shift is not None else scale, scale, weight if weight is not None else scale,
        bias if bias is not None else scale, r, h,
        T, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), s_gb, s_gt, s_shb, s_sht, s_scb, s_sct, float(eps),
        **_flags(norm, gate, C.shift_kind(shift), scale, weight, bias), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        BLOCK_C2=BLOCK_C2, num_warps=num_warps,
    )  # fmt: skip
    return r, h


def _bwd(dr, dh, x, y, gate, scale, weight, bias, shift_kind: int, shift_dtype: torch.dtype, norm: str, eps: float):
    B, T, D = x.shape
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    dy = torch.empty((B, T, D), dtype=y.dtype, device=y.device)
    BLOCK_R, BLOCK_C, BLOCK_C2, num_warps = bwd_blocks(T, D)
    P, iters = C.bwd_programs(B, triton.cdiv(T, BLOCK_R), x.device)
    dg = C.mod_grad_buffer(gate, B, P, D, x)
    dsh = C.shift_grad_buffer(shift_kind, shift_dtype, B, T, P, D, x)
    dsc = C.mod_grad_buffer(scale, B, P, D, x)
    # per-program fp32 partial column sums of the weight / bias gradients (reduced below: no atomics)
    dw, db = (x.new_empty((B, P, D) if t is not None else 1, dtype=torch.float32) for t in (weight, bias))
    if dx.numel() > 0:
        x, y, gate, scale = C.unit_cols(x), C.unit_cols(y), C.unit_cols(gate), C.unit_cols(scale)
        (s_gb, s_gt), (s_scb, s_sct) = C.mod_strides(gate), C.mod_strides(scale)
        dh = dh.contiguous()
        _gated_residual_adaln_bwd_kernel[(P, B)](
            dr.contiguous() if dr is not None else dh, dh, x, y, gate, scale, weight if weight is not None else scale,
            bias if bias is not None else scale, dx, dy, dg, dsh, dsc, dw, db,
            T, D, P, iters, x.stride(0), x.stride(1), y.stride(0), y.stride(1), s_gb, s_gt, s_scb, s_sct, float(eps),
            HAS_DR=dr is not None, **_flags(norm, gate, shift_kind, scale, weight, bias),
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_C2=BLOCK_C2, num_warps=num_warps,
        )  # fmt: skip
    else:  # nothing to reduce: zero gradients of the right shapes
        for buf in (dg, dsh, dsc, dw, db):
            buf.zero_()
    return (
        dx,
        dy,
        C.finish_mod_grad(dg, gate, x),
        C.finish_shift_grad(dsh, shift_kind, shift_dtype, x),
        C.finish_mod_grad(dsc, scale, x),
        dw.sum((0, 1)).to(weight.dtype) if weight is not None else x.new_empty(0),
        db.sum((0, 1)).to(bias.dtype) if bias is not None else x.new_empty(0),
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
    bias: torch.Tensor | None,
    norm: str,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(x, y, gate, shift, scale, weight, bias, norm, eps, out_dtype)


@_gated_residual_adaln_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, norm, eps, out_dtype):
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
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift_kind: int,
    shift_dtype: torch.dtype,
    norm: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # dshift = dh needs no shift value: only its kind (C.shift_kind) and dtype are passed (no unused per-token read)
    return _bwd(dr, dh, x, y, gate, scale, weight, bias, shift_kind, shift_dtype, norm, eps)


@_gated_residual_adaln_backward_op.register_fake
def _(dr, dh, x, y, gate, scale, weight, bias, shift_kind, shift_dtype, norm, eps):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(y.shape, dtype=y.dtype, device=y.device),
        C.fake_grad(gate, x),
        C.fake_shift_grad(shift_kind, shift_dtype, x),
        C.fake_grad(scale, x),
        C.fake_grad(weight, x),
        C.fake_grad(bias, x),
    )


def _setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, norm, eps, _ = inputs
    ctx.norm, ctx.eps = norm, eps
    ctx.shift_kind, ctx.shift_dtype = C.shift_kind(shift), shift.dtype if shift is not None else x.dtype
    ctx.save_for_backward(x, y, gate, scale, weight, bias)


def _backward(ctx, dr, dh):
    x, y, gate, scale, weight, bias = ctx.saved_tensors
    if dh is None:  # only r is used downstream: the norm branch contributes nothing
        dh = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dx, dy, dgate, dshift, dscale, dweight, dbias = _gated_residual_adaln_backward_op(
        dr, dh, x, y, gate, scale, weight, bias, ctx.shift_kind, ctx.shift_dtype, ctx.norm, ctx.eps
    )
    dshift = dshift if ctx.shift_kind else None
    dweight = dweight if weight is not None else None
    dbias = dbias if bias is not None else None
    return dx, dy, dgate, dshift, dscale, dweight, dbias, None, None, None


_gated_residual_adaln_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _canon(x, y, gate, shift, scale, weight, norm, bias=None):
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
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (D,) or bias.device != x.device):  # fmt: skip
        raise ValueError(f"{_OP}: bias must be a floating-point ({D},) tensor on {x.device} (the bias of the linear "
                         f"that produced y), got {getattr(bias, 'dtype', type(bias).__name__)} "
                         f"{tuple(getattr(bias, 'shape', ()))} on {getattr(bias, 'device', None)}")  # fmt: skip
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
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + gate * (y + bias)`` and ``h = norm(r) * (1 + scale) + shift`` in one pass (statistics in fp32).

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
        bias: ``(D,)`` bias of the linear that produced ``y`` (folded here: the linear runs without it and its
            gradient comes from this op's backward, not from a separate sum over the ``(B*N, D)`` gradient), or None.

    Returns:
        ``(r, h)``, both ``(B, N, D)``: ``r`` in ``x.dtype``, ``h`` in ``out_dtype``; ``h`` is computed from the fp32
        ``r`` before rounding. Gradients flow from both (in any float dtype); each gradient has its input's dtype.
    """
    x3, y3, gate3, shift3, scale3 = _canon(x, y, gate, shift, scale, weight, norm, bias)
    od = gemm_input_dtype(x, out_dtype)
    if resolve_backend(backend, x) == "torch":
        return gated_residual_adaln_ref(x, y, gate, shift, scale, weight, norm, eps, out_dtype=od, bias=bias)
    r, h = _gated_residual_adaln_op(x3, y3, gate3, shift3, scale3, weight, bias, norm, float(eps), od)
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
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`gated_residual_adaln` (fp32 math for half inputs; fp64 stays fp64)."""
    x3, y3, gate3, shift3, scale3 = _canon(x, y, gate, shift, scale, weight, norm, bias)
    dt = C.compute_dtype(x, y, gate, shift, scale, weight, bias)
    y3 = y3.to(dt) if bias is None else y3.to(dt) + bias.to(dt)
    r = x3.to(dt) + C.mod_ref(gate3, dt) * y3
    h = C.norm_modulate_ref(r, shift3, scale3, weight, norm, eps)
    return r.to(x.dtype).view(x.shape), h.to(gemm_input_dtype(x, out_dtype)).view(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    a = C.bound(gated_residual_adaln, args, kwargs)
    x, y, gate, shift, scale, weight, bias = (a[k] for k in ("x", "y", "gate", "shift", "scale", "weight", "bias"))
    h = x.numel() * (a["out_dtype"] or x.dtype).itemsize  # h (and dh) in the GEMM dtype
    # forward: read x, y, the modulation and bias, write r (x's size and dtype) and h
    fwd = 2 * tensor_bytes(x) + h + tensor_bytes(y, gate, shift, scale, weight, bias)
    # backward: read dr (x's size), dh, x (the norm needs r = x + gate * (y + bias): x and y are both read, y also for
    # dgate), y, gate, scale, weight, bias; write dx, dy and the gate / shift / scale / weight / bias gradients
    bwd = 3 * tensor_bytes(x) + h + 2 * tensor_bytes(y) + tensor_bytes(gate, scale, weight, bias)
    bwd += tensor_bytes(gate, shift, scale, weight, bias)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        t = (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype)
        return t.requires_grad_(True)

    def case(B, N, D, norm="rms", weight=True, gate="sample", shift="sample", scale="sample", bias=True, label=""):
        mod = {"sample": (B, D), "token": (B, N, D)}
        kw = {"norm": norm}
        if weight:
            kw["weight"] = rnd(D, scale=0.1, offset=1.0)
        if bias:  # the folded bias of the branch's last linear (as the generator blocks call it)
            kw["bias"] = rnd(D, scale=0.5)
        args = (
            rnd(B, N, D, scale=2.0, offset=0.3), rnd(B, N, D), rnd(*mod[gate], scale=0.5),
            rnd(*mod[shift], scale=0.5) if shift else None, rnd(*mod[scale], scale=0.5),
        )  # fmt: skip
        name = (f"({B},{N},{D}) {norm}{'+w' if weight else ''}{'+b' if bias else ''} gate={gate} shift={shift} "
                f"scale={scale}{label}")  # fmt: skip
        return name, args, kw

    if size == "model":
        return [
            case(32, 256, 1152, label=" (LightningDiT-XL block)"),
            case(32, 256, 2048, gate="token", shift="token", scale="token", label=" (DiT^DH head block)"),
        ]
    out = [
        case(2, 257, 72),
        case(2, 5, 33, norm="layer", weight=False, gate="token", shift=None, scale="token", bias=False),
        case(1, 9, 1152, weight=False, gate="token", shift="sample", scale="token"),
    ]
    # non-contiguous residual stream and sub-block output: transposed views whose rows are strided
    x, y = rnd(33, 2, 40), rnd(33, 2, 40)
    out.append(("non-contiguous (2,33,40)", (x.transpose(0, 1), y.transpose(0, 1), rnd(2, 40), rnd(2, 40), rnd(2, 40)),
                {"bias": rnd(40)}))  # fmt: skip
    if dtype in (torch.float16, torch.bfloat16):  # under autocast: fp32 residual, half branch output and h
        x32 = (torch.randn(2, 17, 72, generator=g) * 2.0).to(device).requires_grad_(True)
        args = (x32, rnd(2, 17, 72), rnd(2, 72, scale=0.5), rnd(2, 72, scale=0.5), rnd(2, 72, scale=0.5))
        b32 = torch.randn(72, generator=g).to(device).requires_grad_(True)  # an fp32 master bias under autocast
        out.append(("fp32 x, bias -> half h (2,17,72)", args,
                    {"weight": rnd(72, scale=0.1, offset=1.0), "out_dtype": dtype, "bias": b32}))  # fmt: skip
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
