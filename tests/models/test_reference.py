"""The fused models against a naive, unfused transcription of the papers' equations (plain torch, no kernels).

This pins the wiring that fusion makes easy to get wrong: which block's modulation feeds which fused residual+norm,
per-token modulation of the DiT^DH head, the SiLU placements of RAE's DDT, the RoPE layout, unpatchify.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pae_fast.kernels import use_backend


def _rot_pairs(x: torch.Tensor) -> torch.Tensor:
    # EVA-02 / LightningDiT rotate_half on adjacent pairs: (x0, x1) -> (-x1, x0)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x1, x0), dim=-1).flatten(-2)


def _rope_naive(grid: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    # LightningDiT's VisionRotaryEmbeddingFast(dim=hd/2): freqs theta^(-2i/(hd/2)), repeated per pair; rows then cols.
    half = hd // 2
    freqs = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    freqs = freqs.repeat_interleave(2)
    pos = torch.arange(grid, dtype=torch.float64)
    rows = (pos[:, None, None] * freqs).expand(grid, grid, half)
    cols = (pos[None, :, None] * freqs).expand(grid, grid, half)
    ang = torch.cat([rows, cols], -1).reshape(grid * grid, hd)
    return ang.cos().float(), ang.sin().float()


def _modulate(x, norm, shift, scale):
    n = F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return n * (1 + scale) + (shift if shift is not None else 0.0)


def _attn(attn, h, rope):
    B, N, D = h.shape
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    if attn.q_norm is not None:
        q = F.rms_norm(q, (hd,), attn.q_norm.weight, 1e-6)
        k = F.rms_norm(k, (hd,), attn.k_norm.weight, 1e-6)
    if rope is not None:
        cos, sin = rope
        q, k = q * cos + _rot_pairs(q) * sin, k * cos + _rot_pairs(k) * sin
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
    return attn.proj(o.transpose(1, 2).reshape(B, N, D))


def _mlp(mlp, h):
    a, b = mlp.w12(h).chunk(2, -1)
    return mlp.w3(F.silu(a) * b)


def _block(blk, x, c, rope):
    """x += g_msa * Attn(modulate(norm1(x))); x += g_mlp * MLP(modulate(norm2(x))); c per sample or per token."""
    m = blk.adaLN_modulation(c)
    m = m.unsqueeze(1) if m.dim() == 2 else m
    if blk.wo_shift:
        sc1, g1, sc2, g2 = m.chunk(4, -1)
        sh1 = sh2 = None
    else:
        sh1, sc1, g1, sh2, sc2, g2 = m.chunk(6, -1)
    x = x + g1 * _attn(blk.attn, _modulate(x, blk.norm1, sh1, sc1), rope)
    return x + g2 * _mlp(blk.mlp, _modulate(x, blk.norm2, sh2, sc2))


def _final(fl, x, c):
    m = fl.adaLN_modulation(c)
    shift, scale = (m.unsqueeze(1) if m.dim() == 2 else m).chunk(2, -1)
    return fl.linear(_modulate(x, fl.norm_final, shift, scale))


def _unpatchify(x, p, C, g):
    B = x.shape[0]
    return x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


def _patchify(embedder, x):
    return embedder.proj(x).flatten(2).transpose(1, 2)


def naive_lightningdit(m, x, t, y):
    g, p = m.x_embedder.grid_size, m.patch_size
    h = _patchify(m.x_embedder, x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder.embedding_table(y)
    rope = _rope_naive(g, m.hidden_size // m.num_heads) if m.feat_rope is not None else None
    for blk in m.blocks:
        h = _block(blk, h, c, rope)
    return _unpatchify(_final(m.final_layer, h, c), p, m.out_channels, g)


def naive_ditdh(m, x, t, y):
    g, p = m.s_embedder.grid_size, m.patch_size
    t_emb = m.t_embedder(t)
    c = F.silu(t_emb + m.y_embedder.embedding_table(y))
    s = _patchify(m.s_embedder, x) + m.pos_embed
    rope_s = _rope_naive(g, m.hidden_size // m.num_heads)
    for blk in m.blocks[: m.depth]:
        s = _block(blk, s, c, rope_s)
    s = m.s_projector(F.silu(t_emb[:, None] + s))  # (B, N, Dh): the head's per-token condition
    h = _patchify(m.x_embedder, x)
    rope_x = _rope_naive(g, m.head_hidden_size // m.head_num_heads)
    for blk in m.blocks[m.depth :]:
        h = _block(blk, h, s, rope_x)
    return _unpatchify(_final(m.final_layer, h, s), p, m.out_channels, g)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("LightningDiT-B/1", {}),
        ("LightningDiT-B/2", {"use_qknorm": True}),
        ("LightningDiT-B/2", {"wo_shift": True}),
        ("LightningDiT-B/2", {"use_rope": False, "use_qknorm": True}),
    ],
)
def test_lightningdit_matches_naive_equations(tiny, inputs, name, kw):
    m = tiny(name, **kw).eval()
    x, t, y = inputs(m)
    with torch.no_grad(), use_backend("torch"):
        v = m(x, t, y)
        ref = naive_lightningdit(m, x, t, y)
    assert v.abs().max() > 1e-2  # perturbed weights: a real signal, not zeros
    torch.testing.assert_close(v, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"wo_shift": True, "use_qknorm": True}])
def test_ditdh_matches_naive_equations_with_per_token_head(tiny, inputs, kw):
    m = tiny("DiTDH-S", **kw).eval()
    x, t, y = inputs(m)
    with torch.no_grad(), use_backend("torch"):
        v = m(x, t, y)
        ref = naive_ditdh(m, x, t, y)
    assert v.abs().max() > 1e-2
    torch.testing.assert_close(v, ref, atol=2e-5, rtol=1e-4)


def test_ditdh_head_modulation_is_per_token(tiny, inputs):
    """The head blocks' and final layer's adaLN linears see (B, N, Dh) conditions and give per-token parameters."""
    m = tiny("DiTDH-S").eval()
    x, t, y = inputs(m)
    seen = {}

    def hook(name):
        return lambda mod, args, out: seen.__setitem__(name, out)

    depth = m.depth
    m.blocks[0].adaLN_modulation.register_forward_hook(hook("trunk"))
    m.blocks[depth].adaLN_modulation.register_forward_hook(hook("head"))
    m.final_layer.adaLN_modulation.register_forward_hook(hook("final"))
    with torch.no_grad():
        m(x, t, y)
    B, N, Dh = x.shape[0], m.s_embedder.num_patches, m.head_hidden_size
    assert seen["trunk"].shape == (B, 6 * m.hidden_size)  # per sample in the trunk
    assert seen["head"].shape == (B, N, 6 * Dh)  # per token in the head
    assert seen["final"].shape == (B, N, 2 * Dh)
    assert seen["head"].std(dim=1).min() > 0  # tokens really get different shift/scale/gate
