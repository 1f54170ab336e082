"""PAE, the Prior-Aligned AutoEncoder tokenizer (docs/method.md §PAE tokenizer).

    image [0,1] -> resize + VFM normalisation -> frozen VFM -> tokens u (B, N, D)
                -> DAM(pixels, u) = LN(u * (1 + gamma) + beta) -> projector: Attn -> 3x3 conv -> per-token RMS
                -> z (B, C, h, w) -> decompressor: 3x3 conv -> Attn -> ViT decoder -> x * std + mean

Module and parameter names follow the authors' released checkpoint where they can (``dam.layers.{i}.self_attn.qkv``,
``cross_attn.q_proj`` ...), so :mod:`pae_fast.models.pae_convert` is mostly renaming.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import PatchEmbed
from torch import nn

from pae_fast.kernels.latent_norm import latent_norm
from pae_fast.models.decoder import CrossAttention, add_norm, decoder_for
from pae_fast.models.layers import Attention, Mlp, sincos_pos_embed_2d
from pae_fast.models.tokenizer import Tokenizer, TokenizerFeatures, register_tokenizer_variants
from pae_fast.models.vfm import build_vfm

__all__ = ["DAMBlock", "DAM", "VFMOnly", "LogVarHead", "Projector", "Decompressor", "PAETokenizer", "PAE_VARIANTS",
           "DAM_FUSIONS", "LATENT_EPS", "LOGVAR_INIT"]

LATENT_EPS = 1e-6  # added to the mean square of the per-token RMS normalisation (authors' default)
# DAM fusion modes (docs/method.md § DAM fusion ablation): sft (the paper's DAM), add, concat, and finetune_vfm (no
# DAM: the VFM itself trains). Every mode starts at H_z = LN(u).
DAM_FUSIONS = ("sft", "add", "concat", "finetune_vfm")
LOGVAR_INIT = -8.0  # KL variant: initial log-variance (sigma ~ 0.018 against RMS-1 tokens) [choice]


class DAMBlock(nn.Module):
    """One DAM layer: ``x += SA(LN(x)); x += CA(LN_q(x), LN_kv(u)); x += MLP(LN(x))`` (LayerNorm eps 1e-5).

    Each residual add runs fused with the LayerNorm after it (docs/method.md § Residual + LayerNorm fused): SA's with
    ``norm2_q``, CA's with ``norm3``, the MLP's with the next layer's ``norm1`` when :class:`DAM` chains the layers
    through :meth:`forward_fused`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2_q = nn.LayerNorm(dim)
        self.norm2_kv = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, approximate="none")  # timm Mlp's keys, GELU in GEMM epilogues

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``x (B, N, D)`` pixel-branch tokens, ``u (B, N_vfm, D)`` VFM tokens -> ``(B, N, D)``."""
        return self.forward_fused(x, add_norm(x, None, self.norm1)[1], u, None)[0]

    def forward_fused(
        self, x: torch.Tensor, h: torch.Tensor, u: torch.Tensor, next_norm: nn.LayerNorm | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer on the pair ``(x, h = norm1(x))``: returns ``(x', next_norm(x'))`` (``None`` for the second when
        ``next_norm`` is None), the MLP residual fused into ``next_norm``."""
        # each branch's last bias (SA's and CA's proj, the MLP's fc2) folded into the fused add after it
        o, b = self.self_attn.forward_unbiased(h)
        x, h = add_norm(x, o, self.norm2_q, b)
        o, b = self.cross_attn(h, self.norm2_kv(u), unbiased=True)
        x, h = add_norm(x, o, self.norm3, b)
        if next_norm is None:
            return x + self.mlp(h), None
        o, b = self.mlp.forward_unbiased(h)
        return add_norm(x, o, next_norm, b)


class DAM(nn.Module):
    """Detail-Aware Modulator: a pixel branch that modulates the frozen VFM tokens (SFT fusion).

    Args:
        dim, num_heads: the VFM's width and head count.
        img_size, patch_size: the VFM's input size and patch (the pixel branch sees the same normalised image).
        depth: number of :class:`DAMBlock` layers (6 in the paper).
        fusion: how the pixel branch ``x`` meets ``u`` (docs/method.md § DAM fusion ablation):
            ``sft`` ``LN(u * (1 + gamma) + beta)``, ``(gamma, beta) = W x``, W zero-initialised (the paper's);
            ``add`` ``LN(u + W x)``, W ``(D -> D)`` zero-initialised [choice];
            ``concat`` ``LN(W [u; x])``, W ``(2D -> D)`` initialised ``[I | 0]`` with a zero bias [choice].
            Each starts at ``H_z = LN(u)``.
    """

    def __init__(self, dim: int, num_heads: int, img_size: int, patch_size: int, depth: int = 6,
                 fusion: str = "sft") -> None:
        super().__init__()
        if fusion not in ("sft", "add", "concat"):
            raise ValueError(f"DAM fusion must be sft | add | concat, got {fusion!r}")
        self.fusion = fusion
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=dim)
        g = img_size // patch_size
        self.grid_size = g
        self.register_buffer("pos_embed", torch.zeros(1, g * g, dim), persistent=True)  # fixed, never trained
        self.layers = nn.ModuleList(DAMBlock(dim, num_heads) for _ in range(depth))
        fan = {"sft": (dim, 2 * dim), "add": (dim, dim), "concat": (2 * dim, dim)}[fusion]
        self.fusion_proj = nn.Linear(*fan)  # sft: -> (gamma, beta); add: -> W x; concat: [u; x] -> D
        self.final_ln = nn.LayerNorm(dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sin-cos table; xavier-uniform linears, zero biases; the fusion projection zero (sft, add) or ``[I | 0]``
        (concat), so that at init H_z = LN(u)."""
        self.pos_embed[0].copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size, self.grid_size))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fusion_proj.weight)
        nn.init.zeros_(self.fusion_proj.bias)
        if self.fusion == "concat":
            d = self.fusion_proj.out_features
            self.fusion_proj.weight[:, :d].copy_(torch.eye(d))

    def forward(self, pixels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``pixels (B, 3, S, S)`` normalised, ``u (B, N, D)`` VFM tokens -> ``H_z (B, N, D)``."""
        x = self.patch_embed(pixels) + self.pos_embed.to(pixels.dtype)
        # the loop carries (x, h = the next layer's norm1 of x), as the ViT decoder's does
        norms = [layer.norm1 for layer in self.layers]
        h = add_norm(x, None, norms[0])[1] if norms else None
        for layer, next_norm in zip(self.layers, [*norms[1:], None]):
            x, h = layer.forward_fused(x, h, u, next_norm)
        if self.fusion == "add":
            return self.final_ln(u + self.fusion_proj(x))
        if self.fusion == "concat":
            return self.final_ln(self.fusion_proj(torch.cat([u, x], dim=-1)))
        gamma, beta = self.fusion_proj(x).chunk(2, dim=-1)
        return self.final_ln(u * (1 + gamma) + beta)


class VFMOnly(nn.Module):
    """The ``finetune_vfm`` ablation's stand-in for the DAM: no pixel branch, ``H_z = LN(u)`` (affine LN, eps 1e-5,
    identity at init: the DAM's starting point); the detail must come from the fine-tuned VFM itself."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.final_ln = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - the DAM's signature
        return self.final_ln(u)


class LogVarHead(nn.Module):
    """KL ablation: ``H_z (B, N, D)`` -> per-element log-variance ``(B, C, g, g)`` of the latent, a 3x3 conv with zero
    weight and bias ``LOGVAR_INIT`` (docs/method.md § KL and diffusion-loss regularisers) [choice]."""

    def __init__(self, dim: int, channels: int, grid_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.conv = nn.Conv2d(dim, channels, kernel_size=3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(LOGVAR_INIT)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        return self.conv(h.transpose(1, 2).reshape(B, D, self.grid_size, self.grid_size))


class Projector(nn.Module):
    """``H_z (B, N, D)`` -> latent ``(B, C, g, g)``: attention (no norm, no residual), 3x3 conv, per-token RMS 1."""

    def __init__(self, dim: int, num_heads: int, channels: int, grid_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.attn = Attention(dim, num_heads, qkv_bias=False)
        self.conv = nn.Conv2d(dim, channels, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        g = self.grid_size
        x = self.attn(h).transpose(1, 2).reshape(B, D, g, g)  # token n = row * g + col
        z = self.conv(x).permute(0, 2, 3, 1)  # (B, g, g, C), channels last for the fused op
        return latent_norm(z, eps=LATENT_EPS).permute(0, 3, 1, 2)


class Decompressor(nn.Module):
    """Latent ``(B, C, g, g)`` -> tokens ``(B, N, D)``: 3x3 conv, then attention (no norm, no residual)."""

    def __init__(self, dim: int, num_heads: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, dim, kernel_size=3, padding=1)
        self.attn = Attention(dim, num_heads, qkv_bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.attn(self.conv(z).flatten(2).transpose(1, 2))


class PAETokenizer(Tokenizer):
    """The PAE tokenizer (see the module docstring); ``latent_shape = (latent_channels, g, g)``.

    Args:
        encoder: a registered encoder name (``"DINOv2-L"``, ``"ViT-tiny"``, ...), built with random weights here.
        image_size: S of the images ``encode`` takes and ``decode`` returns.
        dam_depth: DAM layers.
        latent_channels: C (32 in the paper).
        decoder: decoder size name (``"B" | "L" | "XL"``) or ``(hidden, depth, heads, mlp_hidden)``.
        variant: the registered name.
        dam_fusion: one of :data:`DAM_FUSIONS` (``sft`` = the paper's DAM; the others are Table 3b's ablations);
            ``finetune_vfm`` drops the DAM and makes the VFM trainable.
        latent_logvar: add a :class:`LogVarHead` (``latent_logvar``), the KL ablation's encoder variance.
    """

    kind = "pae"
    stats_mode = "channel"

    def __init__(self, encoder: str, image_size: int = 256, dam_depth: int = 6, latent_channels: int = 32,
                 decoder: str | tuple | list = "L", variant: str = "PAE", dam_fusion: str = "sft",
                 latent_logvar: bool = False) -> None:
        if dam_fusion not in DAM_FUSIONS:
            raise ValueError(f"{variant}: dam_fusion must be one of {DAM_FUSIONS}, got {dam_fusion!r}")
        vfm = build_vfm(encoder, log_random=False)  # load_tokenizer_weights logs what it gets
        vfm.trainable = dam_fusion == "finetune_vfm"
        vfm.freeze()  # frozen, or (finetune_vfm) eval mode with every parameter trainable
        g, D, H = vfm.grid_size, vfm.embed_dim, vfm.num_heads
        super().__init__(vfm, image_size, (latent_channels, g, g), variant)
        self.arch = dict(encoder=encoder, image_size=image_size, dam_depth=dam_depth,
                         latent_channels=latent_channels, decoder=decoder, variant=variant, dam_fusion=dam_fusion,
                         latent_logvar=latent_logvar)
        if dam_fusion == "finetune_vfm":
            self.dam: nn.Module = VFMOnly(D)
        else:
            self.dam = DAM(D, H, vfm.input_size, vfm.patch_size, depth=dam_depth, fusion=dam_fusion)
        self.latent_logvar = LogVarHead(D, latent_channels, g) if latent_logvar else None
        self.projector = Projector(D, H, latent_channels, g)
        self.decompressor = Decompressor(D, H, latent_channels)
        self.decoder = decoder_for(vfm, D, image_size, decoder)

    def encode_features(self, images: torch.Tensor) -> TokenizerFeatures:
        """``(B, 3, H, W)`` in [0, 1] -> z ``(B, C, g, g)`` (every token RMS 1), VFM tokens, pixels, DAM output (and
        the KL variant's log-variance)."""
        self.check_images(images)
        pixels = self.vfm.preprocess(images.to(self.compute_dtype))
        u = self.vfm.tokens(pixels)  # (B, N, D), no grad unless finetune_vfm
        h = self.dam(pixels, u)
        logvar = self.latent_logvar(h) if self.latent_logvar is not None else None
        return TokenizerFeatures(self.projector(h), u, pixels, h, logvar)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter, the VFM's too, with ``finetune_vfm``; otherwise all but the frozen VFM's."""
        return list(self.parameters()) if self.vfm.trainable else super().trainable_parameters()

    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C, g, g)`` -> decoder output ``(B, 3, S, S)`` in the encoder's normalised pixel space."""
        return self.decoder(self.decompressor(z))


# name -> constructor defaults (paper configs: docs/method.md §PAE tokenizer)
PAE_VARIANTS: dict[str, dict[str, Any]] = {
    "PAE-DINOv2-L-d32": dict(encoder="DINOv2-L"),
    "PAE-DINOv3-L-d32": dict(encoder="DINOv3-L"),
    "PAE-SigLIP2-SO400M-d32": dict(encoder="SigLIP2-SO400M"),
    "PAE-MAE-L-d32": dict(encoder="MAE-L"),
    "PAE-tiny": dict(encoder="ViT-tiny", image_size=64, dam_depth=2, latent_channels=8, decoder=(128, 2, 4, 512)),
}


# Table 3a / 3b ablation variants (docs/method.md § DAM fusion ablation): registered by name so that every command
# that rebuilds a tokenizer from its name (cache-latents, sample, reconstruct) gets the trained layout.
for _base in ("PAE-DINOv2-L-d32", "PAE-tiny"):
    for _fusion in ("add", "concat", "finetune_vfm"):
        PAE_VARIANTS[f"{_base}-{_fusion.replace('_', '-')}"] = {**PAE_VARIANTS[_base], "dam_fusion": _fusion}
    PAE_VARIANTS[f"{_base}-kl"] = {**PAE_VARIANTS[_base], "latent_logvar": True}

register_tokenizer_variants(PAETokenizer, PAE_VARIANTS)
