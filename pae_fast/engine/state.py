"""Resume state: RNG states as tensors and primitives (so ``state.pt`` loads with ``weights_only=True``), per-rank
seeding, and finding and loading the checkpoint a run resumes from."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pae_fast.engine import checkpoint as ck
from pae_fast.engine import distributed as D
from pae_fast.engine import parallel as P
from pae_fast.engine.data import DataPosition
from pae_fast.engine.optim import load_optimizer_state_dict

__all__ = ["seed_all", "rng_state", "set_rng_state", "gather_rng_states", "fork_rng", "ResumeBundle", "find_resume",
           "load_bundle", "restore_trainer", "train_state"]


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """All RNG states of this process as tensors and primitives."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a host-side gather; every rank must call it)."""
    mine = rng_state(device)
    if not D.is_initialized() or D.get_world_size() == 1:
        return [mine]
    out: list[Any] = [None] * D.get_world_size()
    torch.distributed.all_gather_object(out, mine, group=D.control_group())
    return out


@contextlib.contextmanager
def fork_rng(device: torch.device) -> Iterator[None]:
    """Run a block (e.g. sampling in a checkpoint callback) without advancing any RNG stream of the caller."""
    st = rng_state(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            set_rng_state(st, device)


@dataclass
class ResumeBundle:
    """A checkpoint read into CPU memory: weights, extra modules' weights and the ``state.pt`` dict."""

    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    extras: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]


def load_bundle(path: Path, extra_names: list[str]) -> ResumeBundle:
    """Read a whole checkpoint; :class:`~pae_fast.engine.checkpoint.CheckpointError` names any damaged file (a size
    or checksum that differs from the manifest, or weights holding NaN/Inf)."""
    state = ck.load_state(path)  # validates the manifest first
    model, _ = ck.load_weights_file(path / "model.safetensors")
    ema, _ = ck.load_weights_file(path / "ema.safetensors")
    extras = {n: ck.load_weights_file(path / f"{n}.safetensors")[0] for n in extra_names}
    for name, tensors in (("model", model), ("ema", ema), *extras.items()):
        bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                   None)
        if bad is not None:
            raise ck.CheckpointError(f"checkpoint file {path / f'{name}.safetensors'} holds NaN/Inf (tensor {bad!r})")
    for key in ("step", "optimizer", "scheduler", "data"):
        if key not in state:
            raise ck.CheckpointError(f"checkpoint file {path / 'state.pt'} has no {key!r} entry")
    missing = [n for n in extra_names if n not in state.get("extra", {})]
    if missing:
        raise ck.CheckpointError(f"checkpoint file {path / 'state.pt'} has no optimizer state for {missing}")
    return ResumeBundle(path, model, ema, extras, state)


def find_resume(resume: str, out: Path, extra_names: list[str], log: logging.Logger) -> ResumeBundle | None:
    """The checkpoint to resume from, read into memory.

    Args:
        resume: ``auto`` (the newest loadable checkpoint of ``out``; damaged ones are skipped with a warning),
            ``none`` (start fresh) or a path (a checkpoint folder, or a run folder meaning its newest checkpoint).
        out: the run folder.
        extra_names: names of the task's ``extra_optimized`` modules (their weights must be present).
        log: where the warnings go.
    """
    if resume == "none":
        if ck.list_checkpoints(out):
            log.warning("train.resume=none but %s holds checkpoints; starting fresh (they may be overwritten)", out)
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.exists():
            raise ck.CheckpointError(f"train.resume={resume!r}: no such checkpoint or run folder")
        if p.name.isdigit() or (p / ck.MANIFEST).exists():  # a checkpoint folder
            return load_bundle(p, extra_names)
        latest = ck.latest_checkpoint(p)
        if latest is None:
            raise ck.CheckpointError(f"train.resume={resume!r}: no complete checkpoint under {ck.checkpoint_root(p)}")
        return load_bundle(latest, extra_names)
    candidates = list(reversed(ck.list_checkpoints(out)))
    errors, damaged = [], []
    for c in candidates:
        try:
            bundle = load_bundle(c, extra_names)
        except ck.CheckpointError as e:
            log.warning("auto-resume: skipping damaged checkpoint (%s)", e)
            errors.append(str(e))
            damaged.append(c)
            continue
        if D.is_main():  # so that keep_last pruning and later resumes never count them as checkpoints
            for c in damaged:
                target = c.with_name(f"{c.name}.damaged")
                with contextlib.suppress(OSError):
                    os.replace(c, target if not target.exists() else c.with_name(f"{c.name}.damaged-{os.getpid()}"))
                    log.warning("moved the damaged checkpoint %s aside to %s", c, target)
        return bundle
    if errors:
        raise ck.CheckpointError(
            f"auto-resume: every checkpoint under {ck.checkpoint_root(out)} is damaged: {'; '.join(errors)}. "
            "Move them away or set train.resume=none to start fresh"
        )
    return None


def restore_trainer(tr: Any, b: ResumeBundle) -> None:
    """Put a trainer (``engine.loop``) back where the checkpoint ``b`` left it: optimizer, scheduler and scaler of
    every unit, step, skipped-step count, data position and RNG; a change of the data or the world size is
    warned about, an optimizer state that does not fit raises :class:`~pae_fast.engine.checkpoint.CheckpointError`.
    """
    st = b.state
    for unit in tr.units:
        part = st if unit.name == "model" else st["extra"][unit.name]
        try:
            # same AdamW state across implementations (adamw <-> fused_adamw_ema): the groups keep this run's settings
            load_optimizer_state_dict(
                unit.optimizer, lambda u=unit, sd=part["optimizer"]: P.load_optimizer_state(u.wrapped, u.optimizer, sd))
        except (ValueError, KeyError, RuntimeError) as e:
            raise ck.CheckpointError(
                f"optimizer state of {unit.name!r} in {b.path / 'state.pt'} does not fit: {e}"
            ) from e
        sched_state = dict(part["scheduler"])
        sched_state["lr_lambdas"] = [None] * len(unit.scheduler.lr_lambdas)  # the schedule comes from the config
        unit.scheduler.load_state_dict(sched_state)
        unit.scheduler.base_lrs = [tr.cfg.lr] * len(unit.optimizer.param_groups)
        for g, base, fn in zip(unit.optimizer.param_groups, unit.scheduler.base_lrs, unit.scheduler.lr_lambdas):
            g["initial_lr"] = base
            g["lr"] = base * fn(unit.scheduler.last_epoch)
        if unit.scaler is not None and part.get("scaler"):
            unit.scaler.load_state_dict(part["scaler"])
    tr.step = int(st["step"])
    tr.skipped_total.fill_(int(st.get("skipped_steps", 0)))
    data = st["data"]
    if int(data["num_samples"]) != tr.num_samples or int(data["global_batch_size"]) != tr.cfg.global_batch_size:
        tr.log.warning(
            "data changed since the checkpoint (samples %s -> %d, global batch %s -> %d): resuming at epoch %s "
            "offset %s, which is no longer the exact continuation",
            data["num_samples"], tr.num_samples, data["global_batch_size"], tr.cfg.global_batch_size,
            data["epoch"], data["offset"],
        )
    tr.pos = DataPosition(int(data["epoch"]), int(data["offset"]))
    rng = st.get("rng") or []
    if len(rng) == tr.world:
        set_rng_state(rng[tr.rank], tr.device)
    else:
        tr.log.warning("checkpoint has RNG states for %d ranks, this run has %d: re-seeding instead",
                         len(rng), tr.world)
        seed_all(tr.seed + tr.rank + 7919 * tr.step)
    tr.last_ckpt = b.path
    tr.log.info("resumed from %s (step %d, epoch %d, offset %d)", b.path, tr.step, tr.pos.epoch,
                  tr.pos.offset)


def train_state(tr: Any, opt_sd: dict[str, Any], rng: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """The ``state.pt`` of a checkpoint (tensors and primitives only): step, optimizer / scheduler / scaler states
    of every unit, RNG states of every rank and the data position. :func:`restore_trainer` reads it back."""
    task, step = tr.task, tr.step

    def unit_state(u: Any) -> dict[str, Any]:
        sched = {k: v for k, v in u.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"optimizer": opt_sd[u.name], "scheduler": sched,
                "scaler": u.scaler.state_dict() if u.scaler is not None else {}}

    state = {
        "format": 1, "task": task.name, "step": step, "skipped_steps": skipped, "world_size": tr.world,
        **unit_state(tr.units[0]),
        "extra": {u.name: unit_state(u) for u in tr.units[1:]},
        "rng": rng,
        "data": {"epoch": tr.pos.epoch, "offset": tr.pos.offset, "num_samples": tr.num_samples,
                 "global_batch_size": tr.cfg.global_batch_size, "seed": tr.seed},
    }
    return state
