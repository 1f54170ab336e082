"""fused_adamw_ema: one AdamW step, the EMA update and the low-precision compute copy of one parameter, in one pass.

Per element, with ``t`` the (already incremented) step, decoupled weight decay as in ``torch.optim.AdamW`` and
``c`` an optional device scalar that scales the gradient (the global-norm clip coefficient, docs/method.md
§ Optimizer and EMA bytes per parameter)::

    g ← c · g                         (c = 1 without clipping)
    p ← p · (1 − lr·wd)
    m ← m + (1 − β1)(g − m);          v ← β2·v + (1 − β2)·g²
    p ← p − lr / (1 − β1^t) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
    ema ← ema + (1 − decay)(p − ema)  (optional)
    copy ← p in the copy's dtype      (optional: the bf16 compute weights, docs/method.md § Cost model)

One kernel reads p, g, m, v, ema once and writes p, m, v, ema and the copy: 36 B per parameter with fp32 state and
a bf16 gradient and copy, against 52 B for torch's fused AdamW + a gradient cast + ``_foreach_copy_`` +
``_foreach_lerp_``. A device flag ``skip`` (non-finite step) turns every store off without a host sync, and the step
count is read on the device (bias corrections in-kernel), as torch's fused AdamW does.

Reference (the spec): ``torch._fused_adamw_`` + ``torch._foreach_lerp_`` + a copy, :func:`fused_adamw_ema_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import OpSpec, interpreter_enabled, register_op, resolve_backend, tensor_bytes

__all__ = ["fused_adamw_ema", "fused_adamw_ema_ref"]

_OP = "fused_adamw_ema"


@triton.jit
def _adamw_ema_kernel(
    P, G, M, V, E, C,  # (n,) param, grad, exp_avg, exp_avg_sq, ema, compute copy (E / C read only with HAS_*)
    STEP,  # () the step count t of this update (already incremented), float
    SKIP,  # () nonzero: store nothing (a skipped, non-finite step)
    GSCALE,  # () fp32 factor applied to the gradient (the clip coefficient; 1.0 = unclipped)
    n,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    ema_weight,  # 1 - decay
    HAS_EMA: tl.constexpr,
    HAS_COPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    skip = tl.zeros((BLOCK,), dtype=tl.float32) + tl.load(SKIP).to(tl.float32)
    mask = offs < n
    wmask = mask & (skip == 0.0)
    t = tl.load(STEP).to(tl.float32)
    bc1 = 1.0 - tl.exp2(t * tl.log2(beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(GSCALE).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - (lr / bc1) * (m / denom)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=wmask)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=wmask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=wmask)
    if HAS_EMA:
        e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(E + offs, (e + ema_weight * (p - e)).to(E.dtype.element_ty), mask=wmask)
    if HAS_COPY:
        tl.store(C + offs, p.to(C.dtype.element_ty), mask=wmask)


@torch.library.custom_op(
    "pae_fast::fused_adamw_ema_", mutates_args=("param", "exp_avg", "exp_avg_sq", "ema", "copy")
)
def _fused_adamw_ema_op(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ema: torch.Tensor | None,
    copy: torch.Tensor | None,
    step: torch.Tensor,
    skip: torch.Tensor,
    grad_scale: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ema_decay: float,
) -> None:
    n = param.numel()
    if n == 0:
        return
    BLOCK = 16384 if interpreter_enabled() else 1024
    _adamw_ema_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, ema if ema is not None else param, copy if copy is not None else param,
        step, skip, grad_scale, n, lr, beta1, beta2, eps, weight_decay, 1.0 - ema_decay,
        HAS_EMA=ema is not None, HAS_COPY=copy is not None, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip


@_fused_adamw_ema_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, ema, copy, step, skip, grad_scale, lr, beta1, beta2, eps, weight_decay,
      ema_decay):
    return None


def _check(param, grad, exp_avg, exp_avg_sq, ema, copy, step, skip, grad_scale) -> None:
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("ema", ema), ("copy", copy)):
        if t is None:
            continue
        if t.shape != param.shape or t.device != param.device:
            raise ValueError(
                f"{_OP}: {name} must have the param's shape {tuple(param.shape)} on {param.device}, "
                f"got {tuple(t.shape)} on {t.device}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be contiguous (the kernel walks flat memory)")
    if not param.is_contiguous():
        raise ValueError(f"{_OP}: param must be contiguous (the kernel walks flat memory)")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("ema", ema)):
        if t is not None and t.dtype != param.dtype:
            raise ValueError(f"{_OP}: {name} must have the param's dtype {param.dtype}, got {t.dtype}")
    for name, t in (("step", step), ("skip", skip), ("grad_scale", grad_scale)):
        if t is not None and (t.numel() != 1 or t.device != param.device):
            raise ValueError(f"{_OP}: {name} must be a one-element tensor on {param.device}")


def fused_adamw_ema(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ema: torch.Tensor | None,
    copy: torch.Tensor | None,
    step: torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    ema_decay: float = 0.9999,
    skip: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """One AdamW + EMA + compute-copy update of one parameter, in place.

    Args:
        param: the fp32 master parameter (any shape, contiguous); updated in place.
        grad: its gradient (fp32, or the bf16 gradient of the compute copy), same shape.
        exp_avg, exp_avg_sq: AdamW moments (param's dtype), updated in place.
        ema: the EMA of ``param`` (or None), updated in place with weight ``1 - ema_decay``.
        copy: the low-precision compute copy of ``param`` (or None), overwritten with the new ``param``.
        step: one-element float tensor, the step count of this update (already incremented), on param's device.
        lr, beta1, beta2, eps, weight_decay: AdamW's (``torch.optim.AdamW`` semantics, decoupled decay).
        ema_decay: EMA decay.
        skip: optional one-element tensor; nonzero leaves everything untouched (no host sync).
        grad_scale: optional one-element fp32 tensor multiplying the gradient before the update (the global-norm
            clip coefficient, read on the device: clipping without a host sync or a second pass over the gradients).
        backend: ``auto | triton | torch``.

    Returns:
        ``(param, exp_avg, exp_avg_sq[, ema][, copy])``: the updated tensors themselves.
    """
    _check(param, grad, exp_avg, exp_avg_sq, ema, copy, step, skip, grad_scale)
    if skip is None:
        skip = torch.zeros((), dtype=torch.float32, device=param.device)
    if resolve_backend(backend, param) == "torch":
        return fused_adamw_ema_ref(param, grad, exp_avg, exp_avg_sq, ema, copy, step, lr, beta1, beta2, eps,
                                   weight_decay, ema_decay, skip, grad_scale)  # fmt: skip
    if grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=param.device)
    _fused_adamw_ema_op(param, grad, exp_avg, exp_avg_sq, ema, copy, step, skip, grad_scale, float(lr),
                        float(beta1), float(beta2), float(eps), float(weight_decay), float(ema_decay))  # fmt: skip
    return tuple(t for t in (param, exp_avg, exp_avg_sq, ema, copy) if t is not None)


def fused_adamw_ema_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ema: torch.Tensor | None,
    copy: torch.Tensor | None,
    step: torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    ema_decay: float = 0.9999,
    skip: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Reference: the gradient times ``grad_scale``, then ``torch._fused_adamw_`` (torch's fused AdamW kernel),
    ``torch._foreach_lerp_`` and a copy."""
    found = None if skip is None else (skip != 0).to(torch.float32).reshape(())  # torch wants an fp32 flag
    g = grad.to(param.dtype)
    if grad_scale is not None:
        g = g * grad_scale.reshape(()).to(param.dtype)
    torch._fused_adamw_(
        [param], [g], [exp_avg], [exp_avg_sq], [], [step.reshape(()).to(param.dtype)],
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
        found_inf=found,
    )  # fmt: skip
    keep = None if found is None else (1.0 - found).to(param.dtype)
    if ema is not None:
        w = (1.0 - ema_decay) if keep is None else keep * (1.0 - ema_decay)
        torch._foreach_lerp_([ema], [param], [w] if torch.is_tensor(w) else w)
    if copy is not None:
        copy.copy_(param if keep is None else torch.where(keep.bool(), param, copy.to(param.dtype)))
    return tuple(t for t in (param, exp_avg, exp_avg_sq, ema, copy) if t is not None)


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "ema", "copy")
    v = {n: kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)}
    state = tensor_bytes(v["param"], v["exp_avg"], v["exp_avg_sq"], v["ema"])
    return 2 * state + tensor_bytes(v["grad"], v["copy"])  # read + write the state, read g, write the copy


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    def case(shape, step, label, ema=True, copy=True, skip=0.0, grad_dt=dtype, wd=0.1, gscale=None):
        p = rnd(*shape)
        args = (p, rnd(*shape, dt=grad_dt), rnd(*shape, scale=0.1), rnd(*shape, scale=0.01).abs(),
                rnd(*shape) if ema else None, torch.zeros(shape, device=device, dtype=half) if copy else None,
                torch.full((), float(step), device=device, dtype=torch.float32))  # fmt: skip
        kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": wd, "ema_decay": 0.99,
              "skip": torch.full((), skip, device=device, dtype=torch.float32)}  # fmt: skip
        if gscale is not None:
            kw["grad_scale"] = torch.full((), gscale, device=device, dtype=torch.float32)
        return label, args, kw

    if size == "model":
        return [case((1152, 4608), 1000, "(1152,4608) LightningDiT-XL qkv weight"),
                case((3072,), 1000, "(3072,) bias")]  # fmt: skip
    return [
        case((33, 17), 1, "(33,17) first step"),
        case((1000,), 7, "(1000,) bf16-style grad + copy", grad_dt=half),
        case((5, 3), 3, "(5,3) no ema, no copy", ema=False, copy=False, wd=0.0),
        case((64,), 2, "(64,) skipped step", skip=1.0),
        case((77, 3), 5, "(77,3) clipped gradient (grad_scale 0.37)", gscale=0.37),
    ]


register_op(
    OpSpec(
        name=_OP,
        fn=fused_adamw_ema,
        ref=fused_adamw_ema_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="AdamW step + EMA lerp + low-precision compute copy of a parameter in one pass (train.optimizer)",
    )
)
