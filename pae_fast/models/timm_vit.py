"""timm ViTs on pae_fast's kernels: the frozen VFMs (:mod:`pae_fast.models.vfm`) and the GAN discriminator's backbone
(:mod:`pae_fast.models.discriminator`) patch their timm modules here.

- :func:`patch_attention`: every ``timm.layers.Attention`` / ``timm.models.eva.EvaAttention`` computes its product
  through :func:`pae_fast.kernels.attention.attention` (the backend registry: FlashAttention / SDPA / xformers /
  math), its q/k/v gradient packed in one copy (``kernels.qkv_heads``);
- :func:`patch_blocks` / :func:`fused_intermediates`: timm ``Block`` residual adds fused with the LayerNorm after them
  (docs/method.md § Residual + LayerNorm fused);
- :func:`patch_mlp`: timm ``Mlp`` through ``kernels.gelu_mlp`` (docs/method.md § GELU in GEMM epilogues).

Each patch checks the exact module type and refuses what it does not know with a TypeError, so nothing bypasses it
silently.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pae_fast.kernels.attention import attention
from pae_fast.kernels.gelu_mlp import gelu_mlp
from pae_fast.kernels.qkv_heads import qkv_heads
from pae_fast.kernels.residual_layernorm import residual_layernorm

__all__ = ["patch_attention", "patch_blocks", "fused_intermediates", "patch_mlp"]


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
# MLPs through gelu_mlp
# ----------------------------------------------------------------------------------------------------------------


def _timm_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``timm.layers.Mlp.forward`` (fc1 -> GELU -> fc2) as one :func:`gelu_mlp` call (docs/method.md § GELU in GEMM
    epilogues); timm's own forward where a dropout would act (training mode, p > 0)."""
    if self.training and (getattr(self.drop1, "p", 0.0) > 0 or getattr(self.drop2, "p", 0.0) > 0):
        return type(self).forward(self, x)
    w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
    return gelu_mlp(x, w1, b1, w2, b2, approximate=self.gelu_approximate)  # (B, N, D) -> (B, N, D)


def _gelu_approximate(name: str, act: nn.Module) -> str:
    """F.gelu's ``approximate`` of a timm Mlp's activation layer."""
    from timm.layers.activations import GELU, GELUTanh

    if type(act) is nn.GELU:
        return act.approximate
    if type(act) in (GELU, GELUTanh):  # timm's: F.gelu(x) and F.gelu(x, approximate="tanh")
        return "tanh" if type(act) is GELUTanh else "none"
    raise TypeError(f"patch_mlp: {name}.act is a {type(act).__name__}, not a GELU: not routed to gelu_mlp")


def patch_mlp(model: nn.Module) -> int:
    """Make every timm ``Mlp`` of ``model`` (exact type: not its GLU / SwiGLU subclasses) compute ``fc2(GELU(fc1(x)))``
    with :func:`pae_fast.kernels.gelu_mlp`; returns how many.

    Raises:
        TypeError: an ``Mlp`` whose activation is not a GELU (exact or tanh), with a norm on the hidden features,
            with 1x1 convolutions instead of linears, or with a dropout other than ``nn.Dropout`` / ``Identity``.
    """
    from timm.layers import Mlp

    n = 0
    for name, m in model.named_modules():
        if type(m) is not Mlp:
            continue
        if type(m.fc1) is not nn.Linear or type(m.fc2) is not nn.Linear:
            raise TypeError(f"patch_mlp: {name} uses {type(m.fc1).__name__} layers, not nn.Linear (use_conv)")
        if type(m.norm) is not nn.Identity:
            raise TypeError(f"patch_mlp: {name}.norm is a {type(m.norm).__name__}: not routed to gelu_mlp")
        for drop in ("drop1", "drop2"):
            if type(getattr(m, drop)) not in (nn.Dropout, nn.Identity):
                raise TypeError(f"patch_mlp: {name}.{drop} is a {type(getattr(m, drop)).__name__}, not nn.Dropout")
        m.gelu_approximate = _gelu_approximate(name, m.act)
        m.forward = types.MethodType(_timm_mlp_forward, m)
        n += 1
    return n
