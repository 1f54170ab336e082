"""Optimizer, learning-rate schedule and EMA for the training engine.

- AdamW from torch: ``fused=True`` on CUDA (one kernel for the whole update, and it can skip a step on a device
  flag without a host sync), ``foreach=True`` on CPU. NVIDIA apex's ``FusedAdam`` only when asked for and installed.
- Schedules are a multiplier of ``lr`` (so ``LambdaLR`` keeps the state): optional linear warm-up from 0, then
  ``constant`` / ``warmup`` (constant after the warm-up), ``linear`` (constant until ``decay_start``, then linear to
  ``min_lr`` at ``steps``; the DiT^DH recipe) or ``cosine`` (``lr`` to ``min_lr`` between the warm-up and ``steps``).
- EMA is a separate module; its update is ``ema <- ema + (1 - decay) (p - ema)`` with foreach ops, optionally masked
  by a device flag so a skipped (non-finite) step leaves it untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pae_fast.engine.parallel import local_tensors

__all__ = [
    "lr_factor",
    "build_optimizer",
    "build_scheduler",
    "supports_found_inf",
    "master_grads_read",
    "clip_gradients",
    "make_ema",
    "ema_update",
    "param_groups",
    "load_optimizer_state_dict",
]


def lr_factor(step: int, *, schedule: str, steps: int, lr: float, min_lr: float, warmup_steps: int = 0,
              decay_start: int = 0) -> float:
    """Learning-rate multiplier (of ``lr``) used for optimizer step ``step`` (0-based).

    Args:
        step: number of optimizer steps already taken.
        schedule: ``constant | warmup | linear | cosine``.
        steps: total optimizer steps of the run.
        lr, min_lr: peak and final learning rates (the decays end at ``min_lr``).
        warmup_steps: linear warm-up length; the first step uses ``lr / warmup_steps``.
        decay_start: ``linear``: the step where the linear decay starts (clamped to the warm-up end).

    Returns:
        The factor ``f`` with ``lr_used = f * lr``.
    """
    if schedule not in ("constant", "warmup", "linear", "cosine"):
        raise ValueError(f"train.schedule={schedule!r}: expected one of constant, warmup, linear, cosine")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule in ("constant", "warmup") or lr <= 0:
        return 1.0
    floor = min_lr / lr
    if schedule == "linear":
        start = max(decay_start, warmup_steps)
        if step < start:
            return 1.0
        span = max(steps - start, 1)
        frac = min((step - start) / span, 1.0)
        return 1.0 + (floor - 1.0) * frac
    # cosine from 1 to floor over [warmup_steps, steps]
    span = max(steps - warmup_steps, 1)
    frac = min((step - warmup_steps) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


class _ScheduleFn:
    """Picklable ``LambdaLR`` multiplier (its fields land in the scheduler's state dict as primitives)."""

    def __init__(self, schedule: str, steps: int, lr: float, min_lr: float, warmup_steps: int, decay_start: int):
        self.schedule, self.steps, self.lr, self.min_lr = schedule, steps, lr, min_lr
        self.warmup_steps, self.decay_start = warmup_steps, decay_start

    def __call__(self, step: int) -> float:
        return lr_factor(step, schedule=self.schedule, steps=self.steps, lr=self.lr, min_lr=self.min_lr,
                         warmup_steps=self.warmup_steps, decay_start=self.decay_start)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :func:`lr_factor` with the fields of ``cfg`` (a ``TrainConfig``)."""
    fn = _ScheduleFn(cfg.schedule, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices (decayed) and vectors/scalars (biases, norms: not decayed)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, cfg, device: torch.device, name: str | None = None) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over :func:`param_groups` of ``module``.

    ``adamw``: torch's AdamW (fused on CUDA, foreach on CPU); ``apex_fused_adam``: NVIDIA apex's ``FusedAdam``;
    ``fused_adamw_ema``: :class:`~pae_fast.engine.fused_optim.FusedAdamWEMA`; ``auto``: resolved for this process
    (:func:`pae_fast.engine.optim_choice.resolve_optimizer`; the engine resolves once per run and passes ``name``).

    Args:
        module: the (master) module whose trainable parameters are optimised.
        cfg: a ``TrainConfig``.
        device: the training device.
        name: the resolved optimizer name, overriding ``cfg.optimizer``.

    Raises:
        ImportError: ``apex_fused_adam`` was asked for but NVIDIA apex is not installed.
    """
    name = name or cfg.optimizer
    if name == "auto":
        from pae_fast.engine.distributed import get_world_size
        from pae_fast.engine.optim_choice import resolve_optimizer

        name = resolve_optimizer(cfg, device, get_world_size()).name
    groups = param_groups(module, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=1e-8)
    if name == "adamw":
        if device.type == "cuda":
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if name == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
        except ImportError as e:
            raise ImportError(
                "train.optimizer='apex_fused_adam' needs NVIDIA apex built with its CUDA extensions "
                "(https://github.com/NVIDIA/apex; the PyPI package named 'apex' is unrelated) and it is not installed; "
                "use train.optimizer=adamw (torch's fused AdamW)"
            ) from e
        if device.type != "cuda":
            raise ValueError("train.optimizer='apex_fused_adam' runs on CUDA only; use train.optimizer=adamw on CPU")
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    if name == "fused_adamw_ema":  # one Triton kernel: AdamW + EMA + bf16 compute copy (engine/fused_optim)
        from pae_fast.engine.fused_optim import FusedAdamWEMA

        return FusedAdamWEMA(groups, **kwargs)
    raise ValueError(f"train.optimizer={name!r}: expected auto, adamw, apex_fused_adam or fused_adamw_ema")


# Param-group keys that are the optimizer's hyper-parameters (restored from a checkpoint); every other key describes
# the implementation (torch's fused / foreach / decoupled_weight_decay ...) and stays as the current optimizer has it.
_HYPER_KEYS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, load: Callable[[], None]) -> None:
    """Run ``load()`` (which loads a state dict into ``optimizer``), keeping the current optimizer's implementation.

    A checkpoint written by another AdamW implementation (``adamw`` <-> ``fused_adamw_ema``) has the same per-parameter
    state (``step``, ``exp_avg``, ``exp_avg_sq``) but other param-group keys, and torch's ``load_state_dict`` takes the
    saved groups as they are: a ``FusedAdamWEMA`` group loaded into torch's fused AdamW on CUDA would come back with
    ``fused=None`` (the foreach path, which refuses the engine's device-side skip flag ``found_inf``) and CPU ``step``
    tensors. After ``load()`` each group keeps the checkpoint's hyper-parameters (lr, betas, eps, weight decay) and
    the current optimizer's other keys (``fused``, ``foreach``, ...), and torch AdamW's ``step`` tensors are put
    where its implementation expects them (the parameter's device when fused or capturable, else the CPU).
    """
    before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load()
    for g, mine in zip(optimizer.param_groups, before):
        saved = {k: g[k] for k in _HYPER_KEYS if k in g}
        for k in [k for k in g if k != "params" and k not in mine and k not in _HYPER_KEYS]:
            del g[k]
        g.update({k: v for k, v in mine.items() if k not in _HYPER_KEYS})
        g.update(saved)
        if not isinstance(optimizer, torch.optim.Adam):
            continue
        on_device = bool(g.get("fused") or g.get("capturable"))
        for p in g["params"]:
            st = optimizer.state.get(p)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(dtype=torch.float32, device=p.device if on_device else "cpu")


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step()`` honours ``optimizer.found_inf`` (torch's fused Adam/AdamW): a skipped step
    then needs no host sync."""
    if getattr(optimizer, "supports_found_inf", False):  # FusedAdamWEMA
        return True
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and isinstance(optimizer, torch.optim.Adam)


def master_grads_read(optimizer: torch.optim.Optimizer, grad_clip: float, want_norm: bool) -> bool:
    """True when something reads the fp32 masters' gradients between the backward and the optimizer step: clipping
    or a logged norm, unless the optimizer clips inside its own step (``clips_in_step``, fused_adamw_ema), which
    reads the gradients where they are (docs/method.md § Optimizer and EMA bytes per parameter)."""
    return (grad_clip > 0 or want_norm) and not getattr(optimizer, "clips_in_step", False)


def clip_gradients(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float,
                   want_norm: bool) -> torch.Tensor | None:
    """Clip the global gradient 2-norm to ``grad_clip`` (0 = off) as ``torch.nn.utils.clip_grad_norm_`` does, and
    return the norm before clipping (None when neither clipping nor a logged norm asks for it).

    An optimizer with ``clips_in_step`` (fused_adamw_ema) computes the norm in one read of the gradients and applies
    the coefficient ``min(1, grad_clip / (norm + 1e-6))`` inside its update kernel; otherwise torch's foreach
    clipping scales the masters' gradients in place.
    """
    if grad_clip <= 0 and not want_norm:
        return None
    if getattr(optimizer, "clips_in_step", False):
        return optimizer.clip_grad_norm_(grad_clip)  # type: ignore[attr-defined]
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


def make_ema(module: nn.Module, share_frozen: bool = True) -> nn.Module:
    """A frozen deep copy of ``module`` (eval mode, no grads) that :func:`ema_update` keeps averaged.

    With ``share_frozen`` the parameters that do not train (``requires_grad=False``: a tokenizer's frozen VFM, a
    fixed positional table) are not copied: the EMA holds the very same tensors as ``module`` (their average is
    themselves), so they cost no memory and no EMA update, and the EMA's state dict (checkpoints,
    ``ema.safetensors``) still holds them. The engine turns it off when FSDP will shard ``module`` (sharding
    replaces its parameters; the EMA is sharded separately).
    """
    shared = {id(p): p for p in module.parameters() if share_frozen and not p.requires_grad}  # deepcopy memo
    ema = copy.deepcopy(module, shared)
    ema.eval()
    ema.requires_grad_(False)
    return ema


def _float_pairs(ema: Iterable[torch.Tensor], src: Iterable[torch.Tensor]) -> tuple[list, list, list, list]:
    fe, fs, oe, os_ = [], [], [], []
    for e, s in zip(ema, src):
        if e is s:  # a frozen parameter the EMA shares with the model (make_ema): nothing to average
            continue
        if e.shape != s.shape:
            raise ValueError(f"EMA tensor shape {tuple(e.shape)} does not match the model's {tuple(s.shape)}")
        (fe if e.is_floating_point() else oe).append(e)
        (fs if e.is_floating_point() else os_).append(s)
    return fe, fs, oe, os_


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, ok: torch.Tensor | None = None,
               params: bool = True) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

    Args:
        ema: the EMA module (same structure as ``model``).
        model: the trained (unwrapped) module.
        decay: EMA decay in [0, 1].
        ok: optional 0-dim bool tensor on the model's device; where False the update is a no-op (skipped step),
            decided on the device without a host sync.
        params: False when the optimizer already updated the EMA's parameters (``fused_adamw_ema``): only the
            buffers are copied.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1], got {decay}")
    # FSDP2: both modules are sharded alike; the update runs on the local shards
    pe, pm, _, _ = _float_pairs(local_tensors(ema.parameters()), local_tensors(model.parameters()))
    if pe and params:
        pm = [p.detach() for p in pm]
        if ok is None:
            torch._foreach_lerp_(pe, pm, 1.0 - decay)
        else:
            # weight (1 - decay) * ok as a 0-dim device tensor: a skipped step (ok False) is a no-op, without a sync.
            # The tensor-weight overload runs one lerp per tensor (3 passes over memory, like the fused scalar one;
            # the extra launches overlap with GPU work) and needs no temporary copy of the parameters.
            w = ok.to(dtype=pe[0].dtype) * (1.0 - decay)
            torch._foreach_lerp_(pe, pm, [w] * len(pe))
    be, bm, oe, om = _float_pairs(local_tensors(ema.buffers()), local_tensors(model.buffers()))
    if be:
        torch._foreach_copy_(be, bm)
    for e, s in zip(oe, om):
        e.copy_(s)
