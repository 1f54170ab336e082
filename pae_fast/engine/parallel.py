"""Data parallelism for the engine: DDP (default) or FSDP2 ``fully_shard``, and the state-dict plumbing both need.

Under DDP the trained module keeps ordinary tensors; the EMA is a plain copy. Under FSDP2 the trained module's
parameters become sharded ``DTensor``s; the EMA copy is sharded the same way, so its update is a foreach op over the
local shards, and full state dicts are gathered (to the CPU of rank 0) only when a checkpoint is written.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from pae_fast.engine.distributed import get_rank, get_world_size

__all__ = [
    "find_blocks",
    "wrap_model",
    "broadcast_module",
    "is_sharded",
    "shard_like",
    "full_model_state",
    "load_model_state",
    "optimizer_state",
    "load_optimizer_state",
    "local_tensors",
    "unsharded_copy",
]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (``blocks`` / ``layers`` ModuleLists, recursively): the units that per-block
    compile and FSDP sharding act on. Empty when there are none."""
    found: list[nn.Module] = []
    prefixes: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(f"{p}.") for p in prefixes):
            continue  # blocks inside a block belong to it
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "layers"):
            prefixes.append(name)
            found.extend(mod)
    return found


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _fully_shard(module: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for blk in find_blocks(module):
        fully_shard(blk)
    fully_shard(module)
    return module


def wrap_model(module: nn.Module, strategy: str, device: torch.device, find_unused: bool = False) -> nn.Module:
    """Wrap ``module`` for data parallel training (identity in a single process or without trainable params).

    Args:
        module: the raw module, already on ``device``.
        strategy: ``ddp`` or ``fsdp`` (FSDP2: each block from :func:`find_blocks`, then the root, is sharded in place).
        device: the training device.
        find_unused: DDP's ``find_unused_parameters``.

    Returns:
        The module to call in the training step (DDP wrapper, or ``module`` itself, sharded in place for FSDP).
    """
    if get_world_size() <= 1 or not _has_trainable(module):
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused)
    if strategy == "fsdp":
        return _fully_shard(module)
    raise ValueError(f"train.distributed={strategy!r}: expected ddp or fsdp")


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (FSDP2 does not; the EMA copy must start equal too)."""
    if get_world_size() <= 1:
        return
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            torch.distributed.broadcast(t, src=0)


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` was sharded by FSDP2."""
    if "torch.distributed.fsdp" not in sys.modules:  # nothing was sharded (and the import costs seconds)
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_like(ema: nn.Module, model: nn.Module) -> nn.Module:
    """Shard the EMA copy the way ``model`` was sharded (no-op when ``model`` is not sharded)."""
    return _fully_shard(ema) if is_sharded(model) else ema


def local_tensors(tensors) -> list[torch.Tensor]:
    """Local shards of DTensors (plain tensors pass through): foreach ops run on these."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: nn.Module, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
    """The full state dict (under FSDP every rank must call this; it is gathered to the CPU of rank 0).

    Args:
        module: plain or FSDP-sharded module.
        all_ranks: under FSDP, gather the full tensors on every rank (on the module's device) instead.

    Returns:
        ``{name: tensor}`` on rank 0 (or in a single process, or on every rank with ``all_ranks``); else None.
    """
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(module, options=_sd_options(cpu_offload=not all_ranks))
        return sd if all_ranks or get_rank() == 0 else None
    return {k: v.detach() for k, v in module.state_dict().items()}


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full state dict into a plain or FSDP-sharded module (every rank holds ``state``)."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(module, state, options=_sd_options(strict=strict))
    else:
        module.load_state_dict(state, strict=strict)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's full state (gathered to rank 0 under FSDP; None on the other ranks)."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(module, optimizer, options=_sd_options(cpu_offload=True))
        return sd if get_rank() == 0 else None
    return optimizer.state_dict()


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state` (every rank holds ``state``)."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=_sd_options())
    else:
        optimizer.load_state_dict(state)


def unsharded_copy(template: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain module with ``template``'s structure (a meta-device copy) filled from a full state dict."""
    m = copy.deepcopy(template).to_empty(device=device)
    m.load_state_dict(state)
    return m
