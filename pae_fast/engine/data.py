"""Deterministic, resumable batching of a map-style dataset.

Each epoch is a permutation of the dataset drawn from ``(seed, epoch)`` alone, identical on every rank. One optimizer
step consumes the next ``global_batch_size`` indices of it (``drop_last``: an epoch ends when fewer remain); those
are split into ``grad_accum x world_size`` micro-batches, micro-batch ``k`` of rank ``r`` being slice
``k * world_size + r``. The data position is ``(epoch, offset)``: the epoch and the number of indices of its
permutation already consumed. It goes into the checkpoint, so a resumed run sees exactly the batches an
uninterrupted run would have seen, whatever the world size.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DataPosition", "epoch_permutation", "StepBatchSampler", "make_loader", "to_device"]


@dataclass
class DataPosition:
    """Where the data stream stands: ``offset`` indices of epoch ``epoch``'s permutation are consumed."""

    epoch: int = 0
    offset: int = 0

    def normalized(self, num_samples: int, global_batch_size: int) -> DataPosition:
        """The same position, moved to the start of the next epoch when a full batch no longer fits."""
        if self.offset + global_batch_size > num_samples:
            return DataPosition(self.epoch + 1, 0)
        return DataPosition(self.epoch, self.offset)

    def advance(self, num_samples: int, global_batch_size: int) -> DataPosition:
        """The position after one optimizer step."""
        pos = self.normalized(num_samples, global_batch_size)
        return DataPosition(pos.epoch, pos.offset + global_batch_size).normalized(num_samples, global_batch_size)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(num_samples)`` for ``epoch`` (depends only on ``seed`` and ``epoch``)."""
    mixed = int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(mixed))


class StepBatchSampler:
    """Infinite batch sampler: this rank's micro-batches (index lists), step after step, from ``start``.

    Args:
        num_samples: dataset length.
        global_batch_size: samples per optimizer step over all ranks and accumulation steps.
        world_size, rank: the process group.
        grad_accum: micro-batches per optimizer step on each rank.
        seed: permutation seed.
        start: the data position to start from.
    """

    def __init__(self, num_samples: int, global_batch_size: int, world_size: int, rank: int, grad_accum: int,
                 seed: int, start: DataPosition | None = None):
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than train.global_batch_size={global_batch_size}: "
                "with drop_last no batch could be formed"
            )
        if global_batch_size % (world_size * grad_accum):
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not divisible by world_size={world_size} x "
                f"train.grad_accum={grad_accum}"
            )
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.micro = global_batch_size // (world_size * grad_accum)
        self.start = (start or DataPosition()).normalized(num_samples, global_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        while True:
            perm = epoch_permutation(self.num_samples, self.seed, pos.epoch)
            while pos.offset + self.global_batch_size <= self.num_samples:
                chunk = perm[pos.offset : pos.offset + self.global_batch_size]
                for k in range(self.grad_accum):
                    j = (k * self.world_size + self.rank) * self.micro
                    yield chunk[j : j + self.micro].tolist()
                pos = DataPosition(pos.epoch, pos.offset + self.global_batch_size)
            pos = DataPosition(pos.epoch + 1, 0)


def _worker_init(worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM: a preemption signal sent to the whole process group (Ctrl-C, a scheduler) must
    let the training process finish its step and checkpoint instead of killing the workers under it. They still
    exit with the training process (the DataLoader's shutdown and its parent watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: torch.utils.data.Dataset, sampler: StepBatchSampler, *, num_workers: int = 0,
                collate_fn: Callable[[list], Any] | None = None, pin_memory: bool = False,
                seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over ``sampler``. Its own generator seeds the workers, so creating it never consumes the global
    RNG (which belongs to the training step and is checkpointed)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=gen,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested tuple/list/dict) batch to ``device`` with ``non_blocking=True``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
