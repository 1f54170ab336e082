"""What a run was started with, so that a resume on other data or another model is refused instead of mixed in.

A run folder holds ``run_identity.json``: the data, tokenizer and model settings that define what is being trained,
plus the sha256 of the latent cache's ``index.json`` and ``stats.safetensors`` (two caches of the same size but other
contents differ there), and one sha256 over all of it. Resuming a run with a different identity raises a
:class:`~pae_fast.errors.ConfigError` listing each difference (``model.in_channels: the run has 4, this command
8``). Settings that do not change what is learned (loader workers, gradient checkpointing, the path the weights
were first loaded from) are left out.

A stage calls, in this order: :func:`run_identity` (after the config is loaded and the data opened),
:func:`check_run_identity` (before writing anything into the folder), then, holding the folder's lock,
:func:`record_run_identity`; :func:`open_run` does the last three in one ``with`` block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pae_fast.errors import ConfigError
from pae_fast.io import atomic_write_text

__all__ = ["IDENTITY_FILE", "run_identity", "identity_digest", "identity_diff", "check_run_identity",
           "record_run_identity", "open_run"]

IDENTITY_FILE = "run_identity.json"

# Fields of each section that do not define what is trained.
_IGNORED: dict[str, set[str]] = {
    "data": {"batch_size", "num_workers", "loader"},
    "tokenizer": {"lpips_weights", "lambda_l1", "lambda_lpips", "lambda_gan", "lambda_ssr", "lambda_mcr",
                  "lambda_scr", "gan_start_step", "disc_start_step", "adaptive_weight_max"},
    "model": {"grad_checkpointing", "checkpoint"},
}

_CACHE_FILES = ("index.json", "stats.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def run_identity(cfg: Any, sections: tuple[str, ...] = ("data", "tokenizer", "model")) -> dict[str, Any]:
    """The flat identity of a run: ``{"model.in_channels": 4, ..., "data.cache.index.json": sha256, ...}``.

    Args:
        cfg: a :class:`~pae_fast.config.Config`.
        sections: the config sections that define the run (a tokenizer run may pass ``("data", "tokenizer")``).
    """
    out: dict[str, Any] = {}
    for name in sections:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            if f.name in _IGNORED.get(name, set()):
                continue
            v = getattr(section, f.name)
            out[f"{name}.{f.name}"] = list(v) if isinstance(v, tuple) else v
    root = getattr(cfg.data, "root", None)
    if "data" in sections and root:
        for fname in _CACHE_FILES:
            p = Path(root) / fname
            if p.is_file():
                out[f"data.cache.{fname}"] = _sha256(p)
        if any(k.startswith("data.cache.") for k in out):
            del out["data.root"]  # a latent cache is identified by its contents: moving it is fine
    return out


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def identity_diff(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences, one per key (``key: the run has X, this command Y``)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, "<unset>"), current.get(key, "<unset>")
        if a != b:
            if key.startswith("data.cache."):
                out.append(f"{key}: the latent cache's contents differ from the one the run was started on")
            else:
                out.append(f"{key}: the run has {a!r}, this command {b!r}")
    return out


def check_run_identity(out_dir: str | os.PathLike, identity: dict[str, Any], resume: str = "auto") -> None:
    """Refuse to continue a run folder that was started with a different identity (reads only).

    Args:
        out_dir: the run folder.
        identity: :func:`run_identity` of this command.
        resume: ``train.resume``; ``none`` starts afresh (the old identity will be replaced) and passes.

    Raises:
        ConfigError: naming every difference and how to proceed.
    """
    path = Path(out_dir) / IDENTITY_FILE
    if resume == "none" or not path.is_file():
        return
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        recorded = rec["identity"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); move it away to resume without the check") from e
    if identity_digest(recorded) == identity_digest(identity):
        return
    diff = identity_diff(recorded, identity)
    raise ConfigError(
        f"the run in {out_dir} was started with other settings; refusing to resume it: {'; '.join(diff)}. Use the "
        "original settings, another out_dir, or train.resume=none to start afresh"
    )


def record_run_identity(out_dir: str | os.PathLike, identity: dict[str, Any]) -> Path:
    """Write ``run_identity.json`` atomically (call it holding the folder's lock, after :func:`check_run_identity`)."""
    path = Path(out_dir) / IDENTITY_FILE
    atomic_write_text(path, json.dumps({"sha256": identity_digest(identity), "identity": identity}, indent=1,
                                       default=str))
    return path


@contextmanager
def open_run(out_dir: str | os.PathLike, identity: dict[str, Any], resume: str = "auto",
             main: bool = True) -> Iterator[Path]:
    """Take a run folder for writing: check the identity (nothing written on a mismatch), lock the folder, check
    again under the lock (another process may have started the run meanwhile), record the identity, yield.

    Args:
        out_dir: the run folder (created when missing, after the first check passed).
        identity: :func:`run_identity` of this command, computed after its config and data were validated.
        resume: ``train.resume``.
        main: False on ranks other than 0 (they neither lock nor write).

    Raises:
        ConfigError: the folder was started with another identity.
        RunLockedError: another process holds the folder.
    """
    from pae_fast.engine.lock import RunLock

    check_run_identity(out_dir, identity, resume)
    with RunLock(out_dir, enabled=main):
        if main:
            check_run_identity(out_dir, identity, resume)
            record_run_identity(out_dir, identity)
        yield Path(out_dir)
