"""residual_layernorm: a pre-norm ViT's residual add (with its LayerScale) fused with the LayerNorm that follows it
(docs/method.md § Residual + LayerNorm fused).

    y = x + gamma * (branch + bb)     (x += ls(Attn(LN1(x))) / x += ls(MLP(LN2(x))); gamma the (D,) LayerScale or 1,
                                       bb the optional (D,) bias of the branch's last linear, folded here)
    n = LayerNorm(y) * w + b          (the next sub-block's pre-norm LN2 / the next block's LN1 / the final norm)

One pass reads ``x`` and ``branch`` and writes the new residual stream ``y`` and the next sublayer's input ``n``,
plus the fp32 row statistics ``mean``, ``rstd`` (8 B per row) for backward. ``branch=None`` is the plain LayerNorm
(``y`` is ``x`` itself: the first block's LN1). Statistics in fp32, over the last dim; ``y`` is rounded to its dtype
before the statistics, as the unfused ``add`` -> ``layer_norm`` does, so the backward's ``n̂ = (y - mean) * rstd``
from the stored ``y`` is exactly the forward's. ``w``, ``b`` optional (the VFMs' final norm is affine-free).

Backward (gy = dL/dy from later uses of y, gn = dL/dn, g = gn * w, <.> = mean over D):
    dy_tot  = gy + rstd * (g - <g> - n̂ * <g n̂>)     (the residual stream's gradient)
    dx      = dy_tot,   dbranch = gamma * dy_tot
    dgamma  = sum_rows dy_tot * (branch + bb),   dbb = sum_rows gamma * dy_tot,   dw = sum_rows gn * n̂,
    db      = sum_rows gn
One kernel reads gy, gn, y (and branch when gamma trains: dgamma needs it) and writes dx (and dbranch when it
differs from dx: with gamma, or another dtype; else dx is returned for both, as autograd's ``add`` does). The
parameter gradients leave as per-program fp32 partial column sums (P, D) reduced by one small ``sum`` each
(deterministic, no atomics), as :mod:`.gated_residual_adaln` does; none when gamma, bb, w and b are all frozen (a
frozen backbone's blocks, differentiated only to their input). Folding bb (the attention ``proj`` / MLP ``fc2``
bias) here replaces the Linear backward's column sum over ``dbranch`` (a full read) by these partials.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._adaln_common import bound, tolerances
from ._dispatch import OpSpec, gemm_input_dtype, register_op, resolve_backend, tensor_bytes
from ._residual_layernorm_bwd import bwd, dbranch_separate, fwd_blocks
from ._utils import as_rows

__all__ = ["residual_layernorm", "residual_layernorm_ref"]

_OP = "residual_layernorm"

# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _residual_layernorm_fwd_kernel(
    X,  # (R, D) residual stream, row stride sx, unit column stride
    BR,  # (R, D) branch output, row stride sbr (read only when HAS_BRANCH)
    GAMMA,  # (D,) LayerScale (read only when HAS_GAMMA)
    BB,  # (D,) bias of the branch's last linear (read only when HAS_BB)
    W,  # (D,) LayerNorm weight (HAS_W)
    B,  # (D,) LayerNorm bias (HAS_B)
    Y,  # (R, D) output: new residual stream, contiguous (written only when HAS_BRANCH)
    N,  # (R, D) output: LayerNorm(y) * w + b, contiguous
    MEAN,  # (R,) fp32 output: row means of y
    RSTD,  # (R,) fp32 output: 1 / sqrt(var(y) + eps)
    R,
    D,
    sx,
    sbr,
    eps,
    HAS_BRANCH: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BB: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    y = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        br = tl.load(BR + rows[:, None] * sbr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BB:
            br = br + tl.load(BB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_GAMMA:
            br = br * tl.load(GAMMA + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = (y + br).to(Y.dtype.element_ty)  # rounded as stored: the statistics (and the backward) see this y
        tl.store(Y + rows[:, None] * D + cols[None, :], y, mask=mask)
        y = y.to(tl.float32)
    mean = tl.sum(y, axis=1) / D
    yc = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / D + eps)
    n = yc * rstd[:, None]
    if HAS_W:
        n = n * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        n = n + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(N + rows[:, None] * D + cols[None, :], n.to(N.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (rows (R, D) with unit column stride; parameters (D,))
# ----------------------------------------------------------------------------------------------------------------


def _fwd(x, branch, gamma, branch_bias, weight, bias, eps: float, y_dtype: torch.dtype, n_dtype: torch.dtype):
    xr, R, D = as_rows(x)
    y = torch.empty(x.shape if branch is not None else (0,), dtype=y_dtype, device=x.device)
    n = torch.empty(x.shape, dtype=n_dtype, device=x.device)
    mean = torch.empty((R,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R == 0 or D == 0:
        return y, n, mean, rstd
    br = as_rows(branch)[0] if branch is not None else xr
    BLOCK_R, BLOCK_C, num_warps = fwd_blocks(R, D)
    _residual_layernorm_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
        xr, br, gamma if gamma is not None else xr, branch_bias if branch_bias is not None else xr,
        weight if weight is not None else xr,
        bias if bias is not None else xr, y if branch is not None else n, n, mean, rstd,
        R, D, xr.stride(0), br.stride(0), float(eps),
        HAS_BRANCH=branch is not None, HAS_GAMMA=gamma is not None, HAS_BB=branch_bias is not None,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )  # fmt: skip
    return y, n, mean, rstd


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::residual_layernorm", mutates_args=())
def _residual_layernorm_op(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    branch_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    y_dtype: torch.dtype,
    n_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # y is an empty (0,) tensor for the plain LayerNorm (branch None): the public function returns x itself
    return _fwd(x, branch, gamma, branch_bias, weight, bias, eps, y_dtype, n_dtype)


@_residual_layernorm_op.register_fake
def _(x, branch, gamma, branch_bias, weight, bias, eps, y_dtype, n_dtype):
    R = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        x.new_empty(x.shape if branch is not None else (0,), dtype=y_dtype),
        x.new_empty(x.shape, dtype=n_dtype),
        x.new_empty((R,), dtype=torch.float32),
        x.new_empty((R,), dtype=torch.float32),
    )


@torch.library.custom_op("pae_fast::residual_layernorm_backward", mutates_args=())
def _residual_layernorm_backward_op(
    gy: torch.Tensor | None,
    gn: torch.Tensor | None,
    y: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    branch_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # branch: the forward's branch when dgamma is wanted (it reads it), else only its dtype matters (may be None).
    # param_grads False (frozen gamma / branch_bias / w / b): their gradients are empty tensors, branch is not read.
    # Returns (dx, dbranch, dgamma, dbranch_bias, dw, db)
    return bwd(gy, gn, y, branch, gamma, branch_bias, weight, bias, mean, rstd, x_dtype, param_grads)


@_residual_layernorm_backward_op.register_fake
def _(gy, gn, y, branch, gamma, branch_bias, weight, bias, mean, rstd, x_dtype, param_grads):
    separate = dbranch_separate(gamma, branch, x_dtype)
    return (
        y.new_empty(y.shape, dtype=x_dtype),
        y.new_empty(y.shape if separate else (0,), dtype=branch.dtype if branch is not None else x_dtype),
        *(y.new_empty(t.shape, dtype=t.dtype) if t is not None and param_grads else y.new_empty(0)
          for t in (gamma, branch_bias, weight, bias)),
    )  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, branch, gamma, branch_bias, weight, bias, _, _, _ = inputs
    y, _, mean, rstd = output
    ctx.has_branch, ctx.x_dtype = branch is not None, x.dtype
    # gradients of gamma / branch_bias / w / b only where one of them trains (a frozen backbone's blocks: none)
    ctx.param_grads = any(t is not None and t.requires_grad for t in (gamma, branch_bias, weight, bias))
    # the plain LayerNorm normalised x; a residual one y (x itself is not needed: dx comes from gradients only).
    # branch is kept only where dgamma needs it; otherwise an empty tensor carries its dtype
    keep = branch if gamma is not None and ctx.param_grads else None
    if keep is None and branch is not None:
        keep = branch.new_empty(0)
    ctx.save_for_backward(y if branch is not None else x, keep, gamma, branch_bias, weight, bias, mean, rstd)


def _backward(ctx, gy, gn, _gmean, _grstd):
    y, branch, gamma, branch_bias, weight, bias, mean, rstd = ctx.saved_tensors
    if gy is None and gn is None:
        return None, None, None, None, None, None, None, None, None
    dx, dbr, dgamma, dbb, dw, db = _residual_layernorm_backward_op(
        gy if ctx.has_branch else None, gn, y, branch, gamma, branch_bias, weight, bias, mean, rstd, ctx.x_dtype,
        ctx.param_grads,
    )
    if not ctx.has_branch:
        dbr = None
    elif not dbranch_separate(gamma, branch, ctx.x_dtype):
        dbr = dx  # dbranch = dx: one tensor for both edges, as autograd's add does
    if not ctx.param_grads:
        dgamma = dbb = dw = db = None
    return (dx, dbr, dgamma if gamma is not None else None, dbb if branch_bias is not None else None,
            dw if weight is not None else None, db if bias is not None else None, None, None, None)  # fmt: skip


_residual_layernorm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check(x, branch, gamma, weight, bias, branch_bias=None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{_OP}: x must be a floating-point (..., D) tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")  # fmt: skip
    D = x.shape[-1]
    if branch is not None and (not isinstance(branch, torch.Tensor) or not branch.is_floating_point()
                               or branch.shape != x.shape or branch.device != x.device):  # fmt: skip
        raise ValueError(f"{_OP}: branch must be a floating-point tensor of x's shape {tuple(x.shape)} on {x.device}, "
                         f"got {getattr(branch, 'dtype', type(branch).__name__)} "
                         f"{tuple(getattr(branch, 'shape', ()))} on {getattr(branch, 'device', None)}")  # fmt: skip
    for name, t in (("gamma", gamma), ("branch_bias", branch_bias)):
        if t is not None and branch is None:
            raise ValueError(f"{_OP}: {name} (of the branch) given without a branch")
    for name, t in (("gamma", gamma), ("branch_bias", branch_bias), ("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()
                              or tuple(t.shape) != (D,) or t.device != x.device):  # fmt: skip
            raise ValueError(f"{_OP}: {name} must be a floating-point ({D},) tensor on {x.device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))} "
                             f"on {getattr(t, 'device', None)}")  # fmt: skip


def _y_dtype(x, branch, gamma) -> torch.dtype:
    """dtype of ``y = x + gamma * branch`` under PyTorch's type promotion (what the unfused add returns)."""
    dt = x.dtype
    for t in (branch, gamma):
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def residual_layernorm(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
    branch_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x + gamma * (branch + branch_bias)`` and ``n = LayerNorm(y) * weight + bias`` in one pass (statistics
    in fp32).

    Args:
        x: ``(..., D)`` residual stream (strided views with a unit-stride last dim are read in place).
        branch: ``(..., D)`` sub-block output (attention / MLP) of ``x``'s shape, or None for the plain LayerNorm
            of ``x`` (then ``y`` is ``x`` itself).
        gamma: ``(D,)`` LayerScale of the branch, or None (scale 1).
        weight, bias: ``(D,)`` LayerNorm affine, each optional.
        eps: added to the variance.
        backend: ``auto | triton | torch`` (None: the scope / process default).
        out_dtype: dtype of ``n`` (it feeds a GEMM). None: the autocast dtype when autocast is on for x's device,
            else ``y``'s dtype.
        branch_bias: ``(D,)`` bias of the branch's last linear, or None: the caller runs that linear without its
            bias and the bias is added here (no pass of its own), its gradient ``sum_rows gamma * dy`` leaving as
            per-program partials of the backward kernel instead of a column sum over ``dbranch`` (docs/method.md
            § Residual + LayerNorm fused). It does not promote ``y``: it is part of the branch.

    Returns:
        ``(y, n)``: ``y`` in the promoted dtype of ``x``, ``branch``, ``gamma`` (``x``'s for the plain LayerNorm),
        ``n`` in ``out_dtype``. Gradients flow from both; each gradient has its input's dtype.
    """
    _check(x, branch, gamma, weight, bias, branch_bias)
    y_dtype = _y_dtype(x, branch, gamma)
    n_dtype = gemm_input_dtype(x.new_empty(0, dtype=y_dtype), out_dtype)
    if resolve_backend(backend, x) == "torch":
        return residual_layernorm_ref(x, branch, gamma, weight, bias, eps, out_dtype=n_dtype, branch_bias=branch_bias)
    y, n, _, _ = _residual_layernorm_op(x, branch, gamma, branch_bias, weight, bias, float(eps), y_dtype, n_dtype)
    return (y if branch is not None else x), n


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def residual_layernorm_ref(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
    branch_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`residual_layernorm`: exactly the unfused ``x + gamma * branch`` then
    ``F.layer_norm`` (so the CPU path computes what the unfused model did); ``branch_bias`` is added to the branch
    in the branch's dtype, as a biased linear (autocast: in its compute dtype) returns it."""
    _check(x, branch, gamma, weight, bias, branch_bias)
    if branch is None:
        y = x
    else:
        if branch_bias is not None:
            branch = branch + branch_bias.to(branch.dtype)
        y = x + (branch if gamma is None else gamma * branch)
    n = F.layer_norm(y, (y.shape[-1],), weight, bias, eps)
    return y, n.to(gemm_input_dtype(y, out_dtype))


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    a = bound(residual_layernorm, args, kwargs)
    x, branch, gamma, weight, bias, bb = (a[k] for k in ("x", "branch", "gamma", "weight", "bias", "branch_bias"))
    itemsize = _y_dtype(x, branch, gamma).itemsize
    y = x.numel() * itemsize if branch is not None else 0  # y (and its gradient); none for the plain LayerNorm
    n = x.numel() * (a["out_dtype"].itemsize if a["out_dtype"] else itemsize)  # n (and its gradient)
    # forward: read x, branch and the parameters, write y and n
    fwd = tensor_bytes(x, branch, gamma, bb, weight, bias) + y + n
    # backward: read dy, dn, y (x for the plain norm; the statistics are recomputable), branch (dgamma only) and the
    # parameters; write dx, dbranch (with gamma; else it is dx) and the parameter gradients
    bwd = y + n + x.numel() * itemsize + tensor_bytes(x)
    if gamma is not None:
        bwd += 2 * tensor_bytes(branch)
    bwd += 2 * tensor_bytes(gamma, bb, weight, bias)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0, dt=None):
        t = (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dt or dtype)
        return t.requires_grad_(True)

    def case(shape, gamma=True, affine=True, branch=True, eps=1e-6, label="", branch_bias=False):
        D = shape[-1]
        kw: dict = {"eps": eps}
        if gamma:
            kw["gamma"] = rnd(D, scale=0.5)
        if branch_bias:
            kw["branch_bias"] = rnd(D, scale=0.5, offset=0.2)
        if affine:
            kw["weight"], kw["bias"] = rnd(D, scale=0.1, offset=1.0), rnd(D, scale=0.5)
        args = (rnd(*shape, scale=2.0, offset=0.3), rnd(*shape) if branch else None)
        name = (f"{shape}{' +branch' if branch else ' plain'}{'+bias' if branch_bias else ''}"
                f"{'+gamma' if gamma else ''}{'+affine' if affine else ''} eps={eps:g}{label}")  # fmt: skip
        return name, args, kw

    if size == "model":
        return [
            case((32, 261, 1024), label=" (DINOv2-L block, LayerScale)"),
            case((32, 257, 1024), gamma=False, eps=1e-12, label=" (ViT-L decoder block)", branch_bias=True),
            case((32, 785, 384), gamma=False, label=" (DINO-S/8 discriminator block)"),
        ]
    out = [
        case((1, 257, 72)),
        case((3, 5, 97), gamma=False, affine=False, eps=1e-12),
        case((2, 3, 1024), gamma=False, eps=1e-12),
        case((1, 257, 72), branch_bias=True),
        case((3, 5, 97), gamma=False, eps=1e-12, branch_bias=True),
        case((2, 7, 40), gamma=False, branch=False, label=" (first LN1)"),
    ]
    # non-contiguous residual stream and branch: transposed views whose rows are strided
    x, y = rnd(9, 2, 40), rnd(9, 2, 40)
    out.append(("non-contiguous (2,9,40)", (x.transpose(0, 1), y.transpose(0, 1)), {"gamma": rnd(40)}))
    if dtype in (torch.float16, torch.bfloat16):  # fp32 residual stream, half branch (autocast): y in fp32
        x32 = rnd(2, 17, 72, scale=2.0, dt=torch.float32)
        out.append(("fp32 x, half branch (2,17,72)", (x32, rnd(2, 17, 72)),
                    {"gamma": rnd(72, scale=0.5), "weight": rnd(72, offset=1.0)}))  # fmt: skip
        out.append(("fp32 x, half branch, fp32 branch bias (2,17,72)", (rnd(2, 17, 72, dt=torch.float32),
                    rnd(2, 17, 72)), {"branch_bias": rnd(72, dt=torch.float32), "weight": rnd(72, offset=1.0)}))
    return out


register_op(
    OpSpec(
        name="residual_layernorm",
        fn=residual_layernorm,
        ref=residual_layernorm_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        tolerances=tolerances(),  # dgamma / dw / db are fp32 sums over all rows, as the adaLN ops' weight gradients
        # ... of terms that carry y's rounding (half y is rounded before its statistics, as the unfused add -> norm
        # rounds it): their error grows like sqrt(rows), so atol scales with their RMS
        atol_rms=True,
        description="residual y = x + gamma*(branch + bias) (LayerScale, the branch's folded bias) fused with the "
        "LayerNorm of y (pre-norm ViT blocks)",
    )
)
