"""Latent cache: tokenizer latents stored once, read by generator training, sampling and the diffusability suite.

A cache is a folder::

    index.json                  num_items, channels, size, num_classes, shards [{file, count}], metadata
    shard-00000.safetensors     latents (n, C, H, W), latents_flip (n, C, H, W), labels (n,) int64
    stats.safetensors           per-channel mean (C,), std (C,) over up to 10k latents (LatentStats.save)

Every file is written atomically; ``index.json`` is written last, so a folder without it is an incomplete cache.
Random horizontal flips (docs/method.md § Latent cache: LightningDiT stores ``latents`` and ``latents_flip``) are
index-based: with ``hflip`` the dataset has 2N items and index ``i >= N`` reads ``latents_flip[i - N]``, so the
engine's deterministic permutation decides the flips and resume stays exact.

Trust: the writer refuses NaN/Inf latents and labels outside ``[0, num_classes)`` (naming the item) and records each
shard's byte size; the reader refuses shard names that leave the cache folder, shards whose size differs from the
index (truncated copies), and, when it loads a shard, NaN/Inf latents and out-of-range labels, always as a
:class:`~pae_fast.errors.DataError` naming the shard and the item.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pae_fast.data.latent_stats import LatentStats, compute_latent_stats
from pae_fast.errors import DataError
from pae_fast.io import atomic_write_text, load_safetensors, save_safetensors

__all__ = ["write_latent_cache", "LatentCache", "check_latents_finite", "INDEX_FILE", "STATS_FILE", "STATS_MAX_ITEMS"]

INDEX_FILE = "index.json"
STATS_FILE = "stats.safetensors"
FORMAT_VERSION = 1
STATS_MAX_ITEMS = 10_000  # statistics over the first 10k latents (docs/method.md § Latent statistics)


def write_latent_cache(
    out_dir: str | os.PathLike,
    latents: torch.Tensor,
    labels: torch.Tensor,
    latents_flip: torch.Tensor | None = None,
    shard_size: int = 4096,
    metadata: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> Path:
    """Write a latent cache (shards, stats, index) atomically.

    Args:
        out_dir: the cache folder (created).
        latents: ``(N, C, H, W)``.
        labels: ``(N,)`` integer class labels.
        latents_flip: ``(N, C, H, W)`` latents of the horizontally flipped images; when None, the latents are
            flipped along W (exact for latents whose tokens do not mix spatially, an approximation otherwise).
        shard_size: items per shard file.
        metadata: JSON-serialisable information (tokenizer name, source data, ...).
        num_classes: defaults to ``max(labels) + 1``.
    Returns:
        The cache folder.
    """
    out = Path(out_dir)
    if latents.dim() != 4:
        raise ValueError(f"latents must be (N, C, H, W), got shape {tuple(latents.shape)}")
    n = latents.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match latents, got {tuple(labels.shape)}")
    if latents_flip is None:
        latents_flip = latents.flip(-1)
    if latents_flip.shape != latents.shape:
        raise ValueError(f"latents_flip shape {tuple(latents_flip.shape)} != latents shape {tuple(latents.shape)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    check_latents_finite(latents, "latents", str(out))
    check_latents_finite(latents_flip, "latents_flip", str(out))
    bad_label = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bool(bad_label.any()):
        i = int(bad_label.nonzero()[0])
        raise DataError(f"latent cache {out}: label {int(labels[i])} of item {i} is outside "
                        f"[0, {num_classes if num_classes is not None else 'num_classes'})")
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_FILE
    if index_path.exists():
        index_path.unlink()  # the folder is incomplete until the new index is written
    labels = labels.to(torch.int64)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        name = f"shard-{k:05d}.safetensors"
        sl = slice(start, min(n, start + shard_size))
        save_safetensors(
            {"latents": latents[sl], "latents_flip": latents_flip[sl], "labels": labels[sl]}, out / name
        )
        shards.append({"file": name, "count": sl.stop - sl.start, "bytes": (out / name).stat().st_size})
    compute_latent_stats(latents, "channel", max_items=STATS_MAX_ITEMS, where=str(out)).save(out / STATS_FILE)
    index = {
        "format_version": FORMAT_VERSION,
        "num_items": n,
        "channels": latents.shape[1],
        "size": [latents.shape[2], latents.shape[3]],
        "num_classes": int(num_classes if num_classes is not None else (int(labels.max()) + 1 if n else 0)),
        "dtype": str(latents.dtype).replace("torch.", ""),
        "shards": shards,
        "metadata": metadata or {},
    }
    atomic_write_text(index_path, json.dumps(index, indent=2))
    return out


def check_latents_finite(z: torch.Tensor, key: str, where: str, offset: int = 0) -> None:
    """Refuse NaN/Inf in ``z (N, ...)``, naming ``where``, the tensor and the first bad item (``offset`` + row)."""
    if not z.is_floating_point() or z.numel() == 0:
        return
    ok = torch.isfinite(z.reshape(z.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        rows = (~ok).nonzero().flatten().tolist()
        raise DataError(f"{where}: {key} of item {offset + rows[0]} hold NaN/Inf ({len(rows)} bad item(s) in all); "
                        "a latent cache must be finite")


def _shard_path(root: Path, name: Any, index_path: Path) -> Path:
    """The shard file ``name`` of the cache ``root``; refuses names that are absolute or leave the folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise DataError(f"{index_path}: shard file {name!r} must be a relative file name inside {root}")
    p = (root / name).resolve()
    if not p.is_relative_to(root.resolve()):
        raise DataError(f"{index_path}: shard file {name!r} points outside the cache folder {root}")
    return p


class LatentCache(Dataset):
    """Map-style dataset over a latent cache.

    Args:
        path: the cache folder.
        normalize: standardise each item with the cache's per-channel mean/std.
        hflip: expose ``latents_flip`` as items ``N..2N-1``.

    Items are ``(latent (C, H, W) float32, label int64 0-dim tensor)``.
    """

    def __init__(self, path: str | os.PathLike, normalize: bool = True, hflip: bool = True) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a latent cache: {INDEX_FILE} is missing (incomplete write, or a wrong folder)"
            )
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{index_path} is not valid JSON: {e}") from e
        for key in ("num_items", "channels", "size", "shards", "num_classes"):
            if key not in self.index:
                raise DataError(f"{index_path} lacks the key {key!r}")
        self.normalize = normalize
        self.hflip = hflip
        self.num_items = int(self.index["num_items"])
        self.channels = int(self.index["channels"])
        self.size = tuple(int(s) for s in self.index["size"])
        self.num_classes = int(self.index["num_classes"])
        self.metadata = self.index.get("metadata", {})
        try:
            self.stats = LatentStats.load(self.path / STATS_FILE)
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"latent cache {self.path}: {e}") from e
        try:  # per-channel (PAE) or per-(C, H, W) (RAE) statistics, of this cache's latent shape
            self.stats.check_fits(torch.zeros(1, self.channels, *self.size), what=f"latents of {self.path}")
        except ValueError as e:
            raise DataError(f"{self.path / STATS_FILE}: {e}") from e
        self._starts = []
        self._files: list[Path] = []
        total = 0
        for k, s in enumerate(self.index["shards"]):
            if not isinstance(s, dict) or "file" not in s or "count" not in s:
                raise DataError(f"{index_path}: shard entry {k} must be {{'file': ..., 'count': ...}}, got {s!r}")
            f = _shard_path(self.path, s["file"], index_path)
            if not f.is_file():
                raise DataError(f"latent cache {self.path}: shard file {f} is missing")
            if "bytes" in s and f.stat().st_size != int(s["bytes"]):
                raise DataError(f"latent cache {self.path}: shard file {f} is damaged or truncated: "
                                f"{f.stat().st_size} bytes, {INDEX_FILE} records {s['bytes']}")
            self._files.append(f)
            self._starts.append(total)
            total += int(s["count"])
        if total != self.num_items:
            raise DataError(f"{index_path}: shards hold {total} items but num_items is {self.num_items}")
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.num_items * (2 if self.hflip else 1)

    def _read_shard(self, k: int) -> dict[str, torch.Tensor]:
        """Load shard ``k`` and check it: tensors present, ``count`` items, finite latents, labels in range."""
        f = self._files[k]
        try:
            tensors, _ = load_safetensors(f)
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"latent cache {self.path}: {e}") from e
        for key in ("latents", "latents_flip", "labels"):
            if key not in tensors:
                raise DataError(f"{f} lacks the tensor {key!r}")
        count = int(self.index["shards"][k]["count"])
        if any(int(tensors[key].shape[0]) != count for key in ("latents", "latents_flip", "labels")):
            raise DataError(f"{f} holds {int(tensors['labels'].shape[0])} items, {INDEX_FILE} records {count}")
        start = self._starts[k]
        for key in ("latents", "latents_flip"):
            check_latents_finite(tensors[key], key, f"latent cache shard {f}", start)
        labels = tensors["labels"]
        bad = ((labels < 0) | (labels >= self.num_classes)).nonzero().flatten().tolist()
        if bad:
            raise DataError(f"latent cache shard {f}: label {int(labels[bad[0]])} of item {start + bad[0]} is outside "
                            f"[0, {self.num_classes}) (num_classes in {INDEX_FILE})")
        return tensors

    def _shard(self, k: int) -> dict[str, torch.Tensor]:
        if k not in self._cache:
            self._cache = {k: self._read_shard(k)}  # keep one shard resident (shards are read mostly in order)
        return self._cache[k]

    def _locate(self, i: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a latent cache of {len(self)} items")
        flip = idx >= self.num_items
        k, j = self._locate(idx - self.num_items if flip else idx)
        shard = self._shard(k)
        z = shard["latents_flip" if flip else "latents"][j].float()
        if self.normalize:
            z = self.stats.normalize(z[None])[0]
        return z, shard["labels"][j]

    def load_all(self, flip: bool = False, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """All latents ``(N, C, H, W)`` float32 and labels ``(N,)``."""
        zs, ys = [], []
        for k in range(len(self._files)):
            tensors = self._read_shard(k)
            zs.append(tensors["latents_flip" if flip else "latents"].float())
            ys.append(tensors["labels"].long())
        z = torch.cat(zs) if zs else torch.empty(0, self.channels, *self.size)
        if normalize:
            z = self.stats.normalize(z)
        return z, torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Undo the standardisation: ``(B, C, H, W)`` -> raw latents."""
        return self.stats.denormalize(z)
