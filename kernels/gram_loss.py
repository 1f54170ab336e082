"""gram_loss: the SSR loss, mean squared difference of two token x token Gram matrices, tiled (never N x N in memory).

    G_z = Z^ Z^T,  G_T = T^ T^T         (x^_i = x_i / max(||x_i||, eps): cosine Gram; normalize=False: x^ = x)
    L   = sum_b sum_ij (G_z - G_T)_ij^2 / den        z (B, N, C1), target (B, N, C2): channel dims may differ
    den = B N^2 (reduction "mean": mean over every entry), B N ("row_mean": per sample, the mean over the N rows of
          each row's sum), B ("sum": per sample ||G_z - G_T||_F^2, mean over the batch) -- docs/method.md § SSR

Forward: one program per (sample, tile (i, j) with j >= i) computes both Gram tiles with ``tl.dot`` over the
channel dim (row norms accumulated in the same loop: the normalisation is a scale ``r_i r_j`` of the raw dot), and
writes ``w * sum(D^2)`` (w = 2 off the diagonal: D is symmetric) to a (B, tiles) buffer that is summed once.

Backward (D = G_z - G_T, c = 4 dL / den; the factor 4 = 2 from the square times 2 from the symmetry):
    dz^_i = c sum_j D_ij z^_j          dT^_i = -c sum_j D_ij T^_j
    dx_i  = r_i (dx^_i - x^_i (x^_i . dx^_i))   (normalize; r_i = 1/||x_i||, plain dx^_i / eps below eps)
One program per (sample, row block i, channel block of the differentiated input) loops over the column blocks j,
recomputes the D tile and accumulates ``D @ x^_j``; with one channel block the normalisation backward runs in the
same program, otherwise a row-wise epilogue kernel does it. The target's gradient is computed only when it
requires grad.
The Gram-tile helpers both kernels share live in :mod:`._gram_loss_common`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes
from ._gram_loss_common import _diff_tile
from ._utils import row_warps

__all__ = ["gram_loss", "gram_loss_ref"]

_EPS = 1e-12  # as torch.nn.functional.normalize


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gram_loss_fwd_kernel(
    Z,  # (B, N, C1) latent tokens, strides (szb, szn, szc)
    T,  # (B, N, C2) target tokens, strides (stb, stn, stc)
    PART,  # (B, NT * NT) fp32 zero-initialised: weighted sum of D^2 per (sample, tile)
    N,
    C1,
    C2,
    szb, szn, szc,
    stb, stn, stc,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K1: tl.constexpr,
    BLOCK_K2: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    b = tl.program_id(1)
    nt = tl.cdiv(N, BLOCK_M)
    ti = tile // nt
    tj = tile % nt
    if tj >= ti:  # D is symmetric: the upper triangle of tiles, off-diagonal tiles counted twice
        rows_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        d, _, _, _, _, _, _ = _diff_tile(
            Z, T, b, rows_i, rows_j, N, C1, C2, szb, szn, szc, stb, stn, stc, eps,
            NORMALIZE, BLOCK_M, BLOCK_K1, BLOCK_K2,
        )  # fmt: skip
        w = tl.where(tj == ti, 1.0, 2.0)
        tl.store(PART + b.to(tl.int64) * nt * nt + tile, w * tl.sum(tl.sum(d * d, axis=1), axis=0))


@triton.jit
def _gram_loss_bwd_kernel(
    Z,  # (B, N, C1) latent tokens, strides (szb, szn, szc)
    T,  # (B, N, C2) target tokens, strides (stb, stn, stc)
    GL,  # () upstream gradient of the loss
    DX,  # (B, N, CX) contiguous: dx (FUSE_NORM or not NORMALIZE, x's dtype) or dx^ (fp32) of the chosen input
    N,
    C1,
    C2,
    szb, szn, szc,
    stb, stn, stc,
    scale,  # 4 / den (den of the reduction: B N^2, B N or B)
    eps,
    WRT_T: tl.constexpr,  # differentiate w.r.t. the target (else z)
    NORMALIZE: tl.constexpr,
    FUSE_NORM: tl.constexpr,  # the channel block covers all channels: normalisation backward in this program
    BLOCK_M: tl.constexpr,
    BLOCK_K1: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    ti = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    if WRT_T:
        X = T
        CX = C2
        sxb = stb
        sxn = stn
        sxc = stc
        coef = -scale * tl.load(GL).to(tl.float32)
    else:
        X = Z
        CX = C1
        sxb = szb
        sxn = szn
        sxc = szc
        coef = scale * tl.load(GL).to(tl.float32)
    rows_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < CX
    xbase = X + b.to(tl.int64) * sxb
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    ri = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sqi = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tj in range(0, tl.cdiv(N, BLOCK_M)):
        rows_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        d, rzi, rzj, rti, rtj, sqzi, sqti = _diff_tile(
            Z, T, b, rows_i, rows_j, N, C1, C2, szb, szn, szc, stb, stn, stc, eps,
            NORMALIZE, BLOCK_M, BLOCK_K1, BLOCK_K2,
        )  # fmt: skip
        if WRT_T:
            rj = rtj
            ri = rti
            sqi = sqti
        else:
            rj = rzj
            ri = rzi
            sqi = sqzi
        xj = tl.load(
            xbase + rows_j[:, None] * sxn + cols[None, :] * sxc, mask=(rows_j < N)[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc = tl.dot(d, xj * rj[:, None], acc, input_precision="ieee")  # sum_j D_ij x^_j
    dxh = coef * acc
    imask = (rows_i < N)[:, None] & cmask[None, :]
    if FUSE_NORM:
        xi = tl.load(xbase + rows_i[:, None] * sxn + cols[None, :] * sxc, mask=imask, other=0.0).to(tl.float32)
        xh = xi * ri[:, None]
        proj = tl.where(tl.sqrt(sqi) >= eps, tl.sum(xh * dxh, axis=1), 0.0)  # below eps the norm is a constant
        dxh = ri[:, None] * (dxh - xh * proj[:, None])
    out = DX + (b.to(tl.int64) * N + rows_i[:, None]) * CX + cols[None, :]
    tl.store(out, dxh.to(DX.dtype.element_ty), mask=imask)


@triton.jit
def _normalize_bwd_kernel(
    X,  # (B, N, C) forward input, strides (sxb, sxn, sxc)
    DXH,  # (B * N, C) fp32 gradient of x^ = x / max(||x||, eps), contiguous
    DX,  # (B * N, C) gradient of x, contiguous
    R,  # B * N rows
    N,
    C,
    sxb, sxn, sxc,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    xoff = (rows64 // N) * sxb + (rows64 % N) * sxn
    x = tl.load(X + xoff[:, None] + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DXH + rows64[:, None] * C + cols[None, :], mask=mask, other=0.0)
    nrm = tl.sqrt(tl.sum(x * x, axis=1))
    r = 1.0 / tl.maximum(nrm, eps)
    xh = x * r[:, None]
    proj = tl.where(nrm >= eps, tl.sum(xh * g, axis=1), 0.0)
    dx = r[:, None] * (g - xh * proj[:, None])
    tl.store(DX + rows64[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


# 8 warps: with 4, the 64x64 fp32 Gram-difference tile plus the operand tiles spill registers on sm_90 (up to ~3 KB per
# thread in the backward, measured with `python -m pae_fast.kernels.tools.compile_check --ops gram_loss --ptxas`).
_NUM_WARPS = 8


def _tile_sizes(N: int, C1: int, C2: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K1, BLOCK_K2, BLOCK_C cap). tl.dot needs every block dim >= 16.

    Under the interpreter programs run one at a time: big tiles (few programs, numpy matmuls).
    """
    p2 = triton.next_power_of_2
    if interpreter_enabled():
        return min(max(16, p2(N)), 256), min(max(16, p2(C1)), 1024), min(max(16, p2(C2)), 1024), 1024
    return 64, min(max(16, p2(C1)), 32), min(max(16, p2(C2)), 32), 64


def _loss_dtype(z: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(z.dtype, target.dtype), torch.float32)


REDUCTIONS = ("mean", "row_mean", "sum")


def _denominator(B: int, N: int, reduction: str) -> int:
    """What the sum of squares over the batch is divided by (docs/method.md § SSR): the one home of the reductions."""
    return {"mean": B * N * N, "row_mean": B * N, "sum": B}[reduction]


def _fwd(z: torch.Tensor, target: torch.Tensor, normalize: bool, reduction: str) -> torch.Tensor:
    B, N, C1 = z.shape
    C2 = target.shape[-1]
    BM, BK1, BK2, _ = _tile_sizes(N, C1, C2)
    nt = triton.cdiv(N, BM)
    part = torch.zeros((B, nt * nt), dtype=torch.float32, device=z.device)
    _gram_loss_fwd_kernel[(nt * nt, B)](
        z, target, part, N, C1, C2, *z.stride(), *target.stride(), _EPS,
        NORMALIZE=normalize, BLOCK_M=BM, BLOCK_K1=BK1, BLOCK_K2=BK2, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return (part.sum() / _denominator(B, N, reduction)).to(_loss_dtype(z, target))


def _grad_of(which_t: bool, g: torch.Tensor, z: torch.Tensor, target: torch.Tensor, normalize: bool,
             reduction: str) -> torch.Tensor:  # fmt: skip
    """Gradient of the loss w.r.t. z (which_t False) or the target, in that input's dtype and shape."""
    B, N, C1 = z.shape
    C2 = target.shape[-1]
    x = target if which_t else z
    CX = x.shape[-1]
    BM, BK1, BK2, c_cap = _tile_sizes(N, C1, C2)
    BLOCK_C = min(max(16, triton.next_power_of_2(CX)), c_cap)
    n_cb = triton.cdiv(CX, BLOCK_C)
    fuse = n_cb == 1
    two_pass = normalize and not fuse
    out = torch.empty((B, N, CX), dtype=torch.float32 if two_pass else x.dtype, device=x.device)
    g = g.reshape(()).contiguous()
    _gram_loss_bwd_kernel[(triton.cdiv(N, BM), n_cb, B)](
        z, target, g, out, N, C1, C2, *z.stride(), *target.stride(), 4.0 / _denominator(B, N, reduction), _EPS,
        WRT_T=which_t, NORMALIZE=normalize, FUSE_NORM=normalize and fuse,
        BLOCK_M=BM, BLOCK_K1=BK1, BLOCK_K2=BK2, BLOCK_C=BLOCK_C, num_warps=_NUM_WARPS,
    )  # fmt: skip
    if not two_pass:
        return out
    dx = torch.empty((B, N, CX), dtype=x.dtype, device=x.device)
    R = B * N
    BLOCK_C = triton.next_power_of_2(CX)
    BLOCK_R = max(1, min(triton.next_power_of_2(R), (65536 if interpreter_enabled() else 8192) // BLOCK_C))
    _normalize_bwd_kernel[(triton.cdiv(R, BLOCK_R),)](
        x, out, dx, R, N, CX, *x.stride(), _EPS, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        num_warps=row_warps(BLOCK_R, BLOCK_C),
    )
    return dx


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::gram_loss", mutates_args=())
def _gram_loss_op(z: torch.Tensor, target: torch.Tensor, normalize: bool, reduction: str) -> torch.Tensor:
    return _fwd(z, target, normalize, reduction)


@_gram_loss_op.register_fake
def _(z, target, normalize, reduction):
    return z.new_empty((), dtype=_loss_dtype(z, target))


@torch.library.custom_op("pae_fast::gram_loss_backward", mutates_args=())
def _gram_loss_backward_op(
    g: torch.Tensor, z: torch.Tensor, target: torch.Tensor, normalize: bool, reduction: str, need_dz: bool,
    need_dt: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dz = _grad_of(False, g, z, target, normalize, reduction) if need_dz else z.new_empty(0)
    dt = _grad_of(True, g, z, target, normalize, reduction) if need_dt else target.new_empty(0)
    return dz, dt


@_gram_loss_backward_op.register_fake
def _(g, z, target, normalize, reduction, need_dz, need_dt):
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if need_dz else z.new_empty(0)
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if need_dt else target.new_empty(0)
    return dz, dt


def _setup_context(ctx, inputs, output):
    z, target, normalize, reduction = inputs
    ctx.save_for_backward(z, target)
    ctx.normalize = normalize
    ctx.reduction = reduction


def _backward(ctx, g):
    z, target = ctx.saved_tensors
    need_dz, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dz, dt = _gram_loss_backward_op(g, z, target, ctx.normalize, ctx.reduction, need_dz, need_dt)
    return dz if need_dz else None, dt if need_dt else None, None, None


_gram_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check_args(z: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"gram_loss: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    for name, t in (("z", z), ("target", target)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"gram_loss: {name} must be a floating-point tensor (B, N, C)")
        if t.dim() != 3 or 0 in t.shape:
            raise ValueError(f"gram_loss: {name} must have shape (B, N, C) with B, N, C >= 1, got {tuple(t.shape)}")
    if z.shape[:2] != target.shape[:2]:
        raise ValueError(
            f"gram_loss: z and target must share (B, N) (channel dims may differ), got {tuple(z.shape)} and "
            f"{tuple(target.shape)}"
        )
    if z.device != target.device:
        raise ValueError(f"gram_loss: z is on {z.device} but target is on {target.device}")


def gram_loss(
    z: torch.Tensor, target: torch.Tensor, normalize: bool = True, backend: str | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """SSR loss ``sum_b sum_ij (G_z - G_T)_ij^2 / den`` between token x token Gram matrices, tiled.

    Args:
        z: ``(B, N, C1)`` latent tokens.
        target: ``(B, N, C2)`` target tokens (C2 may differ from C1; gradients flow to it when it requires grad).
        normalize: cosine Gram of l2-normalised tokens (``x / max(||x||, 1e-12)``); False: raw inner products.
        backend: ``auto | triton | torch`` (None: the scope / process default).
        reduction: ``mean`` (den = B N^2: the mean over every Gram entry), ``row_mean`` (den = B N: per sample the
            mean over rows of each row's sum of squares) or ``sum`` (den = B: per sample the squared Frobenius norm
            ``||G_z - G_T||_F^2``, averaged over the batch); docs/method.md § SSR.

    Returns:
        0-dim loss, fp32 (fp64 when either input is fp64), computed with fp32 accumulation.
    """
    _check_args(z, target, reduction)
    if resolve_backend(backend, z) == "torch":
        return gram_loss_ref(z, target, normalize, reduction)
    return _gram_loss_op(z, target, bool(normalize), reduction)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def gram_loss_ref(z: torch.Tensor, target: torch.Tensor, normalize: bool = True, reduction: str = "mean"
                  ) -> torch.Tensor:  # fmt: skip
    """PyTorch reference of :func:`gram_loss` (fp32 math for half inputs; fp64 stays fp64).

    The batch is processed in chunks so that at most ~2^22 Gram entries per matrix exist at a time.
    """
    _check_args(z, target, reduction)
    dt = _loss_dtype(z, target)
    x, t = z.to(dt), target.to(dt)
    if normalize:
        x, t = F.normalize(x, dim=-1, eps=_EPS), F.normalize(t, dim=-1, eps=_EPS)
    B, N, _ = z.shape
    chunk = max(1, 2**22 // (N * N))
    total = x.new_zeros(())
    for xc, tc in zip(x.split(chunk), t.split(chunk)):
        total = total + (xc @ xc.transpose(1, 2) - tc @ tc.transpose(1, 2)).pow(2).sum()
    return total / _denominator(B, N, reduction)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    z, target = args[0], kwargs.get("target", args[1] if len(args) > 1 else None)
    fwd = tensor_bytes(z, target) + 4  # read both once, write the scalar
    # backward: read both and the upstream scalar, write the gradient of every input that requires it
    grads = [t for t in (z, target) if isinstance(t, torch.Tensor) and t.requires_grad]
    bwd = tensor_bytes(z, target) + 4 + tensor_bytes(*grads)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=True, s=1.0):  # tokens of norm ~s: raw Gram entries O(s^2), cosine ones O(1)
        t = torch.randn(*shape, generator=g) * (s / shape[-1] ** 0.5)
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    if size == "model":
        return [
            ("(32,256,32) vs (32,256,768)", (rnd(32, 256, 32), rnd(32, 256, 768, grad=False)), {}),
            ("(32,256,32) vs (32,256,1024) both grads", (rnd(32, 256, 32), rnd(32, 256, 1024)), {}),
        ]
    return [
        ("(2,257,32) vs (2,257,65)", (rnd(2, 257, 32), rnd(2, 257, 65, grad=False)), {}),
        ("(1,33,33) vs (1,33,40) both grads", (rnd(1, 33, 33), rnd(1, 33, 40)), {}),
        ("(2,20,16) vs (2,20,24) raw", (rnd(2, 20, 16), rnd(2, 20, 24)), {"normalize": False}),
        ("non-contiguous (2,40,33)", (rnd(40, 2, 33).transpose(0, 1), rnd(2, 33, 40).transpose(1, 2)), {}),
        # the other reductions multiply the loss by N (row_mean) or N^2 (sum): raw tokens scaled by that factor's
        # -1/3 power (raw gradients scale as the cube of the tokens) keep the gradients at the size the declared
        # absolute tolerances are set for
        ("(2,20,16) vs (2,20,24) raw row_mean", (rnd(2, 20, 16, s=20 ** (-1 / 3)), rnd(2, 20, 24, s=20 ** (-1 / 3))),
         {"normalize": False, "reduction": "row_mean"}),
        ("(1,19,16) vs (1,19,8) raw sum", (rnd(1, 19, 16, s=19 ** (-2 / 3)), rnd(1, 19, 8, s=19 ** (-2 / 3))),
         {"normalize": False, "reduction": "sum"}),
    ]


register_op(
    OpSpec(
        name="gram_loss",
        fn=gram_loss,
        ref=gram_loss_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="SSR loss: mean squared difference of token x token (cosine) Gram matrices, tiled",
        # The loss is a mean over B N^2 entries, so its gradients are ~1e-5 (small cases) to ~1e-7 (model sizes):
        # the default absolute tolerances would accept anything. Tight atol, rtol sized for fp32 sums of N * C terms
        # (half dtypes: one rounding of the stored gradient; fp16 gradients this small are subnormal, ulp 6e-8).
        tolerances={
            torch.float64: (1e-14, 1e-10),
            torch.float32: (1e-9, 1e-4),
            torch.float16: (1e-7, 5e-3),
            torch.bfloat16: (1e-7, 1.6e-2),
        },
    )
)
