"""DAM fusion modes and the fine-tuned-VFM ablation (Table 3b; docs/method.md § DAM fusion ablation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pae_fast.engine.optim import make_ema, param_groups
from pae_fast.models.pae import VFMOnly
from pae_fast.registry import create_tokenizer

B = 2
VARIANTS = {"sft": "PAE-tiny", "add": "PAE-tiny-add", "concat": "PAE-tiny-concat",
            "finetune_vfm": "PAE-tiny-finetune-vfm"}


def _tok(fusion: str):
    torch.manual_seed(0)
    return create_tokenizer(VARIANTS[fusion]).eval()


@pytest.mark.parametrize("fusion", sorted(VARIANTS))
def test_every_mode_starts_at_layernorm_of_the_vfm_tokens(fusion):
    tok = _tok(fusion)
    assert tok.arch["dam_fusion"] == fusion
    images = torch.rand(B, 3, tok.image_size, tok.image_size)
    with torch.no_grad():
        f = tok.encode_features(images)
    D = tok.vfm_dim
    assert f.dam_tokens.shape == f.vfm_tokens.shape == (B, tok.vfm.num_tokens, D)
    assert f.z.shape == (B, *tok.latent_shape)
    torch.testing.assert_close(f.dam_tokens, F.layer_norm(f.vfm_tokens, (D,), eps=1e-5), atol=1e-5, rtol=0)
    assert isinstance(tok.dam, VFMOnly) == (fusion == "finetune_vfm")


@pytest.mark.parametrize("fusion", ["sft", "add", "concat"])
def test_fusion_formulas_against_a_naive_transcription(fusion):
    tok = _tok(fusion)
    dam = tok.dam
    with torch.no_grad():  # move off the identity start: random projection and LayerNorm affine
        dam.fusion_proj.weight.normal_(0, 0.1)
        dam.fusion_proj.bias.normal_(0, 0.1)
        dam.final_ln.weight.uniform_(0.5, 1.5)
        dam.final_ln.bias.normal_(0, 0.1)
    images = torch.rand(B, 3, tok.image_size, tok.image_size)
    with torch.no_grad():
        pixels = tok.vfm.preprocess(images)
        u = tok.vfm.tokens(pixels)
        x = dam.patch_embed(pixels) + dam.pos_embed
        for layer in dam.layers:
            x = layer(x, u)
        W, b = dam.fusion_proj.weight, dam.fusion_proj.bias
        D = u.shape[-1]
        if fusion == "sft":
            gb = x @ W.T + b
            pre = u * (1 + gb[..., :D]) + gb[..., D:]
        elif fusion == "add":
            pre = u + x @ W.T + b
        else:
            pre = torch.cat([u, x], -1) @ W.T + b
        mean = pre.mean(-1, keepdim=True)
        var = (pre - mean).square().mean(-1, keepdim=True)
        naive = (pre - mean) / torch.sqrt(var + 1e-5) * dam.final_ln.weight + dam.final_ln.bias
        torch.testing.assert_close(dam(pixels, u), naive, atol=1e-5, rtol=1e-5)
        if fusion != "sft":  # the roles of u and x are not interchangeable
            swapped = torch.cat([x, u], -1) @ W.T + b if fusion == "concat" else x + u @ W.T + b
            assert not torch.allclose(F.layer_norm(swapped, (D,), dam.final_ln.weight, dam.final_ln.bias), naive,
                                      atol=1e-3)


def test_concat_and_add_shapes_of_the_projection():
    D = _tok("sft").vfm_dim
    assert tuple(_tok("sft").dam.fusion_proj.weight.shape) == (2 * D, D)
    assert tuple(_tok("add").dam.fusion_proj.weight.shape) == (D, D)
    w = _tok("concat").dam.fusion_proj.weight
    assert tuple(w.shape) == (D, 2 * D)
    torch.testing.assert_close(w[:, :D], torch.eye(D))
    torch.testing.assert_close(w[:, D:], torch.zeros(D, D))


@pytest.mark.parametrize("fusion", ["sft", "finetune_vfm"])
def test_vfm_trains_only_when_fine_tuned_and_the_engine_sees_it(fusion):
    tok = _tok(fusion)
    tok.train()  # the tokenizer's train() re-freezes the VFM: it must stay trainable in finetune_vfm
    ft = fusion == "finetune_vfm"
    assert not tok.vfm.training  # eval mode in both cases
    vfm_params = list(tok.vfm.parameters())
    assert all(p.requires_grad == ft for p in vfm_params)
    ids = {id(p) for p in tok.trainable_parameters()}
    assert all((id(p) in ids) == ft for p in vfm_params)
    images = torch.rand(B, 3, tok.image_size, tok.image_size)
    z = tok.encode(images)
    z.square().mul(torch.randn_like(z)).sum().backward()
    assert all((p.grad is not None and p.grad.abs().sum() > 0) == ft for p in vfm_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.dam.parameters())
    opt_ids = {id(p) for g in param_groups(tok, 0.0) for p in g["params"]}
    assert all((id(p) in opt_ids) == ft for p in vfm_params)
    ema = make_ema(tok)  # frozen parameters are shared with the EMA, trained ones copied
    shared = [pe is p for pe, p in zip(ema.vfm.parameters(), vfm_params)]
    assert all(s != ft for s in shared)


def test_variants_rebuild_their_layout_by_name():
    kl = create_tokenizer("PAE-tiny-kl")
    f = kl.encode_features(torch.rand(B, 3, kl.image_size, kl.image_size))
    assert f.logvar.shape == f.z.shape and torch.all(f.logvar == -8.0)  # zero weight, LOGVAR_INIT bias
    assert create_tokenizer("PAE-tiny").latent_logvar is None
    tok = create_tokenizer("PAE-tiny-concat")
    again = create_tokenizer("PAE-tiny-concat")
    again.load_state_dict(tok.state_dict(), strict=True)
    with pytest.raises(RuntimeError):
        create_tokenizer("PAE-tiny").load_state_dict(tok.state_dict(), strict=True)
