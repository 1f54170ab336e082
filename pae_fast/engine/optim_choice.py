"""``train.optimizer: auto``: which optimizer a run gets, decided once per run
(docs/method.md § Optimizer and EMA bytes per parameter).

``auto`` resolves to ``fused_adamw_ema`` (:class:`pae_fast.engine.fused_optim.FusedAdamWEMA`: AdamW, the EMA update
and the bf16 compute copy in one Triton kernel per parameter) where that kernel runs and the run is one it supports,
else to ``adamw`` (torch's AdamW: fused on CUDA, foreach on CPU). :func:`choose_optimizer` is the decision as a pure
function of the facts (device type, kernel backend, Triton's availability, distribution, precision), so the whole
table is tested without a GPU; :func:`resolve_optimizer` gathers the facts of a run.

What ``fused_adamw_ema`` supports (engine/fused_optim.py and its tests in tests/engine/test_precision.py): one
device or DDP (whole parameters), any parameter groups (the decayed / not decayed split), gradient clipping and a
logged gradient norm (the engine then moves the bf16 gradients to the fp32 masters first), gradient accumulation,
non-finite steps skipped on a device flag, exact resume. Not chosen by ``auto``:

- ``train.distributed=fsdp`` on several ranks: FSDP2 shards the parameters; the kernel updates whole ones.
- ``train.precision=fp16``: the gradient scaler skips an overflowing step on the host after the step was counted
  as good, and the fused kernel then also skips that step's EMA update, where the engine's own EMA update would
  still run; torch's AdamW keeps the engine's EMA rule for every step.
- no CUDA device, ``train.kernel_backend=torch`` or Triton unavailable: the "fused" optimizer would run its PyTorch
  reference (torch's fused AdamW + a foreach lerp + a copy), no faster than ``adamw``.

Both optimizers keep AdamW's state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so a checkpoint written
under one resumes under the other (:func:`pae_fast.engine.optim.load_optimizer_state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OPTIMIZER_NAMES", "OptimizerChoice", "choose_optimizer", "resolve_optimizer", "record_optimizer"]

OPTIMIZER_NAMES: tuple[str, ...] = ("auto", "adamw", "apex_fused_adam", "fused_adamw_ema")


@dataclass(frozen=True)
class OptimizerChoice:
    """The optimizer a run uses and why.

    Attributes:
        requested: ``train.optimizer`` as configured (``auto`` or a name).
        name: the optimizer built (``adamw | apex_fused_adam | fused_adamw_ema``).
        reason: one line saying why (for the log).
    """

    requested: str
    name: str
    reason: str

    def log_text(self) -> str:
        """``train.optimizer auto -> fused_adamw_ema (reason)`` (or ``train.optimizer adamw (set explicitly)``)."""
        if self.requested == "auto":
            return f"train.optimizer auto -> {self.name} ({self.reason})"
        return f"train.optimizer {self.name} ({self.reason})"


def choose_optimizer(requested: str, *, device_type: str, kernel_backend: str, triton_reason: str | None,
                     distributed: str, world_size: int, precision: str) -> OptimizerChoice:
    """Resolve ``train.optimizer`` (a pure function: every fact is an argument).

    Args:
        requested: ``train.optimizer`` (``auto`` or an optimizer name, which is returned as is).
        device_type: the training device's type (``cuda``, ``cpu``, ...).
        kernel_backend: the kernel backend in force for the run (``auto | triton | torch``).
        triton_reason: why Triton kernels cannot run on the device (None: they can).
        distributed: ``train.distributed`` (``ddp | fsdp``).
        world_size: number of ranks.
        precision: ``train.precision``.

    Returns:
        The :class:`OptimizerChoice`.

    Raises:
        ValueError: an unknown ``requested`` name.
    """
    if requested not in OPTIMIZER_NAMES:
        raise ValueError(f"train.optimizer={requested!r}: expected one of {', '.join(OPTIMIZER_NAMES)}")
    if requested != "auto":
        return OptimizerChoice(requested, requested, "set explicitly")

    def torch_adamw(why: str) -> OptimizerChoice:
        return OptimizerChoice("auto", "adamw", why)

    if device_type != "cuda":
        return torch_adamw(f"training on {device_type}: the fused AdamW + EMA kernel is a CUDA (Triton) kernel")
    if kernel_backend == "torch":
        return torch_adamw("train.kernel_backend=torch: the fused kernel would run its PyTorch reference")
    if triton_reason is not None:
        return torch_adamw(f"Triton kernels cannot run: {triton_reason}")
    if distributed == "fsdp" and world_size > 1:
        return torch_adamw("train.distributed=fsdp shards the parameters; the fused kernel updates whole parameters")
    if precision == "fp16":
        return torch_adamw("train.precision=fp16: the gradient scaler's host-side skips would also skip the fused "
                           "EMA update")
    where = "one device" if world_size <= 1 else f"DDP on {world_size} ranks"
    copy = ", bf16 compute copy" if precision == "bf16" else ""
    return OptimizerChoice("auto", "fused_adamw_ema",
                           f"CUDA with Triton kernels, {where}, precision {precision}: AdamW + EMA{copy} in one kernel")


def resolve_optimizer(cfg: Any, device: torch.device, world_size: int) -> OptimizerChoice:
    """:func:`choose_optimizer` with the facts of this run: ``cfg`` (a ``TrainConfig``), its device and world size.

    Call it inside the run's kernel-backend scope (``engine.runtime.kernel_scope``): the backend in force there is the
    one the run's kernels use. Off CUDA nothing is imported (Triton's import takes seconds).
    """
    backend, reason = cfg.kernel_backend, None
    if cfg.optimizer == "auto" and device.type == "cuda":
        from pae_fast.kernels import current_backend, triton_unavailable_reason

        backend = cfg.kernel_backend if cfg.kernel_backend != "auto" else current_backend()
        reason = triton_unavailable_reason(device)
    return choose_optimizer(cfg.optimizer, device_type=device.type, kernel_backend=backend, triton_reason=reason,
                            distributed=cfg.distributed, world_size=world_size, precision=cfg.precision)


def record_optimizer(config_yaml: str | None, choice: OptimizerChoice) -> str | None:
    """The run's resolved config with ``train.optimizer`` set to what ``auto`` resolved to (unchanged otherwise)."""
    if config_yaml is None or choice.requested != "auto":
        return config_yaml
    import yaml

    data = yaml.safe_load(config_yaml)
    if not isinstance(data, dict):
        return config_yaml
    section = data.get("train") if isinstance(data.get("train"), dict) else data  # a whole Config or a TrainConfig
    if section.get("optimizer") != "auto":
        return config_yaml
    section["optimizer"] = choice.name
    return yaml.safe_dump(data, sort_keys=False)
