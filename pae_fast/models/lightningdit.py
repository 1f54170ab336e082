"""LightningDiT (Yao et al., 2025) on fused kernels: the PAE generator (docs/method.md § Generators).

    c = t_emb(t) + y_emb(y)                                          sinusoidal t (256-d -> MLP), labels with dropout
    x = PatchEmbed(x_t) + APE                                        fixed 2-D sin-cos positions
    per block (pre-norm adaLN-Zero, RMSNorm with learnable weight, eps 1e-6):
        shift, scale, gate (x2) = Linear(SiLU(c))
        x += g_msa * Attn(RMSNorm(x) * (1 + scale_msa) + shift_msa)      qkv bias, optional qk-norm, 2-D RoPE
        x += g_mlp * MLP(RMSNorm(x) * (1 + scale_mlp) + shift_mlp)       SwiGLU W3(SiLU(x W1) * x W2)
    v = Linear(RMSNorm(x) * (1 + scale) + shift) -> unpatchify          zero-initialised final layer

Fusion: each residual add is fused with the pre-norm + modulation that reads its result (``gated_residual_adaln``):
the attention residual with ``norm2``, the MLP residual with the *next* block's ``norm1`` (or the final layer's
norm), so the residual stream is read and written once per add. :func:`run_blocks` threads that chain. The biases
of ``attn.proj`` and ``mlp.w3`` are folded into that op, ``x += g * (y + b)`` (``forward_unbiased``): their
gradients come out of its backward kernel instead of a ``sum`` over each ``(B*N, D)`` gradient
(docs/method.md § Gated-residual bias fold).

Time convention (docs/method.md § Conventions): ``t = 1`` is data, ``t = 0`` noise; the model predicts
``v = x1 - x0``. Guidance lives in ``pae_fast.flow``; the unconditional label is ``model.null_class``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pae_fast.models.generator import ClassConditionalGenerator, build_named, check_inputs, register_variants
from pae_fast.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    Modulation,
    NextNorm,
    PatchEmbed,
    RMSNorm,
    RoPE2D,
    SwiGLU,
    TimestepEmbedder,
    gated_residual,
    modulate,
    sincos_pos_embed_2d,
    swiglu_hidden,
    unpatchify,
)

__all__ = [
    "LightningDiTBlock",
    "FinalLayer",
    "run_blocks",
    "LightningDiT",
    "VARIANTS",
    "lightningdit",
]


# ----------------------------------------------------------------------------------------------------------------
# Block and final layer
# ----------------------------------------------------------------------------------------------------------------


class LightningDiTBlock(nn.Module):
    """One pre-norm adaLN-Zero transformer block.

    Args:
        hidden_size: width ``D``; num_heads: attention heads.
        mlp_ratio: MLP expansion (SwiGLU hidden ``int(2/3 * mlp_ratio * D)``).
        use_qknorm: RMSNorm on q, k over head_dim; use_swiglu: SwiGLU (else GELU-tanh MLP).
        wo_shift: adaLN without the shift terms (4 instead of 6 modulation vectors).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        wo_shift: bool = False,
    ) -> None:
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=use_qknorm)
        self.norm2 = RMSNorm(hidden_size)
        if use_swiglu:
            self.mlp: nn.Module = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        else:
            self.mlp = Mlp(hidden_size, mlp_ratio)
        n_mod = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mod * hidden_size))

    def modulation(self, c: torch.Tensor) -> Modulation:
        """adaLN parameters from the condition ``c``: ``(B, D)`` per sample or ``(B, N, D)`` per token."""
        return Modulation.from_linear(self.adaLN_modulation(c), self.wo_shift)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        mod: Modulation,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        nxt: NextNorm | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block on the residual stream.

        Args:
            x: ``(B, N, D)`` residual stream entering the block.
            h: ``(B, N, D)`` = ``RMSNorm(x) * (1 + scale_msa) + shift_msa`` (fused into the previous residual add).
            mod: this block's :class:`Modulation`.
            rope: ``(cos, sin)`` each ``(N, head_dim)``, or None.
            nxt: the pre-norm that reads this block's output (next block's ``norm1`` or the final layer's norm);
                None returns the plain residual stream.

        Returns:
            ``(x', h')``: the residual stream after the block, and ``nxt`` applied to it (None without ``nxt``).
        """
        # the last linear of each branch runs without its bias; the fused residual adds it (and returns its gradient)
        y, bias = self.attn.forward_unbiased(h, rope)
        x, h = gated_residual(x, y, mod.gate_msa, NextNorm(self.norm2, mod.shift_mlp, mod.scale_mlp), bias)
        y, bias = self.mlp.forward_unbiased(h)
        return gated_residual(x, y, mod.gate_mlp, nxt, bias)


class FinalLayer(nn.Module):
    """``Linear(RMSNorm(x) * (1 + scale) + shift)`` to ``p * p * C`` per token, no gate.

    The norm + modulation is fused into the last block's residual add: call :meth:`modulation` to get the
    :class:`NextNorm` for :func:`run_blocks`, then ``forward`` on its output ``h``.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, c: torch.Tensor) -> NextNorm:
        """``c (B, D)`` or ``(B, N, D)`` -> the final pre-norm with its shift and scale."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return NextNorm(self.norm_final, shift, scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, N, D) modulated -> (B, N, p*p*C)
        return self.linear(h)


def run_blocks(
    blocks: Sequence[LightningDiTBlock],
    x: torch.Tensor,
    cond: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    final: NextNorm | None,
    grad_checkpointing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a stack of blocks with every residual add fused into the next pre-norm.

    Args:
        blocks: the blocks, in order (all of width ``D``).
        x: ``(B, N, D)`` input tokens.
        cond: adaLN condition, ``(B, D)`` per sample or ``(B, N, D)`` per token.
        rope: ``(cos, sin)`` tables or None.
        final: the pre-norm applied to the stack's output (the final layer's), or None for the raw stream.
        grad_checkpointing: recompute each block in backward (``torch.utils.checkpoint``, non-reentrant).

    Returns:
        ``(x, h)``: the residual stream after the last block and ``final`` applied to it (None without ``final``).
    """
    mod = blocks[0].modulation(cond)
    h = modulate(x, NextNorm(blocks[0].norm1, mod.shift_msa, mod.scale_msa))
    for i, blk in enumerate(blocks):
        if i + 1 < len(blocks):
            next_mod = blocks[i + 1].modulation(cond)
            nxt = NextNorm(blocks[i + 1].norm1, next_mod.shift_msa, next_mod.scale_msa)
        else:
            next_mod, nxt = None, final
        if grad_checkpointing and torch.is_grad_enabled():
            x, h = checkpoint(blk, x, h, mod, rope, nxt, use_reentrant=False)
        else:
            x, h = blk(x, h, mod, rope, nxt)
        mod = next_mod
    return x, h


class LightningDiT(ClassConditionalGenerator):
    """LightningDiT: ``model(x_t, t, y) -> v``.

    Args:
        input_size: latent side ``H = W``; patch_size: 1 or 2; in_channels: latent channels ``C``.
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        num_classes: classes; the null (unconditional) label is ``num_classes``.
        class_dropout: label dropout probability in training (0.1).
        use_qknorm, use_rope, use_swiglu, wo_shift: LightningDiT's architecture switches.
        grad_checkpointing: activation checkpointing per block.

    Shapes: ``x_t (B, C, H, W)``, ``t (B,)`` in [0, 1] (1 = data), ``y (B,)`` long -> ``v (B, C, H, W)``.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        use_qknorm: bool = False,
        use_rope: bool = True,
        use_swiglu: bool = True,
        wo_shift: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"LightningDiT: depth must be >= 1, got {depth}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(
                f"LightningDiT: hidden_size {hidden_size} / num_heads {num_heads} must give a head_dim divisible by 4 "
                "(2-D RoPE rotates pairs on two axes)"
            )
        self.arch: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # Fixed sin-cos APE, a frozen parameter as in DiT (saved with the weights, not trained).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        g = self.x_embedder.grid_size
        self.feat_rope = RoPE2D(g, g, hidden_size // num_heads) if use_rope else None
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, wo_shift) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """LightningDiT's init: xavier-uniform linears, N(0, 0.02) label table and t-MLP, sin-cos APE, zero adaLN
        and zero final layer (adaLN-Zero: the model outputs exactly 0 at init). Also valid after ``to_empty``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.x_embedder.reset_parameters()
        g = self.x_embedder.grid_size
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, g, g).unsqueeze(0))
        if self.feat_rope is not None:
            self.feat_rope.reset()
        self._init_conditioning_and_zero_outputs()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity ``v (B, C, H, W)`` at ``x_t (B, C, H, W)``, time ``t (B,)`` (or scalar), labels ``y (B,)``."""
        t, y = check_inputs(self, x, t, y)
        g = self.x_embedder.grid_size
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        rope = self.feat_rope() if self.feat_rope is not None else None
        _, h = run_blocks(self.blocks, x, c, rope, self.final_layer.modulation(c), self.grad_checkpointing)
        return unpatchify(self.final_layer(h), self.patch_size, self.out_channels, g, g)


# ----------------------------------------------------------------------------------------------------------------
# Named variants (docs/method.md § Generators)
# ----------------------------------------------------------------------------------------------------------------

_SIZES = {
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
    "1p0B": dict(hidden_size=1536, depth=24, num_heads=24),
    "1p6B": dict(hidden_size=1792, depth=28, num_heads=28),
}

VARIANTS: dict[str, dict[str, Any]] = {
    f"LightningDiT-{size}/{p}": dict(kw, patch_size=p) for size, kw in _SIZES.items() for p in (1, 2)
}
register_variants(LightningDiT, VARIANTS)


def lightningdit(name: str, **overrides: Any) -> LightningDiT:
    """Build a named LightningDiT variant; ``overrides`` set constructor arguments (None keeps the default).

    Example: ``lightningdit("LightningDiT-XL/1", in_channels=32)`` (675.26M parameters).
    """
    return build_named(LightningDiT, "LightningDiT", VARIANTS, name, overrides)
