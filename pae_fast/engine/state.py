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

__all__ = ["seed_all", "rng_state", "set_rng_state", "gather_rng_states", "fork_rng", "ResumeBundle", "find_resume",
           "load_bundle"]


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
