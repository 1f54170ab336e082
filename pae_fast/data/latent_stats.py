"""Latent statistics for diffusion: the one mean/std convention, normalize and denormalize.

Two layouts, one convention:
- ``"channel"`` (PAE, LightningDiT): mean and std per channel, shape ``(C,)``, over all ``(N, H, W)`` positions.
- ``"chw"`` (RAE): mean and std per ``(C, H, W)`` element, over ``N`` (RAE's batch-norm-like statistics).

``std = sqrt(population variance + eps)`` with ``eps = 1e-5`` by default (RAE's value; PAE's per-channel stds are
O(1), where this eps changes nothing measurable). Statistics accumulate in float64 and are stored in float32.
They travel with what uses them: inside a generator checkpoint's metadata (:meth:`LatentStats.to_metadata`) and
as ``stats.safetensors`` beside a latent cache (:meth:`LatentStats.save`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["LatentStats", "StatsMode", "LatentStatsAccumulator", "compute_latent_stats", "DEFAULT_EPS"]

StatsMode = Literal["channel", "chw"]
DEFAULT_EPS = 1e-5
_META_KEYS = ("latent_stats_mode", "latent_mean", "latent_std", "latent_stats_eps", "latent_stats_count")


@dataclass(frozen=True)
class LatentStats:
    """Mean and std of a latent space.

    Attributes:
        mode: ``"channel"`` (mean/std ``(C,)``) or ``"chw"`` (mean/std ``(C, H, W)``).
        mean: float32 tensor of the mode's shape.
        std: float32 tensor of the mode's shape; ``sqrt(var + eps)``, so strictly positive.
        eps: the variance floor used.
        count: how many latents the statistics were computed from.
    """

    mode: StatsMode
    mean: torch.Tensor
    std: torch.Tensor
    eps: float = DEFAULT_EPS
    count: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("channel", "chw"):
            raise ValueError(f"latent statistics mode {self.mode!r}: expected 'channel' or 'chw'")
        want = 1 if self.mode == "channel" else 3
        if self.mean.dim() != want or self.mean.shape != self.std.shape:
            raise ValueError(f"latent statistics ({self.mode}): mean {tuple(self.mean.shape)} and std "
                             f"{tuple(self.std.shape)} must match and have {want} dims")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all() and (self.std > 0).all()):
            raise ValueError("latent statistics hold NaN/Inf or a non-positive std")

    @classmethod
    def from_variance(cls, mode: StatsMode, mean: torch.Tensor, var: torch.Tensor, eps: float = DEFAULT_EPS,
                      count: int = 0) -> LatentStats:
        """The statistics of a population variance: ``std = sqrt(var + eps)`` (the one place this rule lives)."""
        return cls(mode, mean.float(), (var.double() + eps).sqrt().float(), eps, count)

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def _view(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t = t.to(device=z.device, dtype=z.dtype)
        return t.view(1, -1, 1, 1) if self.mode == "channel" else t.unsqueeze(0)

    def check_fits(self, z: torch.Tensor, what: str = "latents") -> None:
        """Raise ValueError naming ``what`` when ``z (B, C, H, W)`` does not have these statistics' shape."""
        want = (self.channels,) if self.mode == "channel" else tuple(self.mean.shape)
        got = (z.shape[1],) if self.mode == "channel" else tuple(z.shape[1:])
        if z.dim() != 4 or got != want:
            raise ValueError(f"{what} of shape {tuple(z.shape)} do not fit {self.mode} statistics of shape "
                             f"{tuple(self.mean.shape)}")

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - mean) / std`` for ``z (B, C, H, W)``."""
        self.check_fits(z)
        return (z - self._view(self.mean, z)) / self._view(self.std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z * std + mean``: the inverse of :meth:`normalize`."""
        self.check_fits(z)
        return z * self._view(self.std, z) + self._view(self.mean, z)

    # -- storage ---------------------------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        """String entries for a safetensors header (a generator checkpoint carries its latent space with it)."""
        return {
            "latent_stats_mode": self.mode,
            "latent_mean": json.dumps(self.mean.tolist()),
            "latent_std": json.dumps(self.std.tolist()),
            "latent_stats_eps": repr(self.eps),
            "latent_stats_count": str(self.count),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "metadata") -> LatentStats | None:
        """The statistics stored by :meth:`to_metadata`, or None when ``meta`` holds none."""
        if "latent_mean" not in meta or "latent_std" not in meta:
            return None
        try:
            mean = torch.tensor(json.loads(meta["latent_mean"]), dtype=torch.float32)
            std = torch.tensor(json.loads(meta["latent_std"]), dtype=torch.float32)
            mode = meta.get("latent_stats_mode", "channel" if mean.dim() == 1 else "chw")
            return cls(mode, mean, std, float(meta.get("latent_stats_eps", DEFAULT_EPS)),
                       int(meta.get("latent_stats_count", 0)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"latent statistics in {where} are malformed: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mean``/``std`` to a safetensors file atomically, the rest in its metadata."""
        from pae_fast.io import save_safetensors

        meta = {k: v for k, v in self.to_metadata().items() if k not in ("latent_mean", "latent_std")}
        save_safetensors({"mean": self.mean, "std": self.std}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentStats:
        """Read a file written by :meth:`save`; a damaged or foreign file raises ValueError naming it."""
        from pae_fast.io import load_safetensors

        tensors, meta = load_safetensors(path)
        if "mean" not in tensors or "std" not in tensors:
            raise ValueError(f"{path} holds no latent statistics (expected tensors 'mean' and 'std', found "
                             f"{sorted(tensors)})")
        mean, std = tensors["mean"].float(), tensors["std"].float()
        mode = meta.get("latent_stats_mode", "channel" if mean.dim() == 1 else "chw")
        try:
            return cls(mode, mean, std, float(meta.get("latent_stats_eps", DEFAULT_EPS)),
                       int(meta.get("latent_stats_count", 0)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


class LatentStatsAccumulator:
    """Streaming float64 sums of latents, so statistics need no second copy of the data (and merge across ranks).

    Args:
        mode: ``"channel"`` or ``"chw"``.
        eps: variance floor of the resulting :class:`LatentStats`.
    """

    def __init__(self, mode: StatsMode = "channel", eps: float = DEFAULT_EPS) -> None:
        if mode not in ("channel", "chw"):
            raise ValueError(f"latent statistics mode {mode!r}: expected 'channel' or 'chw'")
        self.mode, self.eps = mode, eps
        self.count = 0  # latents seen
        self.hw = 0  # H*W of the latents (channel mode sums over it)
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, z: torch.Tensor, where: str = "latents") -> None:
        """Add ``z (B, C, H, W)``; NaN/Inf is refused with an error naming ``where``."""
        if z.dim() != 4:
            raise ValueError(f"{where}: expected (B, C, H, W) latents, got shape {tuple(z.shape)}")
        x = z.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"{where}: latents hold NaN/Inf (items {bad[:8]} of this batch)")
        dims = (0, 2, 3) if self.mode == "channel" else (0,)
        s1, s2 = x.sum(dims), x.pow(2).sum(dims)
        if self.s1 is None:
            self.s1, self.s2, self.hw = s1, s2, z.shape[2] * z.shape[3]
        else:
            if s1.shape != self.s1.shape or self.hw != z.shape[2] * z.shape[3]:
                raise ValueError(f"{where}: latents of shape {tuple(z.shape[1:])} differ from earlier ones")
            self.s1 += s1
            self.s2 += s2
        self.count += z.shape[0]

    def merge(self, other: LatentStatsAccumulator) -> None:
        """Add another accumulator's sums (e.g. one per rank)."""
        if other.s1 is None:
            return
        if self.s1 is None:
            self.s1, self.s2, self.hw = other.s1.clone(), other.s2.clone(), other.hw
        else:
            if other.s1.shape != self.s1.shape or other.hw != self.hw:
                raise ValueError("cannot merge statistics of latents of different shapes")
            self.s1 += other.s1
            self.s2 += other.s2
        self.count += other.count

    def result(self) -> LatentStats:
        if self.s1 is None or self.count == 0:
            raise ValueError("no latents were seen: statistics need at least one latent")
        n = self.count * (self.hw if self.mode == "channel" else 1)
        mean = self.s1 / n
        var = (self.s2 / n - mean.pow(2)).clamp_min(0.0)
        return LatentStats.from_variance(self.mode, mean, var, self.eps, self.count)


def compute_latent_stats(
    latents: torch.Tensor | Iterable[torch.Tensor],
    mode: StatsMode = "channel",
    eps: float = DEFAULT_EPS,
    max_items: int | None = None,
    where: str = "latents",
) -> LatentStats:
    """Statistics of a latent tensor ``(N, C, H, W)`` or of an iterable of batches.

    Args:
        latents: the latents, or batches of them (streamed; only sums are kept).
        mode: ``"channel"`` or ``"chw"``.
        eps: variance floor.
        max_items: use at most this many latents (PAE/LightningDiT: 10k).
        where: names the data in errors (a cache folder, a shard).
    """
    acc = LatentStatsAccumulator(mode, eps)
    batches = [latents] if isinstance(latents, torch.Tensor) else latents
    for z in batches:
        if max_items is not None:
            z = z[: max(0, max_items - acc.count)]
            if z.shape[0] == 0:
                break
        acc.update(z, where)
    if acc.count == 0:
        raise ValueError(f"{where}: no latents to compute statistics from")
    return acc.result()
