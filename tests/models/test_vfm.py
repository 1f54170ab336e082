"""Frozen VFMs: token shapes, freezing, attention through the registry (vs math and vs timm's own), weight files."""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from pae_fast.io import save_safetensors
from pae_fast.kernels import interpreter_enabled, use_backend
from pae_fast.kernels.attention import attention_backend_reasons, use_attention_backend
from pae_fast.models.timm_vit import fused_intermediates, patch_blocks
from pae_fast.models.vfm import TINY_VIT_KWARGS, FrozenVFM, VFMSpec, build_vfm
from pae_fast.registry import create_encoder, list_encoders
from pae_fast.weights import WeightsError

BACKENDS = [b for b, why in attention_backend_reasons().items() if why is None and b != "triton"]


def _unpatched(vfm: FrozenVFM) -> torch.nn.Module:
    """The same timm model with timm's own attention and block forwards (the instance overrides removed)."""
    model = copy.deepcopy(vfm.model)
    for m in model.modules():
        if "forward" in m.__dict__:
            del m.forward
    return model


def test_tiny_encoder_tokens_and_freezing():
    torch.manual_seed(0)
    vfm = create_encoder("ViT-tiny")
    assert vfm.num_tokens == 64 and vfm.embed_dim == 128 and vfm.num_heads == 4 and vfm.num_attention == 4
    assert not any(p.requires_grad for p in vfm.parameters())
    vfm.train()
    assert not vfm.training and not any(m.training for m in vfm.modules())
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    u = vfm(x)
    assert u.shape == (2, 64, 128) and not u.requires_grad
    # CLS dropped, affine-free final LayerNorm: every token has zero mean and unit variance over D
    assert torch.allclose(u.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(u.var(-1, unbiased=False), torch.ones(2, 64), atol=1e-3)
    # other sizes are resized (bicubic) to the encoder input
    assert vfm(torch.rand(1, 3, 80, 80)).shape == (1, 64, 128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vfm_attention_matches_math_and_timm(backend):
    torch.manual_seed(0)
    vfm = build_vfm("ViT-tiny")
    x = torch.rand(2, 3, 64, 64)
    pixels = vfm.preprocess(x)
    with use_attention_backend("math"):
        ref = vfm.tokens(pixels)
    with use_attention_backend(backend):
        got = vfm.tokens(pixels)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        timm_out = _unpatched(vfm).forward_features(pixels)[:, 1:]
    torch.testing.assert_close(got, timm_out, atol=2e-5, rtol=2e-5)


def test_eva_rope_attention_matches_timm():
    """DINOv3 is a timm Eva with RoPE: a 2-layer one through the registry equals timm's own forward."""
    torch.manual_seed(0)
    spec = VFMSpec("vit_small_patch16_dinov3.lvd1689m", 32,
                   kwargs=dict(depth=2, embed_dim=64, num_heads=2, qkv_bias=True))
    vfm = FrozenVFM(spec, name="DINOv3-test")
    with torch.no_grad():
        for p in vfm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pixels = vfm.preprocess(torch.rand(2, 3, 32, 32))
    assert vfm.num_attention == 2 and vfm.num_prefix_tokens == 5
    with use_attention_backend("math"):
        got = vfm.tokens(pixels)
    with torch.no_grad():
        ref = _unpatched(vfm).forward_features(pixels)[:, 5:]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_tiny_encoder_loads_timm_weights(tmp_path, caplog):
    """A timm VisionTransformer(**TINY_VIT_KWARGS) state dict (e.g. from MAE pre-training) loads strictly."""
    torch.manual_seed(1)
    src = VisionTransformer(**TINY_VIT_KWARGS)
    path = tmp_path / "vit_tiny.safetensors"
    save_safetensors({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    with caplog.at_level(logging.INFO):
        vfm = create_encoder("ViT-tiny", weights=path)
    assert "dropped 2 keys" in caplog.text  # the final norm's affine
    torch.testing.assert_close(vfm.model.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)
    assert not any(p.requires_grad for p in vfm.parameters())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        src.norm = torch.nn.LayerNorm(128, eps=src.norm.eps, elementwise_affine=False)
        ref = src.forward_features(vfm.preprocess(x))[:, 1:]
    torch.testing.assert_close(vfm(x), ref, atol=2e-5, rtol=2e-5)
    bad = dict(src.state_dict())
    bad["blocks.9.attn.qkv.weight"] = bad.pop("blocks.3.attn.qkv.weight")
    save_safetensors({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=r"missing 1: blocks\.3\.attn\.qkv\.weight.*unexpected 1: blocks\.9"):
        create_encoder("ViT-tiny", weights=tmp_path / "bad.safetensors")


def test_random_init_only_when_asked(caplog):
    with pytest.raises(WeightsError, match="pretrained=True needs weights"):
        create_encoder("ViT-tiny", pretrained=True)
    with caplog.at_level(logging.WARNING):
        create_encoder("ViT-tiny")
    assert "random initialisation" in caplog.text


@pytest.mark.parametrize(
    "name, grid, dim, heads, params",
    [
        ("DINOv2-S", 16, 384, 6, 21_629_184),
        ("DINOv2-B", 16, 768, 12, 85_725_696),
        ("DINOv2-L", 16, 1024, 16, 303_228_928),
        ("DINOv2-G", 16, 1536, 24, 1_134_771_200),
        ("DINOv3-B", 16, 768, 12, 85_658_112),
        ("DINOv3-L", 16, 1024, 16, 303_126_528),
        ("SigLIP2-B", 16, 768, 12, 85_841_664),
        ("SigLIP2-SO400M", 16, 1152, 16, 412_647_408),
        ("MAE-B", 16, 768, 12, 85_843_200),
        ("MAE-L", 16, 1024, 16, 303_361_024),
    ],
)
def test_paper_encoders_on_meta(name, grid, dim, heads, params):
    """Counts tie to the authors' encoder entries (reference key lists): DINOv2-L 304,370,688 = ours + the 37x37
    table beyond 16x16 (1,114 x 1024) + mask_token; DINOv3-L 303,127,552 = ours + mask_token; SigLIP2-SO400M
    427,885,760 = ours + the unused 15,238,352-parameter pooling head; MAE-L 303,299,584 = ours - 60 x 1024
    (their 14x14 table vs our 16x16)."""
    with torch.device("meta"):
        vfm = create_encoder(name)
    assert (vfm.grid_size, vfm.embed_dim, vfm.num_heads) == (grid, dim, heads)
    assert vfm.num_attention == len(vfm.model.blocks)
    assert vfm.model.norm.weight is None  # affine removed
    assert sum(p.numel() for p in vfm.parameters()) == params
    expected_input = 224 if name.startswith("DINOv2") else 256
    assert vfm.input_size == expected_input
    assert timm.__version__.startswith("1.")


def test_encoder_registry_lists_all():
    assert {"ViT-tiny", "DINOv2-L", "DINOv3-L", "SigLIP2-SO400M", "MAE-L", "SigLIP2-B"} <= set(list_encoders())


def test_timm_file_of_another_grid_is_resampled(tmp_path, caplog):
    """A timm file made at another resolution: its position table is resampled (prefix slot kept), logged."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(2)
    src = VisionTransformer(**dict(TINY_VIT_KWARGS, img_size=32))  # 4x4 grid + CLS slot
    path = tmp_path / "vit_32.safetensors"
    save_safetensors({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    with caplog.at_level(logging.INFO):
        vfm = create_encoder("ViT-tiny", weights=path)
    assert "pos_embed resampled from 4x4 to 8x8" in caplog.text
    want = resample_abs_pos_embed(src.pos_embed.detach(), [8, 8], (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(vfm.model.pos_embed, want)
    torch.testing.assert_close(vfm.model.pos_embed[:, :1], src.pos_embed[:, :1].detach())


def test_dinov3_file_without_qv_biases_gets_zeros():
    """timm's own DINOv3 layout has no q/v biases; ours (the HF layout) has them: they are filled with zeros."""
    from pae_fast.models.vfm import adapt_timm_state

    spec = VFMSpec("vit_small_patch16_dinov3.lvd1689m", 32, kwargs=dict(depth=1, embed_dim=64, num_heads=2,
                                                                         qkv_bias=True))
    vfm = FrozenVFM(spec, name="DINOv3-test")
    state = {k: v for k, v in vfm.model.state_dict().items() if not k.endswith(("q_bias", "v_bias"))}
    adapted = adapt_timm_state(vfm.model, state, "test")
    assert torch.equal(adapted["blocks.0.attn.q_bias"], torch.zeros(64))
    vfm.load_encoder_state(state)


# ----------------------------------------------------------------------------------------------------------------
# timm Blocks: the attention residual fused with norm2 (docs/method.md § Residual + LayerNorm fused)
# ----------------------------------------------------------------------------------------------------------------

KERNEL_BACKENDS = ["torch"] + (["triton"] if interpreter_enabled() else [])


def _layerscale_vit() -> VisionTransformer:
    """A tiny DINOv2-like ViT (LayerScale, registers) with non-trivial LayerNorm affines and LayerScales."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=40, depth=2, num_heads=2, init_values=0.5,
                              reg_tokens=2, num_classes=0, global_pool="")  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ls" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_patched_blocks_match_timm_forward_and_gradients(backend):
    model = _layerscale_vit()
    ref = copy.deepcopy(model)
    assert patch_blocks(model) == 2
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    outs = []
    for m in (model, ref):
        with use_backend(backend):
            feats = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True, output_fmt="NLC")
            out = torch.cat([f.flatten() for f in feats] + [m.forward_features(x).flatten()])
            up = torch.linspace(-1, 1, out.numel())
            grads = torch.autograd.grad((out * up).sum(), [x, *m.parameters()])
        outs.append((out, grads))
    (got, got_g), (want, want_g) = outs
    tol = {"atol": 0.0, "rtol": 0.0} if backend == "torch" else {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(got, want, **tol)
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, g, w in zip(names, got_g, want_g):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_intermediates_match_timm(backend):
    # the MLP residual of each block fused into the next block's norm1 too: the same tokens and gradients as timm's
    # forward_intermediates (DINOv2-like: LayerScale on both branches, registers as prefix tokens)
    model = _layerscale_vit()
    model.blocks.append(copy.deepcopy(model.blocks[1]))  # 3 blocks: take 0 and 1, stop before the last
    ref = copy.deepcopy(model)
    patch_blocks(model)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with use_backend(backend):
        got = fused_intermediates(model, x, (1, 0))
        want = ref.forward_intermediates(x, indices=[1, 0], intermediates_only=True, output_fmt="NLC",
                                         stop_early=True)  # fmt: skip
        assert [t.shape for t in got] == [t.shape for t in want] == [(2, 16, 40)] * 2
        g_got = torch.autograd.grad(sum((t * t.detach().sin()).sum() for t in got), [x, *model.parameters()],
                                    allow_unused=True)  # fmt: skip
        g_want = torch.autograd.grad(sum((t * t.detach().sin()).sum() for t in want), [x, *ref.parameters()],
                                     allow_unused=True)  # fmt: skip
    tol = {"atol": 0.0, "rtol": 0.0} if backend == "torch" else {"atol": 2e-5, "rtol": 1e-4}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    for name, a, b in zip(["x"] + [n for n, _ in model.named_parameters()], g_got, g_want):
        assert (a is None) == (b is None), name  # the last block and the final norm are not reached
        if b is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # a model whose blocks are not patched runs timm's own walk
    torch.testing.assert_close(fused_intermediates(ref, x, [0])[0], want[0], **tol)  # block order: want[0] is block 0


def test_patch_blocks_refuses_what_it_cannot_fuse():
    model = _layerscale_vit()
    model.blocks[1].norm2 = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\.1\.norm2 is a Identity"):
        patch_blocks(model)
    model = _layerscale_vit()
    model.blocks[0].ls2 = torch.nn.Dropout()
    with pytest.raises(TypeError, match=r"blocks\.0\.ls2 is a Dropout, expected one of LayerScale, Identity"):
        patch_blocks(model)
    # drop-path on the attention branch in training mode: refused when patching and when called
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.2)
    with pytest.raises(TypeError, match=r"blocks\.1\.drop_path1 .* active in training mode"):
        patch_blocks(model.train())
    assert patch_blocks(model.eval()) == 2
    model.forward_features(torch.randn(1, 3, 16, 16))  # eval: drop-path is the identity
    with pytest.raises(TypeError, match="drop-path is active in training mode"):
        model.train().forward_features(torch.randn(1, 3, 16, 16))


def test_frozen_vfm_and_discriminator_blocks_are_patched():
    from pae_fast.models.discriminator import DinoDiscriminator

    assert build_vfm("ViT-tiny").num_fused_blocks == 4
    disc = DinoDiscriminator(model="vit_small_patch8_224.dino", blocks=(1, 3), input_size=32, allow_random=True,
                             backbone_kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    assert all("forward" in blk.__dict__ for blk in disc.backbone.blocks)
    images = torch.rand(2, 3, 32, 32)
    unpatched = copy.deepcopy(disc.backbone)
    for blk in unpatched.blocks:
        del blk.forward
    want = unpatched.forward_intermediates((images - disc.mean) / disc.std, indices=[1, 3], intermediates_only=True,
                                           output_fmt="NLC")  # fmt: skip
    for got, w in zip(disc.features(images), want):
        torch.testing.assert_close(got, w, atol=0.0, rtol=0.0)  # CPU: the reference ops, the unfused chain itself
