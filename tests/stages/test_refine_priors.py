"""refine-priors: the stage-0 loss falls on real photographs, the priors file carries the projector and the targets'
recipe, train-tokenizer loads it (initialising the PAE projector), and a mismatched file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pae_fast.config import ConfigError, load_config
from pae_fast.data.demo_images import build_demo_images
from pae_fast.io import load_safetensors, save_safetensors
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
    assert set(tensors) == {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "conv.weight",
                            "conv.bias"}
    assert tensors["conv.weight"].shape == (8, 128, 3, 3)  # PAE-tiny: D = 128 -> 8 latent channels
    assert meta["upsampler"] == "bilinear" and float(meta["lowpass_strength"]) == 0.4 and meta["grid"] == "8"
    assert json.loads(meta["recipe"])["latent_dim"] == "8"
    model, _ = load_safetensors(priors.parent / "checkpoints" / "0000016" / "model.safetensors")
    assert torch.equal(model["projector.conv.weight"], tensors["conv.weight"])  # the trained (not EMA) projector


def test_train_tokenizer_loads_the_priors(tmp_path, priors, photos):
    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "tok"), "tokenizer.priors": "refined",
                               "tokenizer.priors_file": str(priors)})
    task, _ = build_tokenizer_task(cfg, photos, None)
    tensors, _ = load_safetensors(priors)
    tok = task.model.tok
    assert torch.equal(tok.projector.conv.weight, tensors["conv.weight"])  # initialised from P_t
    assert torch.equal(tok.projector.attn.qkv.weight, tensors["attn.qkv.weight"])
    sh = task.model.shared
    assert torch.equal(sh.projector.conv.weight, tensors["conv.weight"])  # the frozen target projector
    assert not any(p.requires_grad for p in sh.projector.parameters())
    loss, terms = task.loss_fn(task.model, (photos.images[:4], photos.labels[:4]), 0)
    loss.backward()
    assert all(p.grad is None for p in sh.projector.parameters())  # stop-gradient targets
    assert {"ssr", "scr"} <= set(terms)
    assert not (tmp_path / "tok").exists()  # building the task writes nothing


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
