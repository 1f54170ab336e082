"""The PIL image loader: :class:`ImageDataset` under a torch DataLoader, sharded per rank by ``DistributedSampler``.

Semantics shared with the DALI loader (``pae_fast/data/dali_loader.py``): ADM centre crop, horizontal flip with
probability 1/2, batches of float [0, 1] ``(B, 3, S, S)`` on the training device, each rank a disjoint shard of a
seeded per-epoch shuffle, bad files an error or skipped and counted (``bad_files``). Every ``iter()`` is one epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pae_fast.data.images import BadFileLog, ImageBatch, ImageDataset, ImageSamples, OnBadFile

__all__ = ["PILImageLoader"]


class _EpochTaggedSampler(Sampler):
    """Yields ``(index, epoch)`` from a ``DistributedSampler`` so that the dataset's flips depend on the epoch too
    (dataset copies inside persistent workers never see ``set_epoch``)."""

    def __init__(self, inner: DistributedSampler):
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((i, epoch) for i in self.inner)


def _collate(items: list[tuple[Any, Any, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Stack the good items; return the skipped ones' ``(path, reason)`` beside them."""
    good = [it for it in items if it[0] is not None]
    bad = [(p, r) for x, p, r in items if x is None]
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty(0, dtype=torch.uint8), empty, empty, bad
    images = torch.stack([x for x, _, _ in good])  # (B, 3, S, S) uint8
    labels = torch.tensor([lab for _, lab, _ in good], dtype=torch.int64)
    indices = torch.tensor([i for _, _, i in good], dtype=torch.int64)
    return images, labels, indices, bad


class PILImageLoader:
    """Image batches through PIL decoding in ``num_workers`` processes.

    Args:
        samples: the items (all ranks pass the same list).
        image_size: training resolution ``S``.
        batch_size: images per batch on this rank.
        rank, world_size: this process's shard.
        device: where batches go (pinned host memory and non-blocking copies when CUDA).
        num_workers: decoding processes (0: in the calling process); persistent across epochs.
        hflip: random horizontal flips.
        shuffle: a seeded per-epoch permutation (same on all ranks); False keeps the list order.
        drop_last: drop the last incomplete batch; also drops the tail that does not divide by ``world_size``
            (else ``DistributedSampler`` repeats items to even the shards).
        seed: shuffle and flip seed.
        on_bad_file: ``"error"`` or ``"skip"`` (a skipped item makes its batch smaller).
        prefetch: batches each worker prepares ahead.

    Iterating yields :class:`ImageBatch` es (``images (B, 3, S, S)`` float32 in [0, 1]); each ``iter()`` is the next
    epoch. ``len()`` is the number of batches per epoch on this rank.
    """

    kind = "pil"

    def __init__(self, samples: ImageSamples, *, image_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", num_workers: int = 0, hflip: bool = True, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, on_bad_file: OnBadFile = "error", prefetch: int = 2):
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if prefetch <= 0:
            raise ValueError(f"data.prefetch must be > 0, got {prefetch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.samples, self.device = samples, torch.device(device)
        self.batch_size, self.epoch = batch_size, 0
        self.bad_files = BadFileLog()
        self.dataset = ImageDataset(samples, image_size, hflip=hflip, on_bad_file=on_bad_file, as_uint8=True,
                                    seed=seed)
        shard = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                   drop_last=drop_last)
        self.sampler = _EpochTaggedSampler(shard)
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[ImageBatch]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for images, labels, indices, bad in self.loader:
            for path, reason in bad:
                self.bad_files.add(path, reason)
            if images.shape[0] == 0:
                continue
            images = images.to(self.device, non_blocking=True).float().div_(255.0)
            yield ImageBatch(images, labels.to(self.device, non_blocking=True), indices)
