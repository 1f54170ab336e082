"""The held-out evaluation measures the weights its rows name: the EMA at every checkpoint, the raw initial weights at
step 0 of a fresh run (docs/method.md § Tokenizer training)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pae_fast.config import load_config
from pae_fast.eval.recon import reconstruction_metrics
from pae_fast.stages.image_data import TensorImageDataset
from pae_fast.stages.tokenizer_eval import EVAL_FILE
from pae_fast.stages.train_tokenizer import build_tokenizer_task, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "tokenizer_tiny_cpu.yaml"


def _data(n: int, seed: int) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorImageDataset(torch.rand(n, 3, 64, 64, generator=g), torch.zeros(n, dtype=torch.long))


def _psnr(tok, images: torch.Tensor) -> float:
    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    tok.eval()
    with torch.no_grad():
        return float(reconstruction_metrics(tok, [(u8,)], device=torch.device("cpu"))["psnr"])


def test_checkpoint_rows_evaluate_the_ema_weights_they_name(tmp_path):
    cfg = load_config(PRESET, {"out_dir": str(tmp_path), "train.progress": False, "tokenizer.grid_items": 0,
                               "eval.batch_size": 4, "tokenizer.mcr": False})
    held = _data(4, 1)
    task, _ = build_tokenizer_task(cfg, _data(4, 0), held)
    raw = task.model
    ema = copy.deepcopy(raw)
    with torch.no_grad():  # EMA and raw weights now reconstruct differently
        ema.tok.decoder.pred.weight.mul_(0.2)
        ema.tok.decoder.pred.bias.add_(0.3)
    task.on_checkpoint(7, raw, ema, str(tmp_path))
    (row,) = [json.loads(x) for x in (tmp_path / EVAL_FILE).read_text().splitlines()]
    assert row["step"] == 7 and row["weights"] == "ema"
    images = held.images if hasattr(held, "images") else torch.stack([held[i][0] for i in range(len(held))])
    want, other = _psnr(ema.tok, images), _psnr(raw.tok, images)
    assert abs(want - other) > 0.5  # the two weight sets are told apart by the metric
    assert row["psnr"] == pytest.approx(want, rel=1e-5)


def test_a_fresh_run_starts_with_a_raw_row_then_ema_rows(tmp_path):
    cfg = load_config(PRESET, {"out_dir": str(tmp_path), "train.progress": False, "tokenizer.grid_items": 0,
                               "eval.batch_size": 4, "tokenizer.mcr": False, "train.steps": 2,
                               "train.ckpt_every": 2, "train.global_batch_size": 4})
    train_tokenizer(cfg, _data(4, 0), _data(4, 1))
    rows = [json.loads(x) for x in (tmp_path / EVAL_FILE).read_text().splitlines()]
    assert [(r["step"], r["weights"]) for r in rows] == [(0, "raw"), (2, "ema")]
