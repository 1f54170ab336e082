"""Transformer pieces of the tokenizers: cross attention on the kernel registry, the ViT pixel decoder (self-attention
is :class:`pae_fast.models.layers.Attention`).

The ViT decoder is the ViT-MAE-style decoder PAE and RAE use (docs/method.md §PAE tokenizer): ``Linear(D_in ->
hidden)`` on the latent tokens, a learnable CLS prepended (dropped at the end), a fixed 2-D sin-cos position table
(slot 0, the CLS, is zeros), pre-norm blocks (LayerNorm eps 1e-12, exact GELU), a final LayerNorm and
``Linear(hidden -> p*p*3)``; tokens are unpatchified row-major with each token's values ordered (row, col, channel).
Its output is in the *encoder's normalised pixel space*; the tokenizer maps it back with the encoder's mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pae_fast.kernels.attention import attention
from pae_fast.kernels.residual_layernorm import residual_layernorm
from pae_fast.models.layers import Attention, Mlp, head_dim_of, sincos_pos_embed_2d, unpatchify
from pae_fast.models.vfm import FrozenVFM

__all__ = ["CrossAttention", "DecoderBlock", "ViTDecoder", "DECODER_SIZES", "add_norm", "decoder_for"]

# name -> (hidden, depth, heads, mlp hidden)
DECODER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "XL": (1152, 28, 16, 4096),
}


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x (B, Nq, D)``, keys/values from ``ctx (B, Nk, D)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim_of("CrossAttention", dim, num_heads)
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, hd)
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, unbiased: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, Nq, D)``; ``unbiased``: ``(output without proj's bias, proj.bias)``, the bias to fold into the
        residual (:func:`add_norm`), as :meth:`pae_fast.models.layers.Attention.forward_unbiased` returns."""
        B, N, D = x.shape
        o = attention(self._heads(self.q_proj(x)), self._heads(self.k_proj(ctx)), self._heads(self.v_proj(ctx)))
        o = o.transpose(1, 2).reshape(B, N, D)
        return (F.linear(o, self.proj.weight), self.proj.bias) if unbiased else self.proj(o)


def add_norm(
    x: torch.Tensor, branch: torch.Tensor | None, norm: nn.LayerNorm, branch_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + branch, norm(x + branch))`` in one fused pass (``branch`` None: ``(x, norm(x))``) for a pre-norm block
    (docs/method.md § Residual + LayerNorm fused); ``norm`` an ``nn.LayerNorm`` over the last dim. ``branch_bias``:
    the ``(D,)`` bias of the branch's last linear when ``branch`` comes without it (``forward_unbiased``), added in
    the same pass, its gradient from the fused backward (no column sum over the branch's gradient)."""
    return residual_layernorm(x, branch, None, norm.weight, norm.bias, norm.eps, branch_bias=branch_bias)


class DecoderBlock(nn.Module):
    """Pre-norm ViT block: ``x += Attn(LN(x)); x += MLP(LN(x))`` (LayerNorm eps 1e-12, exact GELU).

    Each residual add runs fused with the LayerNorm that follows it (docs/method.md § Residual + LayerNorm fused):
    the attention residual with ``norm2``, the MLP residual with the next block's ``norm1`` (or the decoder's final
    norm) when :class:`ViTDecoder` chains the blocks through :meth:`forward_fused`; the biases of ``attn.proj`` and
    ``mlp.fc2`` are folded into those fused adds.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden=mlp_hidden, approximate="none")  # timm Mlp's keys, GELU in GEMM epilogues

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, D)``: the block on its own (LN1 here, the MLP residual a plain add)."""
        return self.forward_fused(x, add_norm(x, None, self.norm1)[1], None)[0]

    def forward_fused(
        self, x: torch.Tensor, h: torch.Tensor, next_norm: nn.LayerNorm | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on the pair ``(x, h = norm1(x))``, all ``(B, N, D)``: returns ``(x', next_norm(x'))`` (``None``
        for the second when ``next_norm`` is None), the MLP residual fused into ``next_norm``."""
        o, b = self.attn.forward_unbiased(h)  # proj's bias b folded into the fused add
        x, h = add_norm(x, o, self.norm2, b)
        if next_norm is None:
            return x + self.mlp(h), None
        o, b = self.mlp.forward_unbiased(h)  # fc2's bias b likewise
        return add_norm(x, o, next_norm, b)


class ViTDecoder(nn.Module):
    """Latent tokens ``(B, N, in_dim)`` -> images ``(B, 3, g*p, g*p)`` in the encoder's normalised pixel space.

    Args:
        in_dim: width of the incoming tokens (the decompressor's D for PAE, the VFM's D for RAE).
        grid_size: g, tokens per side (N = g*g).
        patch_size: p, pixels per token side.
        hidden, depth, num_heads, mlp_hidden: transformer size (:data:`DECODER_SIZES`).
    """

    def __init__(
        self, in_dim: int, grid_size: int, patch_size: int, hidden: int, depth: int, num_heads: int, mlp_hidden: int
    ) -> None:
        super().__init__()
        self.grid_size, self.patch_size, self.hidden = grid_size, patch_size, hidden
        self.embed = nn.Linear(in_dim, hidden)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        # fixed sin-cos table (1, 1 + N, hidden) with a zero CLS slot: a buffer, so never trained
        self.register_buffer("pos_embed", torch.zeros(1, 1 + grid_size**2, hidden), persistent=True)
        self.blocks = nn.ModuleList(DecoderBlock(hidden, num_heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.pred = nn.Linear(hidden, patch_size * patch_size * 3)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sin-cos table; xavier-uniform linears with zero bias; CLS ~ N(0, 0.02) (ViT-MAE's initialisation)."""
        self.pos_embed[0, 1:].copy_(sincos_pos_embed_2d(self.hidden, self.grid_size, self.grid_size))
        self.pos_embed[0, 0].zero_()
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, in_dim) -> (B, 3, g*p, g*p)``."""
        B, N, _ = tokens.shape
        if self.grid_size**2 != N:
            raise ValueError(f"ViTDecoder: expected {self.grid_size**2} tokens, got {N}")
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.embed(tokens)], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        # the loop carries (x, h): h is the next LayerNorm of x, each fused with the residual add before it
        norms = [blk.norm1 for blk in self.blocks] + [self.norm]
        _, h = add_norm(x, None, norms[0])
        for blk, next_norm in zip(self.blocks, norms[1:]):
            x, h = blk.forward_fused(x, h, next_norm)
        x = self.pred(h)[:, 1:]  # (B, N, p*p*3), CLS dropped
        return unpatchify(x, self.patch_size, 3, self.grid_size, self.grid_size)


def _decoder_size(decoder: str | tuple | list) -> tuple[int, int, int, int]:
    if isinstance(decoder, str):
        decoder = decoder.removeprefix("ViT-")  # "ViT-L" (the config's spelling) == "L"
        if decoder not in DECODER_SIZES:
            raise ValueError(f"unknown decoder size {decoder!r}; valid: {', '.join(DECODER_SIZES)} (or ViT-<size>) or "
                             "(hidden, depth, heads, mlp_hidden)")
        return DECODER_SIZES[decoder]
    if len(decoder) != 4:
        raise ValueError(f"decoder must be a size name or (hidden, depth, heads, mlp_hidden), got {decoder!r}")
    return tuple(int(v) for v in decoder)  # type: ignore[return-value]


def decoder_for(vfm: FrozenVFM, in_dim: int, image_size: int, decoder: str | tuple | list) -> ViTDecoder:
    """The ViT decoder on the VFM's token grid whose patch makes ``image_size`` (16 for 16x16 tokens at 256)."""
    g = vfm.grid_size
    if image_size % g:
        raise ValueError(f"image_size {image_size} is not a multiple of the {g}x{g} token grid of {vfm.name}")
    hidden, depth, heads, mlp = _decoder_size(decoder)
    return ViTDecoder(in_dim, g, image_size // g, hidden, depth, heads, mlp)
