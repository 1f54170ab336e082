"""PAE / RAE tokenizers: paper configs on meta (shapes, parameter counts), tiny-variant properties, the API, weights."""

from __future__ import annotations

import logging
import re
import time

import pytest
import torch
import torch.nn.functional as F

from pae_fast.io import save_safetensors
from pae_fast.models.tokenizer import TokenizerFeatures, to_image_range
from pae_fast.registry import create_tokenizer, list_tokenizers
from pae_fast.weights import WeightsError

# Authors' trainable counts (shared/reference/README.md): everything but the frozen encoder and the two fixed tables.
AUTHORS_TRAINABLE = {
    "PAE-DINOv2-L-d32": 416_627_488,
    "PAE-DINOv3-L-d32": 416_811_808,
    "PAE-SigLIP2-SO400M-d32": 446_656_032,
}

# name -> (vfm input, D, latent shape, trainable, all parameters)
PAPER = {
    "PAE-DINOv2-L-d32": (224, 1024, (32, 16, 16), 416_627_488, 719_856_416),
    "PAE-DINOv3-L-d32": (256, 1024, (32, 16, 16), 416_811_808, 719_938_336),
    "PAE-SigLIP2-SO400M-d32": (256, 1152, (32, 16, 16), 446_656_032, 859_303_440),
    "PAE-MAE-L-d32": (256, 1024, (32, 16, 16), 416_811_808, 720_172_832),
    "RAE-DINOv2-B": (224, 768, (768, 16, 16), 415_056_640, 500_782_336),
    "RAE-SigLIP2-B": (256, 768, (768, 16, 16), 415_056_640, 500_898_304),
    "RAE-MAE-B": (256, 768, (768, 16, 16), 415_056_640, 500_899_840),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_on_meta(name):
    size, D, latent, trainable, total = PAPER[name]
    with torch.device("meta"):
        tok = create_tokenizer(name)
    assert tok.image_size == 256 and tok.latent_shape == latent and tok.vfm_dim == D
    assert tok.vfm.input_size == size and tok.vfm.grid_size == 16
    assert tok.decoder.patch_size == 16 and tok.decoder.grid_size == 16
    assert tok.decoder.hidden == (1024 if name.startswith("PAE") else 1152)
    assert len(tok.decoder.blocks) == (24 if name.startswith("PAE") else 28)
    n_train = sum(p.numel() for p in tok.trainable_parameters())
    assert n_train == trainable
    if name in AUTHORS_TRAINABLE:
        assert n_train == AUTHORS_TRAINABLE[name]
    assert sum(p.numel() for p in tok.parameters()) == total
    assert tok.kind == name[:3].lower() and tok.stats_mode == ("channel" if name.startswith("PAE") else "chw")
    if tok.kind == "pae":
        assert len(tok.dam.layers) == 6 and tok.dam.layers[0].self_attn.num_heads == tok.vfm.num_heads
    z = torch.empty(2, *latent, device="meta")
    assert tok.decode(z).shape == (2, 3, 256, 256)


@pytest.fixture(scope="module", params=["PAE-tiny", "RAE-tiny"])
def tiny(request):
    torch.manual_seed(0)
    return create_tokenizer(request.param)


def _images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_tiny_builds_fast():
    create_tokenizer("PAE-tiny")  # warm imports
    for name in ("PAE-tiny", "RAE-tiny"):
        t = time.perf_counter()
        create_tokenizer(name)
        assert time.perf_counter() - t < 1.0


def test_tiny_api(tiny):
    x = _images()
    f = tiny.encode_features(x)
    assert isinstance(f, TokenizerFeatures)
    C, H, W = tiny.latent_shape
    assert f.z.shape == (2, C, H, W) and tiny.encode(x).shape == (2, C, H, W)
    assert f.vfm_tokens.shape == (2, H * W, tiny.vfm_dim) and tiny.vfm_dim == 128
    y = tiny.decode(f.z)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # decode = decoder output mapped back with the encoder's mean/std; clamping is a separate helper
    std, mean = torch.tensor(tiny.std).view(1, 3, 1, 1), torch.tensor(tiny.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(y, tiny.decode_tokens(f.z) * std + mean)
    img = to_image_range(y)
    assert img.min() >= 0 and img.max() <= 1
    assert tiny.image_size == 64 and tiny.mean == (0.485, 0.456, 0.406) and tiny.std == (0.229, 0.224, 0.225)
    assert isinstance(tiny.last_decoder_layer, torch.nn.Linear) and tiny.last_decoder_layer.out_features == 8 * 8 * 3
    with pytest.raises(ValueError, match="latents must be"):
        tiny.decode(torch.zeros(1, C + 1, H, W))


def test_vfm_frozen_and_no_grad(tiny):
    tiny.train()
    assert tiny.training and not tiny.vfm.training
    assert not any(p.requires_grad for p in tiny.vfm.parameters())
    ids = {id(p) for p in tiny.trainable_parameters()}
    assert ids.isdisjoint(id(p) for p in tiny.vfm.parameters())
    assert ids == {id(p) for n, p in tiny.named_parameters() if not n.startswith("vfm.")}
    tiny.zero_grad(set_to_none=True)
    tiny(_images()).square().mean().backward()
    assert all(p.grad is None for p in tiny.vfm.parameters())
    assert all(p.grad is not None for p in tiny.trainable_parameters())
    tiny.zero_grad(set_to_none=True)
    tiny.eval()


def test_pae_dam_is_layernorm_at_init_and_latent_on_sphere():
    torch.manual_seed(0)
    tok = create_tokenizer("PAE-tiny")
    f = tok.encode_features(_images(3))
    # zero-initialised SFT: H_z = LN(u) exactly, whatever the pixel branch computes
    torch.testing.assert_close(f.dam_tokens, F.layer_norm(f.vfm_tokens, (128,), eps=1e-5))
    # the latent is the pre-norm conv output divided by its per-token RMS (eps 1e-6 in the mean square)
    B, N, D = f.dam_tokens.shape
    pre = tok.projector.conv(tok.projector.attn(f.dam_tokens).transpose(1, 2).reshape(B, D, 8, 8))
    ms = pre.pow(2).mean(dim=1, keepdim=True)
    torch.testing.assert_close(f.z, pre / (ms + 1e-6).sqrt())
    # at random init this tiny net's pre-norm tokens are small (mean square ~1e-3), so eps shows; with weights of
    # a trained scale (perturbed) every token has RMS 1 within 1e-4
    with torch.no_grad():
        for p in tok.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = tok.encode(_images(3))
    rms = z.float().pow(2).mean(dim=1).sqrt()  # (B, H, W): RMS over channels per token
    assert (rms - 1).abs().max() < 1e-4
    # once the SFT projection is trained the DAM does modulate the tokens (the test above can fail)
    f2 = tok.encode_features(_images(3))
    assert not torch.allclose(f2.dam_tokens, F.layer_norm(f2.vfm_tokens, (128,), eps=1e-5), atol=1e-3)


def test_rae_latent_is_raw_vfm_tokens():
    torch.manual_seed(0)
    tok = create_tokenizer("RAE-tiny")
    assert tok.latent_shape == (128, 8, 8)
    f = tok.encode_features(_images())
    assert f.dam_tokens is None
    torch.testing.assert_close(f.z[:, :, 2, 5], f.vfm_tokens[:, 2 * 8 + 5])
    torch.testing.assert_close(f.vfm_tokens, tok.vfm(_images()))


def test_overrides_and_names():
    tok = create_tokenizer("PAE-tiny", latent_channels=4, dam_depth=1)
    assert tok.latent_shape == (4, 8, 8) and len(tok.dam.layers) == 1
    with torch.device("meta"):
        assert len(create_tokenizer("PAE-tiny", decoder="ViT-B").decoder.blocks) == 12
    with pytest.raises(ValueError, match="unknown decoder size 'Q'"):
        create_tokenizer("PAE-tiny", decoder="Q")
    assert {"PAE-tiny", "RAE-tiny", *PAPER} <= set(list_tokenizers())
    with pytest.raises(KeyError, match="unknown tokenizer"):
        create_tokenizer("PAE-nope")


def test_weights_round_trip_and_errors(tmp_path, caplog):
    torch.manual_seed(0)
    src = create_tokenizer("PAE-tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full = tmp_path / "pae_tiny.safetensors"
    save_safetensors({k: v.contiguous() for k, v in src.state_dict().items()}, full)
    with caplog.at_level(logging.INFO):
        tok = create_tokenizer("PAE-tiny", weights=full)
    assert "weights loaded" in caplog.text
    x = _images()
    torch.testing.assert_close(tok.encode(x), src.encode(x))
    assert not any(p.requires_grad for p in tok.vfm.parameters())
    # a file without the encoder needs the encoder's own file
    rest = tmp_path / "rest.safetensors"
    save_safetensors({k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("vfm.")}, rest)
    with pytest.raises(WeightsError, match="no encoder"):
        create_tokenizer("PAE-tiny", weights=rest)
    enc = tmp_path / "vit.safetensors"
    save_safetensors({k: v.contiguous() for k, v in src.vfm.model.state_dict().items()}, enc)
    tok2 = create_tokenizer("PAE-tiny", weights=rest, vfm_weights=enc)
    torch.testing.assert_close(tok2.encode(x), src.encode(x))
    with pytest.raises(WeightsError, match=r"does not fit RAE-tiny: .*unexpected"):
        create_tokenizer("RAE-tiny", weights=full)
    with pytest.raises(WeightsError, match="pretrained=True needs"):
        create_tokenizer("PAE-tiny", pretrained=True)


def test_weight_loading_logs_what_happens(tmp_path, caplog):
    """No "random initialisation" message when a weights file fills the tokenizer; each case says where every part
    comes from (the encoder is built inside the constructor, which stays silent)."""
    src = create_tokenizer("PAE-tiny")
    full, rest, enc = tmp_path / "full.safetensors", tmp_path / "rest.safetensors", tmp_path / "enc.safetensors"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_safetensors(sd, full)
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("vfm.")}, rest)
    save_safetensors({k: v.contiguous() for k, v in src.vfm.model.state_dict().items()}, enc)

    def messages(**kw) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pae_fast"):
            create_tokenizer("PAE-tiny", **kw)
        return [r.getMessage() for r in caplog.records if r.name.startswith("pae_fast")]

    assert messages(weights=full) == [f"tokenizer PAE-tiny: weights loaded from {full}, encoder included"]
    assert messages(weights=rest, vfm_weights=enc) == [
        f"tokenizer PAE-tiny: weights loaded from {rest}, encoder from {enc}"]
    assert messages(weights=full, vfm_weights=enc) == [
        f"tokenizer PAE-tiny: weights loaded from {full}, encoder included (its weights replace those of "
        f"vfm_weights={enc})"]  # fmt: skip
    assert messages(vfm_weights=enc) == [
        f"tokenizer PAE-tiny: encoder weights loaded from {enc}; the rest is a random initialisation "
        "(pretrained=False, no weights file)"]  # fmt: skip
    (only,) = messages()
    assert "random initialisation of every part, encoder included" in only
    assert caplog.records[0].levelno == logging.WARNING


def test_info_gmacs_match_hand_count():
    """Decode MACs of PAE-DINOv2-L-d32 against a hand count: decompressor conv + attention, decoder linears on 257
    tokens, attention products, the pixel head."""
    from pae_fast.models.tokenizer import describe_tokenizer

    text = describe_tokenizer("PAE-DINOv2-L-d32")
    gm = {k: float(v) for k, v in re.findall(r"(encode|decode) GMAC/image\s+([\d.]+)", text)}
    N, D, W, L = 256, 1024, 1024, 24
    decompressor = 32 * D * 9 * N + 4 * D * D * N + 2 * N * N * D
    blocks = L * ((4 * W * W + 2 * W * 4096) * (N + 1) + 2 * (N + 1) ** 2 * W)
    decoder = D * W * N + blocks + W * 768 * (N + 1)
    assert gm["decode"] == pytest.approx((decompressor + decoder) / 1e9, rel=2e-3)
    T = N + 5  # CLS + 4 registers + patches
    vfm = 3 * 14 * 14 * D * N + L * (12 * D * D * T + 2 * T * T * D)
    dam = 3 * 14 * 14 * D * N + 6 * ((4 + 4 + 8) * D * D * N + 2 * (2 * N * N * D)) + 2 * D * D * N
    projector = 4 * D * D * N + 2 * N * N * D + D * 32 * 9 * N
    assert gm["encode"] == pytest.approx((vfm + dam + projector) / 1e9, rel=2e-3)
