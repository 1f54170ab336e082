"""swiglu: the gated activation of LightningDiT's SwiGLU MLP, ``W3(SiLU(x W1) * (x W2))``, between the two GEMMs.

    y = silu(a) * b = a * sigmoid(a) * b

With ``b=None`` the input is one packed tensor ``[a | b]`` (the output of a fused ``Linear(d, 2 * hidden)``, as in
LightningDiT's ``w12``), split in half on the last dim; the output has half its width.

Backward (s = sigmoid(a), g = dL/dy):
    da = g * b * s * (1 + a * (1 - s))
    db = g * a * s

For the packed input both halves of the gradient are written by one kernel straight into ``dx (..., 2H)``, so no
concatenation (and no zero-filled slice gradients) is needed. Widths: 3072 = int(2/3 * 4 * 1152) for
LightningDiT-XL; any width works (the column tile is masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes
from ._utils import as_rows, row_block

__all__ = ["swiglu", "swiglu_ref"]


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(
    A,  # (R, H) gate rows, row stride stride_a, unit column stride
    B,  # (R, H) value rows, row stride stride_b, unit column stride (packed input: A + H, same row stride)
    Y,  # (R, H) output rows, contiguous
    R,
    H,
    stride_a,
    stride_b,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + rows[:, None] * H + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    G,  # (R, H) upstream gradient, contiguous
    A,  # (R, H) forward gate, row stride stride_a
    B,  # (R, H) forward value, row stride stride_b
    DA,  # (R, H) gradient of a, row stride stride_da (packed: the first half of dx)
    DB,  # (R, H) gradient of b, row stride stride_db (packed: DA + H)
    R,
    H,
    stride_a,
    stride_b,
    stride_da,
    stride_db,
    NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    g = tl.load(G + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    if NEED_DA:
        b = tl.load(B + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        da = g * b * s * (1.0 + a * (1.0 - s))
        tl.store(DA + rows[:, None] * stride_da + cols[None, :], da.to(DA.dtype.element_ty), mask=mask)
    if NEED_DB:
        db = g * a * s
        tl.store(DB + rows[:, None] * stride_db + cols[None, :], db.to(DB.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _halves(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and value tensors ``(..., H)`` (views of the packed input when ``b`` is None)."""
    if b is None:
        H = a.shape[-1] // 2
        return a[..., :H], a[..., H:]
    return a, b


def _blocks(R: int, H: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for the elementwise 2-D tiling: whole rows under the interpreter, 1024-wide tiles on GPU."""
    if interpreter_enabled():
        return row_block(R, H)
    BLOCK_C = min(triton.next_power_of_2(max(H, 1)), 1024)
    return max(1, min(triton.next_power_of_2(max(R, 1)), 4096 // BLOCK_C)), BLOCK_C


def _fwd(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    ga, vb = _halves(a, b)
    ar, R, H = as_rows(ga)
    br, _, _ = as_rows(vb)
    y = torch.empty((R, H), dtype=a.dtype, device=a.device)
    if R and H:
        BLOCK_R, BLOCK_C = _blocks(R, H)
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(H, BLOCK_C))
        _swiglu_fwd_kernel[grid](
            ar, br, y, R, H, ar.stride(0), br.stride(0), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C
        )  # fmt: skip
    return y.view(*ga.shape[:-1], H)


def _bwd(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, need_a: bool, need_b: bool):
    ga, vb = _halves(a, b)
    ar, R, H = as_rows(ga)
    br, _, _ = as_rows(vb)
    gr = g.reshape(R, H).contiguous()
    if b is None:  # packed: one (R, 2H) gradient, both halves written by the same program
        dx = torch.empty((R, 2 * H), dtype=a.dtype, device=a.device)
        da, db, sda, sdb = dx, dx[:, H:], 2 * H, 2 * H
        need_a = need_b = need_a
    else:
        da = torch.empty((R, H) if need_a else (0,), dtype=a.dtype, device=a.device)
        db = torch.empty((R, H) if need_b else (0,), dtype=b.dtype, device=b.device)
        sda, sdb = H, H
    if R and H and (need_a or need_b):
        BLOCK_R, BLOCK_C = _blocks(R, H)
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(H, BLOCK_C))
        _swiglu_bwd_kernel[grid](
            gr, ar, br, da, db, R, H, ar.stride(0), br.stride(0), sda, sdb,
            NEED_DA=need_a, NEED_DB=need_b, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        )  # fmt: skip
    if b is None:
        return dx.view(a.shape), a.new_empty(0)
    da = da.view(a.shape) if need_a else da
    db = db.view(b.shape) if need_b else db
    return da, db


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::swiglu", mutates_args=())
def _swiglu_op(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _fwd(a, b)


@_swiglu_op.register_fake
def _(a, b):
    H = a.shape[-1] // 2 if b is None else a.shape[-1]
    return a.new_empty((*a.shape[:-1], H))


@torch.library.custom_op("pae_fast::swiglu_backward", mutates_args=())
def _swiglu_backward_op(
    g: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, need_a: bool, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(g, a, b, need_a, need_b)


@_swiglu_backward_op.register_fake
def _(g, a, b, need_a, need_b):
    if b is None:
        return a.new_empty(a.shape), a.new_empty(0)
    return a.new_empty(a.shape if need_a else (0,)), b.new_empty(b.shape if need_b else (0,))


def _setup_context(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a, b)


def _backward(ctx, dy):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], b is not None and ctx.needs_input_grad[1]
    da, db = _swiglu_backward_op(dy, a, b, need_a, need_b)
    return (da if need_a else None), (db if need_b else None)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def swiglu(a: torch.Tensor, b: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """SwiGLU gate ``silu(a) * b``, fused (one read of each input, one write of the output).

    Args:
        a: ``(..., H)`` gate pre-activation, or with ``b=None`` the packed ``(..., 2H)`` tensor ``[a | b]``.
        b: ``(..., H)`` value, same shape and dtype as ``a``; None for the packed form.
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        ``(..., H)`` in the input dtype (computed in fp32).
    """
    if a.dim() == 0:
        raise ValueError("swiglu: a must have at least one dimension (..., H), got a scalar")
    if b is None:
        if a.shape[-1] % 2:
            raise ValueError(
                f"swiglu: packed input [a | b] (b=None) needs an even last dim, got shape {tuple(a.shape)}"
            )
    else:
        if b.shape != a.shape:
            raise ValueError(f"swiglu: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if b.dtype != a.dtype or b.device != a.device:
            raise ValueError(
                f"swiglu: a and b must share dtype and device, got {a.dtype}/{a.device} and {b.dtype}/{b.device}"
            )
    if resolve_backend(backend, a) == "torch":
        return swiglu_ref(a, b)
    return _swiglu_op(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def swiglu_ref(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`swiglu` (fp32 math for half inputs; fp64 stays fp64)."""
    if b is None:
        a, b = a.chunk(2, dim=-1)
    dt = a.dtype
    if dt in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return (torch.nn.functional.silu(a) * b).to(dt)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    a = args[0]
    b = kwargs.get("b", args[1] if len(args) > 1 else None)
    n_in = tensor_bytes(a, b)  # a and b (or the packed tensor), read once
    n_out = n_in // 2  # y has the width of one half
    fwd = n_in + n_out
    bwd = n_out + n_in + n_in  # read dy, a, b; write da, db (or dx)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 2.0).to(device=device, dtype=dtype).requires_grad_(True)

    if size == "model":
        # LightningDiT-XL/1: batch 32 x 256 tokens, hidden int(2/3 * 4 * 1152) = 3072; DiT^DH head: 2048 wide
        return [
            ("packed (32,256,2x3072)", (rnd(32, 256, 2 * 3072),), {}),
            ("a,b (32,256,3072)", (rnd(32, 256, 3072), rnd(32, 256, 3072)), {}),
            ("packed (32,256,2x5461)", (rnd(32, 256, 2 * 5461),), {}),
        ]
    x = rnd(5, 2, 2 * 37)
    return [
        ("packed (2,257,2x40)", (rnd(2, 257, 80),), {}),
        ("a,b (3,5,33)", (rnd(3, 5, 33), rnd(3, 5, 33)), {}),
        ("packed (1,3,2x3072)", (rnd(1, 3, 2 * 3072),), {}),
        ("non-contiguous packed (2,5,2x37)", (x.transpose(0, 1),), {}),
        ("a,b non-contiguous (2,7,19)", (rnd(7, 2, 19).transpose(0, 1), rnd(2, 19, 7).transpose(1, 2)), {}),
    ]


register_op(
    OpSpec(
        name="swiglu",
        fn=swiglu,
        ref=swiglu_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="SwiGLU gate silu(a) * b (separate or packed [a | b] input)",
    )
)
