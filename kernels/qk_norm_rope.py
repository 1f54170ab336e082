"""qk_norm_rope: RMSNorm over head_dim of q and k (optional weights) then 2-D axial RoPE, in one pass.

    x̂ = x / sqrt(mean_d x_d^2 + eps) * w                   (skipped with normalize=False)
    out = x̂ * cos + rot(x̂) * sin,   rot(x)_(2i, 2i+1) = (-x_(2i+1), x_(2i))

The rotation is the interleaved-pair form of EVA-02's ``VisionRotaryEmbeddingFast`` (``rotate_half`` stacks
``(-x2, x1)`` over adjacent pairs), which LightningDiT applies to q and k after its optional qk RMSNorm, built with
``dim = head_dim // 2`` so each spatial axis rotates half of head_dim (EVA-02 ``rope.py``; LightningDiT
``models/lightningdit.py`` / ``models/pos_embed.py``). :func:`rope_2d_tables` builds that layout.

Backward (g = dL/dout; R = rot is linear with R^T = -R):
    dx̂ = g * cos - rot(g * sin),   i.e. dx̂_2i = g_2i c_2i + g_2i+1 s_2i+1,  dx̂_2i+1 = g_2i+1 c_2i+1 - g_2i s_2i
    dw = sum_rows dx̂ * xn,   dxn = dx̂ * w,   dx = r * (dxn - xn * mean_d(dxn * xn))   (xn = x * r, r = 1/rms)

The kernels read q and k through their (batch, head, token) strides, so the views of a packed projection
``qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)`` are consumed in place (no ``.contiguous()`` copy); outputs
are contiguous ``(B, H, N, hd)``, the layout SDPA prefers. The rms is recomputed in backward (x is read anyway).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import OpSpec, register_op, resolve_backend, tensor_bytes
from ._qk_rope_common import qk_bwd, qk_check, qk_fwd

__all__ = ["qk_norm_rope", "qk_norm_rope_ref", "rope_2d_tables"]


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_fwd(q, k, cos, sin, q_weight, k_weight, eps, normalize)[:2]


@_qk_norm_rope_op.register_fake
def _(q, k, cos, sin, q_weight, k_weight, eps, normalize):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("pae_fast::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(
    dqo: torch.Tensor,
    dko: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_bwd(dqo, dko, q, k, cos, sin, q_weight, k_weight, eps, normalize)[:4]


@_qk_norm_rope_backward_op.register_fake
def _(dqo, dko, q, k, cos, sin, q_weight, k_weight, eps, normalize):
    dqw = q_weight.new_empty(q_weight.shape) if q_weight is not None else q.new_empty(0)
    dkw = k_weight.new_empty(k_weight.shape) if k_weight is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), dqw, dkw


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, q_weight, k_weight, eps, normalize = inputs
    ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight)
    ctx.eps, ctx.normalize = eps, normalize


def _backward(ctx, dqo, dko):
    q, k, cos, sin, q_weight, k_weight = ctx.saved_tensors
    dq, dk, dqw, dkw = _qk_norm_rope_backward_op(dqo, dko, q, k, cos, sin, q_weight, k_weight, ctx.eps, ctx.normalize)
    need = ctx.needs_input_grad
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        None,  # cos, sin: constant tables
        None,
        dqw if q_weight is not None and need[4] else None,
        dkw if k_weight is not None and need[5] else None,
        None,
        None,
    )


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k over head_dim (optional weights) then interleaved-pair 2-D RoPE, in one pass.

    Args:
        q, k: ``(B, H, N, hd)``; any batch/head/token strides (e.g. views of a packed qkv projection), hd even.
        cos, sin: ``(N, hd)`` rotation tables (see :func:`rope_2d_tables`); constants, no gradient.
        q_weight, k_weight: optional ``(hd,)`` RMSNorm weights (differentiable).
        eps: added to the mean square.
        normalize: False applies only RoPE (LightningDiT without qk-norm); the weights must then be None.
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        ``(q', k')``, each ``(B, H, N, hd)`` contiguous in the input dtype (statistics in fp32).
    """
    qk_check(q, k, cos, sin, q_weight, k_weight, normalize)
    if resolve_backend(backend, q) == "torch":
        return qk_norm_rope_ref(q, k, cos, sin, q_weight, k_weight, eps, normalize)
    return _qk_norm_rope_op(q, k, cos, sin, q_weight, k_weight, float(eps), bool(normalize))


def rope_2d_tables(
    h: int,
    w: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(h * w, head_dim)`` of 2-D axial RoPE in the EVA-02 / LightningDiT layout.

    Tokens are row-major (token ``i * w + j`` sits at row i, column j). The first half of head_dim rotates by the
    row index, the second half by the column index; each half has ``head_dim / 4`` frequencies
    ``theta^(-2i / (head_dim / 2))`` repeated interleaved, so the members of a pair ``(2i, 2i+1)`` share an angle.

    Args:
        h, w: token grid height and width.
        head_dim: divisible by 4 (two axes, pairs within each).
        theta: RoPE base.

    Returns:
        ``(cos, sin)``, each ``(h * w, head_dim)`` in ``dtype`` (angles computed in fp64).
    """
    if head_dim % 4:
        raise ValueError(f"rope_2d_tables: head_dim must be divisible by 4 (2 axes x pairs), got {head_dim}")
    if h < 1 or w < 1:
        raise ValueError(f"rope_2d_tables: grid must be at least 1x1, got h={h}, w={w}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (hd/4,)
    freqs = freqs.repeat_interleave(2)  # (hd/2,): pair members share a frequency
    rows = torch.arange(h, dtype=torch.float64)[:, None, None] * freqs  # (h, 1, hd/2)
    cols = torch.arange(w, dtype=torch.float64)[None, :, None] * freqs  # (1, w, hd/2)
    ang = torch.cat([rows.expand(h, w, half), cols.expand(h, w, half)], dim=-1).reshape(h * w, head_dim)
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """rot(x): each adjacent pair ``(x0, x1)`` -> ``(-x1, x0)``."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x1, x0), dim=-1).flatten(-2)


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`qk_norm_rope` (fp32 math for half inputs; fp64 stays fp64)."""
    N, D = q.shape[-2], q.shape[-1]

    def one(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if normalize:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
            if w is not None:
                y = y * w.to(y.dtype)
        c, s = cos.reshape(N, D).to(y.dtype), sin.reshape(N, D).to(y.dtype)
        return (y * c + _rotate_pairs(y) * s).to(x.dtype)

    return one(q, q_weight), one(k, k_weight)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    names = ("q", "k", "cos", "sin", "q_weight", "k_weight")
    v = {n: kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)}
    qk = tensor_bytes(v["q"], v["k"])
    tables = tensor_bytes(v["cos"], v["sin"])
    weights = tensor_bytes(v["q_weight"], v["k_weight"])
    fwd = 2 * qk + tables + weights  # read q, k, tables, weights; write q', k'
    bwd = 3 * qk + tables + 2 * weights  # read dq', dk', q, k, tables, weights; write dq, dk, dweights
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0, grad=True):
        t = (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    def packed(B, N, H, hd):
        # the models' layout: views of one (B, N, 3 * H * hd) projection
        qkv = rnd(B, N, 3 * H * hd).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]

    def grid(n):
        s = math.isqrt(n)
        return (s, n // s) if s * (n // s) == n else (1, n)

    out = []
    shapes = [(32, 16, 256, 72), (32, 16, 256, 128)] if size == "model" else [(2, 3, 17, 72), (1, 2, 16, 128)]
    for B, H, N, hd in shapes:
        cos, sin = rope_2d_tables(*grid(N), hd, device=device, dtype=torch.float32)
        w = {"q_weight": rnd(hd, scale=0.1, offset=1.0), "k_weight": rnd(hd, scale=0.1, offset=1.0)}
        out.append((f"packed qkv ({B},{H},{N},{hd})+w", (*packed(B, N, H, hd), cos, sin), w))
        out.append((f"({B},{H},{N},{hd}) no weight", (rnd(B, H, N, hd), rnd(B, H, N, hd), cos, sin), {}))
        plain = (rnd(B, H, N, hd), rnd(B, H, N, hd), cos, sin)
        out.append((f"({B},{H},{N},{hd}) rope only", plain, {"normalize": False}))
    if size != "model":
        cos, sin = rope_2d_tables(1, 257, 64, device=device)
        out.append(("(1,1,257,64)+w", (rnd(1, 1, 257, 64), rnd(1, 1, 257, 64), cos, sin), {"q_weight": rnd(64)}))
    return out


register_op(
    OpSpec(
        name="qk_norm_rope",
        fn=qk_norm_rope,
        ref=qk_norm_rope_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="RMSNorm of q, k over head_dim (+weights) then interleaved 2-D axial RoPE",
    )
)
