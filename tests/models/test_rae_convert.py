"""RAE's released files load as released: the stage-1 decoder (its own layout) with the HF encoder and ``stat.pt``,
and the bare DiT^DH-XL / DiT^DH-S guide ``.pt`` files with their channels taken from the weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pae_fast.config import Config, ConfigError
from pae_fast.models.pae_convert import convert_authors_rae, load_authors_layout, split_release_folder
from pae_fast.registry import create_generator, create_tokenizer
from pae_fast.weights import WeightsError, load_into

REF = Path(__file__).resolve().parent / "data" / "rae_reference"
PAE_REF = Path(__file__).resolve().parent / "data" / "pae_reference"


def read_layout(path: Path) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from a reference key list (``key<TAB>shape<TAB>dtype``)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            out[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return out


def meta_state(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


def hf_dinov2_base_layout() -> dict[str, tuple[int, ...]]:
    """transformers' Dinov2WithRegistersModel layout at base size (768 wide, 12 layers, MLP 3072, 37x37 + CLS
    positions), derived from the reference list of the large model by its sizes."""
    out = {}
    for k, s in read_layout(PAE_REF / "hf_dinov2_reg4_large.txt").items():
        m = re.match(r"encoder\.layer\.(\d+)\.", k)
        if m and int(m.group(1)) >= 12:
            continue
        out[k] = tuple({1024: 768, 4096: 3072}.get(d, d) for d in s)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the full-size layouts, on the meta device
# ---------------------------------------------------------------------------------------------------------------


def test_released_decoder_and_hf_encoder_load_strictly_on_meta():
    layout = read_layout(REF / "rae_stage1_decoder_vitxl_dinov2b.txt")
    assert len(layout) == 456
    with torch.device("meta"):
        tok = create_tokenizer("RAE-DINOv2-B")
    converted, leftovers = convert_authors_rae(meta_state(layout))
    assert leftovers == []
    assert set(converted) == {k for k in tok.state_dict() if k.startswith("decoder.")}
    assert load_authors_layout(tok, {"model": {f"module.{k}": v for k, v in meta_state(layout).items()}},
                               what="model.pt", need_vfm=False) is False
    tok.vfm.load_encoder_state(meta_state(hf_dinov2_base_layout()), what="dinov2-with-registers-base")


def test_released_decoder_mismatch_gives_a_readable_diff():
    state = meta_state(read_layout(REF / "rae_stage1_decoder_vitxl_dinov2b.txt"))
    with torch.device("meta"):
        tok = create_tokenizer("RAE-DINOv2-B")
        pae = create_tokenizer("PAE-tiny")
    broken = dict(state)
    del broken["decoder_layers.27.layernorm_after.bias"]
    broken["decoder_pred.weight"] = torch.empty(3, 3, device="meta")
    with pytest.raises(WeightsError, match=r"model\.pt does not fit RAE-DINOv2-B: missing 1: decoder\.blocks\.27\."
                                           r"norm2\.bias; wrong shape 1: decoder\.pred\.weight \(3, 3\) "
                                           r"\(expected \(768, 1152\)\)"):
        load_authors_layout(tok, broken, what="model.pt", need_vfm=False)
    with pytest.raises(WeightsError, match=r"1 keys of RAE's decoder layout have no counterpart.*encoder_extra\.w"):
        load_authors_layout(tok, {**state, "encoder_extra.w": torch.empty(1, device="meta")}, "m", need_vfm=False)
    with pytest.raises(WeightsError, match="decoder alone; pass the encoder's own file"):
        load_authors_layout(tok, state, what="model.pt")
    with pytest.raises(WeightsError, match="PAE-tiny is not an RAE tokenizer"):
        load_authors_layout(pae, state, what="model.pt", need_vfm=False)


@pytest.mark.parametrize("name,ref,over", [
    ("DiTDH-XL", "rae_stage2_ditdh_XL.txt", {}),
    ("DiTDH-S", "rae_stage2_ditdh_S_guide.txt", {"in_channels": 768}),
])  # fmt: skip
def test_released_ditdh_layouts_load_strictly_on_meta(name, ref, over):
    from pae_fast.models.generator import UPSTREAM_CONSTANTS

    layout = read_layout(REF / ref)
    with torch.device("meta"):
        model = create_generator(name, **over)
    assert model.in_channels == layout["x_embedder.proj.weight"][1] == 768
    load_into(model, meta_state(layout), what=ref, skip=lambda k: k.endswith(UPSTREAM_CONSTANTS))


# ---------------------------------------------------------------------------------------------------------------
# a scaled-down RAE in the released layout, real tensors, through create_tokenizer
# ---------------------------------------------------------------------------------------------------------------

# ours -> RAE's decoder names (test-side inverse of the converter; q/k/v rows of ``qkv`` are [q; k; v])
_INVERSE = [
    (r"decoder\.pos_embed", r"decoder_pos_embed"),
    (r"decoder\.cls_token", r"trainable_cls_token"),
    (r"decoder\.(embed|norm|pred)\.(.*)", r"decoder_\1.\2"),
    (r"decoder\.blocks\.(\d+)\.attn\.proj\.(.*)", r"decoder_layers.\1.attention.output.dense.\2"),
    (r"decoder\.blocks\.(\d+)\.mlp\.fc1\.(.*)", r"decoder_layers.\1.intermediate.dense.\2"),
    (r"decoder\.blocks\.(\d+)\.mlp\.fc2\.(.*)", r"decoder_layers.\1.output.dense.\2"),
    (r"decoder\.blocks\.(\d+)\.norm1\.(.*)", r"decoder_layers.\1.layernorm_before.\2"),
    (r"decoder\.blocks\.(\d+)\.norm2\.(.*)", r"decoder_layers.\1.layernorm_after.\2"),
]


def to_rae_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        if not key.startswith("decoder."):
            continue
        if m := re.fullmatch(r"decoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            for part, chunk in zip(("query", "key", "value"), t.chunk(3)):
                out[f"decoder_layers.{m.group(1)}.attention.attention.{part}.{m.group(2)}"] = chunk.clone()
        else:
            new = next((re.sub(p, s, key) for p, s in _INVERSE if re.fullmatch(p, key)), None)
            assert new is not None, key
            out[new] = t.clone()
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """RAE-tiny in RAE's release layout: decoder ``model.pt`` (bare), encoder (timm safetensors), ``stat.pt``."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = create_tokenizer("RAE-tiny")
    with torch.no_grad():
        for p in src.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no symmetric init values (zero biases, unit norms) left
    root = tmp_path_factory.mktemp("rae_release")
    authors = to_rae_layout(src.state_dict())
    norm = lambda keys: {re.sub(r"\.\d+\.", ".N.", k) for k in keys}  # noqa: E731
    assert norm(authors) == norm(read_layout(REF / "rae_stage1_decoder_vitxl_dinov2b.txt"))
    torch.save(authors, root / "model.pt")
    save_file({k: v.contiguous() for k, v in src.vfm.model.state_dict().items()}, root / "encoder.safetensors")
    C, H, W = src.latent_shape
    stat = {"mean": torch.randn(C, H, W), "var": torch.rand(C, H, W) * 3}
    torch.save(stat, root / "stat.pt")
    return src, root, stat


def _check_loaded(tok, src, stat):
    ref = src.state_dict()
    for k, v in tok.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=k, rtol=0, atol=0)
    z = torch.randn(2, *src.latent_shape)
    torch.testing.assert_close(tok.decode(z), src.decode(z))
    # RAE's standardisation, written out: (z - mean) / sqrt(var + 1e-5), per (C, H, W)
    s = tok.latent_stats
    assert s.mode == "chw" and s.eps == 1e-5
    torch.testing.assert_close(s.normalize(z), (z - stat["mean"]) / torch.sqrt(stat["var"] + 1e-5))
    torch.testing.assert_close(s.denormalize(s.normalize(z)), z)


def test_create_tokenizer_loads_the_released_files(released):
    src, root, stat = released
    tok = create_tokenizer("RAE-tiny", weights=str(root / "model.pt"), vfm_weights=str(root / "encoder.safetensors"),
                           latent_stats=str(root / "stat.pt"))
    _check_loaded(tok, src, stat)
    assert create_tokenizer("RAE-tiny", vfm_weights=str(root / "encoder.safetensors")).latent_stats is None


def test_create_tokenizer_loads_a_release_folder(released):
    src, root, stat = released
    assert {k: v.name for k, v in split_release_folder(root).items()} == {
        "weights": "model.pt", "vfm_weights": "encoder.safetensors", "latent_stats": "stat.pt"}
    _check_loaded(create_tokenizer("RAE-tiny", weights=str(root)), src, stat)


def test_release_folder_and_stats_errors(released, tmp_path):
    src, root, stat = released
    (tmp_path / "a.pt").write_bytes((root / "model.pt").read_bytes())
    (tmp_path / "b.pt").write_bytes((root / "model.pt").read_bytes())
    with pytest.raises(WeightsError, match=r"more than one file of a kind \(weights: a\.pt, b\.pt\)"):
        create_tokenizer("RAE-tiny", weights=str(tmp_path))
    torch.save({"mean": torch.zeros(3)}, tmp_path / "s.pt")
    with pytest.raises(WeightsError, match=r"s\.pt holds no latent statistics"):
        create_tokenizer("RAE-tiny", latent_stats=str(tmp_path / "s.pt"))
    torch.save({"mean": torch.zeros(3), "var": torch.ones(3)}, tmp_path / "c.pt")
    with pytest.raises(WeightsError, match="'channel' statistics, but RAE-tiny standardises per 'chw'"):
        create_tokenizer("RAE-tiny", latent_stats=str(tmp_path / "c.pt"))
    torch.save({"mean": torch.zeros(3, 2, 2), "var": torch.ones(3, 2, 2)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"do not fit chw statistics of shape \(3, 2, 2\)"):
        create_tokenizer("RAE-tiny", latent_stats=str(tmp_path / "w.pt"))


# ---------------------------------------------------------------------------------------------------------------
# sample: RAE's bare DiT^DH and its guide, channels from the weights
# ---------------------------------------------------------------------------------------------------------------

TINY_DITDH = dict(hidden_size=32, depth=1, num_heads=2, head_hidden_size=32, head_depth=1, head_num_heads=2,
                  input_size=4, num_classes=3)


def _register_tiny() -> None:
    from pae_fast.models.ditdh import DiTDH
    from pae_fast.models.generator import register_variant
    from pae_fast.registry import GENERATORS

    if "DiTDH-test-guide" not in GENERATORS:
        register_variant("DiTDH-test-guide", DiTDH, dict(TINY_DITDH, hidden_size=16))


@pytest.mark.parametrize("wrap", ["bare", "ema"])
def test_sample_takes_raes_bare_ditdh_and_guide(tmp_path, wrap):
    """No metadata in RAE's ``.pt`` files: the model section builds the main model, the guide is the named variant,
    and both take their 12 latent channels from ``x_embedder.proj.weight`` (not the config's 32)."""
    from pae_fast.models.ditdh import DiTDH
    from pae_fast.stages.sample import load_generator, sample

    _register_tiny()
    torch.manual_seed(0)
    main = DiTDH(in_channels=12, **TINY_DITDH)
    guide = create_generator("DiTDH-test-guide", in_channels=12)
    pack = (lambda s: s) if wrap == "bare" else (lambda s: {"ema": s, "model": {}, "opt": {}})
    torch.save(pack(main.state_dict()), tmp_path / "main.pt")
    torch.save(pack(guide.state_dict()), tmp_path / "guide.pt")
    torch.save({"mean": torch.randn(12, 4, 4), "var": torch.rand(12, 4, 4)}, tmp_path / "stat.pt")
    cfg = Config()
    cfg.model.name = "DiTDH-S"
    for k, v in TINY_DITDH.items():
        setattr(cfg.model, k, v)
    assert cfg.model.in_channels == 32  # the default the weights override
    cfg.flow.time_convention = "rae"
    got, _ = load_generator(tmp_path / "guide.pt", name="DiTDH-test-guide", key="sample.guide_checkpoint",
                            like=cfg.model, flow_cfg=cfg.flow)  # like: the config's 32 channels; the weights win
    assert got.in_channels == 12
    cfg.sample.checkpoint, cfg.sample.guide_checkpoint = str(tmp_path / "main.pt"), str(tmp_path / "guide.pt")
    cfg.sample.guide_name, cfg.sample.guidance = "DiTDH-test-guide", "autoguidance"
    cfg.sample.latent_stats = str(tmp_path / "stat.pt")
    cfg.sample.num_samples, cfg.sample.batch_size, cfg.sample.steps = 2, 2, 2
    cfg.sample.save_png, cfg.sample.device, cfg.sample.output_dir = False, "cpu", str(tmp_path / "out")
    sample(cfg)
    from pae_fast.io import load_safetensors

    out, _ = load_safetensors(tmp_path / "out" / "latents.safetensors")
    assert out["latents"].shape == (2, 12, 4, 4)
    # a guide on other latents is refused
    other = create_generator("DiTDH-test-guide", in_channels=8)
    torch.save(other.state_dict(), tmp_path / "guide8.pt")
    cfg.sample.guide_checkpoint = str(tmp_path / "guide8.pt")
    with pytest.raises(ConfigError, match=r"the guide works on 8x4\^2 latents, the main model on 12x4\^2"):
        sample(cfg)


def test_sample_decodes_with_raes_released_decoder(released):
    """``sample.tokenizer_checkpoint`` may be RAE's bare decoder ``model.pt`` (its layout converted on load), with the
    encoder from ``tokenizer.vfm_weights``: the decoder sample uses is the released one, value for value."""
    from pae_fast.stages.sample_output import load_decoder

    src, root, _ = released
    cfg = Config()
    cfg.tokenizer.name, cfg.tokenizer.vfm_weights = "RAE-tiny", str(root / "encoder.safetensors")
    cfg.sample.tokenizer_checkpoint = str(root / "model.pt")
    tok = load_decoder(cfg, torch.device("cpu"), root / "model.pt")
    z = torch.randn(2, *src.latent_shape)
    torch.testing.assert_close(tok.decode(z), src.decode(z), rtol=0, atol=0)
    cfg.tokenizer.name = "No-such-tokenizer"
    with pytest.raises(ConfigError, match="cannot decode sample.tokenizer_checkpoint.*Valid names"):
        load_decoder(cfg, torch.device("cpu"), root / "model.pt")
