"""The ViT decoder with its residual adds fused into the LayerNorms after them (docs/method.md § Residual + LayerNorm
fused) against a naive loop of the same modules: ``x += attn(norm1(x)); x += mlp(norm2(x))``, ``norm``, ``pred``.
"""

from __future__ import annotations

import pytest
import torch

from pae_fast.kernels import interpreter_enabled, use_backend
from pae_fast.models.decoder import DecoderBlock, ViTDecoder
from pae_fast.models.layers import unpatchify

BACKENDS = ["torch"] + (["triton"] if interpreter_enabled() else [])


def _decoder(depth: int = 3) -> ViTDecoder:
    torch.manual_seed(0)
    dec = ViTDecoder(in_dim=8, grid_size=3, patch_size=2, hidden=40, depth=depth, num_heads=4, mlp_hidden=56)
    with torch.no_grad():  # every LayerNorm with its own non-trivial affine: a norm used in the wrong place shows
        for m in dec.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
            elif isinstance(m, torch.nn.Linear):  # non-zero biases (init zeros them): the folded ones must show
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return dec


def _naive_block(blk: DecoderBlock, x: torch.Tensor) -> torch.Tensor:
    x = x + blk.attn(blk.norm1(x))
    return x + blk.mlp(blk.norm2(x))


def _naive(dec: ViTDecoder, tokens: torch.Tensor) -> torch.Tensor:
    B = tokens.shape[0]
    x = torch.cat([dec.cls_token.expand(B, -1, -1), dec.embed(tokens)], dim=1) + dec.pos_embed
    for blk in dec.blocks:
        x = _naive_block(blk, x)
    x = dec.pred(dec.norm(x))[:, 1:]
    return unpatchify(x, dec.patch_size, 3, dec.grid_size, dec.grid_size)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    up = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    return list(torch.autograd.grad((out * up).sum(), leaves, allow_unused=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth", [1, 3])
def test_fused_decoder_matches_naive_loop(backend, depth):
    dec = _decoder(depth)
    tokens = torch.randn(2, 9, 8, requires_grad=True)
    params = [p for p in dec.parameters()]
    with use_backend(backend):  # the attention follows the scope too: both sides run the same attention
        out = dec(tokens)
        got = _grads(out, [tokens, *params])
        want_out = _naive(dec, tokens)
        want = _grads(want_out, [tokens, *params])
    # torch backend: the folded proj / fc2 biases are added after their bias-free GEMMs (not inside addmm), and
    # their gradients summed by the fused op's reference: equal to the naive loop up to fp32 rounding
    tol = {"atol": 1e-6, "rtol": 1e-6} if backend == "torch" else {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(out, want_out, **tol)
    names = ["tokens"] + [n for n, _ in dec.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_alone_matches_naive(backend):
    blk = _decoder(1).blocks[0]
    x = torch.randn(2, 5, 40, requires_grad=True)
    with use_backend(backend):
        out = blk(x)
        got = _grads(out, [x, *blk.parameters()])
        want_out = _naive_block(blk, x)
        want = _grads(want_out, [x, *blk.parameters()])
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_state_dict_keys_unchanged():
    keys = set(_decoder(2).state_dict())
    for i in range(2):
        names = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc2.weight")
        assert {f"blocks.{i}.{n}" for n in names} <= keys
    assert {"norm.weight", "norm.bias", "pred.weight", "embed.weight", "cls_token", "pos_embed"} <= keys


def _naive_dam(dam, pixels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    x = dam.patch_embed(pixels) + dam.pos_embed
    for layer in dam.layers:
        x = x + layer.self_attn(layer.norm1(x))
        x = x + layer.cross_attn(layer.norm2_q(x), layer.norm2_kv(u))
        x = x + layer.mlp(layer.norm3(x))
    gamma, beta = dam.fusion_proj(x).chunk(2, dim=-1)
    return dam.final_ln(u * (1 + gamma) + beta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dam_matches_naive_loop(backend):
    # the DAM's layers chain the same way: SA residual -> norm2_q, CA residual -> norm3, MLP residual -> next norm1
    from pae_fast.models.pae import DAM

    torch.manual_seed(0)
    dam = DAM(dim=32, num_heads=2, img_size=16, patch_size=4, depth=2)
    with torch.no_grad():  # non-trivial affines everywhere and a non-zero fusion projection
        for name, p in dam.named_parameters():
            if "norm" in name or "ln" in name or "fusion_proj" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    pixels, u = torch.randn(2, 3, 16, 16), torch.randn(2, 16, 32, requires_grad=True)
    params = list(dam.parameters())
    with use_backend(backend):
        out = dam(pixels, u)
        got = _grads(out, [u, *params])
        want_out = _naive_dam(dam, pixels, u)
        want = _grads(want_out, [u, *params])
    tol = {"atol": 1e-6, "rtol": 1e-6} if backend == "torch" else {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(out, want_out, **tol)
    for name, g, w in zip(["u"] + [n for n, _ in dam.named_parameters()], got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(not interpreter_enabled(), reason="the Triton path runs on CPU only under TRITON_INTERPRET=1")
def test_decoder_backward_has_no_bias_column_sums():
    """The bias fold in the trainable blocks: with the fused backend, no ``sum`` for a block Linear's bias gradient
    (over ``d branch`` / ``d qkv``) and no ``stack`` of dq, dk, dv is left in the decoder's backward; the only sums
    are those of the embed and pred biases, the CLS token's batch expand and the loss."""
    from pae_fast.kernels.tools.traffic import TrafficCounter

    dec = _decoder(2)
    tokens = torch.randn(2, 9, 8, requires_grad=True)
    with use_backend("triton"):
        out = dec(tokens)
        with TrafficCounter() as tc:
            out.square().sum().backward()
    rows = tc.summary()["rows"]
    ops = [r["op"] for r in rows for _ in range(r["calls"])]
    sums = sum(r["written_bytes"] for r in rows if r["op"] == "sum")
    assert "stack" not in ops and ops.count("sum") == 4, sorted(set(ops))
    assert sums == 4 * (dec.embed.bias.numel() + dec.pred.bias.numel() + dec.cls_token.numel() + 1)
    assert ops.count("pae_fast::qkv_heads_backward") == 2 and ops.count("pae_fast::residual_layernorm_backward") == 5
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in dec.named_parameters() if n.endswith("bias"))
