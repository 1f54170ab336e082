"""GAN discriminator: frozen DINO ViT features + trainable token heads (docs/method.md §GAN).

Layout (RAE's discriminator, itself the projected discriminator of StyleGAN-T) [paper/code lineage]:

    image in [0, 1] -> resize to ``input_size`` (bilinear) -> ImageNet mean/std -> frozen ViT (timm, default
    ``vit_small_patch8_224.dino``) -> patch tokens after blocks ``(2, 5, 8, 11)``, each ``(B, N, D)``
    -> one head per block over the token sequence as a 1-D signal ``(B, D, N)``:
         SNConv1d(D, D, 1) -> BN -> LeakyReLU(0.2)
         -> residual [SNConv1d(D, D, 9, pad 4) -> BN -> LeakyReLU(0.2)], (x + f(x)) / sqrt(2)
         -> SNConv1d(D, 1, 1)
    -> logits ``(B, N)`` per head, concatenated to ``(B, heads * N)``.

SN = spectral normalisation (``torch.nn.utils.parametrizations.spectral_norm``, one power iteration per forward).
BN = ``BatchNorm1d`` with batch statistics always (``track_running_stats=False``) [choice]: no running buffers, so a
generator-side forward never changes discriminator state except the spectral-norm power iteration. Prefix tokens
(CLS) are dropped [choice]. The backbone is frozen (``requires_grad=False``, eval mode) but differentiable w.r.t. the
image, so the generator's GAN gradient flows through it.

Frozen weights come from a local file through :mod:`pae_fast.weights`. Random frozen features are used only when
the caller passes ``allow_random=True`` (tests, demos); :attr:`DinoDiscriminator.random_features` tells the caller to
report it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from pae_fast.models.vfm import patch_mlp
from pae_fast.weights import load_into, read_state_dict

__all__ = ["DiscriminatorHead", "DinoDiscriminator", "create_discriminator", "RANDOM_WEIGHTS"]

RANDOM_WEIGHTS = "random"  # value of tokenizer.disc_weights asking for random frozen features


def _sn_conv(cin: int, cout: int, k: int) -> nn.Module:
    return spectral_norm(nn.Conv1d(cin, cout, k, padding=k // 2))


class _ConvBlock(nn.Module):
    """SNConv1d -> BatchNorm1d (batch statistics) -> LeakyReLU(0.2); ``(B, C, N) -> (B, C, N)``."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = _sn_conv(channels, channels, kernel_size)
        self.norm = nn.BatchNorm1d(channels, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class DiscriminatorHead(nn.Module):
    """Trainable head over one block's tokens: ``(B, N, D) -> (B, N)`` logits.

    Args:
        channels: token width D.
        kernel_size: width of the residual conv over the token sequence (9).
    """

    def __init__(self, channels: int, kernel_size: int = 9) -> None:
        super().__init__()
        self.inp = _ConvBlock(channels, 1)
        self.res = _ConvBlock(channels, kernel_size)
        self.out = _sn_conv(channels, 1, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.inp(tokens.transpose(1, 2))  # (B, D, N)
        x = (x + self.res(x)) / math.sqrt(2)
        return self.out(x).squeeze(1)  # (B, N)


class DinoDiscriminator(nn.Module):
    """Frozen ViT features at several blocks + one trainable :class:`DiscriminatorHead` each.

    Args:
        model: timm model name of the frozen backbone.
        blocks: indices of the blocks whose output tokens feed the heads.
        input_size: images are resized to ``input_size x input_size`` before the backbone.
        weights: local weights file of the backbone (safetensors / torch ``weights_only``), or None.
        allow_random: with ``weights=None``, keep random frozen features instead of raising (tests, demos).
        kernel_size: heads' residual conv width.
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. a tiny depth / width in tests).

    Raises:
        FileNotFoundError: no weights and ``allow_random`` is False.
        pae_fast.weights.WeightsError: the file does not fit the backbone.
    """

    full_precision = True  # fp32 weights under train.precision=bf16 (engine.precision.compute_weights): its spectral
    # norm's power iteration and the fp32 features it computes need them; the heads are a few M parameters

    def __init__(
        self,
        model: str = "vit_small_patch8_224.dino",
        blocks: Sequence[int] = (2, 5, 8, 11),
        input_size: int = 224,
        weights: str | os.PathLike | None = None,
        allow_random: bool = False,
        kernel_size: int = 9,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        kw = {"img_size": input_size, **(backbone_kwargs or {})}
        self.backbone = timm.create_model(model, pretrained=False, num_classes=0, **kw)
        patch_mlp(self.backbone)  # its MLPs through gelu_mlp (docs/method.md § GELU in GEMM epilogues)
        depth = len(self.backbone.blocks)
        self.blocks = tuple(int(b) for b in blocks)
        if not self.blocks or any(not 0 <= b < depth for b in self.blocks):
            raise ValueError(f"discriminator blocks {self.blocks} out of range for {model} with {depth} blocks")
        self.model_name = model
        self.input_size = int(input_size)
        if weights is None:
            if not allow_random:
                raise FileNotFoundError(
                    f"the GAN discriminator needs local weights of its frozen backbone {model!r}: set "
                    f"tokenizer.disc_weights to a safetensors / .pth file (or to {RANDOM_WEIGHTS!r} for random frozen "
                    "features in tests and demos, or set tokenizer.lambda_gan: 0)"
                )
            self.random_features = True
            self.weights_file: str | None = None
        else:
            state, _ = read_state_dict(weights, key="tokenizer.disc_weights")
            # timm's checkpoint filter maps original-layout files (e.g. DINO's own .pth) onto timm's names
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, self.backbone)
            load_into(self.backbone, state, what=f"tokenizer.disc_weights={str(weights)!r}",
                      skip=lambda k: k.startswith("head."))  # fmt: skip
            self.random_features = False
            self.weights_file = str(weights)
        self.backbone.eval().requires_grad_(False)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        D = self.backbone.embed_dim
        self.heads = nn.ModuleList(DiscriminatorHead(D, kernel_size) for _ in self.blocks)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode (no dropout / drop-path)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters (the backbone is frozen)."""
        return [p for p in self.heads.parameters() if p.requires_grad]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen patch tokens after each configured block.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1].
        Returns:
            one ``(B, N, D)`` tensor per block (prefix tokens dropped), differentiable w.r.t. ``images``.
        """
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return self.backbone.forward_intermediates(
            x, indices=list(self.blocks), intermediates_only=True, output_fmt="NLC", stop_early=True
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1] (already augmented by the caller).
        Returns:
            ``(B, len(blocks) * N)`` fp32 logits, one per token per head.
        """
        feats = self.features(images)
        return torch.cat([head(f) for head, f in zip(self.heads, feats)], dim=1)


def create_discriminator(cfg: Any, allow_random: bool = False, **overrides: Any) -> DinoDiscriminator:
    """A :class:`DinoDiscriminator` from a :class:`~pae_fast.config.TokenizerConfig`.

    ``cfg.disc_weights = "random"`` asks for random frozen features explicitly (reported by
    ``disc.random_features``); ``allow_random`` also permits them when ``disc_weights`` is unset (tests).
    ``overrides`` replace constructor arguments (e.g. ``backbone_kwargs`` for a tiny test backbone).
    """
    weights = cfg.disc_weights
    random_ok = allow_random or (isinstance(weights, str) and weights.lower() == RANDOM_WEIGHTS)
    if isinstance(weights, str) and weights.lower() == RANDOM_WEIGHTS:
        weights = None
    kwargs: dict[str, Any] = {
        "model": cfg.disc_model,
        "blocks": tuple(cfg.disc_blocks),
        "input_size": cfg.disc_input_size,
        "weights": weights,
        "allow_random": random_ok,
    }
    kwargs.update(overrides)
    return DinoDiscriminator(**kwargs)
