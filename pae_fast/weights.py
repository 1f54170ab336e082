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

Where a path is accepted, ``hf://<org>/<name>/<path-in-repo>`` (optionally ``hf://<org>/<name>@<revision>/<path>``)
names a file of a Hugging Face hub repository, resolved by :func:`resolve_hub_file` through ``huggingface_hub``'s
cache (the optional ``hub`` extra); ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` are honoured (docs/method.md § Checkpoint
conversion). Latent statistics files (ours and RAE's ``stat.pt``) are read by :func:`read_latent_stats`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "WeightsError",
    "WRAPPER_PREFIXES",
    "HUB_SCHEME",
    "resolve_hub_file",
    "resolve_weights_file",
    "is_release_folder",
    "read_state_dict",
    "read_metadata",
    "read_shapes",
    "read_latent_stats",
    "check_finite",
    "strip_prefixes",
    "key_diff",
    "load_into",
    "load_weights",
]

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt")
HUB_SCHEME = "hf://"
_TRUE = ("1", "on", "yes", "true")


class WeightsError(ValueError):
    """A weights file is missing, damaged, unsafe to read, or does not fit the model; the message names it."""


def resolve_hub_file(path: str, key: str = "weights") -> Path:
    """The local file of ``hf://<org>/<name>[@<revision>]/<path-in-repo>``, from the Hugging Face cache or the hub.

    ``huggingface_hub`` (extra ``hub``) resolves it: its cache (``HF_HUB_CACHE`` / ``HF_HOME``) first; with
    ``HF_HUB_OFFLINE=1`` only the cache, never the network. Both variables are read when this is called.

    Raises:
        WeightsError: one line naming ``key`` and the address: a malformed address, ``huggingface_hub`` missing, the
            file not in the cache offline, or the repository / file not found.
    """
    rest = path[len(HUB_SCHEME):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise WeightsError(f"{key}={path!r}: expected hf://<org>/<name>/<path-in-repo> (a file of a hub repository)")
    org, name, filename = parts
    name, _, revision = name.partition("@")
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise WeightsError(f"{key}={path!r}: hf:// addresses need huggingface_hub; install the extra: "
                           "pip install 'pae_fast[hub]'") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(
        huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        local = huggingface_hub.hf_hub_download(f"{org}/{name}", filename, revision=revision or None,
                                                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                                local_files_only=offline)
    except LocalEntryNotFoundError:
        where = os.environ.get("HF_HUB_CACHE") or huggingface_hub.constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set and it is not" if offline else "it could not be downloaded and is not"
        raise WeightsError(f"{key}={path!r}: {why} in the Hugging Face cache {where}") from None
    except Exception as e:  # RepositoryNotFoundError, EntryNotFoundError, HTTP errors: one line, the cause kept
        raise WeightsError(f"{key}={path!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return Path(local)


def resolve_weights_file(path: str | os.PathLike, prefer_ema: bool = True, key: str = "weights") -> Path:
    """The weights file behind ``path``.

    Args:
        path: a weights file; a checkpoint folder written by the engine (``ema.safetensors`` / ``model.safetensors``
            beside its manifest); a run folder (its newest checkpoint that validates); or a hub file
            ``hf://<org>/<name>/<path-in-repo>`` (:func:`resolve_hub_file`).
        prefer_ema: in a checkpoint folder, take ``ema.safetensors`` before ``model.safetensors``.
        key: the config key or argument named in error messages (e.g. ``"sample.checkpoint"``).

    Raises:
        WeightsError: nothing usable at ``path``; the message names ``key``, the path and what was expected.
    """
    from pae_fast.engine.checkpoint import MANIFEST, checkpoint_root, latest_checkpoint, validate_checkpoint

    if isinstance(path, str) and path.startswith(HUB_SCHEME):
        return resolve_hub_file(path, key)
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


def is_release_folder(path: str | os.PathLike) -> bool:
    """A folder of released files (weights at its top level) that is neither an engine checkpoint folder nor a run
    folder: those resolve to one weights file (:func:`resolve_weights_file`)."""
    from pae_fast.engine.checkpoint import MANIFEST, list_checkpoints

    if isinstance(path, str) and path.startswith(HUB_SCHEME):
        return False
    p = Path(path)
    if not p.is_dir() or (p / MANIFEST).is_file() or list_checkpoints(p):
        return False
    return any(f.is_file() and f.suffix in (".safetensors", *TORCH_SUFFIXES) for f in p.iterdir())


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
            why = str(e)
            if "Unsupported global" in why:  # torch's advice to load it unsafely is left out of the one line
                found = why.split("Unsupported global: ", 1)[1].split(" was not", 1)[0]
                why = f"it holds pickled objects ({found}); only tensors and primitives are read"
            raise WeightsError(f"{key}: {file} cannot be read as a tensors-only torch file "
                               f"(weights_only=True): {why}") from e
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
    check_finite(state, f"{key}: {file}")
    return strip_prefixes(state, prefixes), dict(meta)


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN/Inf (a diverged or damaged file loads, then silently gives NaN outputs).

    Raises:
        WeightsError: naming ``where``, the first bad tensor and how many values are non-finite (exit code 3).
    """
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise WeightsError(f"{where} holds NaN/Inf weights: {bad} of {t.numel()} values of {name!r} are not "
                                   "finite; use an earlier checkpoint")


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


def read_shapes(
    path: str | os.PathLike, prefer: tuple[str, ...] = ("ema", "model"), key: str = "weights"
) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of one weights file without reading its tensors (safetensors header; a torch file is
    memory-mapped, ``weights_only=True``); a ``{"ema"|"model": ...}`` checkpoint gives the first of ``prefer``;
    wrapper prefixes are stripped as in :func:`read_state_dict`."""
    file = resolve_weights_file(path, prefer_ema=bool(prefer) and prefer[0] == "ema", key=key)
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return strip_prefixes({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{key}: {file} cannot be read as a weights file: {e}") from e
    if isinstance(obj, dict):
        for name in prefer:
            if isinstance(obj.get(name), dict):
                obj = obj[name]
                break
        return strip_prefixes({str(k): tuple(v.shape) if isinstance(v, torch.Tensor) else () for k, v in obj.items()})
    raise WeightsError(f"{key}: {file} holds {type(obj).__name__}, not a state dict")


def read_latent_stats(path: str | os.PathLike, key: str = "latent_stats", eps: float | None = None) -> Any:
    """Latent statistics from a file, as :class:`~pae_fast.data.latent_stats.LatentStats`.

    Layouts: ours (``stats.safetensors``: ``mean`` / ``std`` + metadata, :meth:`LatentStats.save`), and RAE's
    ``stat.pt`` (``{"mean": (C, H, W), "var": (C, H, W)}``, torch, ``weights_only=True``): RAE standardises with
    ``(z - mean) / sqrt(var + 1e-5)`` (docs/method.md § RAE checkpoints), so ``std = sqrt(var + eps)``, eps 1e-5 unless
    given; mode ``"chw"`` for a 3-D mean, ``"channel"`` for a 1-D one.

    Raises:
        WeightsError: missing, unsafe or foreign file; the message names ``key`` and the file.
    """
    from pae_fast.data.latent_stats import DEFAULT_EPS, LatentStats

    file = resolve_weights_file(path, key=key)
    if file.suffix == ".safetensors":
        try:
            return LatentStats.load(file)
        except (ValueError, FileNotFoundError) as e:
            raise WeightsError(f"{key}: {e}") from e
    state, _ = read_state_dict(file, prefer=(), key=key)
    if "mean" not in state or not ({"var", "std"} & set(state)):
        raise WeightsError(f"{key}: {file} holds no latent statistics (expected tensors 'mean' and 'var' (RAE's "
                           f"stat.pt) or 'mean' and 'std', found {sorted(state)[:8]})")
    mean = state["mean"].float()
    mode = "chw" if mean.dim() == 3 else "channel"
    try:
        if "var" in state:
            return LatentStats.from_variance(mode, mean, state["var"].float(), DEFAULT_EPS if eps is None else eps)
        return LatentStats(mode, mean, state["std"].float())
    except ValueError as e:
        raise WeightsError(f"{key}: {file}: {e}") from e


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
