"""Choose and build the image loader for a run: ``data.loader = auto | dali | pil`` (docs/method.md §Data).

``auto`` takes DALI when it imports and PIL otherwise; an explicit ``dali`` that cannot import is an error saying
why. Both loaders yield :class:`~pae_fast.data.images.ImageBatch` es of float [0, 1] ``(B, 3, S, S)`` images on
``device``, shard the items over ranks, and count skipped bad files in ``loader.bad_files.count``.
"""

from __future__ import annotations

import logging

import torch

from pae_fast.data.dali_loader import DALIImageLoader, dali_available
from pae_fast.data.images import ImageDataError, ImageSamples, find_samples
from pae_fast.data.pil_loader import PILImageLoader

__all__ = ["ImageLoader", "resolve_loader_kind", "build_image_loader"]

log = logging.getLogger("pae_fast.train.data")

ImageLoader = DALIImageLoader | PILImageLoader


def resolve_loader_kind(loader: str) -> str:
    """``"dali"`` or ``"pil"`` for ``data.loader``.

    Raises:
        ImageDataError: ``loader == "dali"`` and DALI does not import (the reason is in the message), or an unknown
            value.
    """
    if loader not in ("auto", "dali", "pil"):
        raise ImageDataError(f"data.loader must be one of auto, dali, pil; got {loader!r}")
    if loader == "pil":
        return "pil"
    ok, why = dali_available()
    if loader == "dali" and not ok:
        raise ImageDataError(f"data.loader=dali but DALI is not usable: {why}; set data.loader=pil or auto")
    if not ok:
        log.info("data.loader=auto: DALI unavailable (%s); using the PIL loader", why)
    return "dali" if ok else "pil"


def build_image_loader(data_cfg, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", *,
                       seed: int = 0, shuffle: bool = True, hflip: bool | None = None, drop_last: bool | None = None,
                       samples: ImageSamples | None = None) -> ImageLoader:
    """The image loader described by ``data_cfg`` (a :class:`pae_fast.config.DataConfig`) for one rank.

    Args:
        data_cfg: reads ``root``, ``file_list``, ``num_classes``, ``image_size``, ``batch_size`` (per process),
            ``loader``, ``num_workers`` (PIL), ``dali_threads`` (DALI), ``prefetch``, ``hflip``, ``drop_last``,
            ``on_bad_file``.
        rank, world_size: this process's shard.
        device: the training device; batches arrive there.
        seed: shuffle / flip seed (the run's ``seed``).
        shuffle: False keeps the sample order (e.g. writing a cache).
        hflip, drop_last: override the config's values when not None.
        samples: the items, when already listed (else from ``data.file_list`` / ``data.root``).
    Returns:
        A :class:`DALIImageLoader` or :class:`PILImageLoader`; ``len()`` batches per epoch, ``iter()`` one epoch.
    Raises:
        ImageDataError: missing/empty data, a class count other than ``data.num_classes``, DALI requested but
            unavailable, or a bad file under ``data.on_bad_file=error``.
    """
    if samples is None:
        samples = find_samples(data_cfg.root, data_cfg.file_list, data_cfg.num_classes)
    kind = resolve_loader_kind(data_cfg.loader)
    common = dict(
        image_size=data_cfg.image_size, batch_size=data_cfg.batch_size, rank=rank, world_size=world_size,
        device=device, hflip=data_cfg.hflip if hflip is None else hflip, shuffle=shuffle, seed=seed,
        drop_last=data_cfg.drop_last if drop_last is None else drop_last, on_bad_file=data_cfg.on_bad_file,
        prefetch=data_cfg.prefetch,
    )
    if kind == "dali":
        loader: ImageLoader = DALIImageLoader(samples, threads=data_cfg.dali_threads, **common)
    else:
        loader = PILImageLoader(samples, num_workers=data_cfg.num_workers, **common)
    if rank == 0:
        log.info("image loader: %s, %d items in %d classes from %s, %d batches of %d per epoch on each of %d ranks",
                 kind, len(samples), len(samples.classes), samples.source, len(loader), data_cfg.batch_size,
                 world_size)
    return loader
