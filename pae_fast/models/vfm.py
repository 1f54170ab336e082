"""Frozen vision foundation models (VFMs) built with timm, their attention routed through ``pae_fast.kernels``.

A :class:`FrozenVFM` turns images in [0, 1] into patch tokens ``(B, N, D)``: bicubic resize to the encoder's input
size, the encoder's own mean/std, the timm ViT, prefix tokens (CLS, registers) dropped, and a final LayerNorm
*without* affine (docs/method.md §PAE tokenizer). It is always in eval mode, its parameters never require grad, and
its forward runs under ``torch.no_grad()``.

Every attention module of the timm model (``timm.layers.Attention`` and ``timm.models.eva.EvaAttention``) has its
``forward`` replaced by one that calls :func:`pae_fast.kernels.attention.attention`, so the attention backend
registry (FlashAttention / SDPA / xformers / math) drives the VFM as it drives the generators; every timm ViT
``Block`` has its attention residual fused with ``norm2`` (:func:`patch_blocks`).

Weights come only from local files (:mod:`pae_fast.weights`), in timm's key layout. Random initialisation happens
only with ``pretrained=False`` and is logged.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from pae_fast.kernels.attention import attention
from pae_fast.kernels.qkv_norm_rope import qkv_heads
from pae_fast.kernels.residual_layernorm import residual_layernorm
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
    "patch_attention",
    "patch_blocks",
    "fused_intermediates",
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
# Attention through the registry
# ----------------------------------------------------------------------------------------------------------------


def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("pae_fast VFM attention supports neither attention masks nor causal attention")


def _timm_attention_forward(self: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
    """``timm.layers.Attention.forward`` with the product computed by the attention registry."""
    _no_mask(attn_mask, is_causal)
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    q, k, v = qkv_heads(self.qkv(x), self.num_heads)  # views; the gradient packed in one copy (no stack + clone)
    q, k = self.q_norm(q), self.k_norm(k)
    o = attention(q, k, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, H*hd)
    o = self.norm(o)
    if gate is not None:
        o = o * gate
    return self.proj_drop(self.proj(o))


def _eva_attention_forward(self: nn.Module, x: torch.Tensor, rope=None, attn_mask=None, is_causal: bool = False):
    """``timm.models.eva.EvaAttention.forward`` (RoPE on the patch tokens) with the registry's attention."""
    from timm.layers import apply_rot_embed_cat

    _no_mask(attn_mask, is_causal)
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    if self.qkv is not None:
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        projs = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in projs)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    o = attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
    o = self.norm(o)
    if gate is not None:
        o = o * gate
    return self.proj_drop(self.proj(o))


def patch_attention(model: nn.Module) -> int:
    """Make every timm attention module of ``model`` compute attention through the registry; returns how many.

    Raises:
        TypeError: the model holds an attention class this function does not know (it would bypass the registry).
    """
    from timm.models.eva import EvaAttention
    from timm.models.vision_transformer import Attention  # the class timm ViTs instantiate (re-exported)

    n = 0
    for name, m in model.named_modules():
        if type(m) is Attention:
            m.forward = types.MethodType(_timm_attention_forward, m)
        elif type(m) is EvaAttention:
            m.forward = types.MethodType(_eva_attention_forward, m)
        elif "attention" in type(m).__name__.lower() and not name.startswith("attn_pool"):
            raise TypeError(f"patch_attention: {name} is a {type(m).__name__}, which is not routed to the registry")
        else:
            continue
        n += 1
    return n


def _drop_path_active(m: nn.Module) -> bool:
    return m.training and float(getattr(m, "drop_prob", 0.0)) > 0.0


def _fused_block(blk: nn.Module, x: torch.Tensor, h: torch.Tensor, next_norm: nn.LayerNorm | None, attn_mask=None,
                 is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A timm ViT ``Block`` on ``(x, h = norm1(x))``, ``(B, N, D)`` each: ``x + ls1(attn(h))`` fused with ``norm2``,
    then the MLP residual fused with ``next_norm`` -> ``(x', next_norm(x'))``, or a plain add -> ``(x', None)``
    (docs/method.md § Residual + LayerNorm fused)."""
    if _drop_path_active(blk.drop_path1) or (next_norm is not None and _drop_path_active(blk.drop_path2)):
        # a per-sample drop of the branch is not a (D,) scale the fused op can apply
        raise TypeError("patched timm Block: drop-path is active in training mode; the fused residual cannot apply it")
    gamma1 = blk.ls1.gamma if not isinstance(blk.ls1, nn.Identity) else None
    branch = blk.attn(h, attn_mask=attn_mask, is_causal=is_causal)
    x, h = residual_layernorm(x, branch, gamma1, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    branch = blk.mlp(h)
    if next_norm is None:
        return x + blk.drop_path2(blk.ls2(branch)), None
    gamma2 = blk.ls2.gamma if not isinstance(blk.ls2, nn.Identity) else None
    return residual_layernorm(x, branch, gamma2, next_norm.weight, next_norm.bias, next_norm.eps)


def _timm_block_forward(self: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """``timm...vision_transformer.Block.forward`` with the attention residual fused into ``norm2``; the MLP residual
    stays a plain add (the next block's ``norm1`` is fused only where :func:`fused_intermediates` chains blocks)."""
    return _fused_block(self, x, self.norm1(x), None, attn_mask, is_causal)[0]


def patch_blocks(model: nn.Module) -> int:
    """Make every timm ViT ``Block`` of ``model`` (exact type) add its attention residual (with its LayerScale) fused
    with ``norm2`` (:func:`pae_fast.kernels.residual_layernorm.residual_layernorm`); returns how many.

    Other block types (EVA / DINOv3 blocks, post-norm blocks) keep their own forward. Dropout inside the attention or
    MLP is unaffected (it is part of the branch); drop-path on a residual branch is refused in training mode.

    Raises:
        TypeError: a ``Block`` whose norms are not LayerNorms over the last dim, whose LayerScale / drop-path is of
            an unknown type, or whose attention drop-path is active in training mode.
    """
    from timm.layers import DropPath, LayerScale
    from timm.models.vision_transformer import Block

    n = 0
    for name, m in model.named_modules():
        if type(m) is not Block:
            continue
        for attr in ("norm1", "norm2"):
            norm = getattr(m, attr)
            if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
                raise TypeError(f"patch_blocks: {name}.{attr} is a {type(norm).__name__} "
                                f"{tuple(getattr(norm, 'normalized_shape', ()))}, not a LayerNorm over the last dim")
        for attr, kinds in (("ls1", (LayerScale, nn.Identity)), ("ls2", (LayerScale, nn.Identity)),
                            ("drop_path1", (DropPath, nn.Identity)), ("drop_path2", (DropPath, nn.Identity))):
            if type(getattr(m, attr)) not in kinds:
                raise TypeError(f"patch_blocks: {name}.{attr} is a {type(getattr(m, attr)).__name__}, expected one of "
                                f"{', '.join(k.__name__ for k in kinds)}")
        if _drop_path_active(m.drop_path1):
            raise TypeError(f"patch_blocks: {name}.drop_path1 (p={m.drop_path1.drop_prob}) is active in training mode; "
                            "the fused residual cannot drop a sample's branch (call .eval() first)")
        m.forward = types.MethodType(_timm_block_forward, m)
        n += 1
    return n


def fused_intermediates(model: nn.Module, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """``model.forward_intermediates(x, indices, intermediates_only=True, output_fmt="NLC", stop_early=True)`` with
    each block's MLP residual also fused into the next block's ``norm1`` (docs/method.md § Residual + LayerNorm fused).

    Args:
        model: a timm ``VisionTransformer`` whose blocks :func:`patch_blocks` patched (any other model, or one with
            gradient checkpointing, runs timm's ``forward_intermediates``).
        x: ``(B, 3, S, S)`` normalised images.
        indices: non-negative block indices whose outputs are returned.
    Returns:
        one ``(B, N, D)`` tensor per distinct index in block order (prefix tokens dropped), as timm's.
    """
    from timm.models.vision_transformer import VisionTransformer

    take = sorted({int(i) for i in indices})
    blocks = list(model.blocks)[: take[-1] + 1] if take and take[0] >= 0 else []
    if (type(model) is not VisionTransformer or model.grad_checkpointing or not blocks
            or any(getattr(b.forward, "__func__", None) is not _timm_block_forward for b in blocks)):  # fmt: skip
        return model.forward_intermediates(x, indices=list(indices), intermediates_only=True, output_fmt="NLC",
                                           stop_early=True)  # fmt: skip
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    h, out = blocks[0].norm1(x), []
    for i, blk in enumerate(blocks):
        x, h = _fused_block(blk, x, h, blocks[i + 1].norm1 if i + 1 < len(blocks) else None)
        if i in take:
            out.append(x[:, model.num_prefix_tokens :])
    return out  # in block order, as timm's


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
