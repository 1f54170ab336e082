"""The PAE authors' checkpoint layout (shared/reference key lists) -> our modules, strictly, with readable diffs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pae_fast.models.pae import PAETokenizer
from pae_fast.models.pae_convert import convert_authors_pae, load_authors_pae
from pae_fast.models.tokenizer import load_tokenizer_weights
from pae_fast.registry import create_tokenizer
from pae_fast.weights import WeightsError

# copies of the reference key lists gathered from the authors' code (key, shape, dtype, requires_grad; no code)
REF = Path(__file__).resolve().parent / "data" / "pae_reference"
LAYOUTS = {
    "PAE-DINOv2-L-d32": "pae_dinov2l_d32.txt",
    "PAE-DINOv3-L-d32": "pae_dinov3l_d32.txt",
    "PAE-SigLIP2-SO400M-d32": "pae_siglip2so_d32.txt",
    "PAE-MAE-L-d32": "pae_mael_d32.txt",
}


def read_layout(name: str) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from a reference key list (``key<TAB>shape<TAB>dtype<TAB>requires_grad``)."""
    out = {}
    for line in (REF / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            out[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_full_layout_loads_strictly_on_meta(name):
    """Every key of the authors' full-size layout maps, with its shape, onto ours (wrapper and prefixes too)."""
    layout = read_layout(LAYOUTS[name])
    state = {f"module._orig_mod.{k}": torch.empty(s, device="meta") for k, s in layout.items()}
    with torch.device("meta"):
        tok = create_tokenizer(name)
    load_authors_pae(tok, {"model": state}, what=LAYOUTS[name])
    converted, leftovers = convert_authors_pae({k: v for k, v in zip(layout, state.values())},
                                               name.split("-")[1].lower().replace("siglip2", "siglip"), 16)
    assert leftovers == []
    assert set(converted) == set(tok.state_dict())


def test_mismatch_gives_readable_diff():
    layout = read_layout(LAYOUTS["PAE-DINOv2-L-d32"])
    state = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    with torch.device("meta"):
        tok = create_tokenizer("PAE-DINOv2-L-d32")
    broken = dict(state)
    del broken["delta_encoder.layers.3.norm3.bias"]
    broken["decoder.decoder_pred.weight"] = torch.empty(3, 3, device="meta")
    with pytest.raises(WeightsError, match=r"missing 1: dam\.layers\.3\.norm3\.bias.*wrong shape 1: "
                                           r"decoder\.pred\.weight \(3, 3\) \(expected \(768, 1024\)\)"):
        load_authors_pae(tok, broken, what="ckpt.pt")
    extra = {"latent_compressor.3.weight": torch.empty(1, device="meta")}  # no rule knows it
    with pytest.raises(WeightsError, match=r"1 keys of the authors' layout have no counterpart.*latent_compressor\.3"):
        load_authors_pae(tok, {**state, **extra})
    with pytest.raises(WeightsError, match=r"unexpected 1: dam\.extra\.weight"):  # renamed, but not ours
        load_authors_pae(tok, {**state, "delta_encoder.extra.weight": torch.empty(1, device="meta")})
    no_encoder = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    with pytest.raises(WeightsError, match="no encoder"):
        load_authors_pae(tok, no_encoder)
    load_authors_pae(tok, no_encoder, need_vfm=False)  # the encoder came from its own file


def test_value_transforms():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    D = 8
    q, k, v = r(D, D), r(D, D), r(D, D)
    cls, pos = r(1, 1, D), r(1, 1 + 37 * 37, D)
    fusion = r(2 * D, D)
    state = {
        "decoder.decoder_layers.4.attention.attention.query.weight": q,
        "decoder.decoder_layers.4.attention.attention.key.weight": k,
        "decoder.decoder_layers.4.attention.attention.value.weight": v,
        "delta_encoder.fusion_proj.weight": fusion,
        "encoder.encoder.embeddings.cls_token": cls,
        "encoder.encoder.embeddings.position_embeddings": pos,
        "encoder.encoder.embeddings.mask_token": r(1, D),
    }
    out, left = convert_authors_pae(state, "dinov2", 16)
    assert left == [] and "vfm.model.mask_token" not in out
    torch.testing.assert_close(out["decoder.blocks.4.attn.qkv.weight"], torch.cat([q, k, v]))
    assert out["dam.fusion_proj.weight"] is fusion
    torch.testing.assert_close(out["vfm.model.cls_token"], cls + pos[:, :1])  # CLS position folded in
    grid = pos[:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out["vfm.model.pos_embed"], want.permute(0, 2, 3, 1).reshape(1, 256, D))
    # MAE: CLS slot kept, 14x14 -> 16x16 without antialias
    mae_pos = r(1, 1 + 14 * 14, D)
    out, _ = convert_authors_pae({"encoder.model.embeddings.position_embeddings": mae_pos}, "mae", 16)
    grid = mae_pos[:, 1:].reshape(1, 14, 14, D).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(out["vfm.model.pos_embed"][:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, D))
    assert torch.equal(out["vfm.model.pos_embed"][:, :1], mae_pos[:, :1])
    # DINOv3: q and v biases, no k bias
    qb, vb = r(D), r(D)
    base = "encoder.encoder.layer.2.attention."
    out, _ = convert_authors_pae({base + "q_proj.bias": qb, base + "v_proj.bias": vb, base + "q_proj.weight": q,
                                  base + "k_proj.weight": k, base + "v_proj.weight": v}, "dinov3", 16)
    assert out["vfm.model.blocks.2.attn.q_bias"] is qb and out["vfm.model.blocks.2.attn.v_bias"] is vb
    torch.testing.assert_close(out["vfm.model.blocks.2.attn.qkv.weight"], torch.cat([q, k, v]))
    with pytest.raises(WeightsError, match="layer 2 weight has only"):
        convert_authors_pae({base + "q_proj.weight": q}, "dinov3", 16)


# ours -> the authors' names (test-side inverse of the converter, DINOv2 family)
_INVERSE = [
    (r"vfm\.model\.reg_token", r"encoder.encoder.embeddings.register_tokens"),
    (r"vfm\.model\.patch_embed\.proj\.(.*)", r"encoder.encoder.embeddings.patch_embeddings.projection.\1"),
    (r"vfm\.model\.blocks\.(\d+)\.norm([12])\.(.*)", r"encoder.encoder.encoder.layer.\1.norm\2.\3"),
    (r"vfm\.model\.blocks\.(\d+)\.attn\.proj\.(.*)", r"encoder.encoder.encoder.layer.\1.attention.output.dense.\2"),
    (r"vfm\.model\.blocks\.(\d+)\.ls([12])\.gamma", r"encoder.encoder.encoder.layer.\1.layer_scale\2.lambda1"),
    (r"vfm\.model\.blocks\.(\d+)\.mlp\.(.*)", r"encoder.encoder.encoder.layer.\1.mlp.\2"),
    (r"dam\.(.*)", r"delta_encoder.\1"),
    (r"projector\.attn\.(.*)", r"latent_compressor.0.\1"),
    (r"projector\.conv\.(.*)", r"latent_compressor.1.\1"),
    (r"decompressor\.conv\.(.*)", r"latent_decompressor.0.\1"),
    (r"decompressor\.attn\.(.*)", r"latent_decompressor.1.\1"),
    (r"decoder\.pos_embed", r"decoder.decoder_pos_embed"),
    (r"decoder\.cls_token", r"decoder.trainable_cls_token"),
    (r"decoder\.(embed|norm|pred)\.(.*)", r"decoder.decoder_\1.\2"),
    (r"decoder\.blocks\.(\d+)\.attn\.proj\.(.*)", r"decoder.decoder_layers.\1.attention.output.dense.\2"),
    (r"decoder\.blocks\.(\d+)\.mlp\.fc1\.(.*)", r"decoder.decoder_layers.\1.intermediate.dense.\2"),
    (r"decoder\.blocks\.(\d+)\.mlp\.fc2\.(.*)", r"decoder.decoder_layers.\1.output.dense.\2"),
    (r"decoder\.blocks\.(\d+)\.norm1\.(.*)", r"decoder.decoder_layers.\1.layernorm_before.\2"),
    (r"decoder\.blocks\.(\d+)\.norm2\.(.*)", r"decoder.decoder_layers.\1.layernorm_after.\2"),
]


def to_authors_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pos0 = torch.randn(1, 1, state["vfm.model.cls_token"].shape[-1])
    for key, t in state.items():
        if m := re.fullmatch(r"(vfm\.model\.blocks|decoder\.blocks)\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            enc = m.group(1).startswith("vfm")
            pre = (f"encoder.encoder.encoder.layer.{m.group(2)}" if enc
                   else f"decoder.decoder_layers.{m.group(2)}") + ".attention.attention."
            for part, chunk in zip(("query", "key", "value"), t.chunk(3)):
                out[f"{pre}{part}.{m.group(3)}"] = chunk.clone()
        elif key == "vfm.model.cls_token":
            out["encoder.encoder.embeddings.cls_token"] = t - pos0
        elif key == "vfm.model.pos_embed":  # the grid already matches: no resampling on the way back
            out["encoder.encoder.embeddings.position_embeddings"] = torch.cat([pos0, t], dim=1)
        else:
            new = next((re.sub(p, s, key) for p, s in _INVERSE if re.fullmatch(p, key)), None)
            assert new is not None, key
            out[new] = t.clone()
    out["encoder.encoder.embeddings.mask_token"] = torch.zeros(1, pos0.shape[-1])
    return out


def test_small_dinov2_checkpoint_file_round_trip(tmp_path):
    """A scaled-down PAE on DINOv2-S in the authors' layout, saved as ``{"model": {"module._orig_mod." + k}}``,
    loads back value for value; its key names are exactly the reference list's (layer indices aside)."""
    torch.manual_seed(0)
    small = dict(encoder="DINOv2-S", dam_depth=1, decoder=(64, 1, 2, 128), variant="PAE-DINOv2-S-small")
    src = PAETokenizer(**small)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    authors = to_authors_dinov2(src.state_dict())
    norm = lambda keys: {re.sub(r"\.\d+\.", ".N.", k) for k in keys}  # noqa: E731
    assert norm(authors) == norm(read_layout(LAYOUTS["PAE-DINOv2-L-d32"]))
    path = tmp_path / "pae_small.pt"
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in authors.items()}, "step": 5}, path)
    dst = load_tokenizer_weights(PAETokenizer(**small), False, path, None)
    ref = src.state_dict()
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=k)
    x = torch.rand(1, 3, 256, 256)
    torch.testing.assert_close(dst.encode(x), src.encode(x))


def test_hf_dinov2_encoder_file_layout_loads_on_meta():
    """The public transformers DINOv2-L-reg4 layout (final LayerNorm included) loads into our encoder by name."""
    from pae_fast.models.pae_convert import hf_encoder_to_timm
    from pae_fast.registry import create_encoder

    layout = read_layout("hf_dinov2_reg4_large.txt")
    assert len(layout) == 440
    state = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    with torch.device("meta"):
        vfm = create_encoder("DINOv2-L")
    vfm.load_encoder_state(state, what="hf dinov2")
    assert set(hf_encoder_to_timm(state, "DINOv2-L", 16)) == set(vfm.model.state_dict())
    with pytest.raises(WeightsError, match=r"1 keys of the transformers dinov2 layout .*embeddings\.extra"):
        vfm.load_encoder_state({**state, "embeddings.extra": torch.empty(1, device="meta")})
