"""What the shared training engine trains: a :class:`TrainTask`.

Every stage (prior refinement, tokenizer, generator) describes itself as a task and calls
``pae_fast.engine.train(task, cfg.train, out_dir, seed=cfg.seed)``; there is no second training loop anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TrainTask", "LossFn", "Shared"]

# loss_fn(model, batch, step) -> (scalar loss, {term name: scalar tensor}); ``model`` may be wrapped (DDP, compile),
# ``batch`` is what the data yields, already moved to the training device; ``step`` is the 0-based index of the
# optimizer step being computed (the same for every micro-batch of a step). Terms are logged as running means.
LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Shared:
    """A holder of frozen helpers (VFM, losses, projectors) a trained module references but that are not part of its
    state dict: ``copy.deepcopy`` (the engine's EMA copy, the bf16 compute copy) shares it instead of copying it."""

    def __init__(self, **items: Any) -> None:
        self.__dict__.update(items)

    def __deepcopy__(self, memo: dict) -> Shared:
        return self


@dataclass
class TrainTask:
    """A training job for :func:`pae_fast.engine.train`.

    Attributes:
        name: short name used in logs ("generator", "tokenizer", "refine").
        model: the module whose parameters are optimised; EMA tracks it; ``model.safetensors`` stores it.
        loss_fn: see :data:`LossFn`.
        dataset: a map-style ``torch.utils.data.Dataset``; the engine batches it with a deterministic per-epoch
            permutation from the seed (sharded over ranks, ``drop_last``), so the data position is part of the
            checkpoint and resume is exact.
        collate_fn: optional collate function for the DataLoader.
        metadata: strings stored in the safetensors metadata of every checkpoint (e.g. ``{"config": yaml}``).
        extra_optimized: further modules with their own optimizer and loss (e.g. a GAN discriminator):
            ``{name: (module, loss_fn)}``; each is stepped after the main model every step.
        on_checkpoint: optional ``fn(step, model, ema_model, out_dir)`` called on rank 0 after each checkpoint
            (sample grids, reconstructions).
        checkpoint_steps: further steps (besides every ``train.ckpt_every`` and the last) at which a checkpoint is
            written and ``on_checkpoint`` called, e.g. the log-spaced evaluation steps of a convergence run
            (docs/method.md § Convergence).
        flops_per_sample: training FLOPs per sample (forward + backward) for MFU, or ``fn(step) -> FLOPs`` when
            the step's work changes during training (a GAN that starts later); None: not reported.
        num_workers: DataLoader worker processes (0 loads in the training process).
        counters: optional ``fn() -> {name: count}`` of running totals kept by the task (e.g. ``data/bad_files``,
            images skipped as undecodable); summed over ranks and written into every ``stats.jsonl`` record.
    """

    name: str
    model: nn.Module
    loss_fn: LossFn
    dataset: torch.utils.data.Dataset
    collate_fn: Callable[[list], Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    extra_optimized: dict[str, tuple[nn.Module, LossFn]] = field(default_factory=dict)
    on_checkpoint: Callable[[int, nn.Module, nn.Module, str], None] | None = None
    checkpoint_steps: frozenset[int] = frozenset()
    flops_per_sample: float | Callable[[int], float] | None = None
    num_workers: int = 0
    counters: Callable[[], dict[str, int]] | None = None
