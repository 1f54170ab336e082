"""`train-dit` and `sample` end to end on the tiny preset, with a synthetic latent cache written here."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from pae_fast.cli import main
from pae_fast.config import ConfigError, dump_yaml, load_config
from pae_fast.data.latent_cache import STATS_FILE, write_latent_cache
from pae_fast.data.latent_stats import LatentStats
from pae_fast.data.synthetic import SyntheticLatentSpec, synthetic_latents
from pae_fast.engine.checkpoint import save_weights, write_checkpoint
from pae_fast.io import load_safetensors, save_safetensors
from pae_fast.registry import TOKENIZERS
from pae_fast.stages.sample import initial_noise, sample
from pae_fast.stages.train_generator import build_generator_task

PRESET = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")
FAST = ["--train.progress", "false", "--train.tf32", "false"]


def write_synthetic_cache(folder: Path, channels: int = 4, size: int = 8, per_class: int = 32) -> Path:
    """A two-class synthetic latent cache matching the tiny preset's generator (C=4, 8x8)."""
    spec = SyntheticLatentSpec(num_classes=2, channels=channels, size=size, mean_scale=1.5, noise_scale=0.5)
    z, y = synthetic_latents(spec, per_class)
    return write_latent_cache(folder, z, y, metadata={"source": "tests/cli synthetic"})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The tiny preset trained for 20 steps by the CLI (checkpoints at 10 and 20)."""
    root = tmp_path_factory.mktemp("dit")
    cache = write_synthetic_cache(root / "cache")
    run = root / "run"
    rc = main(["train-dit", "--config", PRESET, "--data.root", str(cache), "--out_dir", str(run), *FAST])
    assert rc == 0
    return run, cache


def test_train_dit_writes_checkpoints_config_and_stats(trained_run):
    run, cache = trained_run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["root"] == str(cache) and cfg["model"]["name"] == "LightningDiT-B/1"
    for step in ("0000010", "0000020"):
        for name in ("model.safetensors", "ema.safetensors", "COMPLETE"):
            assert (run / "checkpoints" / step / name).is_file()
    cache_stats = LatentStats.load(cache / STATS_FILE)
    for name in ("ema.safetensors", "model.safetensors"):  # the statistics travel in every weights file
        _, meta = load_safetensors(run / "checkpoints" / "0000020" / name)
        stats = LatentStats.from_metadata(meta)
        torch.testing.assert_close(stats.mean, cache_stats.mean)
        torch.testing.assert_close(stats.std, cache_stats.std)
        assert stats.mode == "channel" and stats.count == cache_stats.count
    assert not list(run.glob("*stats.safetensors"))  # no second statistics file beside the run
    assert json.loads(meta["latent_shape"]) == [4, 8, 8] and meta["generator"] == "LightningDiT-B/1"
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all({"loss", "mse", "cos"} <= r.keys() and np.isfinite(r["loss"]) for r in records)
    # the generator counts its FLOPs (3 x forward): achieved TFLOP/s reaches stats.jsonl; no CPU peak, so MFU null
    assert all(r["tflops"] > 0 and r["mfu"] is None for r in records)


def test_sample_writes_latents_and_grid(trained_run, tmp_path, capsys):
    run, _ = trained_run
    out = tmp_path / "samples"
    rc = main(["sample", "--config", PRESET, "--sample.checkpoint", str(run), "--sample.output_dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "latents.safetensors") in printed
    t, meta = load_safetensors(out / "latents.safetensors")
    assert t["latents"].shape == (8, 4, 8, 8) and t["labels"].shape == (8,)
    assert torch.isfinite(t["latents"]).all() and set(t["labels"].tolist()) <= {0, 1}
    assert "config" in meta
    grid = Image.open(out / "latent_grid.png")
    assert grid.mode == "RGB" and grid.size[0] > 32
    assert yaml.safe_load((out / "config.yaml").read_text())["sample"]["checkpoint"] == str(run)
    # AutoGuidance with the step-10 checkpoint as the guide changes the samples
    out_ag = tmp_path / "ag"
    rc = main(["sample", "--config", PRESET, "--sample.checkpoint", str(run), "--sample.output_dir", str(out_ag),
               "--sample.guidance", "autoguidance", "--sample.guide_checkpoint", str(run / "checkpoints" / "0000010"),
               "--sample.autoguidance_scale", "2.0", "--sample.sampler", "heun", "--sample.steps", "5"])
    assert rc == 0
    t_ag, _ = load_safetensors(out_ag / "latents.safetensors")
    assert t_ag["latents"].shape == (8, 4, 8, 8) and not torch.allclose(t_ag["latents"], t["latents"])


def test_dry_run_prints_the_resolved_yaml(capsys):
    assert main(["train-dit", "--config", PRESET, "--flow.shift", "0.5", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["flow"]["shift"] == 0.5 and cfg["model"]["hidden_size"] == 64
    assert main(["sample", "--config", PRESET, "--sample.steps", "7", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sample"]["steps"] == 7


def test_clear_errors(tmp_path, capsys):
    assert main(["train-dit", "--config", PRESET, "--out_dir", str(tmp_path / "x"), "--data.source", "folder"]) == 2
    assert "data.root" in capsys.readouterr().err
    cache = write_synthetic_cache(tmp_path / "cache3", channels=3, per_class=4)
    assert main(["train-dit", "--config", PRESET, "--data.root", str(cache), "--out_dir", str(tmp_path / "y")]) == 2
    assert "model.in_channels is 4 but the cache has 3 channels" in capsys.readouterr().err
    assert main(["sample", "--config", PRESET]) == 2
    assert "sample.checkpoint" in capsys.readouterr().err
    # a missing weights path is a data error (EXIT_DATA)
    assert main(["sample", "--config", PRESET, "--sample.checkpoint", str(tmp_path / "missing")]) == 3
    assert "does not exist" in capsys.readouterr().err


def _zero_model_checkpoint(tmp_path: Path):
    """A checkpoint of the freshly initialised tiny generator (adaLN-Zero: v = 0, so samples = the noise)."""
    cache = write_synthetic_cache(tmp_path / "cache", per_class=8)
    cfg = load_config(PRESET, {"data.root": str(cache), "out_dir": str(tmp_path / "run")})
    task, cfg = build_generator_task(cfg)
    meta = dict(task.metadata, config=dump_yaml(cfg))
    state = task.model.state_dict()
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints", 1, {"ema.safetensors": save_weights(state, meta)})
    return cfg, ckpt, task


def test_sampling_denormalises_with_the_cache_stats(tmp_path):
    cfg, ckpt, task = _zero_model_checkpoint(tmp_path)
    cfg.sample.checkpoint = str(ckpt)
    cfg.sample.num_samples = 5
    cfg.sample.batch_size = 2
    cfg.sample.steps = 3
    paths = sample(cfg)
    out = tmp_path / "run" / "samples" / ckpt.name  # beside the checkpoint sampled
    assert out / "latents.safetensors" in paths
    t, _ = load_safetensors(out / "latents.safetensors")
    expected = task.dataset.stats.denormalize(initial_noise(cfg.sample.seed, range(5), (4, 8, 8)))
    torch.testing.assert_close(t["latents"], expected)


def test_class_balanced_sampling_and_a_damaged_checkpoint(tmp_path, capsys):
    cfg, ckpt, _ = _zero_model_checkpoint(tmp_path)
    out = tmp_path / "balanced"
    args = ["sample", "--config", PRESET, "--sample.checkpoint", str(ckpt), "--sample.output_dir", str(out),
            "--sample.steps", "1", "--sample.per_class", "3"]
    assert main(args) == 0
    t, _ = load_safetensors(out / "latents.safetensors")
    assert torch.equal(torch.bincount(t["labels"]), torch.tensor([3, 3])) and t["latents"].shape[0] == 6
    weights = ckpt / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: the manifest's size no longer matches
    assert main(args) == 3  # a damaged checkpoint is a data error (pae_fast.errors.EXIT_DATA)
    assert "ema.safetensors is damaged" in capsys.readouterr().err


def test_missing_latent_stats_are_an_error_and_no_folder_is_searched(tmp_path):
    cfg, ckpt, task = _zero_model_checkpoint(tmp_path)
    # a bare weights file whose metadata has the run config but no latent statistics
    bare = tmp_path / "bare" / "weights.safetensors"
    save_safetensors(task.model.state_dict(), bare, metadata={"config": dump_yaml(cfg)})
    cfg.sample.checkpoint = str(bare)
    cfg.sample.output_dir = str(tmp_path / "out")
    cfg.sample.num_samples, cfg.sample.steps = 2, 1
    # statistics files beside the weights are not consulted: the checkpoint metadata is the one source
    LatentStats("channel", torch.full((4,), 3.0), torch.full((4,), 2.0)).save(bare.parent / STATS_FILE)
    with pytest.raises(ConfigError, match="carries no latent statistics"):
        sample(cfg)
    stats = LatentStats("channel", torch.full((4,), 3.0), torch.full((4,), 2.0))
    save_safetensors(task.model.state_dict(), bare, metadata={"config": dump_yaml(cfg), **stats.to_metadata()})
    sample(cfg)
    t, _ = load_safetensors(tmp_path / "out" / "latents.safetensors")
    torch.testing.assert_close(t["latents"], initial_noise(cfg.sample.seed, range(2), (4, 8, 8)) * 2.0 + 3.0)
    wrong = LatentStats("channel", torch.zeros(3), torch.ones(3))
    save_safetensors(task.model.state_dict(), bare, metadata={"config": dump_yaml(cfg), **wrong.to_metadata()})
    with pytest.raises(ConfigError, match="do not fit channel statistics"):
        sample(cfg)


def test_synthetic_source_without_a_cache():
    cfg = load_config(PRESET)  # data.source: synthetic, no data.root
    task, _ = build_generator_task(cfg)
    x, y = task.dataset[0]
    assert x.shape == (4, 8, 8) and y.dtype == torch.long and len(task.dataset) == cfg.data.synthetic_size
    z = torch.stack([task.dataset[i][0] for i in range(len(task.dataset))])
    assert z.mean().abs() < 1e-4 and (z.transpose(0, 1).flatten(1).std(1) - 1).abs().max() < 0.01  # standardised
    assert json.loads(task.metadata["latent_std"]) == pytest.approx(task.dataset.stats.std.tolist())
    assert task.flops_per_sample > 0 and task.num_workers == cfg.data.num_workers


def test_dimension_shift_is_resolved_from_the_data_shape(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache", per_class=4)
    cfg = load_config(PRESET, {"data.root": str(cache), "flow.dimension_shift": True})
    task, resolved = build_generator_task(cfg)
    # m = 4 x 8 x 8 = 256 -> alpha = sqrt(256 / 4096) = 1/4 -> s = 4
    assert resolved.flow.shift == pytest.approx(4.0) and task.loss_fn.shift == pytest.approx(4.0)
    assert task.metadata["train_shift"] == repr(resolved.flow.shift) and cfg.flow.shift == 1.0


class _TinyDecoder(nn.Module):
    """A stand-in tokenizer: ``decode(z (B, 4, 8, 8)) -> images (B, 3, 16, 16)`` in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(4, 3, 1)

    def decode(self, z):
        return torch.sigmoid(nn.functional.interpolate(self.proj(z), scale_factor=2))


def test_sample_decodes_with_a_registered_tokenizer(tmp_path, monkeypatch, capsys):
    cfg, ckpt, _ = _zero_model_checkpoint(tmp_path)
    tok_file = tmp_path / "tok.safetensors"
    save_safetensors(_TinyDecoder().state_dict(), tok_file)
    TOKENIZERS.names()  # load the real registry first
    monkeypatch.setitem(TOKENIZERS._entries, "TinyDecoder-test", _TinyDecoder)
    out = tmp_path / "decoded"
    args = ["sample", "--config", PRESET, "--sample.checkpoint", str(ckpt), "--sample.output_dir", str(out),
            "--sample.tokenizer_checkpoint", str(tok_file), "--sample.steps", "2", "--sample.num_samples", "6"]
    assert main([*args, "--tokenizer.name", "No-Such-Tokenizer"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.name='No-Such-Tokenizer'" in err and "Valid names" in err
    assert main([*args, "--tokenizer.name", "TinyDecoder-test"]) == 0
    arr = np.load(out / "samples.npz")
    assert arr["arr_0"].shape == (6, 16, 16, 3) and arr["arr_0"].dtype == np.uint8 and arr["labels"].shape == (6,)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000003.png")), arr["arr_0"][3])
    assert Image.open(out / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)  # 6 images, 3 per row, 2 px padding
    assert not (out / "latents.safetensors").exists()


def test_guide_without_run_config_takes_the_main_models_latent_space(tmp_path, monkeypatch):
    """A bare weights file (no run config in its metadata) as AutoGuidance guide is built for the main model's
    latent channels, size and classes, with the named variant's architecture."""
    from pae_fast.config import GeneratorConfig
    from pae_fast.io import save_safetensors
    from pae_fast.registry import GENERATORS, create_generator
    from pae_fast.stages.sample import load_generator

    name = "LightningDiT-test-guide"
    GENERATORS.names()  # import the model modules first, then add a tiny variant for this test only
    monkeypatch.setitem(GENERATORS._entries, name, lambda **kw: create_generator(
        "LightningDiT-B/1", **{"depth": 1, "hidden_size": 32, "num_heads": 4, **kw}))
    guide = create_generator(name, in_channels=4, input_size=4, num_classes=3)
    save_safetensors(guide.state_dict(), tmp_path / "guide.safetensors")
    like = GeneratorConfig(name="LightningDiT-B/1", in_channels=4, input_size=4, num_classes=3)
    model, _ = load_generator(tmp_path / "guide.safetensors", name=name, like=like)
    assert model.in_channels == 4 and model.num_classes == 3
    with pytest.raises(Exception, match="size mismatch|shape"):
        load_generator(tmp_path / "guide.safetensors", name=name)  # default latent space: 32 channels
