"""refine-priors: the stage-0 loss falls on real photographs, the priors file carries the tokenizer's projector and
decompressor and the targets' recipe, train-tokenizer starts the PAE tokenizer at the refined prior (SCR = 0, the
prior's latent), and a mismatched file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pae_fast.config import ConfigError, load_config
from pae_fast.data.demo_images import build_demo_images
from pae_fast.io import load_safetensors, save_safetensors
from pae_fast.registry import create_tokenizer
from pae_fast.stages.image_data import TensorImageDataset
from pae_fast.stages.refine_priors import refine_priors
from pae_fast.stages.train_tokenizer import build_tokenizer_task

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "tokenizer_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def photos() -> TensorImageDataset:
    d = build_demo_images(train_per_class=4, heldout_per_class=1, num_classes=4, image_size=64, seed=0)
    return TensorImageDataset(d.train.images, d.train.labels, "demo train")


@pytest.fixture(scope="module")
def priors(tmp_path_factory, photos) -> Path:
    out = tmp_path_factory.mktemp("refine") / "run"
    cfg = load_config(PRESET, {"out_dir": str(out), "train.steps": 16, "train.ckpt_every": 16, "train.log_every": 4,
                               "train.global_batch_size": 8, "train.lr": 2e-3, "train.progress": False})
    return refine_priors(cfg, photos)


def test_refine_loss_falls_and_the_file_holds_projector_and_recipe(priors):
    stats = [json.loads(line) for line in (priors.parent / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["loss"] < 0.7 * stats[0]["loss"], (stats[0]["loss"], stats[-1]["loss"])
    assert {"rep", "gram"} <= set(stats[-1])
    tensors, meta = load_safetensors(priors)
    with torch.device("meta"):
        tok = create_tokenizer("PAE-tiny")
    want = {k: v.shape for k, v in tok.state_dict().items() if k.startswith(("projector.", "decompressor."))}
    assert {k: v.shape for k, v in tensors.items()} == want  # exactly the tokenizer's two parts, no qkv bias
    assert "projector.attn.qkv.bias" not in tensors and "decompressor.attn.qkv.bias" not in tensors
    assert tensors["projector.conv.weight"].shape == (8, 128, 3, 3)  # PAE-tiny: D = 128 -> 8 latent channels
    assert meta["upsampler"] == "bilinear" and float(meta["lowpass_strength"]) == 0.4 and meta["grid"] == "8"
    assert json.loads(meta["recipe"])["latent_dim"] == "8"
    model, _ = load_safetensors(priors.parent / "checkpoints" / "0000016" / "model.safetensors")
    assert torch.equal(model["projector.conv.weight"], tensors["projector.conv.weight"])  # trained, not EMA
    assert torch.equal(model["reconstructor.decompressor.conv.weight"], tensors["decompressor.conv.weight"])


def test_refine_priors_builds_no_tokenizer(tmp_path, photos, monkeypatch):
    """Stage 0 builds the frozen encoder and what it trains; the tokenizer only on the meta device."""
    import pae_fast.models.pae as pae
    from pae_fast.stages.refine_priors import build_refine_task

    built = []
    init = pae.PAETokenizer.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        built.append(self.vfm.model.patch_embed.proj.weight.device.type)

    monkeypatch.setattr(pae.PAETokenizer, "__init__", spy)
    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "r")})
    task = build_refine_task(cfg, photos)
    assert built == ["meta"]
    assert all(p.device.type == "cpu" for p in task.model.parameters())
    n_trained = sum(p.numel() for p in task.model.parameters())
    with torch.device("meta"):
        tok = create_tokenizer("PAE-tiny")
    parts = sum(p.numel() for n, p in tok.named_parameters() if n.startswith(("projector.", "decompressor.")))
    assert n_trained - parts == sum(p.numel() for p in task.model.reconstructor.parameters()) - sum(
        p.numel() for p in task.model.reconstructor.decompressor.parameters())  # the rest is Q_t's ViT


def test_train_tokenizer_loads_the_priors(tmp_path, priors, photos):
    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "tok"), "tokenizer.priors": "refined",
                               "tokenizer.priors_file": str(priors)})
    task, _ = build_tokenizer_task(cfg, photos, None)
    tensors, _ = load_safetensors(priors)
    tok = task.model.tok
    for k, v in tok.state_dict().items():  # projector and decompressor initialised from stage 0
        if k.startswith(("projector.", "decompressor.")):
            assert torch.equal(v, tensors[k]), k
    sh = task.model.shared
    assert torch.equal(sh.projector.conv.weight, tensors["projector.conv.weight"])  # the frozen target projector
    assert not any(p.requires_grad for p in sh.projector.parameters())
    loss, terms = task.loss_fn(task.model, (photos.images[:4], photos.labels[:4]), 0)
    loss.backward()
    assert all(p.grad is None for p in sh.projector.parameters())  # stop-gradient targets
    assert {"ssr", "scr"} <= set(terms)
    assert not (tmp_path / "tok").exists()  # building the task writes nothing


def test_tokenizer_starts_at_the_refined_prior(tmp_path, priors, photos):
    """At step 0 the PAE latent is the refined prior's latent and SCR is 0 (to fp32 rounding).

    The DAM starts at H_z = LN(u) and u is already layer-normalised (affine-free), so the projector sees u up to the
    LayerNorm eps (1e-5 against a unit variance): agreement to ~1e-5 relative, and 1 - cos to ~1e-10."""
    from pae_fast.losses.scr import scr_losses
    from pae_fast.models.refine import RefinedPriors

    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "tok"), "tokenizer.priors": "refined",
                               "tokenizer.priors_file": str(priors)})
    task, _ = build_tokenizer_task(cfg, photos, None)
    tok = task.model.tok.eval()
    images = photos.images[:4].float()
    with torch.no_grad():
        feats = tok.encode_features(images)
        z = feats.z.flatten(2).transpose(1, 2)  # (B, N, C)
        prior = task.model.shared.projector(feats.vfm_tokens)  # P_t(u), the SCR / SSR target
        # stage 0's own modules, loaded from its checkpoint: the latent and the decompressor's output agree
        state, _ = load_safetensors(priors.parent / "checkpoints" / "0000016" / "model.safetensors")
        stage0 = RefinedPriors.from_config(cfg.refine, tok.vfm_dim, tok.vfm.grid_size, tok.latent_shape[0])
        stage0.load_state_dict(state)
        p = stage0.projector(feats.vfm_tokens)
        dec_tok = tok.decompressor(feats.z)
        dec_prior = stage0.reconstructor.decompressor(p.transpose(1, 2).reshape(feats.z.shape))
    torch.testing.assert_close(z, p, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prior, p)
    torch.testing.assert_close(dec_tok, dec_prior, rtol=1e-4, atol=1e-4)
    scr = scr_losses(feats.z, prior, "both")
    assert all(abs(float(v)) < 1e-6 for v in scr.values()), scr
    _, terms = task.loss_fn(task.model, (photos.images[:4], photos.labels[:4]), 0)
    assert abs(float(terms["scr"])) < 1e-6
    # a projector started elsewhere (here: the tokenizer's own random init) is far from the prior
    fresh = create_tokenizer("PAE-tiny")
    with torch.no_grad():
        z_fresh = fresh.projector(fresh.dam(feats.pixels, feats.vfm_tokens))
    assert float(scr_losses(z_fresh, prior, "both")["scr_patch"]) > 1e-2


def test_priors_of_another_tokenizer_are_refused(tmp_path, priors, photos):
    tensors, meta = load_safetensors(priors)
    other = tmp_path / "other.safetensors"
    save_safetensors(tensors, other, metadata={**meta, "vfm_dim": "1024", "grid": "16"})
    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "tok"), "tokenizer.priors": "refined",
                               "tokenizer.priors_file": str(other)})
    with pytest.raises(ConfigError, match="made for another tokenizer: vfm_dim='1024'"):
        build_tokenizer_task(cfg, photos, None)
    # an RAE cannot use SSR / SCR at all: refused before any priors are read
    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "tok"), "tokenizer.name": "RAE-tiny", "tokenizer.ssr": False,
                               "tokenizer.priors": "refined", "tokenizer.priors_file": str(other)})
    with pytest.raises(ConfigError, match="tokenizer.scr"):
        build_tokenizer_task(cfg, photos, None)


def test_refined_priors_without_a_file_is_a_config_error(tmp_path, photos):
    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "tok"), "tokenizer.priors": "refined"})
    with pytest.raises(ConfigError, match="tokenizer.priors_file"):
        build_tokenizer_task(cfg, photos, None)
