"""The demo pipeline (make demo) at tiny settings: every stage runs and the report is written."""

import json
import subprocess
import sys

import pytest

from pae_fast.cli.common import preset_path
from pae_fast.config import apply_overrides, load_config
from pae_fast.demo import classwise_frechet, run_demo


@pytest.mark.filterwarnings("ignore:viv. a class has")
def test_demo_runs_end_to_end_at_tiny_settings(tmp_path):
    cfg = load_config(preset_path("demo_cpu"))
    cfg = apply_overrides(cfg, {
        "out_dir": str(tmp_path / "demo"), "data.synthetic_size": 64, "model.depth": 1, "model.hidden_size": 32,
        "train.steps": 4, "train.global_batch_size": 8, "train.ckpt_every": 4, "train.log_every": 2,
        "train.warmup_steps": 1, "train.progress": False, "sample.per_class": 4, "sample.steps": 2,
    })  # fmt: skip
    res = run_demo(cfg, heldout_per_class=16)
    out = tmp_path / "demo"
    for f in ("demo_report.md", "demo_results.json", "config.yaml", "loss_curve.png", "diffusability/report.md",
              "samples_cfg/latents.safetensors", "samples_no_guidance/latent_grid.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "demo_results.json").read_text())
    assert set(saved["classwise_frechet"]) == set(res["classwise_frechet"])
    assert set(res["diffusability"]) == {"data", "samples_cfg", "samples_no_guidance", "noise"}
    assert "Per-class Fréchet distance" in (out / "demo_report.md").read_text()


def test_classwise_frechet_separates_matching_from_shifted_sets():
    import torch

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 2, 2, 2, generator=g)
    labels = torch.arange(400) % 2
    same = torch.randn(400, 2, 2, 2, generator=g)
    assert classwise_frechet(same, labels, ref, labels) < 0.5
    assert classwise_frechet(same + 2.0, labels, ref, labels) > 25.0  # mean shift 2 in 8 dims: FD += 32


def test_demo_dry_run_prints_the_preset(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pae_fast", "demo", "--dry-run", "--train.steps", "3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "steps: 3" in out.stdout and "LightningDiT-B/1" in out.stdout
