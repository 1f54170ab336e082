"""A tiny LightningDiT trained with flow matching (through the shared engine) on a two-class Gaussian latent set.

Class k is ``N(mu_k, sd²·I)`` with well-separated means ``±1.5·u`` (u a fixed random pattern, RMS 1), latents
``C = 4, 4×4``. The per-class Fréchet distance of the samples to the true Gaussian must fall far below the untrained
model's (whose zero-initialised output leaves the noise untouched), and CFG must push the classes further apart.
"""

import dataclasses

import pytest
import torch

from pae_fast.config import load_config
from pae_fast.data.latent_cache import write_latent_cache
from pae_fast.data.latent_stats import LatentStats
from pae_fast.eval.fid import frechet_distance
from pae_fast.models.generator import generator_from_config
from pae_fast.stages.sample import generate_latents, load_generator
from pae_fast.stages.train_generator import train_generator

C, S, SD = 4, 4, 0.5


def _class_means() -> torch.Tensor:
    u = torch.randn(C, S, S, generator=torch.Generator().manual_seed(0))
    u = u / u.pow(2).mean().sqrt()
    return torch.stack([1.5 * u, -1.5 * u])  # (2, C, S, S); distance between the means: 3·sqrt(64) = 24


def _config(tmp_path, steps: int):
    means = _class_means()
    g = torch.Generator().manual_seed(1)
    y = torch.arange(2).repeat_interleave(512)
    x = means[y] + SD * torch.randn(1024, C, S, S, generator=g)
    cache = write_latent_cache(tmp_path / "cache", x, y)
    overrides = {
        "out_dir": str(tmp_path / "run"),
        "data.root": str(cache),
        "data.hflip": False,  # a flipped class mean is not the class mean: keep the distribution exact
        "data.num_workers": 0,
        "model.name": "LightningDiT-B/1",
        "model.in_channels": C,
        "model.input_size": S,
        "model.num_classes": 2,
        "model.depth": 2,
        "model.hidden_size": 64,
        "model.num_heads": 4,
        "flow.shift": 1.0,
        "train.steps": steps,
        "train.global_batch_size": 32,
        "train.lr": 2e-3,
        "train.precision": "fp32",
        "train.device": "cpu",
        "train.ema_decay": 0.98,
        "train.log_every": 100,
        "train.ckpt_every": steps,
        "train.progress": False,
        "train.tf32": False,
        "sample.steps": 16,
        "sample.batch_size": 256,
        "sample.shift": 1.0,
        "sample.cfg_interval_start": 0.0,
    }
    return load_config(None, overrides), means


def _per_class_stats(model, cfg, means, guidance: str, scale: float = 1.0, n: int = 256):
    """Per-class Fréchet distance to N(mu_k, SD²·I) (raw latent space) and the distance between class centroids."""
    sc = dataclasses.replace(cfg.sample, guidance=guidance, cfg_scale=scale, seed=5)
    labels = torch.arange(2).repeat_interleave(n)
    z = generate_latents(model, labels, (C, S, S), sc, progress=False)
    z = model.latent_stats.denormalize(z).flatten(1).double()
    eye = SD**2 * torch.eye(C * S * S, dtype=torch.float64)
    fds, cents = [], []
    for k in range(2):
        zk = z[labels == k]
        fds.append(frechet_distance(zk.mean(0), torch.cov(zk.T), means[k].flatten().double(), eye))
        cents.append(zk.mean(0))
    return fds, (cents[0] - cents[1]).norm().item()


def _train_and_check(tmp_path, steps: int, fd_ratio: float, sep_gain: float):
    cfg, means = _config(tmp_path, steps)
    train_generator(cfg)
    model, meta = load_generator(cfg.out_dir, use_ema=True)
    assert meta["weights"] == "ema" and int(meta["step"]) == steps
    model.latent_stats = LatentStats.from_metadata(meta)

    untrained = generator_from_config(cfg.model).eval()
    untrained.latent_stats = model.latent_stats
    fd_untrained, _ = _per_class_stats(untrained, cfg, means, "none")
    fd_trained, sep = _per_class_stats(model, cfg, means, "none")
    _, sep_cfg = _per_class_stats(model, cfg, means, "cfg", scale=3.0)
    for k in range(2):
        assert fd_trained[k] < fd_ratio * fd_untrained[k], (fd_trained, fd_untrained)
    assert sep_cfg > sep_gain * sep, (sep_cfg, sep)
    return fd_trained, fd_untrained, sep, sep_cfg


def test_tiny_lightningdit_learns_two_gaussian_classes_and_cfg_separates_them(tmp_path):
    _train_and_check(tmp_path, steps=300, fd_ratio=0.1, sep_gain=1.1)


@pytest.mark.slow
def test_tiny_lightningdit_longer_run(tmp_path):
    # A converged model has nearly the true class centroids (distance 24) and CFG only acts early on the path,
    # so its gain in separation is smaller than the under-trained model's.
    fd_trained, _, sep, _ = _train_and_check(tmp_path, steps=2000, fd_ratio=0.03, sep_gain=1.03)
    assert max(fd_trained) < 4.0 and abs(sep - 24.0) < 1.5, (fd_trained, sep)
