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

Precision (docs/method.md § Precision policies): under ``train.precision=bf16`` the engine calls
:meth:`DinoDiscriminator.use_compute_dtype` (``engine.precision.compute_weights``): the frozen backbone is then held
ONCE in bf16 (it never trains, so it needs no fp32 master and no per-step cast), the image enters it in bf16 and its
block tokens leave it in fp32; the trainable heads keep fp32 weights, spectral-norm ``u``/``v`` and BatchNorm
statistics, their power iterations and sigma run in fp32 outside autocast (their convs follow the autocast in force),
and the logits are fp32. The state dict still holds the backbone in fp32 (checkpoint format unchanged).

Frozen weights come from a local file through :mod:`pae_fast.weights`. Random frozen features are used only when
the caller passes ``allow_random=True`` (tests, demos); :attr:`DinoDiscriminator.random_features` tells the caller to
report it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from pae_fast.models.timm_vit import fused_intermediates, patch_attention, patch_blocks, patch_mlp
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
        patch_attention(self.backbone)  # the attention registry, q/k/v gradient packed in one copy (as the VFM's)
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
        patch_blocks(self.backbone)  # attention residual fused with norm2 (docs/method.md § Residual + LayerNorm fused)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        D = self.backbone.embed_dim
        self.heads = nn.ModuleList(DiscriminatorHead(D, kernel_size) for _ in self.blocks)
        self.register_state_dict_post_hook(_backbone_saved_fp32)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the frozen backbone holds its weights and computes in (fp32 unless :meth:`use_compute_dtype`)."""
        return next(self.backbone.parameters()).dtype

    @torch.no_grad()
    def use_compute_dtype(self, dtype: torch.dtype) -> None:
        """Hold the frozen backbone's floating parameters and buffers in ``dtype``, in place (one copy, no fp32
        master: it never trains); the heads stay fp32. The engine's hook for ``train.precision=bf16``
        (:func:`pae_fast.engine.precision.compute_weights`); calling it again with the same dtype changes nothing."""
        for t in [*self.backbone.parameters(), *self.backbone.buffers()]:
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)

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
            one fp32 ``(B, N, D)`` tensor per block (prefix tokens dropped), differentiable w.r.t. ``images``.
        """
        x = images.float()  # resize and normalise in fp32 (B * 3 * S^2 values: negligible bytes)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).to(self.compute_dtype)  # one cast at the backbone's input
        # timm's forward_intermediates, residual adds fused (docs/method.md § Residual + LayerNorm fused)
        feats = fused_intermediates(self.backbone, x, self.blocks)
        return [f.float() for f in feats]  # the heads are fp32 (a no-op with an fp32 backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1] (already augmented by the caller).
        Returns:
            ``(B, len(blocks) * N)`` fp32 logits, one per token per head (also under autocast, whose convs give bf16).
        """
        feats = self.features(images)
        with parametrize.cached():  # each spectral-norm weight computed once here, in fp32, and reused by its conv
            self._spectral_norms()
            logits = [head(f) for head, f in zip(self.heads, feats)]
        return torch.cat(logits, dim=1).float()

    def _spectral_norms(self) -> None:
        """Evaluate the heads' spectral-norm weights (the power iteration in training mode, and sigma) outside any
        autocast: CUDA autocast would run their ``mv`` in bf16. Call inside ``parametrize.cached()``."""
        dev = self.heads[0].out.parametrizations.weight.original.device.type
        off = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()
        with off:
            for m in self.heads.modules():
                if parametrize.is_parametrized(m, "weight"):
                    m.weight  # noqa: B018 - computes and caches the normalised weight


def _backbone_saved_fp32(module: DinoDiscriminator, state: dict[str, torch.Tensor], prefix: str, meta: Any) -> None:
    """State-dict post-hook: the backbone's floating tensors are saved in fp32 whatever dtype it computes in, so
    ``disc.safetensors`` keeps its format (a bf16 run stores the bf16 values exactly, widened)."""
    for k, v in state.items():
        if k.startswith(prefix + "backbone.") and v.is_floating_point() and v.dtype != torch.float32:
            state[k] = v.float()


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
