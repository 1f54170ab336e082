"""What the training loop needs around it: its result and errors, config checks, precision and kernel scopes,
loss-output checks and the FLOP part of the log line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pae_fast.errors import NonFiniteError

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "micro_batch_size",
    "check_train_config",
    "precision_flags",
    "kernel_scope",
    "check_loss_output",
    "flops_text",
    "is_log_step",
]


class NonFiniteLossError(NonFiniteError):
    """``nonfinite: stop`` and a loss (or gradient norm) was NaN/inf, or ``nonfinite: skip`` and
    ``train.max_skipped_steps`` consecutive steps were skipped; the message names the steps (exit code 5)."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        step: optimizer steps completed.
        model: the trained module (unwrapped: no DDP/compile wrapper; an unsharded copy under FSDP).
        ema: the EMA copy of ``model``.
        out_dir: the run folder.
        stats_path: ``<out_dir>/stats.jsonl``.
        checkpoint_dir: the newest checkpoint (None when none was written or resumed).
        interrupted: True when SIGTERM/SIGINT stopped the run early (after writing a checkpoint).
        skipped_steps: optimizer steps skipped for a non-finite loss or gradient (``nonfinite: skip``).
    """

    step: int
    model: nn.Module
    ema: nn.Module
    out_dir: Path
    stats_path: Path
    checkpoint_dir: Path | None
    interrupted: bool
    skipped_steps: int = 0


def is_log_step(step: int, cfg) -> bool:
    """Whether the 0-based optimizer step ``step`` ends a logging interval (``train.log_every``, and the last step):
    the engine writes a ``stats.jsonl`` record after it. Tasks use it to compute diagnostics only for logged steps."""
    return (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps


def micro_batch_size(global_batch_size: int, world_size: int, grad_accum: int) -> int:
    """Samples per micro-batch per rank; raises naming the values when they do not divide."""
    denom = world_size * grad_accum
    if global_batch_size <= 0 or grad_accum <= 0 or global_batch_size % denom:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a positive multiple of world_size={world_size} "
            f"x train.grad_accum={grad_accum} = {denom}"
        )
    return global_batch_size // denom


def check_train_config(cfg) -> None:
    """Reject values the loop cannot run with, naming the key."""
    for key in ("steps", "log_every", "ckpt_every", "grad_accum", "max_skipped_steps"):
        if int(getattr(cfg, key)) <= 0:
            raise ValueError(f"train.{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.keep_last < 0:
        raise ValueError(f"train.keep_last must be >= 0 (0 keeps all), got {cfg.keep_last}")
    if cfg.grad_clip < 0:
        raise ValueError(f"train.grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1], got {cfg.ema_decay}")
    if cfg.lr < 0 or cfg.min_lr < 0:
        raise ValueError(f"train.lr and train.min_lr must be >= 0, got {cfg.lr} and {cfg.min_lr}")


@contextlib.contextmanager
def precision_flags(tf32: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls/convs (set here, at train time; restored afterwards)."""
    prev_mm, prev_cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev_mm)
        torch.backends.cudnn.allow_tf32 = prev_cudnn


def kernel_scope(backend: str) -> contextlib.AbstractContextManager:
    """``pae_fast.kernels.use_backend(backend)``. With the default ``auto`` and no kernel imported yet (a model
    that uses the fused ops imports them when it is built), the import (triton: seconds) is skipped."""
    if backend == "auto" and "pae_fast.kernels" not in sys.modules:
        return contextlib.nullcontext()
    from pae_fast.kernels import use_backend

    return use_backend(backend)


def check_loss_output(name: str, loss: Any, terms: Any) -> None:
    """A task's ``loss_fn`` must return ``(scalar tensor, {name: scalar tensor})``; else TypeError naming it."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not isinstance(terms, dict):
        raise TypeError(
            f"the loss_fn of {name!r} must return (scalar loss tensor, {{term name: scalar tensor}}), got "
            f"({type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}, "
            f"{type(terms).__name__})"
        )
    for k, v in terms.items():
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            raise TypeError(f"loss term {k!r} of {name!r} must be a scalar tensor, got {v!r}")


def flops_text(rec: dict[str, Any]) -> str:
    """`` 12.3 TFLOP/s mfu=40.1%`` for the log line ('' when the task counts no FLOPs)."""
    if rec.get("tflops") is None:
        return ""
    mfu = f" mfu={rec['mfu']:.1%}" if rec.get("mfu") is not None else ""
    return f" {rec['tflops']:.3g} TFLOP/s{mfu}"
