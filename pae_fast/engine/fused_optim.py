"""``train.optimizer: fused_adamw_ema``: AdamW, the EMA update and the bf16 compute copy in one kernel per parameter.

:class:`FusedAdamWEMA` is a ``torch.optim.Optimizer`` with AdamW's semantics and state (``step``, ``exp_avg``,
``exp_avg_sq``; checkpoints and exact resume work as with torch's AdamW). Each step runs
:func:`pae_fast.kernels.fused_adamw_ema` on every parameter: one read of p, g, m, v and the EMA, one write of p, m,
v, the EMA and the compute copy (36 B/param with a bf16 copy, against 52 B for torch's fused AdamW + a cast +
``_foreach_copy_`` + ``_foreach_lerp_``; docs/method.md § Cost model). The kernel backend follows the engine's
``train.kernel_backend`` scope (``auto``: Triton on CUDA, torch's fused AdamW kernel + ``_foreach_lerp_`` on CPU).

The engine hands it the EMA (:meth:`set_ema`; the engine then copies only the EMA's buffers) and, with
``train.precision=bf16``, the compute copy (:meth:`set_compute_copy`, via ``ComputeWeights.attach``). A device flag
``found_inf`` (set by the engine for a non-finite step) skips the whole update without a host sync.

Gradient clipping (``clips_in_step``): :meth:`clip_grad_norm_` reads every gradient once where it lies (the compute
copy's bf16 gradient: 2 B/param) for the global norm, and the next :meth:`step` multiplies the gradients by
``min(1, max_norm / (norm + 1e-6))`` inside the kernel, as ``torch.nn.utils.clip_grad_norm_`` would have done in
place: clipping adds 2 B/param to the 36 B, where casting to fp32 masters and clipping there costs 20 B/param.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["FusedAdamWEMA"]


class FusedAdamWEMA(torch.optim.Optimizer):
    """AdamW + EMA + compute copy (see the module docstring).

    Args:
        params: parameters or param groups (fp32 masters, contiguous).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
    """

    writes_compute_copy = True
    reads_compute_grads = True  # a master without .grad takes its compute copy's (bf16) gradient directly
    supports_found_inf = True
    clips_in_step = True  # the engine calls clip_grad_norm_; the clip coefficient is applied in the kernel

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"FusedAdamWEMA: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._ema: dict[int, torch.Tensor] = {}
        self._copy: dict[int, torch.Tensor] = {}
        self.ema_decay = 0.0
        self.found_inf: torch.Tensor | None = None
        self.grad_scale: torch.Tensor | None = None
        self._clip_coef: torch.Tensor | None = None  # set by clip_grad_norm_, consumed by the next step

    @property
    def updates_ema(self) -> bool:
        """True once :meth:`set_ema` gave it an EMA (the engine then leaves the EMA's parameters to it)."""
        return bool(self._ema)

    def set_ema(self, ema: nn.Module, master: nn.Module, decay: float) -> None:
        """Update ``ema``'s parameters (matched to ``master``'s by name) with weight ``1 - decay`` in each step."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1], got {decay}")
        ema_params = dict(ema.named_parameters())
        self._ema = {id(p): ema_params[n] for n, p in master.named_parameters() if n in ema_params}
        self.ema_decay = float(decay)

    def set_compute_copy(self, compute: Any) -> None:
        """Write each master's low-precision copy (``compute.pairs``: ``(master, copy)``) in each step."""
        self._copy = {id(m): c for m, c in compute.pairs}

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._clip_coef = None
        for c in self._copy.values():  # gradients left on the compute copy for this optimizer to read
            c.grad = None

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        if p.grad is not None:
            return p.grad
        c = self._copy.get(id(p))
        return c.grad if c is not None else None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global 2-norm of the gradients the next :meth:`step` reads (fp32, one read of each gradient); with
        ``max_norm > 0`` that step scales them by ``min(1, max_norm / (norm + 1e-6))`` (torch's clip rule) in the
        kernel. Returns the norm before clipping (0 without gradients)."""
        grads = [g for g in (self._grad(p) for group in self.param_groups for p in group["params"]) if g is not None]
        if not grads:
            self._clip_coef = None
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        self._clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) if max_norm > 0 else None
        return total

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        from pae_fast.kernels import fused_adamw_ema

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.grad_scale is not None:
            raise ValueError("FusedAdamWEMA does not unscale gradients (grad_scale); use train.precision=bf16/fp32")
        todo = [(g, p) for g in self.param_groups for p in g["params"] if self._grad(p) is not None]
        if not todo:
            return loss
        if any(hasattr(p, "device_mesh") for _, p in todo):
            raise ValueError("train.optimizer=fused_adamw_ema runs on whole (unsharded) parameters: single-device or "
                             "DDP; with train.distributed=fsdp use train.optimizer=adamw")
        dev = todo[0][1].device
        skip = self.found_inf if self.found_inf is not None else torch.zeros((), device=dev)
        skip = skip.to(device=dev, dtype=torch.float32).reshape(())
        steps = []
        for _, p in todo:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif st["step"].device != p.device or st["step"].dtype != torch.float32:  # loaded from a checkpoint
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            steps.append(st["step"])
        torch._foreach_add_(steps, [1.0 - skip] * len(steps))  # a skipped step does not count (as in torch)
        coef, self._clip_coef = self._clip_coef, None
        if coef is not None:
            coef = coef.to(device=dev, dtype=torch.float32).reshape(())
        for group, p in todo:
            st = self.state[p]
            b1, b2 = group["betas"]
            fused_adamw_ema(
                p, self._grad(p), st["exp_avg"], st["exp_avg_sq"], self._ema.get(id(p)), self._copy.get(id(p)),
                st["step"],
                lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"],
                ema_decay=self.ema_decay, skip=skip, grad_scale=coef,
            )  # fmt: skip
            if p.grad is None:  # read from the compute copy: consumed
                self._copy[id(p)].grad = None
        return loss
