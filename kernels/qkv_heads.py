"""qkv_heads: head views ``q, k, v`` of a packed ``qkv`` projection, whose backward packs ``dq, dk, dv`` into one
``dqkv`` and writes the projection's bias gradient in the same pass (docs/method.md § Residual + LayerNorm fused,
bias fold).

A plain ViT attention (no qk-norm, no RoPE) splits one ``(B, N, 3·H·hd)`` projection into heads::

    qkv = x W^T + b                                                  # cuBLAS addmm, the bias in its epilogue
    q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)   # (B, H, N, hd) views, no pass

Autograd's backward of the views stacks ``dq, dk, dv`` and then clones them into qkv's layout (two reads and two
writes of the whole gradient), and the addmm backward reduces ``db = sum_(b, n) dqkv`` in one more full read. Here the
forward stays views of ``qkv`` (no pass); the Linear runs with its bias *detached* (``F.linear(x, W, b.detach())``:
still cuBLAS's epilogue, and its backward is two plain GEMMs) and this op takes ``b`` as an input whose gradient it
returns: one kernel reads dq, dk, dv once, writes the packed ``dqkv`` and per-program fp32 column sums of it, reduced
by one small ``sum`` into ``db`` (deterministic, no atomics). Counted per call: 2 |qkv| bytes instead of 3 |qkv|
(stack + bias sum; 4 |qkv| with autograd's stack + clone).

The forward is views (a custom op cannot return views of its input), so an ``autograd.Function`` holds it; its
backward is the custom op ``pae_fast::qkv_heads_backward`` (Triton) or the same ``stack`` (+ column sum) in PyTorch.
Reference: ``qkv_heads_ref`` (views of ``qkv + (b - b.detach())``: the same values, the bias gradient of the sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._adaln_common import bwd_programs
from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes
from ._utils import row_block, row_warps
from .qkv_norm_rope import split_heads

__all__ = ["qkv_heads", "qkv_heads_ref", "linear_qkv_heads"]

# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _pack_third(G, sb, sh, sn, sd, DQKV, DB, pid, s, R, N, D, hd, ITERS, HAS_BIAS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    # G (B, H, N, hd) strides (sb, sh, sn, sd) -> columns s*D .. s*D + D - 1 of DQKV (R = B*N, 3*D) contiguous;
    # DB (P, 3*D) fp32: this program's column sums of those columns
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < D
    h = cols // hd
    d = cols % hd
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        b = rows // N
        n = rows % N
        src = (b * sb + n * sn)[:, None] + (h * sh + d * sd)[None, :]
        g = tl.load(G + src, mask=mask, other=0.0)
        tl.store(DQKV + rows[:, None] * (3 * D) + s * D + cols[None, :], g, mask=mask)
        if HAS_BIAS:
            acc += tl.sum(g.to(tl.float32), axis=0)  # masked entries loaded as 0
    if HAS_BIAS:
        tl.store(DB + pid * (3 * D) + s * D + cols, acc, mask=cmask)


@triton.jit
def _qkv_heads_bwd_kernel(
    DQ,  # (B, H, N, hd) gradient of q, strides (qb, qh, qn, qd)
    DK,  # (B, H, N, hd) gradient of k, strides (kb, kh, kn, kd)
    DV,  # (B, H, N, hd) gradient of v, strides (vb, vh, vn, vd)
    DQKV,  # (B*N, 3*H*hd) output, contiguous: the packed gradient of qkv
    DB,  # (P, 3*H*hd) fp32 output: per-program partial column sums of DQKV (HAS_BIAS)
    R,  # B*N
    N,
    D,  # H*hd
    hd,
    ITERS,
    qb, qh, qn, qd, kb, kh, kn, kd, vb, vh, vn, vd,  # fmt: skip
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (pid, s): row blocks pid*ITERS .. pid*ITERS + ITERS - 1 of the third s (0 q, 1 k, 2 v)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    if s == 0:
        _pack_third(DQ, qb, qh, qn, qd, DQKV, DB, pid, 0, R, N, D, hd, ITERS, HAS_BIAS, BLOCK_R, BLOCK_C)
    elif s == 1:
        _pack_third(DK, kb, kh, kn, kd, DQKV, DB, pid, 1, R, N, D, hd, ITERS, HAS_BIAS, BLOCK_R, BLOCK_C)
    else:
        _pack_third(DV, vb, vh, vn, vd, DQKV, DB, pid, 2, R, N, D, hd, ITERS, HAS_BIAS, BLOCK_R, BLOCK_C)


# ----------------------------------------------------------------------------------------------------------------
# Launcher and the backward custom op
# ----------------------------------------------------------------------------------------------------------------

# Largest tile (row elements) per program; None: 4096 on GPU (4 rows at width 1024), 65536 under the interpreter.
# Tests lower it to run several row blocks per program and the partial reduction on small shapes.
MAX_BLOCK_ELEMS: int | None = None


def _bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, hd = dq.shape
    D, R = H * hd, B * N
    dqkv = torch.empty((B, N, 3 * D), dtype=dq.dtype, device=dq.device)
    BLOCK_R, BLOCK_C = row_block(R, D, MAX_BLOCK_ELEMS or (65536 if interpreter_enabled() else 4096))
    P, iters = bwd_programs(1, triton.cdiv(R, BLOCK_R), dq.device)
    db = torch.empty((P, 3 * D) if with_bias else (1,), dtype=torch.float32, device=dq.device)
    if R == 0 or D == 0:
        return dqkv, db.zero_().sum(0) if with_bias else dq.new_empty(0, dtype=torch.float32)
    _qkv_heads_bwd_kernel[(P, 3)](
        dq, dk, dv, dqkv, db, R, N, D, hd, iters, *dq.stride(), *dk.stride(), *dv.stride(),
        HAS_BIAS=with_bias, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=row_warps(BLOCK_R, BLOCK_C),
    )  # fmt: skip
    return dqkv, db.sum(0) if with_bias else dq.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("pae_fast::qkv_heads_backward", mutates_args=())
def _qkv_heads_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dqkv (B, N, 3·H·hd), fp32 column sums of dqkv (3·H·hd,) or an empty tensor without a bias)."""
    return _bwd(dq, dk, dv, with_bias)


@_qkv_heads_backward_op.register_fake
def _(dq, dk, dv, with_bias):
    B, H, N, hd = dq.shape
    db = dq.new_empty((3 * H * hd,) if with_bias else (0,), dtype=torch.float32)
    return dq.new_empty((B, N, 3 * H * hd)), db


class _QkvHeads(torch.autograd.Function):
    """:func:`split_heads` of ``qkv`` (views), the gradient of ``bias`` routed through it (see the module
    docstring); backward: the Triton kernel (``triton``) or one strided stack (+ a column sum)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int, bias: torch.Tensor | None, triton_bwd: bool):
        ctx.triton_bwd, ctx.bias_dtype = triton_bwd, bias.dtype if bias is not None else None
        return split_heads(qkv, num_heads)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        with_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        if ctx.triton_bwd:
            dqkv, db = _qkv_heads_backward_op(dq, dk, dv, with_bias)
        else:
            # dqkv[b, n, s, h] = (dq, dk, dv)[s][b, h, n]: one strided stack straight into (B, N, 3, H, hd)
            dqkv = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2).flatten(2)
            db = dqkv.flatten(0, -2).sum(0, dtype=torch.float32) if with_bias else None
        return dqkv, None, db.to(ctx.bias_dtype) if with_bias else None, None


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def qkv_heads(
    qkv: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``q, k, v`` ``(B, H, N, hd)`` of a packed ``qkv (B, N, 3·H·hd)`` (heads inside each third, timm's
    layout) for attention without qk-norm / RoPE, with a packed gradient written in one pass.

    Args:
        qkv: ``(B, N, 3·H·hd)``, the projection's output.
        num_heads: ``H``.
        bias: ``(3·H·hd,)`` bias that ``qkv`` ALREADY holds, added without its gradient
            (``F.linear(x, W, bias.detach())``, see :func:`linear_qkv_heads`): this op returns its gradient, the
            column sum of ``dqkv``, from the packing kernel. None: no bias gradient.
        backend: ``auto | triton | torch`` of the backward (None: the scope / process default).

    Returns:
        ``(q, k, v)``, views of ``qkv`` (bit for bit what ``view -> permute -> unbind`` returns).
    """
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv_heads: qkv must be (B, N, 3 * num_heads * head_dim); got shape {tuple(qkv.shape)} "
                         f"with num_heads={num_heads}")  # fmt: skip
    if bias is not None and (bias.shape != qkv.shape[-1:] or bias.device != qkv.device or not bias.is_floating_point()):
        raise ValueError(f"qkv_heads: bias must be a floating ({qkv.shape[-1]},) tensor on {qkv.device} (the one qkv "
                         f"holds), got {tuple(bias.shape)} {bias.dtype} on {bias.device}")  # fmt: skip
    return _QkvHeads.apply(qkv, int(num_heads), bias, resolve_backend(backend, qkv) == "triton")


def linear_qkv_heads(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed qkv Linear and :func:`qkv_heads`: ``x (B, N, D)``, ``weight (3D, D)``, ``bias (3D,)`` or None ->
    ``q, k, v`` ``(B, H, N, hd)``. The bias is added by the GEMM (cuBLAS's epilogue) without its gradient; its
    gradient comes from :func:`qkv_heads`'s packing kernel (no column sum over ``dqkv`` in the Linear's backward)."""
    qkv = F.linear(x, weight, bias.detach() if bias is not None else None)  # (B, N, 3D): q | k | v, heads inside
    return qkv_heads(qkv, num_heads, bias, backend)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path's values and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def qkv_heads_ref(
    qkv: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`qkv_heads`: the plain views of ``qkv + (bias - bias.detach())`` (the same values:
    ``qkv`` already holds the bias; autograd gives the bias the column sum of ``dqkv``)."""
    if bias is not None:
        qkv = qkv + (bias - bias.detach()).to(qkv.dtype)
    B, N, D3 = qkv.shape
    return qkv.view(B, N, 3, num_heads, D3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    qkv = kwargs.get("qkv", args[0] if args else None)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
    # forward: views (nothing moves); backward: read dq, dk, dv, write dqkv, write the bias gradient
    return (2 * tensor_bytes(qkv) + tensor_bytes(bias)) if backward else 0


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dt=None):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt or dtype).requires_grad_()

    if size == "model":  # the ViT-L decoder's attention (16 heads of 64) on 257 tokens, its qkv bias in fp32
        return [("(32,257,3x16x64)+bias", (rnd(32, 257, 3072), 16), {"bias": rnd(3072, dt=torch.float32)})]
    return [
        ("(2,7,3x3x5)+bias", (rnd(2, 7, 45), 3), {"bias": rnd(45)}),
        ("(1,257,3x2x72)+fp32 bias", (rnd(1, 257, 432), 2), {"bias": rnd(432, dt=torch.float32)}),
        ("(3,5,3x1x97) no bias", (rnd(3, 5, 291), 1), {}),
    ]


register_op(
    OpSpec(
        name="qkv_heads",
        fn=qkv_heads,
        ref=qkv_heads_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        atol_rms=True,  # the bias gradient is an fp32 sum over all B*N rows: its rounding grows with its scale
        description="packed qkv -> q, k, v head views; backward packs dq, dk, dv into dqkv with the qkv bias "
        "gradient in the same pass",
    )
)
