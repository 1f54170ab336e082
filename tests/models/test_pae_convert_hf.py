"""Encoder conversion against HF transformers itself: the authors' encoders are HF models, so a small random HF
model, put in the authors' key layout and converted, must give our FrozenVFM the same tokens.

Needs ``transformers`` (4.56 <= version < 5, as the authors' code); skipped when it is not installed. Checked with
4.57.6: every family agrees to ~1e-6 in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pae_fast.kernels.attention import use_attention_backend
from pae_fast.models.pae_convert import convert_authors_pae
from pae_fast.models.vfm import FrozenVFM, VFMSpec

T = pytest.importorskip("transformers")
D, L, H = 64, 2, 2
SMALL = dict(embed_dim=D, depth=L, num_heads=H)


def _dinov2():
    c = T.Dinov2WithRegistersConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * D,
                                    patch_size=14, image_size=518, num_register_tokens=4, layer_norm_eps=1e-6)
    spec = VFMSpec("vit_small_patch14_reg4_dinov2.lvd142m", 224, kwargs=SMALL)
    return T.Dinov2WithRegistersModel(c), spec, lambda m, p: m.encoder(m.embeddings(p)).last_hidden_state, 5


def _dinov3():
    c = T.DINOv3ViTConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=L, num_attention_heads=H,
                          patch_size=16, num_register_tokens=4, layer_norm_eps=1e-5, rope_theta=100.0, key_bias=False,
                          query_bias=True, value_bias=True, use_gated_mlp=False, image_size=256)
    spec = VFMSpec("vit_small_patch16_dinov3.lvd1689m", 256, kwargs=dict(SMALL, qkv_bias=True))
    return T.DINOv3ViTModel(c), spec, lambda m, p: m(pixel_values=p, output_hidden_states=True).hidden_states[-1], 5


def _siglip(image_size: int = 256):
    c = T.SiglipVisionConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=L, num_attention_heads=H,
                             image_size=image_size, patch_size=16, layer_norm_eps=1e-6)
    spec = VFMSpec("vit_base_patch16_siglip_256.v2_webli", 256,
                   kwargs=dict(SMALL, mlp_ratio=4.0, act_layer="gelu_tanh"))

    def fwd(m, p):
        return m.encoder(inputs_embeds=m.embeddings(p, interpolate_pos_encoding=True)).last_hidden_state

    return T.SiglipVisionModel(c).vision_model, spec, fwd, 0


def _mae():
    c = T.ViTMAEConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * D,
                       image_size=224, patch_size=16, mask_ratio=0.0, layer_norm_eps=1e-6)
    spec = VFMSpec("vit_base_patch16_224.mae", 256, kwargs=SMALL)

    def fwd(m, p):  # the authors' call: no masking, tokens kept in order (noise = arange)
        noise = torch.arange(256.0).expand(p.shape[0], -1)
        emb = m.embeddings(p, noise=noise, interpolate_pos_encoding=True)
        return m.encoder(emb[0] if isinstance(emb, tuple) else emb).last_hidden_state

    return T.ViTMAEModel(c), spec, fwd, 1


def _siglip_384():  # a 24x24 position table, resampled down to our 16x16 grid (transformers at run time)
    return _siglip(384)


@pytest.mark.parametrize("family, build", [("dinov2", _dinov2), ("dinov3", _dinov3), ("siglip", _siglip),
                                           ("siglip", _siglip_384), ("mae", _mae)])
def test_hf_encoder_converts_to_same_tokens(family, build):
    torch.manual_seed(0)
    hf, spec, fwd, prefix_tokens = build()
    hf.eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    root = "encoder.model." if family == "mae" else "encoder.encoder."
    final_ln = ("layernorm.", "post_layernorm.", "norm.")  # the authors' encoders have no final-LN affine
    state = {root + k: v for k, v in hf.state_dict().items() if not k.startswith(final_ln)}
    vfm = FrozenVFM(spec, name=family)
    out, leftovers = convert_authors_pae(state, family, vfm.grid_size)
    assert leftovers == []
    vfm.load_encoder_state({k[len("vfm.model."):]: v for k, v in out.items()}, what=family)
    x = torch.rand(2, 3, spec.input_size, spec.input_size)
    pixels = vfm.preprocess(x)
    with torch.no_grad(), use_attention_backend("math"):
        ours = vfm.tokens(pixels)
        ref = fwd(hf, pixels)
    ref = F.layer_norm(ref, ref.shape[-1:], eps=vfm.model.norm.eps)[:, prefix_tokens:]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the HF checkpoint of the encoder alone (final LayerNorm affine included) loads the same way
    direct = FrozenVFM(spec, name={"dinov2": "DINOv2-x", "dinov3": "DINOv3-x", "siglip": "SigLIP2-x",
                                   "mae": "MAE-x"}[family])
    direct.load_encoder_state(hf.state_dict(), what=family)
    with torch.no_grad(), use_attention_backend("math"):
        torch.testing.assert_close(direct.tokens(pixels), ours)
