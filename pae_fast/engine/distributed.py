"""Process-group helpers: one code path for a single process and for ``torchrun --nproc_per_node=N``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
reads them and starts NCCL on CUDA, gloo on CPU. Without those variables everything here is a cheap no-op
(rank 0 of a world of 1), so library code calls the helpers unconditionally.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "init_from_env",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main",
    "barrier",
    "cleanup",
    "default_device",
    "all_reduce_flag",
    "control_group",
]

_CONTROL_GROUP: list = []  # a gloo group for host-side control messages (stop flags) under NCCL


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from e


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else _env_int("WORLD_SIZE", 1)


def get_local_rank() -> int:
    """Rank on this node (picks the CUDA device)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on the process that does all file I/O and logging."""
    return get_rank() == 0


def default_device(requested: str = "auto", key: str = "train.device") -> torch.device:
    """The training device: ``auto`` is ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU.

    ``key`` is the config key named in errors (``sample.device`` when sampling)."""
    from pae_fast.errors import ConfigError

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={requested!r} but no CUDA device is available; use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", get_local_rank())
    elif dev.type != "cpu":
        raise ConfigError(f"{key}={requested!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    return dev


def init_from_env(device: torch.device | None = None, timeout_s: float = 1800.0) -> bool:
    """Start the default process group from torchrun's environment variables.

    Args:
        device: the training device; CUDA selects NCCL (and binds the device), CPU selects gloo.
        timeout_s: collective timeout.

    Returns:
        True when this call created the process group (the caller then owns :func:`cleanup`); False when the
        world has one process or a group already exists.
    """
    if is_initialized() or _env_int("WORLD_SIZE", 1) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set; launch with torchrun --nproc_per_node=N")
    device = device if device is not None else default_device()
    kwargs: dict = {"timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, **kwargs)
    return True


def control_group():
    """A gloo group for tiny host-side collectives (a stop flag per step must not sync the GPU)."""
    if not is_initialized():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if not _CONTROL_GROUP:
        _CONTROL_GROUP.append(dist.new_group(backend="gloo"))
    return _CONTROL_GROUP[0]


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (host-side, through the gloo control group)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Destroy the process group (and the control group) if one exists."""
    if is_initialized():
        if _CONTROL_GROUP:
            dist.destroy_process_group(_CONTROL_GROUP.pop())
        dist.destroy_process_group()
