"""latent_norm: per-token RMS normalisation without affine (the PAE hypersphere latent, docs/method.md § PAE
tokenizer, step 4).

    y_i = x_i / sqrt(mean_c x_i,c^2 + eps)            (every token has RMS 1, ||y_i|| = sqrt(C))

Backward (r_i = 1/rms_i, g = dL/dy):
    dx_i = r_i * (g_i - y_i * mean_c(g_i,c * y_i,c))

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
    R,
    C,
    stride_x,
    eps,
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
    tl.store(Y + rows[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _latent_norm_bwd_kernel(
    DY,  # (R, C) upstream gradient, contiguous
    X,  # (R, C) forward input, row stride stride_x
    RSTD,  # (R,) fp32 saved 1 / rms
    DX,  # (R, C) gradient of x, contiguous
    R,
    C,
    stride_x,
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
    g = tl.load(DY + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    y = x * rstd[:, None]
    dot = tl.sum(g * y, axis=1) / C
    dx = rstd[:, None] * (g - y * dot[:, None])
    tl.store(DX + rows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _fwd(h: torch.Tensor, eps: float):
    x, R, C = as_rows(h)
    y = torch.empty((R, C), dtype=h.dtype, device=h.device)
    rstd = torch.empty((R,), dtype=torch.float32, device=h.device)
    BLOCK_R, BLOCK_C = row_block(R, C)
    grid = (triton.cdiv(R, BLOCK_R),)
    _latent_norm_fwd_kernel[grid](
        x, y, rstd, R, C, x.stride(0), float(eps),
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=row_warps(BLOCK_R, BLOCK_C),
    )  # fmt: skip
    return y.view(h.shape), rstd


def _bwd(dy: torch.Tensor, h: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    x, R, C = as_rows(h)
    g = dy.reshape(R, C).contiguous()
    dx = torch.empty((R, C), dtype=h.dtype, device=h.device)
    BLOCK_R, BLOCK_C = row_block(R, C)
    _latent_norm_bwd_kernel[(triton.cdiv(R, BLOCK_R),)](
        g, x, rstd, dx, R, C, x.stride(0),
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=row_warps(BLOCK_R, BLOCK_C),
    )  # fmt: skip
    return dx.view(h.shape)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::latent_norm", mutates_args=())
def _latent_norm_op(h: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = _fwd(h, eps)
    return y, rstd


@_latent_norm_op.register_fake
def _(h, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(
        h.numel() // h.shape[-1], dtype=torch.float32
    )


@torch.library.custom_op("pae_fast::latent_norm_backward", mutates_args=())
def _latent_norm_backward_op(dy: torch.Tensor, h: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return _bwd(dy, h, rstd)


@_latent_norm_backward_op.register_fake
def _(dy, h, rstd):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    h, eps = inputs
    _, rstd = output
    ctx.save_for_backward(h, rstd)


def _backward(ctx, dy, drstd):
    h, rstd = ctx.saved_tensors
    return _latent_norm_backward_op(dy, h, rstd), None


_latent_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def latent_norm(h: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """Per-token RMS normalisation over the last dim (no affine).

    Args:
        h: ``(..., C)`` tokens, channels last.
        eps: added to the mean square.
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        ``(..., C)`` in ``h.dtype`` (statistics computed in fp32).
    """
    if resolve_backend(backend, h) == "torch":
        return latent_norm_ref(h, eps)
    return _latent_norm_op(h, float(eps))[0]


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def latent_norm_ref(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch reference of :func:`latent_norm` (fp32 statistics; fp64 stays fp64)."""
    x = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    h = args[0]
    fwd = 2 * tensor_bytes(h)  # read h, write y
    # backward: read dy and h (rstd is recomputable; the fused kernel stores 4 B/row), write dx
    bwd = 3 * tensor_bytes(h)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)

    shapes = [(32, 256, 32), (32, 256, 768)] if size == "model" else [(2, 257, 32), (3, 5, 33)]
    out = [(f"{shp}", (rnd(*shp),), {}) for shp in shapes]
    out.append(("large values (2,9,32)", (rnd(2, 9, 32, scale=300.0),), {}))
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
        description="per-token RMS norm (no affine), the PAE latent",
    )
)
