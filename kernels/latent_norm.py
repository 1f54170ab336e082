"""latent_norm: per-token RMS normalisation without affine (the PAE hypersphere latent), optionally followed in the
same pass by per-channel standardisation ``(z - mean) / std`` (the diffusion latent normalisation).

    y_i = x_i / sqrt(mean_c x_i,c^2 + eps)            (every token has RMS 1, ||y_i|| = sqrt(C))
    z_i = (y_i - mean) / std                            (optional, per channel)

Backward (r_i = 1/rms_i, g = dL/dz):
    dy = g / std
    dx_i = r_i * (dy_i - y_i * mean_c(dy_i,c * y_i,c))
    dmean = -sum_i g_i / std,   dstd = -sum_i g_i * z_i / std

Anatomy (the template every kernel file follows): Triton kernels, launchers, the ``torch.library`` custom ops with
fake implementations and autograd, the public function with dispatch, then the PyTorch reference ``latent_norm_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import OpSpec, register_op, resolve_backend, tensor_bytes
from ._utils import as_rows, row_block, row_warps

__all__ = ["latent_norm", "latent_norm_ref"]


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _latent_norm_fwd_kernel(
    X,  # (R, C) input rows, row stride stride_x, unit column stride
    Y,  # (R, C) output rows, contiguous
    RSTD,  # (R,) fp32: 1 / rms of each row, saved for backward
    MEAN,  # (C,) fp32 per-channel mean (read only when HAS_STATS)
    STD,  # (C,) fp32 per-channel std (read only when HAS_STATS)
    R,
    C,
    stride_x,
    eps,
    HAS_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
    y = x * rstd[:, None]
    if HAS_STATS:
        m = tl.load(MEAN + cols, mask=cmask, other=0.0)
        s = tl.load(STD + cols, mask=cmask, other=1.0)
        y = (y - m[None, :]) / s[None, :]
    tl.store(Y + rows[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _latent_norm_bwd_kernel(
    DZ,  # (R, C) upstream gradient, contiguous
    X,  # (R, C) forward input, row stride stride_x
    RSTD,  # (R,) fp32 saved 1 / rms
    MEAN,  # (C,) fp32 (HAS_STATS)
    STD,  # (C,) fp32 (HAS_STATS)
    DX,  # (R, C) gradient of x, contiguous
    DMEAN_PART,  # (P, C) fp32 per-program partial sums of dL/dmean (HAS_STATS)
    DSTD_PART,  # (P, C) fp32 per-program partial sums of dL/dstd (HAS_STATS)
    R,
    C,
    stride_x,
    HAS_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DZ + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    y = x * rstd[:, None]
    if HAS_STATS:
        m = tl.load(MEAN + cols, mask=cmask, other=0.0)
        s = tl.load(STD + cols, mask=cmask, other=1.0)
        dy = g / s[None, :]
        z = (y - m[None, :]) / s[None, :]
        tl.store(DMEAN_PART + pid * C + cols, -tl.sum(dy, axis=0), mask=cmask)
        tl.store(DSTD_PART + pid * C + cols, -tl.sum(dy * z, axis=0), mask=cmask)
    else:
        dy = g
    dot = tl.sum(dy * y, axis=1) / C
    dx = rstd[:, None] * (dy - y * dot[:, None])
    tl.store(DX + rows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _stats(mean: torch.Tensor | None, std: torch.Tensor | None, C: int, device: torch.device):
    """Both statistics as fp32 (C,) tensors (a missing one is the identity), or (None, None)."""
    if mean is None and std is None:
        return None, None
    m = mean.float().contiguous() if mean is not None else torch.zeros(C, device=device)
    s = std.float().contiguous() if std is not None else torch.ones(C, device=device)
    return m, s


def _fwd(h: torch.Tensor, eps: float, mean: torch.Tensor | None, std: torch.Tensor | None):
    x, R, C = as_rows(h)
    y = torch.empty((R, C), dtype=h.dtype, device=h.device)
    rstd = torch.empty((R,), dtype=torch.float32, device=h.device)
    m, s = _stats(mean, std, C, h.device)
    BLOCK_R, BLOCK_C = row_block(R, C)
    grid = (triton.cdiv(R, BLOCK_R),)
    _latent_norm_fwd_kernel[grid](
        x, y, rstd, m if m is not None else rstd, s if s is not None else rstd,
        R, C, x.stride(0), float(eps),
        HAS_STATS=m is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=row_warps(BLOCK_R, BLOCK_C),
    )  # fmt: skip
    return y.view(h.shape), rstd


def _bwd(dz: torch.Tensor, h: torch.Tensor, rstd: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None):
    x, R, C = as_rows(h)
    g = dz.reshape(R, C).contiguous()
    dx = torch.empty((R, C), dtype=h.dtype, device=h.device)
    m, s = _stats(mean, std, C, h.device)
    BLOCK_R, BLOCK_C = row_block(R, C)
    P = triton.cdiv(R, BLOCK_R)
    has = m is not None
    dmp = torch.empty((P, C) if has else (1,), dtype=torch.float32, device=h.device)
    dsp = torch.empty((P, C) if has else (1,), dtype=torch.float32, device=h.device)
    _latent_norm_bwd_kernel[(P,)](
        g, x, rstd, m if has else rstd, s if has else rstd, dx, dmp, dsp,
        R, C, x.stride(0),
        HAS_STATS=has, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=row_warps(BLOCK_R, BLOCK_C),
    )  # fmt: skip
    dmean = dmp.sum(0).to(mean.dtype) if mean is not None else h.new_empty(0)
    dstd = dsp.sum(0).to(std.dtype) if std is not None else h.new_empty(0)
    return dx.view(h.shape), dmean, dstd


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::latent_norm", mutates_args=())
def _latent_norm_op(
    h: torch.Tensor, eps: float, mean: torch.Tensor | None, std: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = _fwd(h, eps, mean, std)
    return y, rstd


@_latent_norm_op.register_fake
def _(h, eps, mean, std):
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(
        h.numel() // h.shape[-1], dtype=torch.float32
    )


@torch.library.custom_op("pae_fast::latent_norm_backward", mutates_args=())
def _latent_norm_backward_op(
    dz: torch.Tensor, h: torch.Tensor, rstd: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dz, h, rstd, mean, std)


@_latent_norm_backward_op.register_fake
def _(dz, h, rstd, mean, std):
    dmean = torch.empty_like(mean) if mean is not None else h.new_empty(0)
    dstd = torch.empty_like(std) if std is not None else h.new_empty(0)
    return torch.empty_like(h, memory_format=torch.contiguous_format), dmean, dstd


def _setup_context(ctx, inputs, output):
    h, eps, mean, std = inputs
    _, rstd = output
    ctx.save_for_backward(h, rstd, mean, std)


def _backward(ctx, dy, drstd):
    h, rstd, mean, std = ctx.saved_tensors
    dx, dmean, dstd = _latent_norm_backward_op(dy, h, rstd, mean, std)
    return dx, None, dmean if mean is not None else None, dstd if std is not None else None


_latent_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def latent_norm(
    h: torch.Tensor,
    eps: float = 1e-6,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token RMS normalisation over the last dim (no affine), optionally then ``(z - mean) / std``.

    Args:
        h: ``(..., C)`` tokens, channels last.
        eps: added to the mean square.
        mean, std: optional ``(C,)`` per-channel statistics (differentiable).
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        ``(..., C)`` in ``h.dtype`` (statistics computed in fp32).
    """
    C = h.shape[-1]
    for name, t in (("mean", mean), ("std", std)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"latent_norm: {name} must have shape ({C},) to match h's last dim, got {tuple(t.shape)}")
    if resolve_backend(backend, h) == "torch":
        return latent_norm_ref(h, eps, mean, std)
    return _latent_norm_op(h, float(eps), mean, std)[0]


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def latent_norm_ref(
    h: torch.Tensor, eps: float = 1e-6, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch reference of :func:`latent_norm` (fp32 statistics; fp64 stays fp64)."""
    x = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if mean is not None:
        y = y - mean.to(y.dtype)
    if std is not None:
        y = y / std.to(y.dtype)
    return y.to(h.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    h = args[0]
    mean = kwargs.get("mean", args[2] if len(args) > 2 else None)
    std = kwargs.get("std", args[3] if len(args) > 3 else None)
    fwd = 2 * tensor_bytes(h) + tensor_bytes(mean, std)  # read h, write z, read stats
    # backward: read dz and h (rstd is recomputable; the fused kernel stores 4 B/row), write dx and stat grads
    bwd = 3 * tensor_bytes(h) + 2 * tensor_bytes(mean, std)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        t = (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype)
        return t.requires_grad_(True)

    if size == "model":
        shapes = [(32, 256, 32), (32, 256, 768)]
    else:
        shapes = [(2, 257, 32), (3, 5, 33)]
    out = []
    for shp in shapes:
        C = shp[-1]
        out.append((f"{shp}", (rnd(*shp),), {}))
        out.append(
            (f"{shp}+stats", (rnd(*shp),), {"mean": rnd(C, scale=0.1), "std": rnd(C, scale=0.1, offset=1.0).abs()})
        )
    # non-contiguous input: a transposed view whose rows are strided
    x = rnd(33, 2, 40)
    out.append(("non-contiguous (2,33,40)", (x.transpose(0, 1),), {}))
    return out


register_op(
    OpSpec(
        name="latent_norm",
        fn=latent_norm,
        ref=latent_norm_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="per-token RMS norm (no affine) + optional per-channel standardisation",
    )
)
