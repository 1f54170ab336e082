"""Precision policies of the training engine (``train.precision``).

===================  ===============================================================================================
``fp32``             fp32 weights, no autocast.
``bf16``             bf16 *compute weights*: forward and backward run on a bf16 copy of the model (under bf16
                     autocast, so fp32 inputs and the ops autocast keeps in fp32 still work); the fp32 *master*
                     weights, the optimizer state and the EMA stay in fp32. After backward the bf16 gradients are
                     moved into the masters' ``.grad`` (fp32); the optimizer step updates the masters and writes the
                     bf16 copy (a step post-hook of the optimizer, or the fused AdamW + EMA kernel itself).
``bf16-autocast``    fp32 weights under bf16 autocast: every GEMM re-casts its fp32 weight each forward and casts
                     the weight gradient back (the mode of the authors' code; kept for comparison).
``fp16``             fp32 weights under fp16 autocast with a gradient scaler.
===================  ===============================================================================================

Why ``bf16`` is faster (docs/method.md § Cost model): under ``bf16-autocast`` a LightningDiT-XL/1 step casts
every linear weight to bf16 (and each weight gradient back to fp32) — about 8 GB of extra traffic per step at batch
32 — while the compute copy is written once per step by the optimizer (2 B/param).

The master module is the one the engine checkpoints, averages into the EMA and hands to tasks, so checkpoints,
exact resume and sampling are the same in every mode. The compute copy exists only while training.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

__all__ = ["PRECISIONS", "Precision", "autocast_dtype", "compute_dtype", "ComputeWeights", "compute_weights"]

Precision = Literal["fp32", "bf16", "bf16-autocast", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "bf16-autocast", "fp16")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``train.precision`` value (None: no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    return {"bf16": torch.bfloat16, "bf16-autocast": torch.bfloat16, "fp16": torch.float16}.get(precision)


def compute_dtype(precision: str) -> torch.dtype | None:
    """dtype of the compute weights ``train.precision`` asks for (bf16 for ``bf16``), None where the weights stay
    fp32. Frozen helpers a task keeps outside its trained module (the tokenizer's LPIPS trunk) follow it too: one
    copy in this dtype, converted once (docs/method.md § LPIPS fast path)."""
    autocast_dtype(precision)  # validates the name
    return torch.bfloat16 if precision == "bf16" else None


class ComputeWeights:
    """A low-precision compute copy of a fp32 master module, and the two transfers between them.

    Args:
        master: the fp32 module the optimizer, the EMA and the checkpoints see.
        dtype: the compute dtype (bf16).

    Attributes:
        module: the compute copy (same structure; floating parameters in ``dtype``, buffers as in ``master`` so
            e.g. RoPE tables keep their precision). Forward and backward run on it (wrap it for DDP).
    """

    def __init__(self, master: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.master, self.dtype = master, dtype
        self.direct_grads = False  # the attached optimizer reads the copy's gradients itself (fused_adamw_ema)
        self.module = copy.deepcopy(master)
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        masters = dict(master.named_parameters())
        for name, p in self.module.named_parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
            if masters[name].requires_grad:
                self._pairs.append((masters[name], p))

    @property
    def pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(master, compute)`` for every trainable parameter."""
        return self._pairs

    @torch.no_grad()
    def grads_to_master(self, needed: bool = True) -> None:
        """Move the compute copy's gradients into the masters' ``.grad`` (fp32; added to any already there), and
        drop them from the compute copy. Call once after the last backward of a step.

        Args:
            needed: False when nothing reads the masters' gradients before the optimizer (no clipping, no norm
                logged this step): an optimizer that reads the bf16 gradients itself (``direct_grads``) then gets
                them where they are, saving a 6 B/param cast.
        """
        if self.direct_grads and not needed:
            return
        for m, c in self._pairs:
            if c.grad is None:
                continue
            if m.grad is None:
                m.grad = c.grad.to(m.dtype)
            else:
                m.grad.add_(c.grad)
            c.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Write the compute copy from the masters (after every optimizer step): one read of each fp32 master, one
        bf16 write."""
        if self._pairs:
            torch._foreach_copy_([c for _, c in self._pairs], [m for m, _ in self._pairs])

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Refresh the compute copy at the end of every ``optimizer.step()`` (an optimizer that writes the copy
        itself, like the fused AdamW + EMA kernel, exposes ``writes_compute_copy = True`` and is left alone)."""
        if getattr(optimizer, "writes_compute_copy", False):
            optimizer.set_compute_copy(self)  # type: ignore[attr-defined]
            self.direct_grads = bool(getattr(optimizer, "reads_compute_grads", False))
            return
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.refresh())


def compute_weights(master: nn.Module, precision: str, distributed: str = "ddp", world_size: int = 1
                    ) -> ComputeWeights | None:
    """The compute copy ``train.precision`` asks for (``bf16``), else None (the master module is trained as is).

    The one exception (docs/method.md § Precision policies): a module with a ``use_compute_dtype(dtype)`` method sets
    its own mixed precision. Under ``bf16`` it is called once with bf16 and no compute copy is made (None): the module
    is trained as is, its trainable parameters fp32, and it casts what it holds frozen to bf16 in place (one copy, no
    fp32 master, no per-step cast). The tokenizer's discriminator does so: frozen DINO backbone in bf16, trainable
    spectral-norm heads (power iterations, BatchNorm statistics) in fp32.

    Raises:
        ValueError: ``bf16`` with FSDP on several ranks (FSDP shards the module it trains; use ``bf16-autocast``
            there, or FSDP2's own mixed-precision policy).
    """
    dtype = compute_dtype(precision)  # validates the name
    if dtype is None:
        return None
    if distributed == "fsdp" and world_size > 1:
        raise ValueError(
            "train.precision=bf16 (bf16 compute weights with fp32 masters) runs single-device or with "
            "train.distributed=ddp; with fsdp on several ranks use train.precision=bf16-autocast"
        )
    if callable(getattr(master, "use_compute_dtype", None)):
        master.use_compute_dtype(dtype)
        return None
    return ComputeWeights(master, dtype)
