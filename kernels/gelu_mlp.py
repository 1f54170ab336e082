"""gelu_mlp: the ViT MLP ``fc2(gelu(fc1(x)))``, the GELU computed in GEMM epilogues.

    pre = x @ w1^T + b1                (w1 (H, D), b1 (H,) or None)
    h = gelu(pre)                      (M, H); exact (erf) or tanh-approximated GELU (``approximate``, as F.gelu)
    y = h @ w2^T + b2                  (w2 (D, H); b2 (D,) or None: pass None to add it elsewhere)

Forward: one Triton GEMM (``_gelu_mlp_kernels``) computes per ``(BLOCK_M, BLOCK_N)`` tile of the hidden dim the fp32
accumulator, adds b1 and writes ``pre`` (saved for backward; not written when nothing needs a gradient, e.g. a frozen
encoder under ``no_grad``) and ``h`` (computed from the unrounded accumulator); ``y`` is a cuBLAS GEMM with b2 in its
epilogue (``addmm``).

Backward (g = dL/dy; docs/method.md § GELU in GEMM epilogues):
    dW2 = g^T h,  db2 = column sums of g                   (cuBLAS; a column sum)
    dh = g @ w2;  d_pre = dh * gelu'(pre)                  (one Triton GEMM, gelu' in its epilogue)
    db1 = column sums of d_pre                             (per-row-block fp32 partials from the same epilogue)
    dx = d_pre @ w1,   dW1 = d_pre^T x                     (cuBLAS)
The bandwidth-bound GELU pass (read pre, write h; in backward read dh and pre, write d_pre) and the fc1 bias pass
disappear into GEMMs that read and write those tensors anyway. Dtypes: every GEMM input in the compute dtype (the
autocast dtype under autocast, as ``F.linear`` would cast), fp32 accumulation, outputs in the compute dtype. An fp32
compute dtype on a GPU runs the reference (cuBLAS GEMMs with the biases in their epilogues, one aten GELU between):
the Triton GEMMs are for half inputs (IEEE fp32 products run on CUDA cores and spill registers, as ``swiglu_mlp``'s);
the interpreter runs them in fp32 too, for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import OpSpec, register_op, resolve_backend, tensor_bytes
from ._gelu_mlp_kernels import APPROXIMATIONS, gemm_gelu_bwd, gemm_gelu_fwd
from ._gemm_epilogue import cublas_fp32, gemm_operands, op_arg

__all__ = ["gelu_mlp", "gelu_mlp_ref"]

_OP = "gelu_mlp"


# ----------------------------------------------------------------------------------------------------------------
# Launchers (x (M, D) rows; the Triton kernels are in _gelu_mlp_kernels)
# ----------------------------------------------------------------------------------------------------------------


def _fwd(x, w1, b1, w2, b2, approximate: str, save: bool):
    pre, h = gemm_gelu_fwd(x, w1, b1, approximate, save_pre=save)  # (M, H) or None, (M, H)
    y = torch.addmm(b2, h, w2.t()) if b2 is not None else torch.mm(h, w2.t())  # (M, D)
    if not save:  # nothing will be differentiated: no saved tensors (outputs must not alias, so fresh empties)
        return y, x.new_empty(0), x.new_empty(0)
    return y, pre, h


def _bwd(dy, x, w1, w2, pre, h, approximate: str, need_x, need_w1, need_b1, need_w2, need_b2):
    dy = dy.to(x.dtype)
    dx, dw1, db1 = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: custom-op outputs must not alias
    dw2 = torch.mm(dy.t(), h) if need_w2 else x.new_empty(0)  # (D, H)
    db2 = dy.sum(0, dtype=torch.float32).to(x.dtype) if need_b2 else x.new_empty(0)  # (D,)
    if need_x or need_w1 or need_b1:
        dpre, dbias = gemm_gelu_bwd(dy, w2, pre, approximate, with_bias=need_b1)  # (M, H), (H,) fp32
        dx = torch.mm(dpre, w1) if need_x else dx  # (M, D)
        dw1 = torch.mm(dpre.t(), x) if need_w1 else dw1  # (H, D)
        db1 = dbias.to(x.dtype) if dbias is not None else db1  # b1 has the compute dtype (gelu_mlp casts)
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::gelu_mlp", mutates_args=())
def _gelu_mlp_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    approximate: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y (M, D), pre (M, H), h (M, H))``; the last two are saved for backward (empty without ``save``)."""
    return _fwd(x, w1, b1, w2, b2, approximate, save)


@_gelu_mlp_op.register_fake
def _(x, w1, b1, w2, b2, approximate, save):
    M, H = x.shape[0], w1.shape[0]
    saved = (M, H) if save else (0,)
    return x.new_empty((M, w2.shape[0])), x.new_empty(saved), x.new_empty(saved)


@torch.library.custom_op("pae_fast::gelu_mlp_backward", mutates_args=())
def _gelu_mlp_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    pre: torch.Tensor,
    h: torch.Tensor,
    approximate: str,
    need_x: bool,
    need_w1: bool,
    need_b1: bool,
    need_w2: bool,
    need_b2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw1, db1, dw2, db2)``, each empty when not needed (biases' gradients in x's dtype: they were cast)."""
    return _bwd(dy, x, w1, w2, pre, h, approximate, need_x, need_w1, need_b1, need_w2, need_b2)


@_gelu_mlp_backward_op.register_fake
def _(dy, x, w1, w2, pre, h, approximate, need_x, need_w1, need_b1, need_w2, need_b2):
    def like(shape, need):
        return x.new_empty(shape if need else (0,))

    return (like(x.shape, need_x), like(w1.shape, need_w1), like(w1.shape[:1], need_b1), like(w2.shape, need_w2),
            like(w2.shape[:1], need_b2))  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate, save = inputs
    _, pre, h = output
    ctx.mark_non_differentiable(pre, h)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved pre and h
    ctx.approximate, ctx.saved_pre = approximate, save
    ctx.save_for_backward(x, w1, b1, w2, b2, pre, h)


def _backward(ctx, dy, _dpre, _dh):
    x, w1, b1, w2, b2, pre, h = ctx.saved_tensors
    if dy is None:  # y unused downstream (gradients are not materialised)
        return None, None, None, None, None, None, None
    if not ctx.saved_pre:
        raise RuntimeError(f"{_OP}: backward through a call made with save=False (nothing was saved for it)")
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    need_b1, need_b2 = need_b1 and b1 is not None, need_b2 and b2 is not None
    grads = _gelu_mlp_backward_op(dy, x, w1, w2, pre, h, ctx.approximate, need_x, need_w1, need_b1, need_w2, need_b2)
    needs = (need_x, need_w1, need_b1, need_w2, need_b2)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None)


_gelu_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check(x, w1, b1, w2, b2, approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{_OP}: approximate must be one of {', '.join(APPROXIMATIONS)} (as F.gelu), got "
                         f"{approximate!r}")  # fmt: skip
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have shape (..., D), got a scalar")
    D = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != D:
        raise ValueError(f"{_OP}: w1 must be (H, D={D}) (fc1's weight), got {tuple(w1.shape)}")
    H = w1.shape[0]
    if tuple(w2.shape) != (D, H):
        raise ValueError(f"{_OP}: w2 must be (D, H) = ({D}, {H}) for w1 {tuple(w1.shape)}, got {tuple(w2.shape)}")
    if b1 is not None and tuple(b1.shape) != (H,):
        raise ValueError(f"{_OP}: b1 must be ({H},) (fc1's bias) or None, got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (D,):
        raise ValueError(f"{_OP}: b2 must be ({D},) (fc2's bias) or None, got {tuple(b2.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}")


def gelu_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None = None,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """GELU MLP ``gelu(x @ w1^T + b1) @ w2^T + b2`` with the GELU in the epilogues of Triton GEMMs.

    Args:
        x: ``(..., D)`` input rows (any leading shape).
        w1: ``(H, D)`` fc1 weight.
        b1: ``(H,)`` fc1 bias, or None.
        w2: ``(D, H)`` fc2 weight.
        b2: ``(D,)`` fc2 bias, or None (the caller adds it, or folds it into the next fused op).
        approximate: ``"none"`` (exact erf GELU: ViT decoder, DINOv2, DINO) or ``"tanh"`` (SigLIP, DiT), as F.gelu.
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        ``(..., D)`` in the compute dtype: the autocast dtype when autocast is on for x's device (inputs are cast as
        ``F.linear`` would), else ``x.dtype`` (then all inputs must share it). Gradients for every tensor input.
    """
    _check(x, w1, b1, w2, b2, approximate)
    if resolve_backend(backend, x) == "torch":
        return gelu_mlp_ref(x, w1, b1, w2, b2, approximate)
    if cublas_fp32(x):  # fp32 GEMMs stay on cuBLAS (the biases in its epilogues), one aten GELU pass between them
        return gelu_mlp_ref(x, w1, b1, w2, b2, approximate)
    x, w1, b1, w2, b2 = gemm_operands(_OP, ("x", "w1", "b1", "w2", "b2"), x, w1, b1, w2, b2)
    # the pre-activation is written only when a gradient will be taken (not for a frozen encoder under no_grad)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    D = x.shape[-1]
    y, _, _ = _gelu_mlp_op(x.reshape(-1, D), w1, b1, w2, b2, approximate, save)
    return y.view(*x.shape[:-1], D)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def gelu_mlp_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None = None,
    approximate: str = "none",
) -> torch.Tensor:
    """PyTorch reference of :func:`gelu_mlp`: ``F.linear -> F.gelu -> F.linear`` (timm's ``Mlp`` without dropout)."""
    _check(x, w1, b1, w2, b2, approximate)
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: GEMM FLOPs, traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _flops(args: tuple, kwargs: dict, backward: bool) -> int:
    """GEMM FLOPs (2 per multiply-accumulate) of the public call, or of the custom ops' schema-bound arguments (the
    backward op's ``need_*`` flags drop the GEMMs it skips). Forward: ``x w1^T`` and ``h w2^T`` (2MDH each);
    backward: ``dy^T h``, ``dy w2``, ``d_pre w1`` and ``d_pre^T x`` (2MDH each) = 2 x forward. The same FLOPs the
    unfused ``F.linear`` chain's GEMMs count (bias adds and column sums are not GEMM FLOPs)."""
    x, w2 = op_arg(args, kwargs, 0, "x"), op_arg(args, kwargs, 3, "w2")
    D, H = int(w2.shape[0]), int(w2.shape[1])
    M = x.numel() // max(D, 1)
    unit = 2 * M * D * H
    total = 2 * unit
    if backward:
        need = {k: bool(kwargs.get(f"need_{k}", True)) for k in ("x", "w1", "b1", "w2")}
        total += unit * (need["w2"] + (need["x"] or need["w1"] or need["b1"]) + need["x"] + need["w1"])
    return total


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    x, w1, b1, w2, b2 = (op_arg(args, kwargs, i, n) for i, n in enumerate(("x", "w1", "b1", "w2", "b2")))
    D, H = int(w2.shape[0]), int(w2.shape[1])
    M = x.numel() // max(D, 1)
    e = x.element_size()
    weights = tensor_bytes(w1, b1, w2, b2)
    if not kwargs.get("save", True):  # the forward op called with nothing to differentiate: y only, no backward
        return tensor_bytes(x) + weights + e * M * D
    # forward: read x and the weights; write y, pre and h (both saved for backward)
    fwd = tensor_bytes(x) + weights + e * (M * D + 2 * M * H)
    # backward: read dy, x, w1, w2, pre, h; write dx and the weight / bias gradients
    bwd = e * M * D + tensor_bytes(x) + tensor_bytes(w1, w2) + e * 2 * M * H + tensor_bytes(x) + weights
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(True)

    def case(lead, D, H, b1=True, b2=True, approximate="none", label=""):
        # weights at 1/sqrt(fan_in) (as trained models): outputs of order 1 in every dtype
        args = (rnd(*lead, D), rnd(H, D, scale=D**-0.5), rnd(H, scale=0.5) if b1 else None, rnd(D, H, scale=H**-0.5),
                rnd(D, scale=0.5) if b2 else None)  # fmt: skip
        bias = "".join(n for n, on in ((" + b1", b1), (" + b2", b2)) if on)
        return f"x {tuple(lead) + (D,)} H {H}{bias} {approximate}{label}", args, {"approximate": approximate}

    if size == "model":
        return [
            case((32, 257), 1024, 4096, label=" (ViT-L decoder MLP, batch 32)"),
            case((32, 261), 1024, 4096, b2=False, label=" (DINOv2-L MLP, batch 32, fc2 bias outside)"),
            case((32, 256), 768, 3072, approximate="tanh", label=" (SigLIP2-B MLP, batch 32)"),
        ]
    out = [case((2, 19), 40, 24), case((2, 19), 40, 40, b1=False, b2=False, approximate="tanh"),
           case((3,), 40, 24, b2=False, label=" (3 rows)")]  # fmt: skip
    x = rnd(19, 2, 40)  # a transposed view: strided rows
    out.append(("non-contiguous x (2, 19, 40) H 24 tanh", (x.transpose(0, 1), *case((1,), 40, 24)[1][1:]),
                {"approximate": "tanh"}))  # fmt: skip
    return out


register_op(
    OpSpec(
        name=_OP,
        fn=gelu_mlp,
        ref=gelu_mlp_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        flops=_flops,
        atol_rms=True,  # the weight gradients are sums over all M rows of the rounded d_pre (and h)
        description="GELU MLP gelu(x w1^T + b1) w2^T + b2 with the GELU in the epilogues of Triton GEMMs",
        tolerances={
            torch.float64: (1e-10, 1e-10),
            torch.float32: (2e-5, 2e-5),
            # half: rounding d_pre and h to the compute dtype (as the unfused chain does) dominates the weight
            # gradients' error; atol is relative to each tensor's RMS (atol_rms)
            torch.float16: (1e-2, 1e-2),
            torch.bfloat16: (6e-2, 6e-2),
        },
    )
)
