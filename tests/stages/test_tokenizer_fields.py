"""Tokenizer fields that act in the training stage (not in the loss): each changes what the stage builds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from pae_fast.config import TokenizerConfig, load_config
from pae_fast.stages.image_data import TensorImageDataset

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "tokenizer_tiny_cpu.yaml"


def _cfg(tmp_path: Path, **over):
    base = {"out_dir": str(tmp_path), "train.progress": False, "data.synthetic_size": 8, "tokenizer.mcr": False}
    return load_config(PRESET, {**base, **over})


def _images(n: int, seed: int = 0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorImageDataset(torch.rand(n, 3, 64, 64, generator=g), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("items", [3, 5])
def test_heldout_items_sizes_the_heldout_set(tmp_path, items):
    from pae_fast.stages.train_tokenizer import build_tokenizer_task

    _, evaluator = build_tokenizer_task(_cfg(tmp_path, **{"tokenizer.heldout_items": items}))
    assert len(evaluator.heldout) == items


def test_grid_items_sets_the_images_in_the_grid(tmp_path):
    from pae_fast.registry import create_tokenizer
    from pae_fast.stages.tokenizer_eval import HeldoutEvaluator

    tok = create_tokenizer("PAE-tiny")
    widths = []
    for k in (2, 3):
        HeldoutEvaluator(_images(4), 4, k).evaluate(tok, k, tmp_path, weights="raw")
        widths.append(Image.open(tmp_path / "grids" / f"step_{k:07d}.png").size[0])
    assert widths[1] > widths[0]
    HeldoutEvaluator(_images(4), 4, 0).evaluate(tok, 9, tmp_path, weights="raw")
    assert not (tmp_path / "grids" / "step_0000009.png").exists()


def test_raw_prior_projection_selects_pca_or_random(tmp_path):
    from pae_fast.registry import create_tokenizer
    from pae_fast.stages.train_tokenizer import _raw_projection

    torch.manual_seed(0)
    tok = create_tokenizer("PAE-tiny")
    cfg = _cfg(tmp_path, **{"tokenizer.priors": "raw"})
    got = {}
    for kind in ("pca", "random"):
        c = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, raw_prior_projection=kind))
        got[kind] = _raw_projection(c.tokenizer, c.seed, tok, _images(4), torch.device("cpu"))
    assert got["pca"].kind == "pca" and got["random"].kind == "random"
    assert bool(got["pca"].fitted) and float(got["pca"].mean.abs().sum()) > 0  # fitted on the images' tokens
    assert not torch.allclose(got["pca"].weight, got["random"].weight)


def test_lpips_backbone_weights_completes_a_heads_file(tmp_path):
    from safetensors.torch import save_file

    from pae_fast.losses.lpips import LPIPS
    from pae_fast.losses.recon import LPIPSWeightsMissing, build_lpips

    torch.manual_seed(0)
    src = LPIPS("vgg")
    heads = {f"lin{i}.model.1.weight": lin.weight.detach().clone() for i, lin in enumerate(src.lins)}
    backbone = {f"features.{k[len('net.'):]}": v.detach().clone() + 0.5 for k, v in src.state_dict().items()
                if k.startswith("net.")}  # fmt: skip
    save_file(heads, str(tmp_path / "heads.safetensors"))
    save_file(backbone, str(tmp_path / "vgg16.safetensors"))
    only_heads = TokenizerConfig(lpips_weights=str(tmp_path / "heads.safetensors"))
    with pytest.raises(LPIPSWeightsMissing):
        build_lpips(only_heads)
    lp = build_lpips(dataclasses.replace(only_heads, lpips_backbone_weights=str(tmp_path / "vgg16.safetensors")))
    torch.testing.assert_close(lp.net[0].weight, backbone["features.0.weight"])
    torch.testing.assert_close(lp.lins[2].weight, heads["lin2.model.1.weight"])
