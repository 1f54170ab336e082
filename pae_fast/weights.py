"""The one place that turns a path into tensors: weights files, checkpoint folders, run folders, authors' layouts.

Every stage that loads trained weights (the engine's resume-free loads, sampling, the tokenizer, the guide model
of AutoGuidance, converters of the authors' checkpoints) goes through :func:`resolve_weights_file`,
:func:`read_state_dict` and :func:`load_into`. Only safe formats are read: safetensors, or a ``.pt`` / ``.pth`` /
``.bin`` opened with ``torch.load(..., weights_only=True)`` (tensors and primitives, never pickled code).

Layouts understood by :func:`read_state_dict`:
- a flat state dict (safetensors or torch);
- the authors' training checkpoints ``{"model": ..., "ema": ..., "opt": ...}`` (LightningDiT, RAE, PAE): the first
  key of ``prefer`` that holds a dict is taken;
- wrapper prefixes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile), stripped wherever they repeat.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "WeightsError",
    "WRAPPER_PREFIXES",
    "resolve_weights_file",
    "read_state_dict",
    "read_metadata",
    "strip_prefixes",
    "key_diff",
    "load_into",
    "load_weights",
]

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A weights file is missing, damaged, unsafe to read, or does not fit the model; the message names it."""


def resolve_weights_file(path: str | os.PathLike, prefer_ema: bool = True, key: str = "weights") -> Path:
    """The weights file behind ``path``.

    Args:
        path: a weights file; a checkpoint folder written by the engine (``ema.safetensors`` / ``model.safetensors``
            beside its manifest); or a run folder (its newest checkpoint that validates).
        prefer_ema: in a checkpoint folder, take ``ema.safetensors`` before ``model.safetensors``.
        key: the config key or argument named in error messages (e.g. ``"sample.checkpoint"``).

    Raises:
        WeightsError: nothing usable at ``path``; the message names ``key``, the path and what was expected.
    """
    from pae_fast.engine.checkpoint import MANIFEST, checkpoint_root, latest_checkpoint, validate_checkpoint

    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise WeightsError(f"{key}={str(path)!r} does not exist (expected a weights file, a checkpoint folder "
                           "or a run folder)")
    if (p / MANIFEST).is_file():
        try:
            validate_checkpoint(p)
        except Exception as e:  # CheckpointError or OSError: the folder is damaged
            raise WeightsError(f"{key}={str(path)!r}: {e}") from e
        ckpt = p
    else:
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise WeightsError(f"{key}={str(path)!r}: no complete checkpoint under {checkpoint_root(p)}")
    names = ("ema", "model") if prefer_ema else ("model", "ema")
    for name in names:
        if (ckpt / f"{name}.safetensors").is_file():
            return ckpt / f"{name}.safetensors"
    raise WeightsError(f"{key}: checkpoint {ckpt} holds neither ema.safetensors nor model.safetensors")


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Iterable[str] = WRAPPER_PREFIXES) -> dict:
    """``state`` with every leading wrapper prefix removed from its keys (repeated prefixes too)."""
    prefixes = tuple(prefixes)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if k.startswith(prefix):
                    k, changed = k[len(prefix) :], True
        out[k] = v
    return out


def read_state_dict(
    path: str | os.PathLike,
    prefer: tuple[str, ...] = ("ema", "model"),
    prefixes: Iterable[str] = WRAPPER_PREFIXES,
    key: str = "weights",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one weights file, on the CPU.

    Args:
        path: a file (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with ``weights_only=True``), or
            a folder resolved by :func:`resolve_weights_file`.
        prefer: for a torch file holding several state dicts, the keys tried in order (``{"ema": ..., ...}``).
        prefixes: wrapper prefixes stripped from every key.
        key: the config key or argument named in error messages.

    Returns:
        ``(state, metadata)``: metadata is the safetensors header's string map (empty for torch files).
    """
    file = resolve_weights_file(path, prefer_ema=bool(prefer) and prefer[0] == "ema", key=key)
    meta: dict[str, str] = {}
    if file.suffix == ".safetensors":
        from pae_fast.io import load_safetensors

        try:
            state, meta = load_safetensors(file)
        except (ValueError, FileNotFoundError) as e:
            raise WeightsError(f"{key}: {e}") from e
    elif file.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors name classes that weights_only refuses; keep the cause
            raise WeightsError(f"{key}: {file} cannot be read as a tensors-only torch file "
                               f"(weights_only=True): {e}") from e
        if isinstance(state, dict):
            for name in prefer:
                if isinstance(state.get(name), dict):
                    state = state[name]
                    break
    else:
        raise WeightsError(f"{key}: {file} has suffix {file.suffix!r}; expected .safetensors or one of "
                           f"{', '.join(TORCH_SUFFIXES)}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else f"a dict with keys {list(state)[:6]}"
        raise WeightsError(f"{key}: {file} holds {found}, not a state dict of tensors (tried keys {list(prefer)})")
    return strip_prefixes(state, prefixes), dict(meta)


def read_metadata(
    path: str | os.PathLike, prefer_ema: bool = True, key: str = "weights"
) -> tuple[Path, dict[str, str]]:
    """The resolved weights file behind ``path`` and its metadata, without reading the tensors.

    Only safetensors files carry metadata; a torch file gives ``{}``.

    Raises:
        WeightsError: nothing usable at ``path``, or a damaged safetensors header (the message names the file).
    """
    file = resolve_weights_file(path, prefer_ema=prefer_ema, key=key)
    if file.suffix != ".safetensors":
        return file, {}
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return file, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise WeightsError(f"{key}: {file} is damaged or not a safetensors file: {e}") from e


def key_diff(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], limit: int = 12) -> str:
    """A readable account of how two state dicts differ: missing, unexpected and mis-shaped keys ('' if none)."""

    def show(keys: list[str]) -> str:
        more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(got))
        if tuple(expected[k].shape) != tuple(got[k].shape)
    ]
    lines = []
    if missing:
        lines.append(f"missing {len(missing)}: {show(missing)}")
    if unexpected:
        lines.append(f"unexpected {len(unexpected)}: {show(unexpected)}")
    if shapes:
        lines.append(f"wrong shape {len(shapes)}: {show(shapes)}")
    return "; ".join(lines)


def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str = "weights",
    strict: bool = True,
    skip: Callable[[str], bool] | None = None,
) -> None:
    """Copy ``state`` into ``module``; with ``strict`` every key must match in name and shape.

    Args:
        module: the (unwrapped) module to fill.
        state: a clean state dict (prefixes already stripped).
        what: names the source in the error (a file path, "authors' checkpoint ...").
        strict: refuse missing or unexpected keys; shapes must always match.
        skip: keys for which it returns True are ignored on both sides (constants the model rebuilds).

    Raises:
        WeightsError: the readable :func:`key_diff`, naming ``what`` and the module's class.
    """
    expected = {k: v for k, v in module.state_dict().items() if skip is None or not skip(k)}
    state = {k: v for k, v in state.items() if skip is None or not skip(k)}
    diff = key_diff(expected, state)
    if not strict:  # only shape mismatches of shared keys are fatal
        diff = key_diff({k: expected[k] for k in expected if k in state}, {k: state[k] for k in state if k in expected})
    if diff:
        name = getattr(module, "variant", None) or type(module).__name__
        raise WeightsError(f"{what} does not fit {name}: {diff}")
    module.load_state_dict(state, strict=False)


def load_weights(
    module: nn.Module,
    path: str | os.PathLike,
    prefer: tuple[str, ...] = ("ema", "model"),
    strict: bool = True,
    skip: Callable[[str], bool] | None = None,
    key: str = "weights",
) -> dict[str, str]:
    """:func:`read_state_dict` then :func:`load_into`; returns the file's metadata plus ``"weights_file"``."""
    state, meta = read_state_dict(path, prefer=prefer, key=key)
    file = resolve_weights_file(path, prefer_ema=bool(prefer) and prefer[0] == "ema", key=key)
    load_into(module, state, what=f"{key}={str(file)!r}", strict=strict, skip=skip)
    meta["weights_file"] = str(file)
    return meta


def load_state_dict_file(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from a local safetensors or ``.pth``/``.pt`` file, read by :func:`read_state_dict`
    (``weights_only=True``); a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist (no download here: pass a local file)")
    return read_state_dict(p, prefer=("state_dict", "model"), prefixes=(), key=what)[0]
