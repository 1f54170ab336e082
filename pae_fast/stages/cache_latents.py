"""Stage: encode an image data set once with a frozen tokenizer into a sharded latent cache.

The cache folder (read by :class:`pae_fast.data.latent_cache.LatentCache`)::

    cache.json                  what is being written: tokenizer, weights hash, which weights (tokenizer_weights: raw
                                = non-EMA by default, or ema), resolution, shard size, item count
    class_mapping.json          class names (pae_fast.data.images.save_class_mapping)
    shard-00000.safetensors     latents (n, C, h, w), latents_flip (n, C, h, w), labels (n,) int64
    stats.safetensors           LatentStats (per channel for PAE, per (C, H, W) for RAE; pae_fast/data/latent_stats)
    index.json                  written last: num_items, channels, size, num_classes, shards, metadata

Items are the sample list in order (sorted class folders, sorted files); shard ``k`` holds items
``[k * shard_size, (k + 1) * shard_size)`` minus bad files skipped under ``data.on_bad_file: skip``. Rank ``r`` of
``W`` writes the shards ``k = r, r + W, ...``, each atomically, so the result does not depend on the world size.
Re-running resumes: a finished shard whose metadata matches is kept. A folder whose ``cache.json`` names another
tokenizer, weights or resolution is refused. Rank 0 writes the statistics and the index after all shards exist.
``run_cache_latents`` (the command) checks everything it can refuse before touching the folder and holds the
folder's :class:`~pae_fast.engine.lock.RunLock` while writing; the tokenizer comes from
:mod:`pae_fast.stages.frozen_tokenizer` (random weights only when explicitly allowed, hashed from their tensors).
``latents_flip`` is the encoding of the mirrored image (not a flipped latent).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pae_fast import __version__
from pae_fast.data.images import ImageSamples, find_samples, save_class_mapping
from pae_fast.data.latent_cache import FORMAT_VERSION, INDEX_FILE, STATS_FILE, check_latents_finite
from pae_fast.data.latent_stats import LatentStats, compute_latent_stats
from pae_fast.data.loaders import build_image_loader
from pae_fast.errors import ConfigError, DataError
from pae_fast.io import atomic_write_text, load_safetensors, save_safetensors

__all__ = ["CacheError", "cache_latents", "write_shards", "finalize_cache", "shard_ranges", "check_cache_folder",
           "run_cache_latents", "CACHE_FILE"]

log = logging.getLogger("pae_fast.train.cache")

CACHE_FILE = "cache.json"


class CacheError(DataError):
    """The cache folder cannot be written or resumed as asked; the message names the file and the mismatch."""


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` item ranges of the shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(num_items, s + shard_size)) for s in range(0, num_items, shard_size)]


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _identity(tokenizer: nn.Module, tokenizer_name: str, weights_hash: str, samples: ImageSamples,
              shard_size: int, tokenizer_weights: str = "raw") -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_name,
        "weights_hash": weights_hash,
        "tokenizer_weights": tokenizer_weights,  # raw (non-EMA) | ema: stages/frozen_tokenizer.py
        "resolution": int(tokenizer.image_size),
        "latent_shape": [int(x) for x in tokenizer.latent_shape],
        "stats_mode": str(tokenizer.stats_mode),
        "num_items": len(samples),
        "num_classes": len(samples.classes),
        "shard_size": shard_size,
        "source": samples.source,
        "pae_fast_version": __version__,
    }


def check_cache_folder(out: Path, ident: dict[str, Any]) -> bool:
    """Read-only: whether ``out`` already holds this cache's ``cache.json``; a folder holding another cache's is a
    :class:`CacheError` naming each difference."""
    path = out / CACHE_FILE
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON ({e}); delete the folder or choose another --out") from e
    diff = [f"{k}: folder has {old.get(k)!r}, this run {v!r}" for k, v in ident.items()
            if k != "pae_fast_version" and old.get(k) != v]
    if diff:
        raise CacheError(f"{out} holds a cache written by another run ({'; '.join(diff)}); choose another --out "
                         "or delete it")
    return True


def _claim_folder(out: Path, ident: dict[str, Any]) -> None:
    """Write ``cache.json``, or check that an existing one describes the same cache (else :class:`CacheError`)."""
    if check_cache_folder(out, ident):
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CACHE_FILE, json.dumps(ident, indent=1) + "\n")


def _check_resolution(tokenizer: nn.Module, tokenizer_name: str, data_cfg) -> None:
    if int(data_cfg.image_size) != int(tokenizer.image_size):
        raise CacheError(f"data.image_size={data_cfg.image_size} but tokenizer {tokenizer_name} encodes "
                         f"{tokenizer.image_size} px images; set --data.image_size {tokenizer.image_size}")


def _shard_done(path: Path, ident: dict[str, Any], start: int, stop: int) -> bool:
    """Whether ``path`` is a finished shard of this cache; a damaged or foreign shard is a :class:`CacheError`."""
    if not path.exists():
        return False
    try:
        tensors, meta = load_safetensors(path)
    except Exception as e:  # damaged file: the message names it
        raise CacheError(f"shard {path} cannot be read ({e}); delete it and re-run to rewrite it") from e
    want = {"tokenizer": ident["tokenizer"], "weights_hash": ident["weights_hash"],
            "tokenizer_weights": ident.get("tokenizer_weights"), "start": str(start), "stop": str(stop)}
    got = {k: meta.get(k) for k in want}
    if got != want or not {"latents", "latents_flip", "labels"} <= set(tensors):
        raise CacheError(f"shard {path} belongs to another cache (metadata {got}, expected {want}); delete it")
    return True


@torch.no_grad()
def _encode_range(tokenizer: nn.Module, data_cfg, samples: ImageSamples, start: int, stop: int,
                  device: torch.device, check_stop: Callable[[], None] | None = None
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """Latents of items ``[start, stop)`` and of their mirror images, in item order; and the bad-file count.
    ``check_stop`` is called before each batch (it raises to stop; the shard is then not written)."""
    part = samples.subset(range(start, stop))
    loader = build_image_loader(data_cfg, 0, 1, device, shuffle=False, hflip=False, drop_last=False, samples=part)
    zs, zfs, labels, index = [], [], [], []
    for batch in loader:
        if check_stop is not None:
            check_stop()
        x = batch.images  # (B, 3, S, S) in [0, 1]
        zs.append(tokenizer.encode(x).float().cpu())  # (B, C, h, w)
        zfs.append(tokenizer.encode(x.flip(-1)).float().cpu())
        labels.append(batch.labels.cpu())
        index.append(batch.indices)
    if not index:
        c, h, w = tokenizer.latent_shape
        empty = torch.empty(0, c, h, w)
        return {"latents": empty, "latents_flip": empty.clone(), "labels": torch.empty(0, dtype=torch.int64)}, \
            loader.bad_files.count
    order = torch.cat(index).argsort()
    return {"latents": torch.cat(zs)[order], "latents_flip": torch.cat(zfs)[order],
            "labels": torch.cat(labels)[order]}, loader.bad_files.count


def write_shards(tokenizer: nn.Module, data_cfg, out_dir: str | os.PathLike, *, tokenizer_name: str,
                 weights_hash: str, shard_size: int = 4096, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", samples: ImageSamples | None = None,
                 tokenizer_weights: str = "raw", check_stop: Callable[[], None] | None = None) -> list[Path]:
    """Write this rank's shards (``k = rank, rank + world_size, ...``), skipping finished ones.

    Args:
        tokenizer: frozen module with ``encode(images (B, 3, S, S) in [0, 1]) -> (B, C, h, w)``, ``image_size``,
            ``latent_shape (C, h, w)`` and ``stats_mode`` (``"channel"`` | ``"chw"``).
        data_cfg: :class:`pae_fast.config.DataConfig` (root / file_list, num_classes, loader, batch_size, ...);
            ``image_size`` must equal ``tokenizer.image_size``.
        out_dir: the cache folder.
        tokenizer_name, weights_hash: identify the tokenizer; a folder written by another is refused.
        shard_size: items per shard.
        rank, world_size: this process's share of the shards.
        device: where the tokenizer runs.
        samples: the items (default: from ``data_cfg``).
        tokenizer_weights: which of the tokenizer's weights encode (``"raw"``, non-EMA, or ``"ema"``); recorded and
            checked like the weights hash.
        check_stop: called between batches; it raises (``PreemptedError`` on SIGTERM / SIGINT) to stop before the
            current shard is written, so a re-run resumes from the finished shards.
    Returns:
        The shard files this rank wrote now (not those already finished).
    Raises:
        CacheError: another cache in ``out_dir``, a damaged shard, or a resolution mismatch.
    """
    _check_resolution(tokenizer, tokenizer_name, data_cfg)
    samples = samples or find_samples(data_cfg.root, data_cfg.file_list, data_cfg.num_classes)
    out, device = Path(out_dir), torch.device(device)
    ident = _identity(tokenizer, tokenizer_name, weights_hash, samples, shard_size, tokenizer_weights)
    if rank == 0:
        _claim_folder(out, ident)
        save_class_mapping(samples.classes, out, source=samples.source)
    _barrier(world_size)
    if rank != 0:
        _claim_folder(out, ident)  # checks what rank 0 wrote
    from pae_fast.progress import progress

    written = []
    ranges = shard_ranges(len(samples), shard_size)
    for k in progress(range(rank, len(ranges), world_size), "cache-latents", unit="shard", enabled=rank == 0):
        start, stop = ranges[k]
        path = out / _shard_name(k)
        if _shard_done(path, ident, start, stop):
            log.info("shard %s is already written; kept", path.name)
            continue
        tensors, bad = _encode_range(tokenizer, data_cfg, samples, start, stop, device, check_stop)
        for key in ("latents", "latents_flip"):  # no NaN shard is ever written (the reader would refuse it later)
            check_latents_finite(tensors[key], key, f"tokenizer {tokenizer_name} encoding shard {path.name}", start)
        meta = {"tokenizer": tokenizer_name, "weights_hash": weights_hash, "tokenizer_weights": tokenizer_weights,
                "start": str(start), "stop": str(stop), "bad_files": str(bad)}
        save_safetensors(tensors, path, metadata=meta)
        written.append(path)
        log.info("wrote %s: items %d..%d (%d bad files skipped)", path.name, start, stop - 1, bad)
    return written


def _shard_latents(out: Path, names: list[str], stride: int = 1) -> Iterator[torch.Tensor]:
    """The latents of the shards in order, every ``stride``-th item of the whole sequence."""
    offset = 0
    for name in names:
        z = load_safetensors(out / name)[0]["latents"]  # (n, C, h, w)
        yield z[(-offset) % stride :: stride]
        offset += z.shape[0]


def finalize_cache(out_dir: str | os.PathLike, stats_items: int | None = 10_000) -> Path:
    """Rank 0, after every shard is written: statistics over ``stats_items`` latents (all when None), then
    ``index.json``.

    The items are evenly spaced over the whole cache (every ``ceil(N / stats_items)``-th), not the first ones: the
    items are in class order, so the first 10k of ImageNet would cover only its first few classes.

    Raises:
        CacheError: ``cache.json`` or a shard is missing.
    """
    out = Path(out_dir)
    cache_path = out / CACHE_FILE
    if not cache_path.is_file():
        raise CacheError(f"{out} has no {CACHE_FILE}: not a cache being written")
    ident = json.loads(cache_path.read_text(encoding="utf-8"))
    ranges = shard_ranges(ident["num_items"], ident["shard_size"])
    shards, bad_total = [], 0
    for k, (start, stop) in enumerate(ranges):
        path = out / _shard_name(k)
        if not _shard_done(path, ident, start, stop):
            raise CacheError(f"shard {path} is missing: re-run cache-latents (it resumes) before finalising")
        tensors, meta = load_safetensors(path)
        shards.append({"file": path.name, "count": int(tensors["labels"].shape[0])})
        bad_total += int(meta.get("bad_files", 0))
    names = [s["file"] for s in shards if s["count"]]
    total = sum(s["count"] for s in shards)
    stride = max(1, -(-total // stats_items)) if stats_items else 1
    stats = compute_latent_stats(_shard_latents(out, names, stride), mode=ident["stats_mode"], max_items=stats_items,
                                 where=str(out))
    stats.save(out / STATS_FILE)
    c, h, w = ident["latent_shape"]
    index = {
        "format_version": FORMAT_VERSION,
        "num_items": sum(s["count"] for s in shards),
        "channels": c,
        "size": [h, w],
        "num_classes": ident["num_classes"],
        "dtype": "float32",
        "shards": shards,
        "metadata": {k: ident[k] for k in ("tokenizer", "weights_hash", "tokenizer_weights", "resolution", "stats_mode",
                                           "source", "pae_fast_version")} | {"bad_files": bad_total,
                                                                    "class_mapping": "class_mapping.json"},
    }
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return out


def _barrier(world_size: int) -> None:
    from pae_fast.engine.distributed import barrier

    if world_size > 1:
        barrier()


def cache_latents(tokenizer: nn.Module, data_cfg, out_dir: str | os.PathLike, *, tokenizer_name: str,
                  weights_hash: str, shard_size: int = 4096, rank: int = 0, world_size: int = 1,
                  device: torch.device | str = "cpu", stats_items: int | None = 10_000,
                  samples: ImageSamples | None = None, tokenizer_weights: str = "raw",
                  check_stop: Callable[[], None] | None = None) -> LatentStats | None:
    """Write (or finish) a latent cache: this rank's shards, then on rank 0 the statistics and the index.

    Arguments as :func:`write_shards` and :func:`finalize_cache`. Under ``torch.distributed`` ranks meet at a barrier
    before rank 0 finalises. Returns the statistics on rank 0, None elsewhere.
    """
    write_shards(tokenizer, data_cfg, out_dir, tokenizer_name=tokenizer_name, weights_hash=weights_hash,
                 shard_size=shard_size, rank=rank, world_size=world_size, device=device, samples=samples,
                 tokenizer_weights=tokenizer_weights, check_stop=check_stop)
    _barrier(world_size)
    if rank != 0:
        return None
    finalize_cache(out_dir, stats_items)
    return LatentStats.load(Path(out_dir) / STATS_FILE)


def run_cache_latents(cfg, tokenizer_name: str, weights: str | os.PathLike | None, out_dir: str | os.PathLike, *,
                      shard_size: int = 4096, stats_items: int | None = 10_000, random_init: bool = False,
                      check_stop: Callable[[], None] | None = None) -> Path:
    """``cache-latents``: build the frozen tokenizer (:func:`~pae_fast.stages.frozen_tokenizer.load_frozen_tokenizer`),
    start the process group under torchrun, and write the cache (:func:`cache_latents`) on ``cfg.train.device``.

    Everything that can be refused is checked before the folder is touched (the tokenizer name, the weights file, the
    image folder, the resolution, a folder holding another cache); the folder is then locked
    (:class:`~pae_fast.engine.lock.RunLock`, rank 0) while shards are written.

    Args:
        cfg: a :class:`pae_fast.config.Config` (reads ``data``, ``tokenizer.vfm_weights``, ``tokenizer.encode_weights``
            (raw = non-EMA, the default, or ema), ``seed``, ``train.device``).
        tokenizer_name: a registered tokenizer (``pae_fast.registry.TOKENIZERS``).
        weights: its weights (safetensors / .pt, a file or a checkpoint folder); the file's SHA-256 identifies it.
            None only with ``random_init``.
        out_dir: the cache folder.
        shard_size: items per shard (>= 1).
        stats_items: latents the statistics are computed from (None: all).
        random_init: allow a random tokenizer (seeded by ``cfg.seed``; pipeline checks only).
        check_stop: see :func:`write_shards` (the command passes its SIGTERM / SIGINT check).
    Returns:
        The cache folder.
    """
    from pae_fast.engine import distributed as dist_utils
    from pae_fast.engine.lock import RunLock
    from pae_fast.stages.frozen_tokenizer import load_frozen_tokenizer

    if shard_size < 1:
        raise ConfigError(f"--shard-size={shard_size}: expected >= 1")
    if stats_items is not None and stats_items < 1:
        raise ConfigError(f"--stats-items={stats_items}: expected >= 1 (or 0 for all)")
    which = cfg.tokenizer.encode_weights
    tokenizer, weights_hash = load_frozen_tokenizer(tokenizer_name, weights, vfm_weights=cfg.tokenizer.vfm_weights,
                                                    random_init=random_init, seed=cfg.seed, which=which)
    _check_resolution(tokenizer, tokenizer_name, cfg.data)
    samples = find_samples(cfg.data.root, cfg.data.file_list, cfg.data.num_classes)
    out = Path(out_dir)
    check_cache_folder(out, _identity(tokenizer, tokenizer_name, weights_hash, samples, shard_size, which))
    device = dist_utils.default_device(cfg.train.device)
    owns_group = dist_utils.init_from_env(device)
    try:
        rank = dist_utils.get_rank()
        with RunLock(out, enabled=rank == 0):
            cache_latents(tokenizer.to(device), cfg.data, out, tokenizer_name=tokenizer_name,
                          weights_hash=weights_hash, shard_size=shard_size, rank=rank,
                          world_size=dist_utils.get_world_size(), device=device, stats_items=stats_items,
                          samples=samples, tokenizer_weights=which, check_stop=check_stop)
    finally:
        if owns_group:
            dist_utils.cleanup()
    return out
