"""``data.latents: online``: train the generator on images encoded on the fly by the frozen tokenizer.

Instead of a latent cache, ``train-dit`` reads the images at ``data.root`` (ImageFolder tree or ``data.file_list``;
the ADM centre crop of :mod:`pae_fast.data.images`) through the engine's deterministic, resumable batching, and the
loss encodes each micro-batch under ``no_grad`` with the frozen tokenizer on the training device, standardises it
with the run's :class:`~pae_fast.data.latent_stats.LatentStats` and applies the flow loss. Flips are extra items,
as in a cache read with ``data.hflip``: item ``i < N`` is image ``i``, item ``N + i`` its mirror image (encoded, not
a flipped latent). Undecodable files under ``data.on_bad_file: skip`` are dropped from their micro-batch and counted
(``data/bad_files`` in ``stats.jsonl``). Why online is the better trade for wide latents: docs/method.md § Data.

Statistics (docs/method.md § Latent statistics), in this order: ``data.latent_stats`` (a ``stats.safetensors`` file,
e.g. a cache's); the statistics of the checkpoint being resumed (so a resumed run standardises exactly as before);
else computed over ``data.stats_items`` images (a seeded random subset, un-flipped) with the tokenizer's statistics
mode (per channel for PAE, per (C, H, W) for RAE). They go into every checkpoint's metadata exactly as for the cache
path, so ``sample`` de-normalises with them unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pae_fast.config import ConfigError
from pae_fast.data.images import BadFileLog, ImageDataset, ImageSamples, find_samples
from pae_fast.data.latent_stats import LatentStats, compute_latent_stats
from pae_fast.data.pil_loader import _collate as collate_images
from pae_fast.errors import DataError

__all__ = ["OnlineImages", "OnlineLatentData", "online_stats_from_resume"]

log = logging.getLogger("pae_fast.train_generator")


class OnlineImages(Dataset):
    """Map-style images for online encoding: items ``(image (3, S, S) uint8, label, item)``, or ``(None, path,
    reason)`` for a bad file under ``on_bad_file="skip"``; items ``N..2N-1`` are the mirror images when ``hflip``.

    Attributes:
        num_classes, path: the class count and the image source (named in errors and metadata).
    """

    def __init__(self, samples: ImageSamples, image_size: int, hflip: bool, on_bad_file: str) -> None:
        self.images = ImageDataset(samples, image_size, hflip=False, on_bad_file=on_bad_file, as_uint8=True)
        self.n, self.hflip = len(samples), hflip
        self.num_classes, self.path = len(samples.classes), samples.source

    def __len__(self) -> int:
        return self.n * (2 if self.hflip else 1)

    def __getitem__(self, i: int) -> tuple[Any, Any, Any]:
        item = self.images[i % self.n]
        if item[0] is None:  # (None, path, reason): the collate drops it and the loss counts it
            return item
        x, label, _ = item
        return (x.flip(-1) if i >= self.n else x), label, i


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    from pae_fast.engine.precision import autocast_dtype  # the engine's mapping, the only one

    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class OnlineLatentData:
    """The dataset, statistics and encoding loss of an online run.

    Args:
        tokenizer: the frozen tokenizer (``encode``, ``latent_shape``, ``stats_mode``, ``image_size``).
        name, weights_hash: its registered name and the hash identifying its weights (checkpoint metadata).
        tokenizer_weights: which of its weights encode, ``"raw"`` (non-EMA) or ``"ema"`` (checkpoint metadata).
        dataset: :class:`OnlineImages`.
        device: the training device (the tokenizer lives there).
        stats: the statistics latents are standardised with (set by :meth:`from_config` when None).
    """

    def __init__(self, tokenizer: nn.Module, name: str, weights_hash: str, dataset: OnlineImages,
                 device: torch.device, stats: LatentStats | None = None, tokenizer_weights: str = "raw") -> None:
        self.tokenizer, self.name, self.weights_hash, self.dataset = tokenizer, name, weights_hash, dataset
        self.tokenizer_weights = tokenizer_weights
        self.device, self.stats = device, stats
        self.latent_shape = tuple(int(s) for s in tokenizer.latent_shape)
        self.bad_files = BadFileLog()

    @classmethod
    def from_config(cls, cfg: Any) -> OnlineLatentData:
        """Build everything from a run config (reads only; nothing is written).

        Raises:
            ConfigError: the tokenizer cannot be built as configured, ``data.image_size`` is not its resolution, or
                the statistics do not fit its latents. DataError / WeightsError: the images or weights files.
        """
        from pae_fast.engine.distributed import default_device
        from pae_fast.stages.frozen_tokenizer import load_frozen_tokenizer

        data = cfg.data
        if data.loader == "dali":
            raise ConfigError("data.latents=online reads images through the engine's map-style batching (PIL "
                              "decoding in data.num_workers workers); data.loader=dali is for cache-latents and the "
                              "image loaders: use data.loader=auto or pil")
        which = cfg.tokenizer.encode_weights  # raw (non-EMA) by default, as the authors encode
        resumed = _resume_metadata(cfg)
        if resumed is not None and resumed[1].get("tokenizer_weights", which) != which:
            raise ConfigError(f"tokenizer.encode_weights={which} but the run being resumed ({resumed[0]}) encoded with "
                              f"the {resumed[1]['tokenizer_weights']} weights; set "
                              f"tokenizer.encode_weights={resumed[1]['tokenizer_weights']} or start a new run")
        tokenizer, digest = load_frozen_tokenizer(
            cfg.tokenizer.name, cfg.tokenizer.checkpoint, vfm_weights=cfg.tokenizer.vfm_weights,
            random_init=cfg.tokenizer.random_init, seed=cfg.seed, key="tokenizer.checkpoint",
            name_key="tokenizer.name", which=which)
        if int(data.image_size) != int(tokenizer.image_size):
            raise ConfigError(f"data.image_size={data.image_size} but tokenizer {cfg.tokenizer.name} encodes "
                              f"{tokenizer.image_size} px images; set data.image_size={tokenizer.image_size}")
        samples = find_samples(data.root, data.file_list, data.num_classes)
        device = default_device(cfg.train.device)
        tokenizer = tokenizer.to(device)
        dataset = OnlineImages(samples, data.image_size, data.hflip, data.on_bad_file)
        online = cls(tokenizer, cfg.tokenizer.name, digest, dataset, device, tokenizer_weights=which)
        online.stats = online._resolve_stats(cfg)
        return online

    # -- statistics ----------------------------------------------------------------------------------------------

    def _resolve_stats(self, cfg: Any) -> LatentStats:
        probe = torch.zeros(1, *self.latent_shape)
        where, stats = None, None
        if cfg.data.latent_stats:
            where = f"data.latent_stats={cfg.data.latent_stats!r}"
            try:
                stats = LatentStats.load(cfg.data.latent_stats)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise DataError(f"{where}: {e}") from e
        else:
            found = online_stats_from_resume(cfg)
            if found is not None:
                where, stats = found
                log.info("latent statistics from the run being resumed (%s)", where)
        if stats is None:
            return self.compute_stats(cfg.data.stats_items, cfg.data.batch_size or cfg.train.global_batch_size,
                                      cfg.seed, cfg.train.precision)
        if stats.mode != self.tokenizer.stats_mode:
            raise ConfigError(f"{where} holds {stats.mode!r} statistics but tokenizer {cfg.tokenizer.name} uses "
                              f"{self.tokenizer.stats_mode!r} statistics")
        try:
            stats.check_fits(probe, what=f"latents of tokenizer {cfg.tokenizer.name}")
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
        return stats

    @torch.no_grad()
    def compute_stats(self, items: int, batch_size: int, seed: int, precision: str = "fp32") -> LatentStats:
        """Statistics of the latents of ``items`` un-flipped images, a random subset drawn from ``seed`` (so every
        rank and every re-run picks the same one), encoded ``batch_size`` at a time."""
        order = torch.randperm(self.dataset.n, generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = order[: min(items, self.dataset.n)]

        def batches() -> Iterator[torch.Tensor]:
            for s in range(0, len(chosen), batch_size):
                images, _, _, bad = collate_images([self.dataset[i] for i in chosen[s : s + batch_size]])
                for path, reason in bad:
                    self.bad_files.add(path, reason)
                if images.shape[0]:
                    yield self.encode(images, precision)

        stats = compute_latent_stats(batches(), mode=self.tokenizer.stats_mode,
                                     where=f"online latents of {self.dataset.path}")
        log.info("latent statistics (%s) over %d images of %s", stats.mode, stats.count, self.dataset.path)
        return stats

    # -- encoding and the loss -----------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 images -> raw latents ``(B, C, H, W)`` float32 on the training device."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        ctx = _autocast(self.device, precision) if precision is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return self.tokenizer.encode(x).float()

    def loss_fn(self, flow_loss: Any) -> Any:
        """The engine's ``loss_fn(model, batch, step)``: encode (under the engine's autocast), standardise, flow
        loss. Bad files of the batch are counted first."""

        def loss(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict]:
            images, labels, _, bad = batch
            for path, reason in bad:
                self.bad_files.add(path, reason)
            if images.shape[0] == 0:
                raise DataError(f"every image of a micro-batch of {self.dataset.path} was an undecodable file "
                                f"({self.bad_files.count} bad files so far); check the data")
            z = self.stats.normalize(self.encode(images))  # (B, C, H, W) standardised
            return flow_loss(model, (z, labels.to(z.device)), step)

        return loss

    def counters(self) -> dict[str, int]:
        """``{"data/bad_files": count}`` for ``stats.jsonl``."""
        return {"data/bad_files": self.bad_files.count}

    def metadata(self) -> dict[str, str]:
        return {"latent_source": "online", "latent_cache": "", "images": str(self.dataset.path),
                "tokenizer": self.name, "tokenizer_weights_hash": self.weights_hash,
                "tokenizer_weights": self.tokenizer_weights}


def _resume_metadata(cfg: Any) -> tuple[Path, dict[str, str]] | None:
    """``(file, metadata)`` of the checkpoint that ``train.resume`` will continue from, or None (a fresh run)."""
    from pae_fast.engine.checkpoint import latest_checkpoint
    from pae_fast.weights import WeightsError, read_metadata

    if cfg.train.resume == "none":
        return None
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if ckpt is None or not Path(ckpt).exists():
        return None
    try:
        return read_metadata(ckpt, prefer_ema=False, key="train.resume")
    except WeightsError:
        return None  # the engine reports a damaged checkpoint when it resumes


def online_stats_from_resume(cfg: Any) -> tuple[str, LatentStats] | None:
    """The statistics recorded in the checkpoint that ``train.resume`` will continue from, or None (a fresh run)."""
    found = _resume_metadata(cfg)
    if found is None:
        return None
    file, meta = found
    stats = LatentStats.from_metadata(meta, where=str(file))
    return (str(file), stats) if stats is not None else None
