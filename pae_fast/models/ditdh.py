"""DiT^DH: LightningDiT trunk + wide, shallow DDT head (RAE, Zheng et al., 2025), on fused kernels
(docs/method.md § Generators).

    t_emb = GaussianFourier(t);  c = SiLU(t_emb + y_emb(y))           (B, D)      (RAE applies SiLU here *and* in
                                                                                   every adaLN_modulation)
    s = PatchEmbed_s(x_t) + APE;  s = trunk(s, c)                      (B, N, D)   LightningDiT blocks, per-sample adaLN
    s = Linear_{D -> Dh}(SiLU(t_emb + s))                              (B, N, Dh)  per-token condition of the head
    h = PatchEmbed_x(x_t)                                              (B, N, Dh)  separate embed, no APE
    h = head(h, s)                                                     2 blocks of width Dh = 2048 (16 heads, hd 128)
                                                                       whose shift/scale/gate come PER TOKEN from s
    v = Linear(RMSNorm(h) * (1 + scale(s)) + shift(s)) -> unpatchify  final layer, per-token modulated

Structure facts (names, SiLU placement, head RoPE, init) follow RAE's public ``src/stage2/models/DDT.py``
(``DiTwDDTHead``, ``LightningDDTBlock``, ``DDTFinalLayer``); the code here is our own. The per-token modulation
is the same :class:`LightningDiTBlock` with a ``(B, N, 6 Dh)`` condition: the fused adaLN ops take per-token
shift/scale/gate directly.

Parameters (XL, 768 input channels, patch 1): 838,675,796 = trunk blocks 669,451,776 + head blocks 151,065,940 +
final layer 9,968,384 + embedders/projector 8,189,696 (incl. the frozen APE and Fourier W), the "839M" of RAE.
Cost: 161.6 GMAC per image with the head's per-token adaLN linears (2 x 6.44 + 2.15 GMAC) counted; the quoted
146.6 is the same count without them.

Time convention: ``t = 1`` is data (docs/method.md § Conventions). RAE's checkpoints were trained with t = 1 noise;
the flow layer, not this model, converts (``t -> 1 - t``, ``v -> -v``) when such weights are used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pae_fast.models.generator import ClassConditionalGenerator, build_named, check_inputs, register_variants
from pae_fast.models.layers import (
    GaussianFourierEmbedding,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    RoPE2D,
    sincos_pos_embed_2d,
    unpatchify,
)
from pae_fast.models.lightningdit import FinalLayer, LightningDiTBlock, run_blocks

__all__ = ["DiTDH", "VARIANTS", "ditdh"]


class DiTDH(ClassConditionalGenerator):
    """DiT with a wide DDT head: ``model(x_t, t, y) -> v``.

    Args:
        input_size, patch_size, in_channels: latent side, patch (both embedders), channels (768 for RAE DINOv2-B).
        hidden_size, depth, num_heads: the LightningDiT trunk.
        head_hidden_size, head_depth, head_num_heads: the DDT head (2048, 2, 16).
        mlp_ratio, num_classes, class_dropout, use_qknorm, use_rope, use_swiglu, wo_shift, grad_checkpointing:
            as :class:`~pae_fast.models.lightningdit.LightningDiT` (applied to trunk and head alike).

    Shapes: ``x_t (B, C, H, W)``, ``t (B,)`` in [0, 1] (1 = data), ``y (B,)`` long -> ``v (B, C, H, W)``.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        head_hidden_size: int = 2048,
        head_depth: int = 2,
        head_num_heads: int = 16,
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
        # the constructor arguments, captured before any other local exists
        self.arch: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        for what, d, h in (("trunk", hidden_size, num_heads), ("head", head_hidden_size, head_num_heads)):
            if d % h or (d // h) % 4:
                raise ValueError(f"DiTDH: {what} width {d} / heads {h} must give a head_dim divisible by 4")
        if depth < 1 or head_depth < 1:
            raise ValueError(f"DiTDH: depth and head_depth must be >= 1, got {depth} and {head_depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels
        self.hidden_size, self.num_heads, self.depth = hidden_size, num_heads, depth
        self.head_hidden_size, self.head_num_heads = head_hidden_size, head_num_heads
        self.grad_checkpointing = grad_checkpointing

        self.s_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, head_hidden_size)
        self.t_embedder = GaussianFourierEmbedding(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.s_embedder.num_patches, hidden_size), requires_grad=False)
        g = self.s_embedder.grid_size
        self.enc_feat_rope = RoPE2D(g, g, hidden_size // num_heads) if use_rope else None
        self.dec_feat_rope = RoPE2D(g, g, head_hidden_size // head_num_heads) if use_rope else None
        wide = hidden_size != head_hidden_size
        self.s_projector = nn.Linear(hidden_size, head_hidden_size) if wide else nn.Identity()
        # One list, trunk then head, as in RAE (``blocks.{0..depth-1}`` trunk, ``blocks.{depth..}`` head).
        block = dict(mlp_ratio=mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu, wo_shift=wo_shift)
        self.blocks = nn.ModuleList(
            [LightningDiTBlock(hidden_size, num_heads, **block) for _ in range(depth)]
            + [LightningDiTBlock(head_hidden_size, head_num_heads, **block) for _ in range(head_depth)]
        )
        self.final_layer = FinalLayer(head_hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """RAE's init: PyTorch-default linears, xavier patch embeds, N(0, 0.02) label table and t-MLP, sin-cos APE,
        zero adaLN in every block and a zero final layer (output exactly 0 at init). Also valid after ``to_empty``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.s_embedder.reset_parameters()
        self.x_embedder.reset_parameters()
        g = self.s_embedder.grid_size
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, g, g).unsqueeze(0))
        for rope in (self.enc_feat_rope, self.dec_feat_rope):
            if rope is not None:
                rope.reset()
        self.t_embedder.W.normal_(0.0, self.t_embedder.scale)
        self._init_conditioning_and_zero_outputs()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity ``v (B, C, H, W)`` at ``x_t (B, C, H, W)``, time ``t (B,)`` (or scalar), labels ``y (B,)``."""
        t, y = check_inputs(self, x, t, y)
        g = self.s_embedder.grid_size
        trunk, head = self.blocks[: self.depth], self.blocks[self.depth :]
        t_emb = self.t_embedder(t)  # (B, D)
        c = F.silu(t_emb + self.y_embedder(y, self.training))  # (B, D)

        # Trunk: LightningDiT blocks with per-sample adaLN; the raw residual stream is its output.
        s = self.s_embedder(x) + self.pos_embed  # (B, N, D)
        rope_s = self.enc_feat_rope() if self.enc_feat_rope is not None else None
        s, _ = run_blocks(trunk, s, c, rope_s, None, self.grad_checkpointing)
        s = self.s_projector(F.silu(t_emb.unsqueeze(1) + s))  # (B, N, Dh)

        # Head: wide blocks whose adaLN parameters are computed per token from s.
        h = self.x_embedder(x)  # (B, N, Dh)
        rope_x = self.dec_feat_rope() if self.dec_feat_rope is not None else None
        _, h = run_blocks(head, h, s, rope_x, self.final_layer.modulation(s), self.grad_checkpointing)
        return unpatchify(self.final_layer(h), self.patch_size, self.out_channels, g, g)


# ----------------------------------------------------------------------------------------------------------------
# Named variants: trunk sizes of RAE's configs, all with the 2 x 2048 head (docs/method.md § Generators)
# ----------------------------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "DiTDH-S": dict(hidden_size=384, depth=12, num_heads=6),
    "DiTDH-B": dict(hidden_size=768, depth=12, num_heads=12),
    "DiTDH-L": dict(hidden_size=1024, depth=24, num_heads=16),
    "DiTDH-XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
register_variants(DiTDH, VARIANTS)


def ditdh(name: str, **overrides: Any) -> DiTDH:
    """Build a named DiT^DH variant; ``overrides`` set constructor arguments (None keeps the default).

    Example: ``ditdh("DiTDH-XL")`` (768 input channels, 838.68M parameters).
    """
    return build_named(DiTDH, "DiT^DH", VARIANTS, name, overrides)
