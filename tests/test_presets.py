"""Preset inheritance (``base:``) and the paper preset's data-loader settings reaching the DataLoader."""

from pathlib import Path

import pytest
import torch

from pae_fast.cli import main
from pae_fast.config import ConfigError, load_config, read_preset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_800ep_preset_states_only_the_differences_and_inherits_the_rest():
    data = read_preset(CONFIGS / "pae_lightningdit_xl1_800ep.yaml")
    base = read_preset(CONFIGS / "pae_lightningdit_xl1_80ep.yaml")
    own = (CONFIGS / "pae_lightningdit_xl1_800ep.yaml").read_text()
    assert "base: pae_lightningdit_xl1_80ep" in own and "num_workers" not in own
    assert data["train"]["steps"] == 1_000_000 and base["train"]["steps"] == 100_000
    assert data["train"]["global_batch_size"] == base["train"]["global_batch_size"] == 1024  # inherited
    assert data["sample"]["cfg_scale"] == 3.3 and data["sample"]["steps"] == base["sample"]["steps"] == 249
    cfg = load_config(CONFIGS / "pae_lightningdit_xl1_800ep.yaml")
    assert cfg.data.num_workers == 8 and cfg.model.name == "LightningDiT-XL/1"


def test_chains_paths_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\ntrain:\n  steps: 5\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  steps: 7\n")  # relative to b's folder
    (tmp_path / "c.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\nseed: 3\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.seed, cfg.train.steps, cfg.train.lr) == (3, 7, 0.5)
    (tmp_path / "x.yaml").write_text("base: y\n")  # a name without .yaml, found beside the file
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle .*x\.yaml -> .*y\.yaml -> .*x\.yaml"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "bad.yaml").write_text("base: no_such_preset\n")
    with pytest.raises(ConfigError, match="no_such_preset.*neither a file nor a bundled preset"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("base: a.yaml\ntrain:\n  stepz: 1\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(tmp_path / "typo.yaml")


def test_dry_run_prints_the_merged_config(capsys):
    assert main(["train-dit", "--config", str(CONFIGS / "pae_lightningdit_xl1_800ep.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "base:" not in out and "steps: 1000000" in out and "num_workers: 8" in out and "cfg_scale: 3.3" in out


def test_paper_preset_workers_reach_the_dataloader(monkeypatch, tmp_path):
    """The paper preset's ``data.num_workers: 8`` is what the engine's DataLoader gets (model shrunk for speed)."""
    import pae_fast.engine.loop as loop
    from pae_fast.data.latent_cache import write_latent_cache
    from pae_fast.stages.train_generator import train_generator

    cache = write_latent_cache(tmp_path / "cache", torch.randn(8, 32, 2, 2), torch.arange(8) % 2)
    cfg = load_config(CONFIGS / "pae_lightningdit_xl1_80ep.yaml", {
        "data.root": str(cache), "out_dir": str(tmp_path / "run"), "model.input_size": 2, "model.depth": 1,
        "model.hidden_size": 32, "model.num_heads": 2, "train.global_batch_size": 4, "train.device": "cpu",
        "train.precision": "fp32", "train.progress": False,
    })  # fmt: skip
    assert cfg.data.num_workers == 8
    seen = {}

    def spy(dataset, sampler, *, num_workers=0, **kw):
        seen["num_workers"] = num_workers
        raise RuntimeError("stop after the loader is built")

    monkeypatch.setattr(loop, "make_loader", spy)
    with pytest.raises(RuntimeError, match="stop after the loader"):
        train_generator(cfg)
    assert seen == {"num_workers": 8}


@pytest.mark.parametrize(("override", "message"), [
    ({"data.loader": "dali"}, "data.loader='dali' decodes images"),
    ({"data.drop_last": False}, "data.drop_last=false"),
    ({"data.num_workers": -1}, "data.num_workers=-1 is out of range"),  # range-checked at load
    ({"data.batch_size": 0}, "data.batch_size=0 is out of range"),
])  # fmt: skip
def test_latent_loader_options_are_validated(override, message):
    from pae_fast.stages.train_generator import build_generator_task

    with pytest.raises(ConfigError, match=message):
        build_generator_task(load_config(CONFIGS / "tiny_cpu.yaml", override))
