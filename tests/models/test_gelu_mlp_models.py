"""The models' GELU MLPs through ``kernels.gelu_mlp`` (docs/method.md § GELU in GEMM epilogues): the ViT decoder's and
the DAM's MLP (timm ``Mlp``'s keys, exact GELU), the plain DiT MLP (tanh GELU), and the timm ``Mlp`` modules of the
frozen VFMs and of the discriminator backbone (``patch_mlp``), each against timm's / the unfused computation with the
Triton GEMMs running under the interpreter."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, get_act_layer
from timm.layers.activations import GELUTanh
from torch import nn

from pae_fast.kernels import use_attention_backend, use_backend
from pae_fast.kernels.tools.traffic import TrafficCounter
from pae_fast.models.decoder import DecoderBlock
from pae_fast.models.discriminator import DinoDiscriminator
from pae_fast.models.layers import Mlp as FusedMlp
from pae_fast.models.pae import DAMBlock
from pae_fast.models.timm_vit import patch_mlp
from pae_fast.models.vfm import TINY_VIT_KWARGS, VFM_SPECS, FrozenVFM, VFMSpec
from pae_fast.registry import create_encoder


def _unpatched(model: nn.Module) -> nn.Module:
    """A copy with timm's own forwards (the instance overrides of patch_attention / patch_mlp removed)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if "forward" in m.__dict__:
            del m.forward
    return model


def _op_calls(summary: dict) -> dict[str, int]:
    return {r["op"]: r["calls"] for r in summary["rows"]}


@pytest.mark.parametrize("block", ["decoder", "dam"])
def test_tokenizer_blocks_mlp_is_timm_mlp_with_exact_gelu(block):
    """The decoder's / DAM's MLP loads timm ``Mlp``'s state dict strictly (the authors' keys) and computes what it
    computes, exact GELU (inputs of scale 3: the tanh approximation would be off), forward and every gradient."""
    torch.manual_seed(0)
    mod = DecoderBlock(40, 2, 24).mlp if block == "decoder" else DAMBlock(40, 2, mlp_ratio=0.6).mlp
    timm_mlp = Mlp(40, 24, act_layer=nn.GELU)
    assert list(mod.state_dict()) == list(timm_mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    mod.load_state_dict(timm_mlp.state_dict(), strict=True)
    x = 3 * torch.randn(2, 19, 40)
    with use_backend("triton"), TrafficCounter() as tc:
        y = mod(x)
    assert _op_calls(tc.summary())["pae_fast::gelu_mlp"] == 1
    want = timm_mlp(x)
    torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)
    tanh = F.linear(F.gelu(timm_mlp.fc1(x), approximate="tanh"), timm_mlp.fc2.weight, timm_mlp.fc2.bias)
    assert not torch.allclose(tanh, want, atol=2e-5, rtol=2e-5)
    g = torch.randn(y.shape)
    with use_backend("triton"):
        got = torch.autograd.grad(mod(x), list(mod.parameters()), g)
    for a, b in zip(got, torch.autograd.grad(want, list(timm_mlp.parameters()), g)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_dit_mlp_is_tanh_gelu_and_unbiased_form():
    """The plain DiT MLP: fc2(GELU_tanh(fc1(x))); ``forward_unbiased`` gives (that - fc2.bias, fc2.bias)."""
    torch.manual_seed(0)
    m = FusedMlp(48, 2.0)
    x = 3 * torch.randn(2, 5, 48)
    want = m.fc2(F.gelu(m.fc1(x), approximate="tanh"))
    with use_backend("triton"):
        y = m(x)
        y0, b = m.forward_unbiased(x)
    torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)
    assert b is m.fc2.bias
    torch.testing.assert_close(y0 + b, want, atol=2e-5, rtol=2e-5)


def test_vfm_mlps_run_gelu_mlp_and_match_timm():
    """Every block's timm Mlp of the frozen encoder runs the fused op (one forward call each, no aten GELU, nothing
    saved under no_grad) and the tokens equal timm's own forward."""
    torch.manual_seed(0)
    kwargs = {**TINY_VIT_KWARGS, "img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2}  # ViT-tiny, smaller
    vfm = FrozenVFM(VFMSpec("", 32, kwargs=kwargs), name="ViT-tinier")
    assert vfm.num_mlp == 2 and all(b.mlp.gelu_approximate == "none" for b in vfm.model.blocks)
    pixels = vfm.preprocess(torch.rand(2, 3, 32, 32))
    with use_backend("triton"), use_attention_backend("math"), TrafficCounter() as tc:
        got = vfm.tokens(pixels)
    calls = _op_calls(tc.summary())
    assert calls["pae_fast::gelu_mlp"] == 2 and "gelu" not in calls
    gelu_rows = [r for r in tc.summary()["rows"] if r["op"] == "pae_fast::gelu_mlp"]
    assert gelu_rows[0]["written_bytes"] == 2 * (2 * 17 * 64 * 4)  # y only: no pre-activation, no h
    with torch.no_grad():
        ref = _unpatched(vfm.model).forward_features(pixels)[:, 1:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(VFM_SPECS))
def test_paper_encoders_mlps_on_meta(name):
    """Which GELU each encoder's MLPs get: tanh for SigLIP (its act_layer), exact for the others; DINOv2-G's SwiGLU
    (timm ``GluMlp``) is not a GELU Mlp and keeps timm's forward."""
    with torch.device("meta"):
        vfm = create_encoder(name)
    got = {getattr(b.mlp, "gelu_approximate", type(b.mlp).__name__) for b in vfm.model.blocks}
    want = {"GluMlp"} if name == "DINOv2-G" else {"tanh"} if name.startswith("SigLIP") else {"none"}
    assert got == want
    assert vfm.num_mlp == (0 if name == "DINOv2-G" else len(vfm.model.blocks))


def test_patch_mlp_reads_the_gelu_and_refuses_other_mlps():
    torch.manual_seed(0)
    tanh_gelu = functools.partial(nn.GELU, approximate="tanh")
    acts = (GELUTanh, nn.GELU, tanh_gelu, get_act_layer("gelu"))  # timm's, torch's, torch's tanh, timm's by name
    model = nn.Sequential(*(Mlp(8, 16, act_layer=a) for a in acts), GluMlp(8, 16))
    ref = _unpatched(model)
    assert patch_mlp(model) == 4 and [m.gelu_approximate for m in model[:4]] == ["tanh", "none", "tanh", "none"]
    assert "forward" not in model[4].__dict__  # a subclass of Mlp (SwiGLU): not patched
    x = 3 * torch.randn(2, 5, 8)
    with use_backend("triton"), TrafficCounter() as tc:
        got = [m(x) for m in model[:4]]
    assert _op_calls(tc.summary())["pae_fast::gelu_mlp"] == 4
    for g, m in zip(got, ref[:4]):
        torch.testing.assert_close(g, m(x), atol=2e-5, rtol=2e-5)
    alpha = Mlp(8, 16)
    alpha.drop2 = nn.AlphaDropout(0.1)
    for bad, match in ((Mlp(8, 16, act_layer=nn.SiLU), "0.act is a SiLU, not a GELU"),
                       (Mlp(8, 16, norm_layer=nn.LayerNorm), "0.norm is a LayerNorm"),
                       (Mlp(8, 16, use_conv=True), "0 uses Conv2d layers"),
                       (alpha, "0.drop2 is a AlphaDropout, not nn.Dropout")):  # fmt: skip
        with pytest.raises(TypeError, match=match):
            patch_mlp(nn.Sequential(bad))


def test_patched_mlp_keeps_timm_dropout_in_training_mode():
    """A dropout that acts (training mode, p > 0) runs timm's own forward; in eval the fused op."""
    m = Mlp(8, 16, drop=0.5)
    patch_mlp(m)
    x = torch.randn(4, 8)
    with use_backend("triton"), TrafficCounter() as tc:
        m.train()(x)
        m.eval()(x)
    calls = _op_calls(tc.summary())
    assert calls["pae_fast::gelu_mlp"] == 1 and calls["gelu"] == 1


def test_discriminator_backbone_mlps_run_gelu_mlp():
    """The discriminator backbone's MLPs run the fused op: features and their gradient to the image equal timm's."""
    torch.manual_seed(0)
    d = DinoDiscriminator(blocks=(1, 3), input_size=32, allow_random=True,
                          backbone_kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    assert all("forward" in b.mlp.__dict__ and b.mlp.gelu_approximate == "none" for b in d.backbone.blocks)
    ref_backbone = _unpatched(d.backbone)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    with use_backend("triton"), TrafficCounter() as tc:
        feats = d.features(images)
    assert _op_calls(tc.summary())["pae_fast::gelu_mlp"] == 4  # blocks 0..3 (stop_early at the last index, 3)
    d.backbone = ref_backbone
    want = d.features(images)
    g = [torch.randn(f.shape) for f in feats]
    for a, b in zip(feats, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    (ga,) = torch.autograd.grad(feats, [images], g)
    (gb,) = torch.autograd.grad(want, [images], g)
    torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-4)
