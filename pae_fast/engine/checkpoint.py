"""Checkpoints: ``<out>/checkpoints/<step:07d>/{model,ema}.safetensors, state.pt, COMPLETE``.

A checkpoint is written into a hidden temp folder beside the others; every file is fsynced, then a ``COMPLETE``
manifest (JSON: step, the byte size and the sha256 of every file, and ``clean``: whether every weight was finite)
is written last, and the folder is renamed into place. A folder without a valid manifest, or whose files do not have
the recorded sizes and checksums, is damaged: loading it raises a :class:`CheckpointError` naming the file, and
:func:`latest_checkpoint` skips it (with a warning) in favour of the previous one. Pruning never deletes the newest
checkpoint that verifies and is clean. ``state.pt`` holds only tensors and primitives and loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pae_fast.errors import DataError
from pae_fast.io import atomic_path, atomic_write_text, load_safetensors, save_safetensors

__all__ = [
    "CheckpointError",
    "MANIFEST",
    "checkpoint_root",
    "list_checkpoints",
    "validate_checkpoint",
    "latest_checkpoint",
    "write_checkpoint",
    "prune_checkpoints",
    "file_sha256",
    "save_weights",
    "save_torch",
    "load_state",
    "load_weights_file",
]

MANIFEST = "COMPLETE"
log = logging.getLogger("pae_fast.train")


class CheckpointError(DataError, RuntimeError):
    """A checkpoint folder or one of its files is missing or damaged; the message names the file."""


def checkpoint_root(path: str | os.PathLike) -> Path:
    """``<run>/checkpoints`` for a run folder; ``path`` itself when it already holds step folders."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.name == "checkpoints" or any(_is_step_dir(c) for c in _children(p)):
        return p
    return p / "checkpoints"


def _children(p: Path) -> list[Path]:
    return sorted(p.iterdir()) if p.is_dir() else []


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit() and len(p.name) >= 7


def list_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under a run (or checkpoints) folder that carry a manifest, oldest first."""
    root = checkpoint_root(path)
    found = [p for p in _children(root) if _is_step_dir(p) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def validate_checkpoint(ckpt: str | os.PathLike, checksums: bool = True) -> dict[str, Any]:
    """Check the manifest and every file's size and (when recorded and ``checksums``) sha256; return the manifest.

    Checkpoints written before checksums were recorded are checked by size only.

    Raises:
        CheckpointError: naming the folder or file that is missing, truncated or malformed.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt} does not exist")
    man_path = ckpt / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {man_path} is missing (the write was interrupted)")
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint manifest {man_path} is damaged: {e}") from e
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {f} is damaged: {actual} bytes, the manifest records {size}")
    sums = manifest.get("sha256") or {}
    if checksums:
        for name, digest in sums.items():
            if name not in files:
                raise CheckpointError(f"checkpoint manifest {man_path} has a checksum for {name} but no size")
            if file_sha256(ckpt / name) != digest:
                raise CheckpointError(f"checkpoint file {ckpt / name} is damaged: its sha256 differs from the one "
                                      "recorded in the manifest")
    return manifest


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest valid checkpoint under a run folder (or its ``checkpoints`` folder); None when there is none.

    A damaged newest checkpoint is skipped with a warning, so the previous one is used.
    """
    for ckpt in reversed(list_checkpoints(path)):
        try:
            validate_checkpoint(ckpt)
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            continue
        return ckpt
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    root: str | os.PathLike,
    step: int,
    writers: dict[str, Callable[[Path], None]],
    keep_last: int = 0,
    clean: bool = True,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint folder atomically and prune old ones.

    Args:
        root: the ``checkpoints`` folder.
        step: optimizer step (the folder is ``<step:07d>``).
        writers: ``{file name: fn(path)}``; each writes one file at ``path``.
        keep_last: keep this many newest checkpoints (0 keeps all; the newest clean one is always kept).
        clean: recorded in the manifest; False marks a checkpoint whose weights hold NaN/Inf, which pruning does not
            count as a good checkpoint to keep.
        info: more JSON-serialisable manifest entries (e.g. ``skipped_steps``).

    Returns:
        The final checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{step:07d}"
    tmp = root / f".tmp-{step:07d}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        sizes, sums = {}, {}
        for name, write in writers.items():
            write(tmp / name)
            _fsync(tmp / name)
            sizes[name] = (tmp / name).stat().st_size
            sums[name] = file_sha256(tmp / name)
        manifest = {**(info or {}), "step": step, "files": sizes, "sha256": sums, "clean": bool(clean)}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))  # same contents, same bytes
        if final.exists():  # e.g. the same step written again after a resume: replace it as a unit
            trash = root / f".old-{final.name}-{time.monotonic_ns()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        with contextlib.suppress(OSError):
            _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep_last, verified=final if clean else None)
    return final


def _is_clean(ckpt: Path) -> bool:
    try:
        return bool(validate_checkpoint(ckpt).get("clean", True))
    except CheckpointError:
        return False


def prune_checkpoints(root: str | os.PathLike, keep_last: int, verified: Path | None = None) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints and stale temp folders (0 keeps all).

    The newest checkpoint that verifies (sizes and checksums) and is clean is kept even when it is older than the
    ``keep_last`` newest, so a stretch of damaged or NaN checkpoints never removes the last good one.

    Args:
        root: the ``checkpoints`` folder.
        keep_last: how many of the newest to keep.
        verified: a checkpoint the caller has just verified clean (spares re-reading the files).
    """
    root = Path(root)
    for p in _children(root):
        if p.name.startswith((".tmp-", ".old-")):  # left by an interrupted write (only rank 0 writes)
            shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(root)
    keep = set(ckpts[-keep_last:])
    newest_clean = next((c for c in reversed(ckpts) if (verified is not None and c == verified) or _is_clean(c)),
                        None)
    if newest_clean is not None:
        keep.add(newest_clean)
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def save_weights(module_state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[Path], None]:
    """A writer for :func:`write_checkpoint` that saves ``module_state`` as safetensors with ``metadata``."""
    return lambda path: save_safetensors(module_state, path, metadata=metadata)


def save_torch(obj: Any) -> Callable[[Path], None]:
    """A writer for :func:`write_checkpoint` that ``torch.save``s ``obj`` (tensors and primitives only)."""

    def write(path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)

    return write


def load_state(ckpt: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` of a checkpoint with ``weights_only=True`` (validating the checkpoint first)."""
    ckpt = Path(ckpt)
    validate_checkpoint(ckpt)
    path = ckpt / "state.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} is damaged or not loadable with weights_only=True: {e}") from e


def load_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors weights file; a damaged file raises :class:`CheckpointError` naming it."""
    try:
        return load_safetensors(path)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from e
