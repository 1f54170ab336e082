"""The machinery behind :mod:`pae_fast.config`: typed dataclasses from YAML with checked keys and types, preset
inheritance (``base:``), dotted command-line overrides and atomic writes of the resolved config.

Nothing here knows the run's sections; :mod:`pae_fast.config` defines them and re-exports these functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pae_fast.errors import ConfigError
from pae_fast.io import atomic_write_text

__all__ = [
    "ConfigError",
    "BASE_KEY",
    "config_from_dict",
    "merge_config_data",
    "config_to_dict",
    "dump_yaml",
    "list_presets",
    "preset_path",
    "read_preset",
    "apply_overrides",
    "parse_override_args",
    "save_resolved",
]


# ----------------------------------------------------------------------------------------------------------------
# Type checking and coercion
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {len(value)}: {value!r}")
        elem_types = [args[0]] * len(value) if (not args or args[-1] is Ellipsis or origin is list) else list(args)
        out = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, elem_types))] if args else list(value)
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}.{hint} Valid keys here: {', '.join(sorted(valid))}")


def _from_dict(cls: type, data: dict, prefix: str = "", where: str = "") -> Any:
    fields = _fields(cls)
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise _unknown_key(full, list(fields), where)
        kwargs[k] = _coerce(v, fields[k], full) if not dataclasses.is_dataclass(fields[k]) else _from_dict(
            fields[k], v if isinstance(v, dict) else _not_mapping(full, v), full, where
        )
    return cls(**kwargs)


def _not_mapping(key: str, v: Any) -> dict:
    raise ConfigError(f"{key}: expected a mapping (a config section), got {v!r}")


def config_from_dict(data: dict, cls: type, where: str = "") -> Any:
    """Build a typed config of dataclass ``cls`` from a plain dict, checking every key and type; a ``finalize()``
    method of the result (conversions done once at load) is called."""
    if not isinstance(data, dict):
        raise ConfigError(f"config{where} must be a mapping at the top level, got {type(data).__name__}")
    cfg = _from_dict(cls, data, "", where)
    if callable(getattr(cfg, "finalize", None)):
        cfg.finalize()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# Presets (with ``base:`` inheritance), overrides and files
# ----------------------------------------------------------------------------------------------------------------

BASE_KEY = "base"


def list_presets() -> list[str]:
    """Names of the bundled presets (``pae_fast.configs``)."""
    try:
        root = resources.files("pae_fast.configs")
    except ModuleNotFoundError:
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config path: an existing file (also relative to ``relative_to``, the folder of the preset naming it), or a
    bundled preset by name (``tiny_cpu`` or ``tiny_cpu.yaml``)."""
    p = Path(name)
    if relative_to is not None and not p.is_absolute():
        for candidate in (relative_to / p, relative_to / f"{p}.yaml"):
            if candidate.is_file():
                return candidate
    if p.is_file():
        return p
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    try:
        bundled = resources.files("pae_fast.configs") / f"{stem}.yaml"
        if bundled.is_file():
            return Path(str(bundled))
    except ModuleNotFoundError:
        pass
    raise ConfigError(f"config {str(name)!r} is neither a file nor a bundled preset; presets: "
                      f"{', '.join(list_presets())}")


def merge_config_data(base: dict, over: dict) -> dict:
    """Preset data ``over`` laid onto ``base`` (sections merge key by key, values replace), e.g. a variant preset
    applied on top of another."""
    return _merge(base, over)


def _merge(base: dict, over: dict) -> dict:
    """``over`` laid onto ``base``: sections merge key by key, values replace."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_preset(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """The plain dict of a YAML preset with its ``base:`` chain merged in (the base first, this file on top).

    ``base`` names a preset (``pae_lightningdit_xl1_80ep``) or a path (relative to this file's folder first).
    Chains are allowed; a cycle is a :class:`ConfigError` listing it.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    key = p.resolve()
    if key in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, key))
        raise ConfigError(f"config {p}: the base: chain is a cycle ({cycle})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config in {p} must be a mapping at the top level, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{BASE_KEY}: in {p} must name a preset or a path, got {base!r}")
    return _merge(read_preset(preset_path(base, relative_to=p.parent), (*_chain, key)), data)



def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted keys set (``{"train.steps": 20}``), each checked and coerced."""
    data = config_to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        cls: Any = type(cfg)
        for i, part in enumerate(parts):
            fields = _fields(cls)
            if part not in fields:
                raise _unknown_key(".".join(parts[: i + 1]), list(fields), " (command-line override)")
            tp = fields[part]
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key!r}")
                node = node[part]
                cls = tp
            else:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{key} is a section; set one of its keys: {', '.join(_fields(tp))}")
                node[part] = config_to_dict(_coerce(value, tp, key))
    return config_from_dict(data, type(cfg))


def parse_override_args(argv: list[str]) -> dict[str, Any]:
    """Parse ``--a.b value`` / ``--a.b=value`` pairs; values are YAML scalars or lists (``[1, 2]``)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --section.key value")
        body = tok[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {tok} has no value")
            key, raw = body, argv[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


def save_resolved(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``out_dir/name`` atomically (temp file, fsync, rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    atomic_write_text(target, dump_yaml(cfg))
    return target
