"""Shared CLI plumbing: ``--config`` presets, dotted overrides, ``--dry-run``, resolved config per run."""

from __future__ import annotations

import argparse
from pathlib import Path

from pae_fast.config import (
    Config,
    ConfigError,
    dump_yaml,
    list_presets,
    load_config,
    parse_override_args,
    preset_path,
    save_resolved,
)
from pae_fast.config_checks import check_command_devices

__all__ = ["add_config_arguments", "resolve_config", "preset_path", "list_presets", "no_extra"]


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML preset: a path, or the name of a bundled preset (see `python -m pae_fast info --presets`)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")


def resolve_config(args: argparse.Namespace, extra: list[str]) -> Config | None:
    """Load ``--config`` (its ``base:`` chain merged) with the overrides in ``extra``; on ``--dry-run`` print the
    merged, resolved config and return None."""
    path = preset_path(args.config) if getattr(args, "config", None) else None
    cfg = load_config(path, parse_override_args(extra))
    if getattr(args, "dry_run", False):
        print(dump_yaml(cfg), end="")
        if getattr(args, "command", None) == "sample":  # the grid and model calls the sample section asks for
            from pae_fast.flow.grid import plan_from_config

            try:
                print(f"# sampling plan: {plan_from_config(cfg.sample).describe()}")
            except ValueError as e:
                raise ConfigError(str(e)) from e
        return None
    command = getattr(getattr(args, "_command", None), "__name__", "").rsplit(".", 1)[-1].replace("_", "-")
    check_command_devices(cfg, command)  # the device this command runs on must exist, before anything is written
    return cfg


def write_run_config(cfg: Config, out_dir: str | Path | None = None) -> Path:
    """Write the resolved config to the run folder (``cfg.out_dir`` by default)."""
    return save_resolved(cfg, out_dir if out_dir is not None else cfg.out_dir)


def no_extra(extra: list[str], command: str) -> None:
    if extra:
        raise ConfigError(f"`{command}` takes no config overrides; unexpected arguments: {' '.join(extra)}")
