"""swiglu_mlp: LightningDiT's SwiGLU MLP without its last bias, the gate computed in GEMM epilogues.

    [a | b] = x @ w12^T + b12          (w12 (2H, D): the packed rows [w1 | w2], as LightningDiT's ``w12``)
    h = silu(a) * b                    (M, H)
    y = h @ w3^T                       (no w3 bias: the caller adds it, or folds it into the next fused op)

Forward: one Triton GEMM (``_swiglu_mlp_kernels``) computes per ``(BLOCK_M, BLOCK_N)`` tile of the hidden dim the two
fp32 accumulators ``a`` (rows n of w12) and ``b`` (rows H + n), adds the bias and writes both the packed ``[a | b]``
(saved for backward) and ``h`` (computed from the unrounded accumulators); ``y = h @ w3^T`` is a cuBLAS GEMM.

Backward (s = sigmoid(a), g = dL/dy; docs/method.md § SwiGLU in GEMM epilogues):
    dW3 = g^T h                                            (cuBLAS)
    dh = g @ w3;  da = dh * b * s * (1 + a (1 - s));  db = dh * a * s    (one Triton GEMM, the gate in its epilogue)
    db12 = column sums of [da | db]                        (per-row-block fp32 partials from the same epilogue)
    dx = d[a | b] @ w12,   dW12 = d[a | b]^T x             (cuBLAS)
The bandwidth-bound SwiGLU pass (read [a | b], write h; in backward read dh, a, b, write d[a | b]) disappears into
GEMMs that read and write those tensors anyway. Dtypes: every GEMM input in the compute dtype (the autocast dtype
under autocast, as ``F.linear`` would cast), fp32 accumulation, outputs in the compute dtype. An fp32 compute dtype on
a GPU keeps cuBLAS's GEMMs with the fused ``swiglu`` kernel between them (the Triton GEMMs are for half inputs; the
interpreter runs them in fp32 too, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import OpSpec, register_op, resolve_backend, tensor_bytes
from ._gemm_epilogue import cublas_fp32, gemm_operands, op_arg
from ._swiglu_mlp_kernels import gemm_gate_bwd, gemm_gate_fwd
from .swiglu import swiglu, swiglu_ref

__all__ = ["swiglu_mlp", "swiglu_mlp_ref"]

_OP = "swiglu_mlp"


# ----------------------------------------------------------------------------------------------------------------
# Launchers (x (M, D) rows; the Triton kernels are in _swiglu_mlp_kernels)
# ----------------------------------------------------------------------------------------------------------------


def _fwd(x: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor | None, w3: torch.Tensor):
    ab, h = gemm_gate_fwd(x, w12, b12)  # (M, 2H), (M, H)
    y = torch.mm(h, w3.t())  # (M, D)
    return y, ab, h


def _bwd(dy, x, w12, w3, ab, h, need_x: bool, need_w12: bool, need_b12: bool, need_w3: bool):
    dy = dy.to(x.dtype)
    dw3 = torch.mm(dy.t(), h) if need_w3 else x.new_empty(0)  # (D, H)
    dx, dw12, db12 = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: custom-op outputs must not alias
    if need_x or need_w12 or need_b12:
        dab, dbias = gemm_gate_bwd(dy, w3, ab, with_bias=need_b12)  # (M, 2H), (2H,) fp32
        dx = torch.mm(dab, w12) if need_x else dx  # (M, D)
        dw12 = torch.mm(dab.t(), x) if need_w12 else dw12  # (2H, D)
        db12 = dbias.to(x.dtype) if dbias is not None else db12  # b12 has the compute dtype (swiglu_mlp casts)
    return dx, dw12, db12, dw3


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::swiglu_mlp", mutates_args=())
def _swiglu_mlp_op(
    x: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor | None, w3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y (M, D), [a | b] (M, 2H), h (M, H))``; the last two are saved for backward."""
    return _fwd(x, w12, b12, w3)


@_swiglu_mlp_op.register_fake
def _(x, w12, b12, w3):
    M, H = x.shape[0], w12.shape[0] // 2
    return x.new_empty((M, w3.shape[0])), x.new_empty((M, 2 * H)), x.new_empty((M, H))


@torch.library.custom_op("pae_fast::swiglu_mlp_backward", mutates_args=())
def _swiglu_mlp_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w12: torch.Tensor,
    w3: torch.Tensor,
    ab: torch.Tensor,
    h: torch.Tensor,
    need_x: bool,
    need_w12: bool,
    need_b12: bool,
    need_w3: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw12, db12, dw3)``, each empty when not needed (db12 in x's dtype: the bias was cast with x)."""
    return _bwd(dy, x, w12, w3, ab, h, need_x, need_w12, need_b12, need_w3)


@_swiglu_mlp_backward_op.register_fake
def _(dy, x, w12, w3, ab, h, need_x, need_w12, need_b12, need_w3):
    def like(shape, need):
        return x.new_empty(shape if need else (0,))

    return like(x.shape, need_x), like(w12.shape, need_w12), like(w12.shape[:1], need_b12), like(w3.shape, need_w3)


def _setup_context(ctx, inputs, output):
    x, w12, b12, w3 = inputs
    _, ab, h = output
    ctx.mark_non_differentiable(ab, h)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved [a | b] and h
    ctx.save_for_backward(x, w12, b12, w3, ab, h)


def _backward(ctx, dy, _dab, _dh):
    x, w12, b12, w3, ab, h = ctx.saved_tensors
    if dy is None:  # y unused downstream (gradients are not materialised)
        return None, None, None, None
    need_x, need_w12, need_b12, need_w3 = ctx.needs_input_grad
    need_b12 = need_b12 and b12 is not None
    dx, dw12, db12, dw3 = _swiglu_mlp_backward_op(dy, x, w12, w3, ab, h, need_x, need_w12, need_b12, need_w3)
    return dx if need_x else None, dw12 if need_w12 else None, db12 if need_b12 else None, dw3 if need_w3 else None


_swiglu_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor | None, w3: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have shape (..., D), got a scalar")
    D = x.shape[-1]
    if w12.dim() != 2 or w12.shape[1] != D or w12.shape[0] % 2:
        raise ValueError(f"{_OP}: w12 must be (2H, D={D}) (the packed rows [w1 | w2]), got {tuple(w12.shape)}")
    H = w12.shape[0] // 2
    if tuple(w3.shape) != (D, H):
        raise ValueError(f"{_OP}: w3 must be (D, H) = ({D}, {H}) for w12 {tuple(w12.shape)}, got {tuple(w3.shape)}")
    if b12 is not None and tuple(b12.shape) != (2 * H,):
        raise ValueError(f"{_OP}: b12 must be ({2 * H},) (the bias of w12) or None, got {tuple(b12.shape)}")
    for name, t in (("w12", w12), ("b12", b12), ("w3", w3)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}")


def swiglu_mlp(
    x: torch.Tensor,
    w12: torch.Tensor,
    b12: torch.Tensor | None,
    w3: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """SwiGLU MLP without its last bias, ``(silu(a) * b) @ w3^T`` with ``[a | b] = x @ w12^T + b12``.

    Args:
        x: ``(..., D)`` input rows (any leading shape).
        w12: ``(2H, D)`` packed weight ``[w1 | w2]`` (the gate ``a`` from rows ``:H``, the value ``b`` from ``H:``).
        b12: ``(2H,)`` bias of ``w12``, or None.
        w3: ``(D, H)`` weight of the output projection (its bias is NOT applied: add it, or fold it downstream).
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        ``(..., D)`` in the compute dtype: the autocast dtype when autocast is on for x's device (inputs are cast as
        ``F.linear`` would), else ``x.dtype`` (then all inputs must share it). Gradients for x, w12, b12 and w3.
    """
    _check(x, w12, b12, w3)
    if resolve_backend(backend, x) == "torch":
        return swiglu_mlp_ref(x, w12, b12, w3)
    if cublas_fp32(x):  # fp32 GEMMs stay on cuBLAS; only the gate is fused (the swiglu kernel between the GEMMs)
        return F.linear(swiglu(F.linear(x, w12), bias=b12, backend="triton"), w3)
    # every GEMM input in the compute dtype (under autocast the autocast dtype, as F.linear would cast them)
    x, w12, b12, w3 = gemm_operands(_OP, ("x", "w12", "b12", "w3"), x, w12, b12, w3)
    D = x.shape[-1]
    y, _, _ = _swiglu_mlp_op(x.reshape(-1, D), w12, b12, w3)
    return y.view(*x.shape[:-1], D)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def swiglu_mlp_ref(x: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor | None, w3: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`swiglu_mlp`: ``F.linear -> swiglu -> F.linear`` (the gate in fp32 for half)."""
    _check(x, w12, b12, w3)
    return F.linear(swiglu_ref(F.linear(x, w12, b12)), w3)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: GEMM FLOPs, traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _flops(args: tuple, kwargs: dict, backward: bool) -> int:
    """GEMM FLOPs (2 per multiply-accumulate) of the public call, or of the custom ops' schema-bound arguments (the
    backward op's ``need_*`` flags drop the GEMMs it skips). Forward: ``x w12^T`` (4MDH) + ``h w3^T`` (2MDH); backward:
    ``dy^T h`` and ``dy w3`` (2MDH each), ``d[a|b] w12`` and ``d[a|b]^T x`` (4MDH each) = 2 x forward. The same FLOPs
    the unfused ``F.linear`` chain's GEMMs count."""
    x, w3 = op_arg(args, kwargs, 0, "x"), op_arg(args, kwargs, 3, "w3")
    D, H = int(w3.shape[0]), int(w3.shape[1])
    M = x.numel() // max(D, 1)
    unit = 2 * M * D * H
    total = 3 * unit
    if backward:
        need = {k: bool(kwargs.get(f"need_{k}", True)) for k in ("x", "w12", "b12", "w3")}
        total += unit * (need["w3"] + (need["x"] or need["w12"] or need["b12"])) + 2 * unit * (need["x"] + need["w12"])
    return total


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    x, w12, b12, w3 = (op_arg(args, kwargs, i, n) for i, n in enumerate(("x", "w12", "b12", "w3")))
    D, H = int(w3.shape[0]), int(w3.shape[1])
    M = x.numel() // max(D, 1)
    e = x.element_size()
    weights = tensor_bytes(w12, b12, w3)
    # forward: read x and the weights; write y, [a | b] and h (both saved for backward)
    fwd = tensor_bytes(x) + weights + e * (M * D + 3 * M * H)
    # backward: read dy, x, w12, w3, [a | b], h; write dx and the weight / bias gradients
    bwd = e * M * D + tensor_bytes(x) + tensor_bytes(w12, w3) + e * 3 * M * H + tensor_bytes(x) + weights
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(True)

    def case(lead, D, H, bias=True, label=""):
        # weights at 1/sqrt(fan_in) (as trained models): outputs of order 1 in every dtype
        args = (rnd(*lead, D), rnd(2 * H, D, scale=D**-0.5), rnd(2 * H, scale=0.5) if bias else None,
                rnd(D, H, scale=H**-0.5))  # fmt: skip
        return f"x {tuple(lead) + (D,)} H {H}{' + b12' if bias else ''}{label}", args, {}

    if size == "model":
        return [
            case((32, 256), 1152, 3072, label=" (LightningDiT-XL/1 MLP, batch 32)"),
            case((32, 256), 1152, 3072, bias=False),
            case((4, 256), 2048, 5461, label=" (DiT^DH head MLP, batch 4)"),
        ]
    out = [case((2, 19), 40, 24), case((2, 19), 40, 40, bias=False), case((3,), 40, 24, label=" (3 rows)")]
    x = rnd(19, 2, 40)  # a transposed view: strided rows
    out.append(("non-contiguous x (2, 19, 40) H 24", (x.transpose(0, 1), *case((1,), 40, 24)[1][1:]), {}))
    return out


register_op(
    OpSpec(
        name=_OP,
        fn=swiglu_mlp,
        ref=swiglu_mlp_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        flops=_flops,
        atol_rms=True,  # the weight gradients are sums over all M rows of the rounded d[a | b] (and h)
        description="SwiGLU MLP (silu(a) * b) @ w3^T with the gate in the epilogues of Triton GEMMs (no w3 bias)",
        tolerances={
            torch.float64: (1e-10, 1e-10),
            torch.float32: (2e-5, 2e-5),
            # half: rounding d[a | b] and h to the compute dtype (as the unfused chain does) dominates the weight
            # gradients' error; atol is relative to each tensor's RMS (atol_rms)
            torch.float16: (1e-2, 1e-2),
            torch.bfloat16: (6e-2, 6e-2),
        },
    )
)
