"""qkv_norm_rope: :func:`qk_norm_rope` on the packed ``qkv`` projection and its bias, with a packed gradient.

The attention of every LightningDiT / DiT^DH block splits one ``(B, N, 3·H·hd)`` projection into heads::

    qkv = x W^T                                                      # the Linear WITHOUT its bias b = (b_q | b_k | b_v)
    q, k, v = (qkv + b).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4) # (B, H, N, hd) each
    q', k' = qk_norm_rope(q, k, cos, sin, ...)

Unfused, autograd assembles ``d qkv`` from ``dq, dk, dv`` with a ``stack`` and a layout ``clone`` and the Linear's
backward reduces ``db = sum_(b, n) d qkv`` in one more full read. Here the forward kernel adds ``b`` while it loads q, k
(and v), and the backward kernel, which reads dq', dk', dv anyway, writes dq, dk, dv straight into one packed ``dqkv``
and per-(batch, token-block) fp32 column sums of them, summed into ``db`` (deterministic, no atomics; the backward
recomputes the rms from ``qkv + b``). ``q', k'`` (and ``v + b_v``) are written token-major (``(B, N, H, hd)`` memory):
attention's output then follows q's layout and ``o.transpose(1, 2).reshape(B, N, D)`` is a view, not a copy.

``v``: a custom op cannot return a view of its input, so the two custom ops are joined by an ``autograd.Function``.
Without a bias it returns ``v`` as a strided view of ``qkv`` (``(B, H, N, hd)``, unit head_dim stride, the layout of
the plain views every attention backend takes): the forward never touches v, and dv still reaches ``dqkv`` in the
backward kernel. With a bias ``v + b_v`` is not a view, and the forward kernel writes it (one read and one write of v,
as the copy it replaces).

Triton kernels: those of :mod:`pae_fast.kernels.qk_norm_rope` (shared via ``_qk_rope_common``).
Reference: ``qkv_norm_rope_ref``.
"""

from __future__ import annotations

import torch

from ._dispatch import OpSpec, register_op, resolve_backend, tensor_bytes
from ._qk_rope_common import qk_bwd as _qk_bwd
from ._qk_rope_common import qk_check as _qk_check
from ._qk_rope_common import qk_fwd as _qk_fwd
from ._qk_rope_common import token_major
from .qk_norm_rope import qk_norm_rope_ref, rope_2d_tables

__all__ = ["qkv_norm_rope", "qkv_norm_rope_ref", "split_heads"]


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``q, k, v`` ``(B, H, N, hd)`` of a packed ``qkv (B, N, 3·H·hd)`` (copied first if its last dim is
    strided)."""
    B, N, D3 = qkv.shape
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    t = qkv.unflatten(-1, (3, num_heads, D3 // (3 * num_heads))).permute(2, 0, 3, 1, 4)
    q, k, v = t.unbind(0)  # unbind, not indexing: its backward is one stack, not three zero-filled scatters
    return q, k, v


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations), joined by an autograd.Function
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::qkv_norm_rope", mutates_args=())
def _qkv_norm_rope_op(
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    normalize: bool,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q', k' and, with a bias, v' = v + bias_v (without one: an empty tensor; the caller views v in qkv)."""
    q, k, v = split_heads(qkv, num_heads)
    qo, ko, vo = _qk_fwd(q, k, cos, sin, q_weight, k_weight, eps, normalize, token_major_out=True, bias=bias,
                         v=v if bias is not None else None)  # fmt: skip
    return qo, ko, vo if vo is not None else qkv.new_empty(0)


@_qkv_norm_rope_op.register_fake
def _(qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize, bias):
    B, N, D3 = qkv.shape
    shape = (B, num_heads, N, D3 // (3 * num_heads))
    vo = token_major(*shape, qkv) if bias is not None else qkv.new_empty(0)
    return token_major(*shape, qkv), token_major(*shape, qkv), vo


@torch.library.custom_op("pae_fast::qkv_norm_rope_backward", mutates_args=())
def _qkv_norm_rope_backward_op(
    dqo: torch.Tensor,
    dko: torch.Tensor,
    dvo: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    normalize: bool,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv, d q_weight, d k_weight, d bias); absent weights / bias get empty tensors."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, 3D), every element written once
    dq, dk, dv = split_heads(dqkv, num_heads)
    q, k, _ = split_heads(qkv, num_heads)
    _, _, dqw, dkw, db = _qk_bwd(dqo, dko, q, k, cos, sin, q_weight, k_weight, eps, normalize, dq=dq, dk=dk,
                                 bias=bias, dvo=dvo, dv=dv)  # fmt: skip
    return dqkv, dqw, dkw, db if db is not None else qkv.new_empty(0)


@_qkv_norm_rope_backward_op.register_fake
def _(dqo, dko, dvo, qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize, bias):
    dqw = q_weight.new_empty(q_weight.shape) if q_weight is not None else qkv.new_empty(0)
    dkw = k_weight.new_empty(k_weight.shape) if k_weight is not None else qkv.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), dqw, dkw, db


class _QkvNormRope(torch.autograd.Function):
    """The two custom ops as one differentiable function whose v output may be a view of its input.

    A custom op cannot return a view of an input, so without a bias the forward op writes only q', k' and this
    function returns v as a view of ``qkv`` (no pass over v); its backward hands dv to the backward op, whose kernel
    writes it into the packed dqkv next to dq, dk (no ``stack`` / scatter of a view's gradient).
    """

    @staticmethod
    def forward(ctx, qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize, bias):
        qo, ko, vo = _qkv_norm_rope_op(qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize, bias)
        if bias is None:
            vo = split_heads(qkv, num_heads)[2]  # (B, H, N, hd) view, last dim contiguous
        ctx.save_for_backward(qkv, cos, sin, q_weight, k_weight, bias)
        ctx.num_heads, ctx.eps, ctx.normalize = num_heads, eps, normalize
        return qo, ko, vo

    @staticmethod
    def backward(ctx, dqo, dko, dvo):
        qkv, cos, sin, q_weight, k_weight, bias = ctx.saved_tensors
        dqkv, dqw, dkw, db = _qkv_norm_rope_backward_op(
            dqo, dko, dvo, qkv, ctx.num_heads, cos, sin, q_weight, k_weight, ctx.eps, ctx.normalize, bias
        )
        need = ctx.needs_input_grad
        return (
            dqkv if need[0] else None,
            None,  # num_heads
            None,  # cos, sin: constant tables
            None,
            dqw if q_weight is not None and need[4] else None,
            dkw if k_weight is not None and need[5] else None,
            None,  # eps, normalize
            None,
            db if bias is not None and need[8] else None,
        )


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def qkv_norm_rope(
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a packed qkv projection (+ its bias) into heads, RMSNorm q and k over head_dim (optional weights),
    2-D RoPE.

    Args:
        qkv: ``(B, N, 3·H·hd)``, the packed ``qkv`` projection WITHOUT its bias (q | k | v, heads inside).
        num_heads: ``H``.
        cos, sin: ``(N, hd)`` rotation tables (:func:`rope_2d_tables`).
        q_weight, k_weight, eps, normalize, backend: as :func:`~pae_fast.kernels.qk_norm_rope`.
        bias: ``(3·H·hd,)`` bias of the projection, added before the norm (None: no bias).

    Returns:
        ``(q', k', v)``, each ``(B, H, N, hd)`` in qkv's dtype. Triton path: q', k' token-major (``(B, N, H, hd)``
        memory); ``v`` is a view of ``qkv`` without a bias, a token-major ``v + bias_v`` with one.
    """
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv_norm_rope: qkv must be (B, N, 3 * num_heads * head_dim); got shape {tuple(qkv.shape)} "
            f"with num_heads={num_heads}"
        )
    if bias is not None and (bias.shape != qkv.shape[-1:] or bias.device != qkv.device or not bias.is_floating_point()):
        raise ValueError(
            f"qkv_norm_rope: bias must be a floating ({qkv.shape[-1]},) tensor on {qkv.device} (the qkv Linear's "
            f"bias), got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    q, k, _ = split_heads(qkv, num_heads)
    _qk_check(q, k, cos, sin, q_weight, k_weight, normalize)
    if resolve_backend(backend, qkv) == "torch":
        return qkv_norm_rope_ref(qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize, bias)
    return _QkvNormRope.apply(qkv, int(num_heads), cos, sin, q_weight, k_weight, float(eps), bool(normalize), bias)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def qkv_norm_rope_ref(
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`qkv_norm_rope`: add the bias, split into head views, :func:`qk_norm_rope_ref`."""
    if bias is not None:
        qkv = qkv + bias.to(qkv.dtype)
    q, k, v = split_heads(qkv, num_heads)
    qo, ko = qk_norm_rope_ref(q, k, cos, sin, q_weight, k_weight, eps, normalize)
    return qo, ko, v


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    names = ("qkv", "num_heads", "cos", "sin", "q_weight", "k_weight", "eps", "normalize", "bias")
    v = {n: kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)}
    qkv = tensor_bytes(v["qkv"])
    bias = tensor_bytes(v["bias"])
    extra = tensor_bytes(v["cos"], v["sin"], v["q_weight"], v["k_weight"])
    # with a bias: read qkv and the bias, write q', k', v + bias_v; without: read and write the q, k thirds (v: view)
    fwd = (2 * qkv + bias if v["bias"] is not None else 4 * qkv // 3) + extra
    # read dq', dk', dv', the q, k thirds of qkv (and the bias); write dqkv, the weight and bias gradients
    bwd = qkv + 2 * qkv // 3 + qkv + extra + tensor_bytes(v["q_weight"], v["k_weight"]) + 2 * bias
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype).requires_grad_()

    def tables(h, w, hd):
        return rope_2d_tables(h, w, hd, device=device, dtype=torch.float32)

    out = []
    if size == "model":
        for hd in (72, 128):  # LightningDiT-XL trunk / DiT^DH head; the models' qkv Linear has a bias
            H = 1152 // hd if hd == 72 else 16
            w = {"q_weight": rnd(hd, scale=0.1, offset=1.0), "k_weight": rnd(hd, scale=0.1, offset=1.0),
                 "bias": rnd(3 * H * hd, scale=0.1)}  # fmt: skip
            out.append((f"(32,256,3x{H}x{hd})+w+bias", (rnd(32, 256, 3 * H * hd), H, *tables(16, 16, hd)), w))
        return out
    w72 = {"q_weight": rnd(72, scale=0.1, offset=1.0), "k_weight": rnd(72, scale=0.1, offset=1.0)}
    out.append(("(2,17,3x3x72)+w+bias", (rnd(2, 17, 3 * 3 * 72), 3, *tables(1, 17, 72)), {**w72, "bias": rnd(648)}))
    out.append(("(2,17,3x3x72)+w", (rnd(2, 17, 3 * 3 * 72), 3, *tables(1, 17, 72)), w72))
    out.append(("(1,16,3x2x128) no weight", (rnd(1, 16, 3 * 2 * 128), 2, *tables(4, 4, 128)), {}))
    out.append(("(2,9,3x2x64) rope only+bias", (rnd(2, 9, 3 * 2 * 64), 2, *tables(3, 3, 64)),
                {"normalize": False, "bias": rnd(384)}))  # fmt: skip
    out.append(("(1,257,3x1x64)+q weight", (rnd(1, 257, 192), 1, *tables(1, 257, 64)), {"q_weight": rnd(64)}))
    return out


register_op(
    OpSpec(
        name="qkv_norm_rope",
        fn=qkv_norm_rope,
        ref=qkv_norm_rope_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="packed qkv (+bias) -> heads, RMSNorm of q, k (+weights), 2-D RoPE; packed dqkv (+dbias) "
        "in backward",
    )
)
