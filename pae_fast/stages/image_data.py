"""The image data of the tokenizer stages (``refine-priors``, ``train-tokenizer``): a training set and a held-out set.

Both are map-style datasets of ``(image (3, S, S) float32 in [0, 1], label)`` (folder items also carry their
index, which the stages ignore). Sources (``data.source``):

- ``folder`` / ``imagenet``: an ImageFolder tree at ``data.root`` (or ``data.file_list``), ADM centre crop to
  ``data.image_size``; the held-out set is ``tokenizer.heldout_items`` items drawn with the run seed and removed
  from the training set. ``data.on_bad_file: skip`` drops undecodable files (the training set's ``collate_fn``
  drops them from their batch and logs each; bad held-out files are dropped when the set is opened).
- ``skimage``: the demo photographs of :func:`pae_fast.data.demo_images.build_demo_images` (scikit-image's sample
  images, shipped with the package): ``data.synthetic_size`` training crops and ``tokenizer.heldout_items``
  pixel-disjoint held-out crops over ``min(data.num_classes, 8)`` classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pae_fast.errors import ConfigError

__all__ = ["TensorImageDataset", "open_image_data", "check_image_size"]


class TensorImageDataset(torch.utils.data.Dataset):
    """``(N, 3, S, S)`` images in [0, 1] and ``(N,)`` labels as a map-style dataset of ``(image, label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str = "") -> None:
        if images.dim() != 4 or images.shape[1] != 3 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"TensorImageDataset: images (N, 3, S, S) and labels (N,), got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images, self.labels, self.path = images, labels, name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class _SkippingCollate:
    """Batches of the good items of a ``data.on_bad_file: skip`` image set; each bad file is logged once with the
    count so far (:class:`~pae_fast.data.images.BadFileLog`). Picklable for DataLoader workers."""

    def __init__(self) -> None:
        from pae_fast.data.images import BadFileLog

        self.bad_files = BadFileLog()

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from pae_fast.data.pil_loader import _collate

        images, labels, indices, bad = _collate(items)
        for path, reason in bad:
            self.bad_files.add(path, reason)
        if bad and len(bad) == len(items):  # nothing to train on: refuse, naming a file, rather than an empty step
            from pae_fast.errors import DataError

            path, reason = bad[0]
            raise DataError(f"every item of a batch of {len(items)} failed to decode (data.on_bad_file=skip), e.g. "
                            f"{path}: {reason}; the image data is mostly unreadable")
        return images, labels, indices  # images (B', 3, S, S), B' = the good items


def _decodable(samples: Any) -> Any:
    """The items of ``samples`` that decode (a bad one is logged and dropped)."""
    from pae_fast.data.images import BadFileLog, BadImageError, load_image

    log, keep = BadFileLog(), []
    for i, path in enumerate(samples.paths):
        try:
            load_image(path)
            keep.append(i)
        except BadImageError as e:
            log.add(e.path, e.reason)
    return samples.subset(keep)


def check_image_size(cfg: Any, tokenizer_image_size: int) -> None:
    """``data.image_size`` must be the tokenizer's image size (the stages feed images at that size)."""
    if cfg.data.image_size != tokenizer_image_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} but tokenizer {cfg.tokenizer.name!r} takes "
                          f"{tokenizer_image_size}px images; set data.image_size: {tokenizer_image_size}")


def open_image_data(cfg: Any, heldout_items: int = 0) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset
                                                                | None]:
    """The training and held-out image sets of ``cfg.data`` (see the module docstring).

    Args:
        cfg: the run config (``data``, ``seed``).
        heldout_items: size of the held-out set (0: none).
    Returns:
        ``(train, heldout or None)``.
    Raises:
        ConfigError: an unusable ``data.source``; ImageDataError: a missing / empty / malformed folder.
    """
    d = cfg.data
    if d.source == "skimage":
        from pae_fast.data.demo_images import build_demo_images

        k = min(d.num_classes, 8)
        demo = build_demo_images(train_per_class=math.ceil(d.synthetic_size / k),
                                 heldout_per_class=max(1, math.ceil(heldout_items / k)), seed=cfg.seed,
                                 image_size=d.image_size, num_classes=k)
        train = TensorImageDataset(demo.train.images[: d.synthetic_size], demo.train.labels[: d.synthetic_size],
                                   "skimage demo photographs (train)")
        held = None
        if heldout_items > 0:
            held = TensorImageDataset(demo.heldout.images[:heldout_items], demo.heldout.labels[:heldout_items],
                                      "skimage demo photographs (held-out)")
        return train, held
    if d.source in ("folder", "imagenet"):
        from pae_fast.data.images import ImageDataset, find_samples

        if d.root is None and d.file_list is None:
            raise ConfigError(f"data.source={d.source!r} needs data.root (an ImageFolder tree) or data.file_list")
        samples = find_samples(d.root, d.file_list, None)
        if heldout_items >= len(samples):
            raise ConfigError(f"tokenizer.heldout_items={heldout_items} leaves no training images "
                              f"({len(samples)} images under {d.root})")
        held = None
        if heldout_items > 0:
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(samples), generator=g).tolist()
            held_idx, keep = sorted(order[:heldout_items]), sorted(order[heldout_items:])
            held_samples = samples.subset(held_idx)
            if d.on_bad_file == "skip":  # the evaluator reads items directly: drop the bad ones once, here
                held_samples = _decodable(held_samples)
            held = ImageDataset(held_samples, d.image_size, hflip=False, on_bad_file="error")
            samples = samples.subset(keep)
        train = ImageDataset(samples, d.image_size, hflip=d.hflip, on_bad_file=d.on_bad_file, seed=cfg.seed)
        train.path = d.root  # named in logs and the run identity
        if d.on_bad_file == "skip":  # bad items come as (None, path, reason): the collate drops and counts them
            train.collate_fn = _SkippingCollate()
        return train, held
    raise ConfigError(f"data.source={d.source!r}: the tokenizer stages read images; expected 'folder', 'imagenet' "
                      "(data.root) or 'skimage' (the bundled demo photographs)")
