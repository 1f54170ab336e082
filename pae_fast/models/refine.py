"""Refined priors (stage 0): projector ``P_t``, reconstructor ``Q_t`` and the structural target
(docs/method.md §Refined priors).

- ``P_t: D -> latent_dim`` IS the tokenizer's projector (:class:`~pae_fast.models.pae.Projector`: multi-head
  self-attention without qkv bias applied directly -> tokens as a ``(B, D, h, w)`` map -> ``Conv2d(D, latent_dim, 3,
  padding=1)`` -> per-token RMS normalisation without affine), so it initialises it exactly.
- ``Q_t: latent_dim -> D``: the tokenizer's decompressor (:class:`~pae_fast.models.pae.Decompressor`: 3x3 conv
  ``latent_dim -> D``, attention without qkv bias), then ``Linear(D, hidden)`` + fixed 2-D sin-cos positions ->
  ``depth`` pre-norm ViT blocks (timm ``Block``, MLP ratio 4) -> LayerNorm -> ``Linear(hidden, D)``. The
  decompressor initialises the tokenizer's; the ViT after it is stage 0's stand-in for the pixel decoder.
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

from pae_fast.models.layers import sincos_pos_embed_2d
from pae_fast.models.pae import Decompressor, Projector

__all__ = [
    "UPSAMPLERS",
    "register_upsampler",
    "upsample_features",
    "gaussian_lowpass",
    "structural_target",
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


class PriorProjector(Projector):
    """``P_t``: ``(B, N, D)`` VFM tokens -> ``(B, N, latent_dim)`` tokens of RMS 1.

    The tokenizer's own :class:`~pae_fast.models.pae.Projector` (same class, same constructor mapping, same state
    dict: attention without qkv bias, 3x3 conv, per-token RMS normalisation), returning tokens instead of a map, so
    its weights initialise the tokenizer's projector exactly (docs/method.md § Refined priors).

    Args:
        dim: VFM width D.
        latent_dim: output channels (32).
        num_heads: attention heads (the tokenizer's: the VFM's head count).
        grid: side of the token grid; None takes it from the first input (then fixed).
    """

    def __init__(self, dim: int, latent_dim: int = 32, num_heads: int = 16, grid: int | None = None) -> None:
        super().__init__(dim, num_heads, latent_dim, grid or 0)
        self.latent_dim = latent_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        g = _square(tokens.shape[1], "PriorProjector")
        if not self.grid_size:
            self.grid_size = g
        elif g != self.grid_size:
            raise ValueError(f"PriorProjector: built for a {self.grid_size}x{self.grid_size} grid, got {g}x{g}")
        return super().forward(tokens).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, N, C)


class PriorReconstructor(nn.Module):
    """``Q_t``: ``(B, N, latent_dim)`` -> ``(B, N, D)``: the tokenizer's decompressor, then a small ViT.

    ``decompressor`` is a :class:`~pae_fast.models.pae.Decompressor` (3x3 conv ``latent_dim -> D``, attention without
    qkv bias), the module that initialises the tokenizer's; the ViT after it (``Linear(D, hidden)`` + fixed 2-D sin-cos
    positions, ``depth`` pre-norm timm blocks, LayerNorm, ``Linear(hidden, D)``) stands in for the tokenizer's pixel
    decoder during stage 0 and is discarded afterwards (docs/method.md § Refined priors).

    Args:
        latent_dim: input width; dim: output width D; hidden: ViT width; depth: blocks; num_heads: ViT heads;
        grid: side of the token grid; decompressor_heads: heads of the decompressor's attention (the VFM's).
    """

    def __init__(self, latent_dim: int, dim: int, hidden: int = 1024, depth: int = 4, num_heads: int = 16,
                 grid: int = 16, decompressor_heads: int = 16) -> None:  # fmt: skip
        super().__init__()
        from timm.models.vision_transformer import Block

        self.grid = grid
        self.decompressor = Decompressor(dim, decompressor_heads, latent_dim)
        self.embed = nn.Linear(dim, hidden)
        self.register_buffer("pos", sincos_pos_embed_2d(hidden, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(hidden, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        B, N, C = p.shape
        if self.pos.shape[1] != N:
            raise ValueError(f"PriorReconstructor: built for {self.pos.shape[1]} tokens, got {N}")
        z = p.transpose(1, 2).reshape(B, C, self.grid, self.grid)  # the latent map the tokenizer decodes
        x = self.embed(self.decompressor(z)) + self.pos.to(p.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x))


class RefinedPriors(nn.Module):
    """``P_t`` + ``Q_t`` trained by :func:`pae_fast.losses.refine.refine_loss`; ``P_t`` then gives the targets, and
    ``P_t`` with ``Q_t``'s decompressor initialise the tokenizer (keys ``projector.*`` / ``decompressor.*``).

    Args:
        dim: VFM width D.
        grid: side of the VFM / latent token grid.
        latent_dim: the tokenizer's latent width (P_t's output; it initialises the tokenizer's projector).
        hidden, depth, reconstructor_heads: ``Q_t``'s ViT (see :class:`~pae_fast.config.RefineConfig`).
        projector_heads: heads of the projector's and the decompressor's attention (the tokenizer's: the VFM's).
    """

    def __init__(self, dim: int, grid: int = 16, latent_dim: int = 32, hidden: int = 1024, depth: int = 4,
                 projector_heads: int = 16, reconstructor_heads: int = 16) -> None:  # fmt: skip
        super().__init__()
        self.projector = PriorProjector(dim, latent_dim, projector_heads, grid)
        self.reconstructor = PriorReconstructor(latent_dim, dim, hidden, depth, reconstructor_heads, grid,
                                                projector_heads)
        self.dim, self.grid, self.latent_dim = dim, grid, latent_dim

    @classmethod
    def from_config(cls, cfg: Any, dim: int, grid: int = 16, latent_dim: int = 32) -> RefinedPriors:
        """From a :class:`~pae_fast.config.RefineConfig`, the VFM width / token grid and the latent width."""
        return cls(dim, grid, latent_dim, cfg.reconstructor_hidden, cfg.reconstructor_depth,
                   cfg.projector_heads, cfg.reconstructor_heads)  # fmt: skip

    def tokenizer_state(self) -> dict[str, torch.Tensor]:
        """What initialises a PAE tokenizer: ``projector.*`` and ``decompressor.*`` under the tokenizer's key names."""
        out = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        out.update({f"decompressor.{k}": v for k, v in self.reconstructor.decompressor.state_dict().items()})
        return out

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tokens ``(B, N, D)`` (detached).

        Returns: ``P_t(H)`` ``(B, N, latent_dim)`` and ``Q_t(P_t(H))`` ``(B, N, D)``.
        """
        p = self.projector(tokens.detach())
        return p, self.reconstructor(p)
