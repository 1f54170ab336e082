"""The latent data of generator training: a latent cache or an in-memory synthetic set, and its loader options.

Both datasets yield ``(latent (C, H, W) standardised, label)`` and expose ``stats`` (:class:`LatentStats`, the
per-channel statistics used to standardise), ``num_classes`` and ``path`` (named in errors and metadata).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from pae_fast.config import ConfigError
from pae_fast.data.latent_stats import LatentStats, compute_latent_stats
from pae_fast.errors import DataError

__all__ = ["SyntheticLatents", "open_latent_data", "latent_loader_workers", "identity_stats"]

log = logging.getLogger("pae_fast.data")


def identity_stats(channels: int) -> LatentStats:
    """Mean 0 / std 1: the statistics of data that is already standardised."""
    return LatentStats("channel", torch.zeros(channels), torch.ones(channels), eps=0.0)


class SyntheticLatents(torch.utils.data.Dataset):
    """``data.source: synthetic`` without ``data.root``: the class-Gaussian latent set of
    :mod:`pae_fast.data.synthetic`, held in memory and standardised like a cache (no flips: a flipped class mean
    is another distribution).

    Args:
        data: the ``data`` config section (``num_classes``, ``latent_channels``, ``latent_size``,
            ``synthetic_size``, ``batch_size``: latents per batch when computing the statistics).
        seed: the run seed.
    """

    def __init__(self, data: Any, seed: int) -> None:
        from pae_fast.data.synthetic import SyntheticLatentSpec, synthetic_latents

        spec = SyntheticLatentSpec(data.num_classes, data.latent_channels, data.latent_size, seed=seed)
        z, self.labels = synthetic_latents(spec, max(1, data.synthetic_size // data.num_classes), seed=seed + 1)
        step = data.batch_size or len(z)
        self.stats = compute_latent_stats((z[i : i + step] for i in range(0, len(z), step)), "channel",
                                          where="synthetic latents")
        self.latents = self.stats.normalize(z)  # (N, C, H, W)
        self.num_classes = data.num_classes
        self.path = f"synthetic(num_classes={data.num_classes}, C={data.latent_channels}, size={data.latent_size})"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.latents[i], self.labels[i]


def open_latent_data(cfg: Any) -> Any:
    """The latent dataset a run config names: the cache at ``data.root`` (standardised with its statistics,
    h-flips as extra items when ``data.hflip``), or the synthetic set (``data.source: synthetic``, no root)."""
    from pae_fast.data.latent_cache import LatentCache

    if not cfg.data.root:
        if cfg.data.source == "synthetic":
            return SyntheticLatents(cfg.data, cfg.seed)
        raise ConfigError(
            "train-dit trains on a latent cache: set data.root to a cache folder (index.json, shard-*.safetensors, "
            "stats.safetensors), e.g. --data.root runs/latents (or data.source=synthetic for a synthetic set)"
        )
    try:
        return LatentCache(cfg.data.root, normalize=True, hflip=cfg.data.hflip)
    except DataError:  # a damaged cache: its message names the file (exit code 3)
        raise
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.root={cfg.data.root!r}: {e}") from e


def latent_loader_workers(data: Any, train: Any, world_size: int) -> int:
    """Validate the ``data`` loader options against the engine for latent training; returns ``data.num_workers``.

    Latents are tensors read from safetensors shards: ``data.loader`` ``"auto"`` / ``"pil"`` load them in
    DataLoader workers; ``"dali"`` (an image decoder) does not apply. The engine's step sampler always drops an
    epoch's last partial batch (exact resume), so ``data.drop_last`` must be true. ``data.batch_size`` (per
    process) states the layout a preset was written for (e.g. 8 GPUs x 128); the engine's micro-batch is
    ``train.global_batch_size / (world · grad_accum)``, and a mismatch is logged as a warning (the global batch,
    which sets the optimisation, wins).

    Raises:
        ConfigError: naming the key, its value and what was expected.
    """
    if data.loader == "dali":
        raise ConfigError("data.loader='dali' decodes images; latent training reads safetensors shards: use "
                          "data.loader=auto (or pil)")
    if data.loader not in ("auto", "pil"):
        raise ConfigError(f"data.loader: expected 'auto', 'dali' or 'pil', got {data.loader!r}")
    if not data.drop_last:
        raise ConfigError("data.drop_last=false: the training engine always drops an epoch's last partial batch "
                          "(static shapes, exact resume); set data.drop_last=true")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {data.num_workers}")
    if data.batch_size is not None:
        micro = train.global_batch_size // max(1, world_size * train.grad_accum)
        if data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1 (or null), got {data.batch_size}")
        if data.batch_size * world_size * train.grad_accum != train.global_batch_size:
            log.warning("data.batch_size=%d (per process) does not match train.global_batch_size=%d over %d "
                        "process(es) x grad_accum %d: each process runs micro-batches of %d",
                        data.batch_size, train.global_batch_size, world_size, train.grad_accum, micro)
    return data.num_workers
