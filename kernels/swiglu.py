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
    BIAS,  # (2H,) bias of the packed input [bias_a | bias_b] (read only when HAS_BIAS)
    R,
    H,
    stride_a,
    stride_b,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        b += tl.load(BIAS + H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    y = a * tl.sigmoid(a) * b
    tl.store(Y + rows[:, None] * H + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    G,  # (R, H) upstream gradient, contiguous
    A,  # (R, H) forward gate, row stride stride_a
    B,  # (R, H) forward value, row stride stride_b
    BIAS,  # (2H,) bias of the packed input (HAS_BIAS)
    DA,  # (R, H) gradient of a, row stride stride_da (packed: the first half of dx)
    DB,  # (R, H) gradient of b, row stride stride_db (packed: DA + H)
    DBIAS,  # (P, 2H) fp32 per-program column sums of [da | db], the bias gradient's partials (HAS_BIAS)
    R,
    H,
    ITERS,
    stride_a,
    stride_b,
    stride_da,
    stride_db,
    NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (pid_r, pid_c) handles row blocks pid_r*ITERS .. + ITERS - 1 of column block pid_c; with a bias it
    # also sums da and db over its rows (the bias gradient, read from the gradients it writes anyway)
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < H
    if HAS_BIAS:
        bias_a = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        bias_b = tl.load(BIAS + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in range(ITERS):
        rows = ((pid_r * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (rows < R)[:, None] & cmask[None, :]
        g = tl.load(G + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            a += bias_a
        s = tl.sigmoid(a)
        if NEED_DA:
            b = tl.load(B + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b += bias_b
            da = tl.where(mask, g * b * s * (1.0 + a * (1.0 - s)), 0.0)
            tl.store(DA + rows[:, None] * stride_da + cols[None, :], da.to(DA.dtype.element_ty), mask=mask)
            acc_a += tl.sum(da, axis=0)
        if NEED_DB:
            db = tl.where(mask, g * a * s, 0.0)
            tl.store(DB + rows[:, None] * stride_db + cols[None, :], db.to(DB.dtype.element_ty), mask=mask)
            acc_b += tl.sum(db, axis=0)
    if HAS_BIAS:
        part = pid_r.to(tl.int64) * 2 * H
        tl.store(DBIAS + part + cols, acc_a, mask=cmask)
        tl.store(DBIAS + part + H + cols, acc_b, mask=cmask)


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


def _fwd(a: torch.Tensor, b: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    ga, vb = _halves(a, b)
    ar, R, H = as_rows(ga)
    br, _, _ = as_rows(vb)
    y = torch.empty((R, H), dtype=a.dtype, device=a.device)
    if R and H:
        BLOCK_R, BLOCK_C = _blocks(R, H)
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(H, BLOCK_C))
        _swiglu_fwd_kernel[grid](
            ar, br, y, bias if bias is not None else y, R, H, ar.stride(0), br.stride(0), HAS_BIAS=bias is not None,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        )  # fmt: skip
    return y.view(*ga.shape[:-1], H)


def _row_programs(n_row_blocks: int, n_col_blocks: int, device: torch.device) -> tuple[int, int]:
    """``(P, ITERS)``: programs per column block, each summing ITERS row blocks (about four programs per SM; two
    under the interpreter, so the loop and the partial reduction are both exercised)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * n_col_blocks
    P = max(1, min(n_row_blocks, triton.cdiv(target, n_col_blocks)))
    iters = triton.cdiv(n_row_blocks, P)
    return triton.cdiv(n_row_blocks, iters), iters


def _bwd(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, need_a: bool, need_b: bool,
         bias: torch.Tensor | None = None):
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
    BLOCK_R, BLOCK_C = _blocks(R, H)
    n_rb, n_cb = triton.cdiv(R, BLOCK_R), triton.cdiv(H, BLOCK_C)
    P, iters = _row_programs(n_rb, n_cb, a.device) if bias is not None else (n_rb, 1)
    dbias_p = torch.zeros((max(P, 1), 2 * H) if bias is not None else (1,), dtype=torch.float32, device=a.device)
    if R and H and (need_a or need_b):
        _swiglu_bwd_kernel[(P, n_cb)](
            gr, ar, br, bias if bias is not None else gr, da, db, dbias_p, R, H, iters, ar.stride(0), br.stride(0),
            sda, sdb, NEED_DA=need_a, NEED_DB=need_b, HAS_BIAS=bias is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        )  # fmt: skip
    if b is None:
        dbias = dbias_p.sum(0).to(bias.dtype) if bias is not None else a.new_empty(0)
        return dx.view(a.shape), dbias
    da = da.view(a.shape) if need_a else da
    db = db.view(b.shape) if need_b else db
    return da, db


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::swiglu", mutates_args=())
def _swiglu_op(a: torch.Tensor, b: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    return _fwd(a, b, bias)


@_swiglu_op.register_fake
def _(a, b, bias):
    H = a.shape[-1] // 2 if b is None else a.shape[-1]
    return a.new_empty((*a.shape[:-1], H))


@torch.library.custom_op("pae_fast::swiglu_backward", mutates_args=())
def _swiglu_backward_op(
    g: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, bias: torch.Tensor | None, need_a: bool, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(da, db)`` for separate inputs; ``(dx, dbias)`` for the packed one (dbias empty without a bias)."""
    return _bwd(g, a, b, need_a, need_b, bias)


@_swiglu_backward_op.register_fake
def _(g, a, b, bias, need_a, need_b):
    if b is None:
        return a.new_empty(a.shape), bias.new_empty(bias.shape) if bias is not None else a.new_empty(0)
    return a.new_empty(a.shape if need_a else (0,)), b.new_empty(b.shape if need_b else (0,))


def _setup_context(ctx, inputs, output):
    a, b, bias = inputs
    ctx.save_for_backward(a, b, bias)


def _backward(ctx, dy):
    a, b, bias = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], b is not None and ctx.needs_input_grad[1]
    need_bias = bias is not None and ctx.needs_input_grad[2]
    if b is None:
        dx, dbias = _swiglu_backward_op(dy, a, None, bias, need_a or need_bias, need_a or need_bias)
        return (dx if need_a else None), None, (dbias if need_bias else None)
    da, db = _swiglu_backward_op(dy, a, b, None, need_a, need_b)
    return (da if need_a else None), (db if need_b else None), None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def swiglu(
    a: torch.Tensor, b: torch.Tensor | None = None, backend: str | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SwiGLU gate ``silu(a) * b``, fused (one read of each input, one write of the output).

    Args:
        a: ``(..., H)`` gate pre-activation, or with ``b=None`` the packed ``(..., 2H)`` tensor ``[a | b]``.
        b: ``(..., H)`` value, same shape and dtype as ``a``; None for the packed form.
        backend: ``auto | triton | torch`` (None: the scope / process default).
        bias: ``(2H,)`` bias of the packed form, added before the gate (the ``w12`` Linear's bias, taken out of the
            GEMM): its gradient is summed by the backward kernel from the gradients it writes anyway, instead of a
            separate ``sum`` over the whole ``(..., 2H)`` gradient.

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
    if bias is not None and (b is not None or bias.shape != (a.shape[-1],) or bias.device != a.device):
        raise ValueError(
            f"swiglu: bias must be ({a.shape[-1]},) on {a.device} with the packed input (b=None); got "
            f"{tuple(bias.shape)} on {bias.device}{' with b given' if b is not None else ''}"
        )
    if resolve_backend(backend, a) == "torch":
        return swiglu_ref(a, b, bias)
    return _swiglu_op(a, b, bias)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def swiglu_ref(a: torch.Tensor, b: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`swiglu` (fp32 math for half inputs; fp64 stays fp64)."""
    dt = a.dtype
    if dt in (torch.float16, torch.bfloat16):
        a, b = a.float(), (b.float() if b is not None else None)
    if bias is not None:
        a = a + bias.to(a.dtype)
    if b is None:
        a, b = a.chunk(2, dim=-1)
    return (torch.nn.functional.silu(a) * b).to(dt)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    a = args[0]
    b = kwargs.get("b", args[1] if len(args) > 1 else None)
    bias = kwargs.get("bias")
    n_in = tensor_bytes(a, b)  # a and b (or the packed tensor), read once
    n_out = n_in // 2  # y has the width of one half
    fwd = n_in + n_out + tensor_bytes(bias)
    bwd = n_out + n_in + n_in + 2 * tensor_bytes(bias)  # read dy, a, b (, bias); write da, db or dx (, dbias)
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 2.0).to(device=device, dtype=dtype).requires_grad_(True)

    if size == "model":
        # LightningDiT-XL/1: batch 32 x 256 tokens, hidden int(2/3 * 4 * 1152) = 3072; DiT^DH head: 2048 wide
        return [
            ("packed (32,256,2x3072)", (rnd(32, 256, 2 * 3072),), {}),
            ("packed + bias (32,256,2x3072)", (rnd(32, 256, 2 * 3072),), {"bias": rnd(2 * 3072)}),
            ("a,b (32,256,3072)", (rnd(32, 256, 3072), rnd(32, 256, 3072)), {}),
            ("packed (32,256,2x5461)", (rnd(32, 256, 2 * 5461),), {}),
        ]
    x = rnd(5, 2, 2 * 37)
    return [
        ("packed (2,257,2x40)", (rnd(2, 257, 80),), {}),
        ("a,b (3,5,33)", (rnd(3, 5, 33), rnd(3, 5, 33)), {}),
        ("packed (1,3,2x3072)", (rnd(1, 3, 2 * 3072),), {}),
        ("packed + bias (2,257,2x40)", (rnd(2, 257, 80),), {"bias": rnd(80)}),
        ("packed + bias (3,11,2x1100)", (rnd(3, 11, 2200),), {"bias": rnd(2200)}),
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
