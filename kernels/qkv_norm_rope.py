"""qkv_norm_rope: :func:`qk_norm_rope` on the packed ``qkv`` projection, with a packed gradient.

The attention of every LightningDiT / DiT^DH block splits one ``(B, N, 3·H·hd)`` projection into heads::

    q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)      # views, (B, H, N, hd) each
    q', k' = qk_norm_rope(q, k, cos, sin, ...)

Autograd then assembles ``d qkv`` from ``dq, dk, dv`` with a ``stack`` and a layout ``clone`` (both a full read and
write of the 3 tensors). This op returns ``(q', k', v')`` from the packed input and its backward writes the q/k
gradients straight into one packed ``dqkv`` buffer (the strided-output path of the qk_norm_rope backward kernel) and
``dv`` with one copy, so the split costs ~8 tensor passes per block instead of ~22 (measured by
``benchmarks/roofline.py``). ``q', k', v'`` are written token-major (``(B, N, H, hd)`` memory): attention's output
then follows q's layout and ``o.transpose(1, 2).reshape(B, N, D)`` is a view, not a copy; ``v'`` is a copy of the v
third (a custom op cannot return a view of its input).

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
# torch.library custom ops (one op each way, with fake implementations and autograd)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = split_heads(qkv, num_heads)
    qo, ko = _qk_fwd(q, k, cos, sin, q_weight, k_weight, eps, normalize, token_major_out=True)
    vo = token_major(*v.shape, v)
    vo.copy_(v)
    return qo, ko, vo


@_qkv_norm_rope_op.register_fake
def _(qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize):
    B, N, D3 = qkv.shape
    shape = (B, num_heads, N, D3 // (3 * num_heads))
    return token_major(*shape, qkv), token_major(*shape, qkv), token_major(*shape, qkv)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, 3D), filled by two kernels + a copy
    dq, dk, dv = split_heads(dqkv, num_heads)
    q, k, _ = split_heads(qkv, num_heads)
    _, _, dqw, dkw = _qk_bwd(dqo, dko, q, k, cos, sin, q_weight, k_weight, eps, normalize, dq=dq, dk=dk)
    dv.copy_(dvo)
    return dqkv, dqw, dkw


@_qkv_norm_rope_backward_op.register_fake
def _(dqo, dko, dvo, qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize):
    dqw = q_weight.new_empty(q_weight.shape) if q_weight is not None else qkv.new_empty(0)
    dkw = k_weight.new_empty(k_weight.shape) if k_weight is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), dqw, dkw


def _setup_context(ctx, inputs, output):
    qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize = inputs
    ctx.save_for_backward(qkv, cos, sin, q_weight, k_weight)
    ctx.num_heads, ctx.eps, ctx.normalize = num_heads, eps, normalize


def _backward(ctx, dqo, dko, dvo):
    qkv, cos, sin, q_weight, k_weight = ctx.saved_tensors
    dqkv, dqw, dkw = _qkv_norm_rope_backward_op(
        dqo, dko, dvo, qkv, ctx.num_heads, cos, sin, q_weight, k_weight, ctx.eps, ctx.normalize
    )
    need = ctx.needs_input_grad
    return (
        dqkv if need[0] else None,
        None,  # num_heads
        None,  # cos, sin: constant tables
        None,
        dqw if q_weight is not None and need[4] else None,
        dkw if k_weight is not None and need[5] else None,
        None,
        None,
    )


_qkv_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a packed qkv projection into heads, RMSNorm q and k over head_dim (optional weights), 2-D RoPE.

    Args:
        qkv: ``(B, N, 3·H·hd)``, the output of the attention's packed ``qkv`` Linear (q | k | v, heads inside).
        num_heads: ``H``.
        cos, sin: ``(N, hd)`` rotation tables (:func:`rope_2d_tables`).
        q_weight, k_weight, eps, normalize, backend: as :func:`~pae_fast.kernels.qk_norm_rope`.

    Returns:
        ``(q', k', v)``, each ``(B, H, N, hd)`` in the input dtype (the Triton path returns contiguous tensors; the
        reference returns ``v`` as a view).
    """
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv_norm_rope: qkv must be (B, N, 3 * num_heads * head_dim); got shape {tuple(qkv.shape)} "
            f"with num_heads={num_heads}"
        )
    q, k, _ = split_heads(qkv, num_heads)
    _qk_check(q, k, cos, sin, q_weight, k_weight, normalize)
    if resolve_backend(backend, qkv) == "torch":
        return qkv_norm_rope_ref(qkv, num_heads, cos, sin, q_weight, k_weight, eps, normalize)
    return _qkv_norm_rope_op(qkv, int(num_heads), cos, sin, q_weight, k_weight, float(eps), bool(normalize))


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`qkv_norm_rope`: split into head views, then :func:`qk_norm_rope_ref`."""
    q, k, v = split_heads(qkv, num_heads)
    qo, ko = qk_norm_rope_ref(q, k, cos, sin, q_weight, k_weight, eps, normalize)
    return qo, ko, v


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    names = ("qkv", "num_heads", "cos", "sin", "q_weight", "k_weight")
    v = {n: kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)}
    qkv = tensor_bytes(v["qkv"])
    extra = tensor_bytes(v["cos"], v["sin"], v["q_weight"], v["k_weight"])
    fwd = 2 * qkv + extra  # read qkv, write q', k', v'
    # read dq', dk', dv' and the q, k thirds of qkv; write dqkv and the weight gradients
    bwd = qkv + 2 * qkv // 3 + qkv + extra + tensor_bytes(v["q_weight"], v["k_weight"])
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype).requires_grad_()

    def tables(h, w, hd):
        return rope_2d_tables(h, w, hd, device=device, dtype=torch.float32)

    out = []
    if size == "model":
        for hd in (72, 128):  # LightningDiT-XL trunk / DiT^DH head
            H = 1152 // hd if hd == 72 else 16
            w = {"q_weight": rnd(hd, scale=0.1, offset=1.0), "k_weight": rnd(hd, scale=0.1, offset=1.0)}
            out.append((f"(32,256,3x{H}x{hd})+w", (rnd(32, 256, 3 * H * hd), H, *tables(16, 16, hd)), w))
        return out
    w72 = {"q_weight": rnd(72, scale=0.1, offset=1.0), "k_weight": rnd(72, scale=0.1, offset=1.0)}
    out.append(("(2,17,3x3x72)+w", (rnd(2, 17, 3 * 3 * 72), 3, *tables(1, 17, 72)), w72))
    out.append(("(1,16,3x2x128) no weight", (rnd(1, 16, 3 * 2 * 128), 2, *tables(4, 4, 128)), {}))
    out.append(("(2,9,3x2x64) rope only", (rnd(2, 9, 3 * 2 * 64), 2, *tables(3, 3, 64)), {"normalize": False}))
    out.append(("(1,257,3x1x64)+q weight", (rnd(1, 257, 192), 1, *tables(1, 257, 64)), {"q_weight": rnd(64)}))
    return out


register_op(
    OpSpec(
        name="qkv_norm_rope",
        fn=qkv_norm_rope,
        ref=qkv_norm_rope_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="packed qkv -> heads, RMSNorm of q, k (+weights), 2-D RoPE; packed dqkv in backward",
    )
)
