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
from timm.layers import Mlp, PatchEmbed
from torch import nn

from pae_fast.kernels.latent_norm import latent_norm
from pae_fast.models.decoder import CrossAttention, decoder_for
from pae_fast.models.layers import Attention, sincos_pos_embed_2d
from pae_fast.models.tokenizer import Tokenizer, TokenizerFeatures, register_tokenizer_variants
from pae_fast.models.vfm import build_vfm

__all__ = ["DAMBlock", "DAM", "Projector", "Decompressor", "PAETokenizer", "PAE_VARIANTS", "LATENT_EPS"]

LATENT_EPS = 1e-6  # added to the mean square of the per-token RMS normalisation (authors' default)


class DAMBlock(nn.Module):
    """One DAM layer: ``x += SA(LN(x)); x += CA(LN_q(x), LN_kv(u)); x += MLP(LN(x))`` (LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2_q = nn.LayerNorm(dim)
        self.norm2_kv = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``x (B, N, D)`` pixel-branch tokens, ``u (B, N_vfm, D)`` VFM tokens -> ``(B, N, D)``."""
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2_q(x), self.norm2_kv(u))
        return x + self.mlp(self.norm3(x))


class DAM(nn.Module):
    """Detail-Aware Modulator: a pixel branch that modulates the frozen VFM tokens (SFT fusion).

    Args:
        dim, num_heads: the VFM's width and head count.
        img_size, patch_size: the VFM's input size and patch (the pixel branch sees the same normalised image).
        depth: number of :class:`DAMBlock` layers (6 in the paper).
    """

    def __init__(self, dim: int, num_heads: int, img_size: int, patch_size: int, depth: int = 6) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=dim)
        g = img_size // patch_size
        self.grid_size = g
        self.register_buffer("pos_embed", torch.zeros(1, g * g, dim), persistent=True)  # fixed, never trained
        self.layers = nn.ModuleList(DAMBlock(dim, num_heads) for _ in range(depth))
        self.fusion_proj = nn.Linear(dim, 2 * dim)  # -> (gamma, beta), zero-initialised
        self.final_ln = nn.LayerNorm(dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sin-cos table; xavier-uniform linears, zero biases; SFT projection zero so that at init H_z = LN(u)."""
        self.pos_embed[0].copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size, self.grid_size))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fusion_proj.weight)
        nn.init.zeros_(self.fusion_proj.bias)

    def forward(self, pixels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``pixels (B, 3, S, S)`` normalised, ``u (B, N, D)`` VFM tokens -> ``H_z (B, N, D)``."""
        x = self.patch_embed(pixels) + self.pos_embed
        for layer in self.layers:
            x = layer(x, u)
        gamma, beta = self.fusion_proj(x).chunk(2, dim=-1)
        return self.final_ln(u * (1 + gamma) + beta)


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
    """

    kind = "pae"
    stats_mode = "channel"

    def __init__(self, encoder: str, image_size: int = 256, dam_depth: int = 6, latent_channels: int = 32,
                 decoder: str | tuple | list = "L", variant: str = "PAE") -> None:
        vfm = build_vfm(encoder, log_random=False)  # load_tokenizer_weights logs what it gets
        g, D, H = vfm.grid_size, vfm.embed_dim, vfm.num_heads
        super().__init__(vfm, image_size, (latent_channels, g, g), variant)
        self.arch = dict(encoder=encoder, image_size=image_size, dam_depth=dam_depth,
                         latent_channels=latent_channels, decoder=decoder, variant=variant)
        self.dam = DAM(D, H, vfm.input_size, vfm.patch_size, depth=dam_depth)
        self.projector = Projector(D, H, latent_channels, g)
        self.decompressor = Decompressor(D, H, latent_channels)
        self.decoder = decoder_for(vfm, D, image_size, decoder)

    def encode_features(self, images: torch.Tensor) -> TokenizerFeatures:
        """``(B, 3, H, W)`` in [0, 1] -> z ``(B, C, g, g)`` (every token RMS 1), VFM tokens, pixels, DAM output."""
        self.check_images(images)
        pixels = self.vfm.preprocess(images)
        u = self.vfm.tokens(pixels)  # (B, N, D), no grad
        h = self.dam(pixels, u)
        return TokenizerFeatures(self.projector(h), u, pixels, h)

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


register_tokenizer_variants(PAETokenizer, PAE_VARIANTS)
