"""Refined priors (stage 0): projector ``P_t``, reconstructor ``Q_t`` and the structural target
(docs/method.md §Refined priors).

- ``P_t: D -> latent_dim`` has the tokenizer projector's layout (so it can initialise it): multi-head
  self-attention applied directly (no residual, no pre-norm) -> tokens as a ``(B, D, h, w)`` map -> ``Conv2d(D,
  latent_dim, 3, padding=1)`` -> per-token RMS normalisation without affine (every token has RMS 1).
- ``Q_t: latent_dim -> D``: ``Linear(latent_dim, hidden)`` + fixed 2-D sin-cos positions -> ``depth`` pre-norm ViT
  blocks (timm ``Block``, MLP ratio 4) -> LayerNorm -> ``Linear(hidden, D)``.
- Structural target ``H_ref``: VFM tokens as a ``(B, D, h, w)`` map -> upsampled to the image size (registry
  :data:`UPSAMPLERS`; ``bilinear`` by default, ``anyup`` needs the AnyUp module and its weights) -> Gaussian low-pass
  with ``sigma = lowpass_strength * image_size / grid`` pixels (strength in units of one latent cell) [choice] ->
  area-downsampled to the latent grid -> ``(B, n, D)`` tokens. The three steps are linear, so they run in channel
  chunks to bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pae_fast.models.layers import Attention, sincos_pos_embed_2d

__all__ = [
    "UPSAMPLERS",
    "register_upsampler",
    "upsample_features",
    "gaussian_lowpass",
    "structural_target",
    "rms_normalize",
    "PriorProjector",
    "PriorReconstructor",
    "RefinedPriors",
]

Upsampler = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]  # ((B, D, h, w), (H, W)) -> (B, D, H, W)


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _anyup(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    raise RuntimeError(
        "refine.upsampler='anyup' needs the AnyUp upsampler module and its weights, which pae_fast does not ship: "
        "register one with pae_fast.models.refine.register_upsampler('anyup', fn) where fn((B, D, h, w), (H, W)) "
        "returns (B, D, H, W), or set refine.upsampler: bilinear"
    )


UPSAMPLERS: dict[str, Upsampler] = {"bilinear": _bilinear, "anyup": _anyup}


def register_upsampler(name: str, fn: Upsampler) -> None:
    """Add or replace an upsampler ``fn((B, D, h, w), (H, W)) -> (B, D, H, W)`` under ``name``."""
    UPSAMPLERS[name] = fn


def upsample_features(x: torch.Tensor, size: tuple[int, int], upsampler: str = "bilinear") -> torch.Tensor:
    """Upsample a ``(B, D, h, w)`` feature map to ``size`` with a registered upsampler."""
    if upsampler not in UPSAMPLERS:
        raise ValueError(f"refine.upsampler: unknown {upsampler!r}; registered: {', '.join(sorted(UPSAMPLERS))}")
    return UPSAMPLERS[upsampler](x, size)


def gaussian_lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, C, H, W)`` map (radius ``ceil(3 sigma)``, reflect padding).

    ``sigma <= 0`` returns ``x``. The kernel sums to 1, so constant maps are unchanged.
    """
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs r < size
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _square(n: int, what: str) -> int:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{what}: {n} tokens do not form a square grid")
    return s


@torch.no_grad()
def structural_target(
    vfm_tokens: torch.Tensor,
    image_size: int,
    latent_grid: int,
    lowpass_strength: float = 0.4,
    upsampler: str = "bilinear",
    channel_chunk: int = 128,
) -> torch.Tensor:
    """``H_ref``: VFM tokens upsampled to the image, low-passed and downsampled to the latent grid.

    Args:
        vfm_tokens: ``(B, N, D)`` patch tokens on a square ``sqrt(N) x sqrt(N)`` grid (detached here).
        image_size: side of the image the tokens came from.
        latent_grid: side ``n`` of the latent grid.
        lowpass_strength: Gaussian sigma in latent cells (``sigma_px = strength * image_size / latent_grid``).
        upsampler: a name in :data:`UPSAMPLERS`.
        channel_chunk: channels processed at a time (memory bound).
    Returns:
        ``(B, n*n, D)`` fp32 target tokens (no grad).
    """
    B, N, D = vfm_tokens.shape
    g = _square(N, "structural_target")
    x = vfm_tokens.detach().float().transpose(1, 2).reshape(B, D, g, g)
    sigma = float(lowpass_strength) * image_size / latent_grid
    outs = []
    for xc in x.split(channel_chunk, dim=1):
        up = upsample_features(xc, (image_size, image_size), upsampler)
        outs.append(F.adaptive_avg_pool2d(gaussian_lowpass(up, sigma), latent_grid))
    return torch.cat(outs, dim=1).flatten(2).transpose(1, 2)


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token RMS normalisation without affine over the last dim: ``x / sqrt(mean x^2 + eps)``."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class PriorProjector(nn.Module):
    """``P_t``: ``(B, N, D)`` VFM tokens -> ``(B, N, latent_dim)`` tokens of RMS 1 (tokenizer projector layout).

    Args:
        dim: VFM width D.
        latent_dim: output channels (32).
        num_heads: attention heads (``dim`` must be divisible by it).
    """

    def __init__(self, dim: int, latent_dim: int = 32, num_heads: int = 16) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.conv = nn.Conv2d(dim, latent_dim, 3, padding=1)
        self.latent_dim = latent_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        g = _square(N, "PriorProjector")
        x = self.attn(tokens).transpose(1, 2).reshape(B, D, g, g)
        return rms_normalize(self.conv(x).flatten(2).transpose(1, 2))  # (B, N, latent_dim)


class PriorReconstructor(nn.Module):
    """``Q_t``: ``(B, N, latent_dim)`` -> ``(B, N, D)``, a small ViT.

    Args:
        latent_dim: input width; dim: output width D; hidden: ViT width; depth: blocks; num_heads: heads;
        grid: side of the token grid (fixed sin-cos positions).
    """

    def __init__(self, latent_dim: int, dim: int, hidden: int = 1024, depth: int = 4, num_heads: int = 16,
                 grid: int = 16) -> None:  # fmt: skip
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(latent_dim, hidden)
        self.register_buffer("pos", sincos_pos_embed_2d(hidden, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(hidden, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if p.shape[1] != self.pos.shape[1]:
            raise ValueError(f"PriorReconstructor: built for {self.pos.shape[1]} tokens, got {p.shape[1]}")
        x = self.embed(p) + self.pos.to(p.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x))


class RefinedPriors(nn.Module):
    """``P_t`` + ``Q_t`` trained by :func:`pae_fast.losses.refine.refine_loss`; ``P_t`` then gives the targets.

    Args:
        dim: VFM width D.
        grid: side of the VFM / latent token grid.
        latent_dim: the tokenizer's latent width (P_t's output; it initialises the tokenizer's projector).
        hidden, depth, projector_heads, reconstructor_heads: see :class:`~pae_fast.config.RefineConfig`.
    """

    def __init__(self, dim: int, grid: int = 16, latent_dim: int = 32, hidden: int = 1024, depth: int = 4,
                 projector_heads: int = 16, reconstructor_heads: int = 16) -> None:  # fmt: skip
        super().__init__()
        self.projector = PriorProjector(dim, latent_dim, projector_heads)
        self.reconstructor = PriorReconstructor(latent_dim, dim, hidden, depth, reconstructor_heads, grid)
        self.dim, self.grid, self.latent_dim = dim, grid, latent_dim

    @classmethod
    def from_config(cls, cfg: Any, dim: int, grid: int = 16, latent_dim: int = 32) -> RefinedPriors:
        """From a :class:`~pae_fast.config.RefineConfig`, the VFM width / token grid and the latent width."""
        return cls(dim, grid, latent_dim, cfg.reconstructor_hidden, cfg.reconstructor_depth,
                   cfg.projector_heads, cfg.reconstructor_heads)  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tokens ``(B, N, D)`` (detached).

        Returns: ``P_t(H)`` ``(B, N, latent_dim)`` and ``Q_t(P_t(H))`` ``(B, N, D)``.
        """
        p = self.projector(tokens.detach())
        return p, self.reconstructor(p)
