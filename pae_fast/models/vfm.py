"""Frozen vision foundation models (VFMs) built with timm, their attention routed through ``pae_fast.kernels``.

A :class:`FrozenVFM` turns images in [0, 1] into patch tokens ``(B, N, D)``: bicubic resize to the encoder's input
size, the encoder's own mean/std, the timm ViT, prefix tokens (CLS, registers) dropped, and a final LayerNorm
*without* affine (docs/method.md §PAE tokenizer). It is always in eval mode, its parameters never require grad, and
its forward runs under ``torch.no_grad()``.

The timm model runs on pae_fast's kernels (:mod:`pae_fast.models.timm_vit`): its attention through the attention
backend registry, its block residuals fused with the LayerNorms after them, its MLPs through ``gelu_mlp``.

Weights come only from local files (:mod:`pae_fast.weights`), in timm's key layout. Random initialisation happens
only with ``pretrained=False`` and is logged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from pae_fast.models.timm_vit import patch_attention, patch_blocks, patch_mlp
from pae_fast.registry import register_encoder
from pae_fast.weights import WeightsError, load_into, read_state_dict

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HALF_MEAN",
    "HALF_STD",
    "TINY_VIT_KWARGS",
    "VFMSpec",
    "VFM_SPECS",
    "FrozenVFM",
    "build_vfm",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # SigLIP / SigLIP2
HALF_STD = (0.5, 0.5, 0.5)

# The tiny CPU encoder of the demo and the tests (also what the tiny MAE pre-training builds).
TINY_VIT_KWARGS: dict[str, Any] = dict(
    img_size=64,
    patch_size=8,
    embed_dim=128,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    class_token=True,
    reg_tokens=0,
    num_classes=0,
    global_pool="",
)


@dataclass(frozen=True)
class VFMSpec:
    """How to build one frozen encoder.

    Attributes:
        timm_name: a timm model name (built with ``pretrained=False``), or "" for a plain ``VisionTransformer``.
        input_size: square input resolution S (224 for the /14 DINOv2, 256 for /16 backbones).
        mean, std: the encoder's input normalisation.
        kwargs: extra timm constructor arguments (for "" the full ``VisionTransformer`` arguments).
        pos_antialias: whether a position table of another grid is resampled with antialias (transformers does for
            DINOv2, not for ViT-MAE; the authors' encoders are the transformers ones).
    """

    timm_name: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    kwargs: dict[str, Any] = field(default_factory=dict)
    pos_antialias: bool = True


# SigLIP's MLP uses the tanh-approximated GELU (HF's gelu_pytorch_tanh, which the authors' encoder runs); timm's
# SigLIP defaults to the exact GELU, a ~1e-3 difference in the tokens.
_SIGLIP: dict[str, Any] = dict(act_layer="gelu_tanh")
# DINOv3 is built with q/v biases (k bias fixed at 0), as the HF DINOv3 layout the PAE authors load has them.
VFM_SPECS: dict[str, VFMSpec] = {
    "DINOv2-S": VFMSpec("vit_small_patch14_reg4_dinov2.lvd142m", 224),
    "DINOv2-B": VFMSpec("vit_base_patch14_reg4_dinov2.lvd142m", 224),
    "DINOv2-L": VFMSpec("vit_large_patch14_reg4_dinov2.lvd142m", 224),
    "DINOv2-G": VFMSpec("vit_giant_patch14_reg4_dinov2.lvd142m", 224),
    "DINOv3-B": VFMSpec("vit_base_patch16_dinov3.lvd1689m", 256, kwargs=dict(qkv_bias=True)),
    "DINOv3-L": VFMSpec("vit_large_patch16_dinov3.lvd1689m", 256, kwargs=dict(qkv_bias=True)),
    "SigLIP2-B": VFMSpec("vit_base_patch16_siglip_256.v2_webli", 256, HALF_MEAN, HALF_STD, _SIGLIP),
    "SigLIP2-SO400M": VFMSpec("vit_so400m_patch16_siglip_256.v2_webli", 256, HALF_MEAN, HALF_STD, _SIGLIP),
    "MAE-B": VFMSpec("vit_base_patch16_224.mae", 256, pos_antialias=False),
    "MAE-L": VFMSpec("vit_large_patch16_224.mae", 256, pos_antialias=False),
    "ViT-tiny": VFMSpec("", 64, kwargs=TINY_VIT_KWARGS),
}


# ----------------------------------------------------------------------------------------------------------------
# The frozen encoder
# ----------------------------------------------------------------------------------------------------------------


class FrozenVFM(nn.Module):
    """A frozen timm ViT that maps images to affine-free-normalised patch tokens.

    Attributes:
        model: the timm model (its ``norm`` replaced by an affine-free LayerNorm of the same eps).
        input_size: S, the square resolution the encoder sees.
        patch_size, grid_size: p and S / p; ``num_tokens = grid_size**2``.
        embed_dim, num_heads: D and the encoder's head count (the DAM copies it).
        mean, std: ``(3,)`` input normalisation (non-persistent buffers, not in the state dict).
    """

    def __init__(self, spec: VFMSpec, name: str = "") -> None:
        super().__init__()
        self.name = name or spec.timm_name
        self.spec = spec
        if spec.timm_name:
            kwargs = dict(img_size=spec.input_size, num_classes=0, global_pool="")
            kwargs.update(spec.kwargs)
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        else:
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(**spec.kwargs)
        old = model.norm
        if not isinstance(old, nn.LayerNorm):
            raise TypeError(f"{self.name}: final norm is {type(old).__name__}, expected LayerNorm")
        model.norm = nn.LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=False)
        self.num_attention = patch_attention(model)
        self.num_fused_blocks = patch_blocks(model)
        self.num_mlp = patch_mlp(model)
        self.model = model
        self.input_size = spec.input_size
        self.patch_size = int(model.patch_embed.patch_size[0])
        if spec.input_size % self.patch_size:
            raise ValueError(f"{self.name}: input size {spec.input_size} is not a multiple of patch {self.patch_size}")
        self.grid_size = spec.input_size // self.patch_size
        self.num_tokens = self.grid_size**2
        self.embed_dim = int(model.embed_dim)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        # the finetune_vfm ablation (docs/method.md § DAM fusion ablation) sets this: parameters train, still eval mode
        self.trainable = False
        self.freeze()

    def freeze(self) -> FrozenVFM:
        """Eval mode and ``requires_grad=False`` on every parameter (``True`` when :attr:`trainable`); called again
        after any load."""
        self.requires_grad_(self.trainable)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenVFM:  # noqa: ARG002 - a frozen VFM never leaves eval mode
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, S, S)`` resized (bicubic, no antialias, no clamp) and normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        S = self.input_size
        if images.shape[-2:] != (S, S):
            images = F.interpolate(images, size=(S, S), mode="bicubic", align_corners=False, antialias=False)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, S, S)`` pixels -> ``(B, N, D)`` patch tokens (prefix tokens dropped), no grad unless
        :attr:`trainable`."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            h = self.model.forward_features(pixels)  # (B, prefix + N, D), final affine-free LayerNorm applied
        return h[:, self.num_prefix_tokens :]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] -> ``(B, N, D)`` patch tokens."""
        return self.tokens(self.preprocess(images))

    def load_encoder_state(self, state: dict[str, torch.Tensor], what: str = "weights") -> None:
        """Load an encoder state dict into :attr:`model`, strictly.

        Accepts timm's layout (adapted by :func:`adapt_timm_state`) or a transformers (HF) checkpoint of the same
        family (DINOv2-with-registers, DINOv3, SigLIP / SigLIP2 vision tower, ViT-MAE), converted by name with
        :func:`pae_fast.models.pae_convert.hf_encoder_to_timm`.
        """
        from pae_fast.models.pae_convert import hf_encoder_to_timm, is_hf_encoder

        if is_hf_encoder(state):
            state = hf_encoder_to_timm(state, self.name, self.grid_size, what)
            log.info("%s: transformers layout converted to timm's", what)
        state = adapt_timm_state(self.model, state, what, antialias=self.spec.pos_antialias)
        load_into(self.model, state, what=f"{what} (encoder {self.name})", strict=True)
        self.freeze()


def adapt_timm_state(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, antialias: bool = True
) -> dict[str, torch.Tensor]:
    """A timm-layout state dict made to fit ``model``: the explicit, logged adaptations and nothing else.

    - ``norm.weight`` / ``norm.bias`` dropped (the final LayerNorm is affine-free here);
    - the attention-pool / classifier head (``attn_pool.*``, ``head.*``, ``fc_norm.*``) dropped when the model has none;
    - an absolute ``pos_embed`` of another grid resampled to the model's (bicubic, timm's helper; prefix slots kept);
    - missing DINOv3 ``attn.q_bias`` / ``attn.v_bias`` (timm's own DINOv3 files have none) filled with zeros.
    """
    state = dict(state)
    own = model.state_dict()
    dropped = [k for k in state if k in ("norm.weight", "norm.bias") or (
        k.split(".")[0] in ("attn_pool", "head", "fc_norm") and k not in own)]
    for k in dropped:
        del state[k]
    if dropped:
        log.info("%s: dropped %d keys the frozen encoder does not use: %s", what, len(dropped), ", ".join(dropped[:4]))
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        npt = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        old_n = state["pos_embed"].shape[1] - npt
        old = int(round(old_n**0.5))
        if old * old != old_n:
            raise WeightsError(f"{what}: pos_embed {tuple(state['pos_embed'].shape)} is not a square grid")
        new = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(new), (old, old), num_prefix_tokens=npt,
                                                    antialias=antialias)
        log.info("%s: pos_embed resampled from %dx%d to %dx%d", what, old, old, *new)
    filled = [k for k in own if k.endswith(("attn.q_bias", "attn.v_bias")) and k not in state]
    for k in filled:
        state[k] = torch.zeros_like(own[k], device="cpu")
    if filled:
        log.info("%s: %d q/v biases absent, set to 0", what, len(filled))
    return state


def build_vfm(name: str, pretrained: bool = False, weights: str | os.PathLike | None = None,
              log_random: bool = True) -> FrozenVFM:
    """A registered frozen encoder.

    Args:
        name: a key of :data:`VFM_SPECS` (e.g. ``"DINOv2-L"``, ``"ViT-tiny"``).
        pretrained: True requires ``weights``; False with no ``weights`` gives a logged random initialisation.
        weights: a local timm-layout weights file (safetensors or a tensors-only torch file).
        log_random: warn about a random initialisation (False for a tokenizer's encoder: the tokenizer's weight
            loader, which may still fill it, logs what it ends up with).
    """
    if name not in VFM_SPECS:
        raise KeyError(f"unknown encoder {name!r}; valid: {', '.join(sorted(VFM_SPECS))}")
    if pretrained and weights is None:
        raise WeightsError(f"encoder {name}: pretrained=True needs weights= (a local file); nothing is downloaded")
    vfm = FrozenVFM(VFM_SPECS[name], name=name)
    if weights is None:
        if log_random:
            log.warning("encoder %s: random initialisation (pretrained=False, no weights file)", name)
    else:
        state, _ = read_state_dict(weights, key=f"encoder {name} weights")
        vfm.load_encoder_state(state, what=f"encoder {name} weights={str(weights)!r}")
        log.info("encoder %s: weights loaded from %s", name, weights)
    return vfm


def _register(name: str) -> None:
    def make(pretrained: bool = False, weights: str | os.PathLike | None = None) -> FrozenVFM:
        return build_vfm(name, pretrained=pretrained, weights=weights)

    make.__name__ = f"encoder_{name}"
    register_encoder(name, make)


for _name in VFM_SPECS:
    _register(_name)
