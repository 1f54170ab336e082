"""Transformer layers of the generators (LightningDiT, DiT^DH), built on the fused ops of ``pae_fast.kernels``.

Every bandwidth-bound piece of a block is one fused op (docs/method.md § Compute accounting: they are what fusion buys):

    adaln_modulate        h = RMSNorm(x) * (1 + scale) + shift
    gated_residual_adaln  x' = x + gate * (y + b) ;  h = RMSNorm(x') * (1 + scale) + shift   (residual + next norm)
    qk_norm_rope          q, k = RoPE(RMSNorm_hd(q)), RoPE(RMSNorm_hd(k))               (2-D axial RoPE)
    swiglu_mlp            (silu(a) * b) @ w3^T, [a | b] = x w12^T + b12: the gate in GEMM epilogues (SwiGLU MLP)
    gelu_mlp              gelu(x w1^T + b1) @ w2^T + b2: the GELU in GEMM epilogues (the plain DiT MLP)
    attention             softmax(q k^T / sqrt(hd)) v  (the attention backend registry)

``Attention``, ``SwiGLU``, ``Mlp``: ``forward_unbiased`` returns (output without the last linear's bias ``b``, ``b``);
the blocks fold ``b`` into the gated residual, which returns its gradient (docs/method.md § Gated-residual bias fold).

Module and parameter names follow LightningDiT's and RAE's code (``x_embedder.proj``, ``t_embedder.mlp``,
``y_embedder.embedding_table``, ``attn.qkv``, ``mlp.w12``/``mlp.w3``, ``adaLN_modulation.1``, ``pos_embed``), so
their published state dicts load by name.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pae_fast import kernels

__all__ = [
    "RMSNorm",
    "Modulation",
    "NextNorm",
    "modulate",
    "gated_residual",
    "head_dim_of",
    "Attention",
    "SwiGLU",
    "swiglu_hidden",
    "Mlp",
    "TimestepEmbedder",
    "GaussianFourierEmbedding",
    "LabelEmbedder",
    "PatchEmbed",
    "sincos_pos_embed_2d",
    "unpatchify",
    "RoPE2D",
]


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and adaLN modulation
# ----------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight: ``x / sqrt(mean(x^2) + eps) * w`` over the last dim (LightningDiT).

    Inside the blocks the weight is consumed by the fused adaLN ops; ``forward`` is the stand-alone path.

    Args:
        dim: normalised width ``D``.
        eps: added to the mean square (1e-6 in LightningDiT).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Modulation(NamedTuple):
    """adaLN-Zero parameters of one block, each ``(B, D)`` (per sample) or ``(B, N, D)`` (per token).

    The shifts are None for ``wo_shift`` blocks (LightningDiT's "no shift" ablation).
    """

    shift_msa: torch.Tensor | None
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor | None
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor

    @classmethod
    def from_linear(cls, out: torch.Tensor, wo_shift: bool) -> Modulation:
        """Split ``adaLN_modulation(c)`` of shape ``(..., 6D)`` (or ``(..., 4D)`` without shifts) in LightningDiT's
        chunk order: shift, scale, gate for attention, then for the MLP."""
        if wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = out.chunk(4, dim=-1)
            return cls(None, scale_msa, gate_msa, None, scale_mlp, gate_mlp)
        return cls(*out.chunk(6, dim=-1))


class NextNorm(NamedTuple):
    """The pre-norm that follows a residual add: ``RMSNorm(x; weight) * (1 + scale) + shift``.

    A block's last residual add is fused with the next block's ``norm1`` + modulation (or the final layer's), so
    the residual stream is read once per add instead of twice.
    """

    norm: RMSNorm
    shift: torch.Tensor | None
    scale: torch.Tensor


def modulate(x: torch.Tensor, nxt: NextNorm) -> torch.Tensor:
    """``RMSNorm(x) * (1 + scale) + shift`` in one fused op.

    Args:
        x: ``(B, N, D)`` residual stream.
        nxt: the norm (weight, eps) and ``(B, D)`` or ``(B, N, D)`` shift/scale.

    Returns:
        ``(B, N, D)``.
    """
    return kernels.adaln_modulate(x, nxt.shift, nxt.scale, weight=nxt.norm.weight, norm="rms", eps=nxt.norm.eps)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, nxt: NextNorm | None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x' = x + gate * (y + bias)`` and, when ``nxt`` is given, the next pre-norm ``h = modulate(x')`` in one pass.

    Args:
        x: ``(B, N, D)`` residual stream; y: ``(B, N, D)`` branch output; gate: ``(B, D)`` or ``(B, N, D)``.
        nxt: the following norm + modulation, or None for a plain gated residual (end of DiT^DH's trunk).
        bias: ``(D,)`` bias of the branch's last linear when ``y`` comes from ``forward_unbiased`` (its gradient
            comes from the fused backward), or None.

    Returns:
        ``(x', h)``, both ``(B, N, D)``; ``h`` is None without ``nxt``.
    """
    if nxt is None:  # once per DiT^DH step (no fused op without the norm): y + bias is materialised, dbias is a sum
        g = gate.unsqueeze(1) if gate.dim() == 2 else gate
        return torch.addcmul(x, g, y if bias is None else y + bias), None
    return kernels.gated_residual_adaln(
        x, y, gate, nxt.shift, nxt.scale, weight=nxt.norm.weight, norm="rms", eps=nxt.norm.eps, bias=bias
    )


# ----------------------------------------------------------------------------------------------------------------
# Rotary tables, attention and MLP
# ----------------------------------------------------------------------------------------------------------------


def _reset_after_load(module: RoPE2D, incompatible_keys: object) -> None:
    module.reset()


class RoPE2D(nn.Module):
    """2-D axial RoPE tables ``(cos, sin)``, each ``(grid_h * grid_w, head_dim)``, from ``kernels.rope_2d_tables``.

    Half of ``head_dim`` rotates with the row index, half with the column index (LightningDiT's
    ``VisionRotaryEmbeddingFast`` with ``dim = head_dim / 2``, theta 10000). The tables are non-persistent buffers:
    they follow ``.to(device)``, stay out of the state dict, and are rebuilt by :meth:`reset` (called by the models'
    ``initialize_weights`` and after every ``load_state_dict``, so a meta-built, ``to_empty``-ed model is whole again).
    They are never rebuilt in ``forward``: no host-to-device copy per step (CUDA graphs, no syncs).
    """

    def __init__(self, grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.grid_h, self.grid_w, self.head_dim, self.theta = grid_h, grid_w, head_dim, theta
        self.register_buffer("cos", torch.empty(grid_h * grid_w, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(grid_h * grid_w, head_dim), persistent=False)
        self.reset()
        self.register_load_state_dict_post_hook(_reset_after_load)

    @torch.no_grad()
    def reset(self) -> None:
        cos, sin = kernels.rope_2d_tables(self.grid_h, self.grid_w, self.head_dim, theta=self.theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin

    def extra_repr(self) -> str:
        return f"grid={self.grid_h}x{self.grid_w}, head_dim={self.head_dim}, theta={self.theta}"


def head_dim_of(owner: str, dim: int, num_heads: int) -> int:
    """``dim / num_heads`` of a multi-head layer; a ValueError naming ``owner`` when the heads do not divide ``dim``."""
    if dim % num_heads:
        raise ValueError(f"{owner}: dim {dim} is not divisible by num_heads {num_heads}")
    return dim // num_heads


class Attention(nn.Module):
    """Multi-head self-attention: packed qkv (with bias), optional qk RMSNorm over ``head_dim``, 2-D RoPE.

    Without RoPE and qk-norm it is plain self-attention in timm's ``Attention`` layout (``qkv`` rows [q; k; v],
    heads contiguous, output ``proj``): the tokenizers' DAM, projector, decompressor and ViT decoder use it so.

    Args:
        dim: width ``D``; num_heads: ``H`` (``head_dim = D / H``).
        qkv_bias: bias of the packed ``qkv`` projection (True in LightningDiT).
        qk_norm: RMSNorm (learnable weight, eps 1e-6) on q and k over ``head_dim`` before RoPE.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim_of("Attention", dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, unbiased: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Args: x ``(B, N, D)``; rope ``(cos, sin)`` each ``(N, head_dim)`` or None. Returns ``(B, N, D)``
        (``unbiased``: what :meth:`forward_unbiased` returns)."""
        o = self._attend(x, rope)
        return (F.linear(o, self.proj.weight), self.proj.bias) if unbiased else self.proj(o)

    def forward_unbiased(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple:
        """``(forward(x) - proj.bias, proj.bias)``: ``(B, N, D)`` without ``proj``'s bias, and that ``(D,)`` bias (to
        fold into the gated residual). Runs through ``__call__`` (module hooks fire)."""
        return self(x, rope, unbiased=True)

    def _attend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The attention output before ``proj``: ``(B, N, D)`` -> ``(B, N, D)`` (heads merged)."""
        B, N, D = x.shape
        if rope is not None or self.q_norm is not None:
            if rope is None:  # qk-norm without RoPE: the identity rotation
                rope = (x.new_ones(N, self.head_dim), x.new_zeros(N, self.head_dim))
            # bias + split into heads + qk-norm + RoPE in one op whose backward writes the packed dqkv and the bias
            # gradient directly (no separate bias add, no sum over dqkv)
            q, k, v = kernels.qkv_norm_rope(
                F.linear(x, self.qkv.weight),  # (B, N, 3D) without the bias: q | k | v, heads inside
                self.num_heads,
                rope[0],
                rope[1],
                q_weight=self.q_norm.weight if self.q_norm is not None else None,
                k_weight=self.k_norm.weight if self.k_norm is not None else None,
                eps=self.q_norm.eps if self.q_norm is not None else 1e-6,
                normalize=self.q_norm is not None,
                bias=self.qkv.bias,
            )
        else:
            # q | k | v views of the biased GEMM's (B, N, 3D); their gradient packed in one pass with the bias's
            q, k, v = kernels.linear_qkv_heads(x, self.qkv.weight, self.qkv.bias, self.num_heads)
        o = kernels.attention(q, k, v)  # (B, H, N, hd)
        return o.transpose(1, 2).reshape(B, N, D)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """LightningDiT's SwiGLU width ``int(2/3 * mlp_ratio * dim)`` (3072 at 1152, 5461 at 2048)."""
    return int(2 / 3 * int(dim * mlp_ratio))


class SwiGLU(nn.Module):
    """SwiGLU MLP ``W3(SiLU(x W1) * (x W2))`` with ``W1, W2`` packed in one ``w12`` (LightningDiT's layout).

    Args:
        dim: input/output width; hidden: gate width (default ``int(2/3 * 4 * dim)``).
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden(dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, unbiased: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self._unbiased(x)  # (B, N, D) -> (B, N, D)
        return (y, self.w3.bias) if unbiased else y + self.w3.bias.to(y.dtype)

    def forward_unbiased(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x) - w3.bias, w3.bias)``: ``(B, N, D)`` without ``w3``'s bias, and that ``(D,)`` bias.
        Runs through ``__call__`` (module hooks fire)."""
        return self(x, unbiased=True)

    def _unbiased(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D), without w3's bias
        # the gate in the epilogues of the w12 GEMM (forward) and of the dy @ w3 GEMM (backward), w12's bias and its
        # gradient in the same kernels (docs/method.md § SwiGLU in GEMM epilogues)
        return kernels.swiglu_mlp(x, self.w12.weight, self.w12.bias, self.w3.weight)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``: the plain DiT MLP (``use_swiglu=False``; tanh GELU, hidden ``mlp_ratio * dim``) and,
    with ``hidden`` and ``approximate="none"``, the ViT decoder's (the keys of timm's ``Mlp``: ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, hidden: int | None = None, approximate: str = "tanh") -> None:
        super().__init__()
        hidden, self.approximate = hidden or int(dim * mlp_ratio), approximate  # F.gelu's: "tanh" or "none" (erf)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, unbiased: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # (B, N, D) -> (B, N, D), the GELU in GEMM epilogues (docs/method.md § GELU in GEMM epilogues)
        y = kernels.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, None if unbiased else self.fc2.bias,
                             approximate=self.approximate)  # fmt: skip
        return (y, self.fc2.bias) if unbiased else y

    def forward_unbiased(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x) - fc2.bias, fc2.bias)``: ``(B, N, D)`` without ``fc2``'s bias, and that ``(D,)`` bias.
        Runs through ``__call__`` (module hooks fire)."""
        return self(x, unbiased=True)


# ----------------------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Sinusoidal time embedding (256-d, max period 10^4) followed by ``Linear -> SiLU -> Linear`` (DiT).

    As in SiT/LightningDiT the continuous ``t`` in [0, 1] is embedded as is (no x1000 rescale).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """``[cos(t w_i), sin(t w_i)]`` with ``w_i = max_period^(-i / (dim/2))``; ``t (B,)`` -> ``(B, dim)`` fp32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class GaussianFourierEmbedding(nn.Module):
    """Gaussian Fourier time embedding (DiT^DH): ``[sin(2 pi t W), cos(2 pi t W)]``, ``W ~ N(0, scale^2)`` frozen,
    then ``Linear(2 * size, D) -> SiLU -> Linear(D, D)`` (RAE ``model_utils.GaussianFourierEmbedding``).

    ``W`` is a frozen parameter (``requires_grad=False``) so it is saved and loaded with the weights.
    """

    def __init__(self, hidden_size: int, embedding_size: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.scale = scale
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        arg = t.float()[:, None] * self.W.detach().float()[None] * (2 * math.pi)
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows; the last, ``null_class = num_classes``, is the unconditional label.
    In training each label is replaced by ``null_class`` with probability ``dropout_prob``; passing
    ``null_class`` explicitly gives the unconditional branch at sampling time. (Upstream DiT allocates the null row
    only when ``dropout_prob > 0``; here it always exists so guidance never depends on the training setting.)
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"LabelEmbedder: class dropout must be in [0, 1], got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:  # (B,) long -> (B, D)
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """``(B, C, H, W) -> (B, N, D)`` with a ``p x p`` stride-``p`` convolution (``N = (H/p)(W/p)``, row-major)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"PatchEmbed: input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def reset_parameters(self) -> None:
        """Initialise like an ``nn.Linear`` (xavier-uniform on the flattened kernel), as DiT does."""
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``(grid_h * grid_w, embed_dim)`` in fp32 (MAE / DiT convention).

    The first half of the channels encodes the column index, the second half the row index; each half is
    ``[sin(pos w_i), cos(pos w_i)]`` with ``w_i = 10000^(-i / (embed_dim/4))``.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def axis(pos: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, embed_dim / 2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``(B, N, p*p*C) -> (B, C, grid_h*p, grid_w*p)``, the inverse of :class:`PatchEmbed`'s token order."""
    B = x.shape[0]
    p = patch_size
    x = x.reshape(B, grid_h, grid_w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, grid_h * p, grid_w * p)
